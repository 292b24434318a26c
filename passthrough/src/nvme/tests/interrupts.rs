//! Completion interrupts: a completion queue with IEN raises its vector after a pass posts to
//! it, through the function's MSI-X state; without IEN nobody is woken.

use crate::nvme::testdriver::{create_cq_with, pattern, wait_until, TestDriver};
use crate::nvme::Status;

/// Enabled controller with I/O queue 1, its CQ on `vector` (None: IEN = 0).
fn ready(vector: Option<u16>) -> TestDriver {
    let mut d = TestDriver::new(|_| {});
    d.enable();
    d.create_io_queue_with(1, 32, vector);
    d
}

/// Messages sent for `f` (wake-ups seen after it, once the worker has raised them).
fn wakes_for(d: &mut TestDriver, f: impl FnOnce(&mut TestDriver)) -> u64 {
    let before = d.wakes.count();
    f(d);
    // The raise follows the post in the same pass, under the controller lock.
    let _ = d.nvme.cached_blocks();
    d.wakes.count() - before
}

fn write(d: &mut TestDriver) {
    assert_eq!(d.write_blocks(1, 0, &pattern(512, 1)), Status::SUCCESS);
}

#[test]
fn a_queue_without_ien_never_wakes_the_domain() {
    let mut d = ready(None);
    d.enable_interrupts();
    assert_eq!(wakes_for(&mut d, write), 0);
    assert!(!d.msix.pending(1), "nothing raised, nothing pending");
    assert_eq!(d.nvme.stats().interrupts, 0);
}

#[test]
fn ien_with_msix_enabled_and_the_vector_unmasked_wakes_the_domain() {
    let mut d = ready(Some(1));
    d.enable_interrupts();
    assert_eq!(wakes_for(&mut d, write), 1);
    assert_eq!(wakes_for(&mut d, write), 1);
    assert!(d.nvme.stats().interrupts >= 2);
    // Another vector: queue 2 signals vector 3 only.
    d.create_io_queue_with(2, 16, Some(3));
    d.msix.table_write(3 * 16 + 12, &1u32.to_le_bytes());
    let n = wakes_for(&mut d, |d| {
        assert_eq!(d.write_blocks(2, 0, &pattern(512, 2)), Status::SUCCESS)
    });
    assert_eq!(n, 0);
    assert!(d.msix.pending(3) && !d.msix.pending(1));
}

#[test]
fn a_masked_vector_is_left_pending_and_sent_when_unmasked() {
    let mut d = ready(Some(1));
    d.enable_interrupts();
    d.msix.table_write(16 + 12, &1u32.to_le_bytes());
    assert_eq!(wakes_for(&mut d, write), 0);
    assert!(d.msix.pending(1));
    let interrupts = d.nvme.stats().interrupts;
    assert_eq!(wakes_for(&mut d, write), 0);
    assert_eq!(d.nvme.stats().interrupts, interrupts, "pending is not sent");
    let mut pba = [0u8; 8];
    d.msix.pba_read(0, &mut pba);
    assert_eq!(u64::from_le_bytes(pba) & 0b10, 0b10);
    let n = wakes_for(&mut d, |d| d.msix.table_write(16 + 12, &0u32.to_le_bytes()));
    assert_eq!(n, 1, "one message for what was pending");
    assert!(!d.msix.pending(1));
}

#[test]
fn the_function_mask_and_msix_enable_hold_messages_back() {
    let mut d = ready(Some(1));
    d.enable_interrupts();
    d.msix.set_control(true, true);
    assert_eq!(wakes_for(&mut d, write), 0);
    assert!(d.msix.pending(1));
    assert_eq!(wakes_for(&mut d, |d| d.msix.set_control(true, false)), 1);
    d.msix.set_control(false, false);
    assert_eq!(wakes_for(&mut d, write), 0);
    assert!(d.msix.pending(1));
    assert_eq!(wakes_for(&mut d, |d| d.msix.set_control(true, false)), 1);
    assert_eq!(wakes_for(&mut d, write), 1);
}

#[test]
fn the_admin_queue_always_signals_vector_0() {
    let mut d = TestDriver::new(|_| {});
    d.enable_interrupts();
    d.enable();
    let page = d.alloc(1);
    let n = wakes_for(&mut d, |d| {
        let identify = crate::nvme::queue::Command {
            opcode: 0x06,
            prp1: page,
            cdw: [1, 0, 0, 0, 0, 0],
            ..Default::default()
        };
        assert_eq!(d.admin(identify).status, Status::SUCCESS);
    });
    assert_eq!(n, 1);
}

#[test]
fn an_interrupt_vector_the_controller_lacks_is_refused() {
    let mut d = TestDriver::new(|_| {});
    d.enable();
    let vectors = d.msix.layout().vectors;
    assert_eq!(vectors, d.cfg.max_io_queues + 1);
    let base = d.alloc(1);
    let c = d.admin(create_cq_with(1, 16, base, Some(vectors)));
    assert_eq!(c.status, Status::INVALID_INTERRUPT_VECTOR);
    assert_eq!(c.status.field() >> 1 & 0xff, 0x08);
    let c = d.admin(create_cq_with(1, 16, base, Some(vectors - 1)));
    assert_eq!(c.status, Status::SUCCESS);
}

#[test]
fn a_reset_puts_msix_back_to_power_on_and_forgets_what_was_pending() {
    let mut d = ready(Some(1));
    d.enable_interrupts();
    d.msix.table_write(16 + 12, &1u32.to_le_bytes());
    write(&mut d);
    assert!(d.msix.pending(1));
    d.quiesce();
    assert!(!d.msix.enabled() && !d.msix.function_masked());
    assert!(!d.msix.pending(1) && d.msix.masked(1) && d.msix.masked(0));
    let mut entry = [0u8; 8];
    d.msix.table_read(16, &mut entry);
    assert_eq!(entry, [0; 8], "address cleared");
}

#[test]
fn after_quiesce_the_old_domain_is_never_woken() {
    let mut d = ready(Some(1));
    d.enable_interrupts();
    assert_eq!(wakes_for(&mut d, write), 1);
    let old = d.wakes.clone();
    let seen = old.count();
    // Commands still in the queue when the domain dies.
    d.quiesce();
    let mut d = d.reborn();
    d.enable_interrupts();
    d.enable();
    d.create_io_queue_with(1, 32, Some(1));
    assert_eq!(wakes_for(&mut d, write), 1);
    wait_until("the new domain's own wake-ups", || d.wakes.count() >= 2);
    assert_eq!(
        old.count(),
        seen,
        "the old eventfd was written after quiesce"
    );
}
