//! Shadow doorbells and event indexes.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use crate::nvme::queue::Command;
use crate::nvme::testdriver::{pattern, rw, wait_until, Ring, TestDriver};
use crate::nvme::Status;
use crate::pci::PciBackend;

fn shadowed(ring: Ring) -> (TestDriver, Arc<Mutex<Vec<bool>>>) {
    let mut d = TestDriver::new(|_| {});
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = events.clone();
    d.nvme
        .set_on_shadow_doorbells(Box::new(move |on| e.lock().unwrap().push(on)));
    d.enable();
    assert!(!d.nvme.shadow_doorbells_active());
    d.enable_shadow();
    assert!(d.nvme.shadow_doorbells_active());
    d.create_io_queue(1, 32);
    d.ring = ring;
    (d, events)
}

#[test]
fn io_through_the_eventfd_only() {
    let (mut d, events) = shadowed(Ring::IoEventFd);
    assert_eq!(*events.lock().unwrap(), [true]);
    let mmio_before = d.nvme.stats().doorbell_writes;
    for i in 0..20u8 {
        let data = pattern(4096, i);
        assert_eq!(d.write_blocks(1, u64::from(i) * 8, &data), Status::SUCCESS);
        assert_eq!(
            d.read_blocks(1, u64::from(i) * 8, 4096),
            (Status::SUCCESS, data)
        );
    }
    assert_eq!(
        d.nvme.stats().doorbell_writes,
        mmio_before,
        "no I/O doorbell reached MMIO"
    );
}

#[test]
fn idle_device_sets_event_indexes_and_sleeps() {
    let (mut d, _) = shadowed(Ring::IoEventFd);
    let buf = d.alloc(1);
    assert_eq!(d.submit(1, rw(0x02, 0, 1, buf, 0)).status, Status::SUCCESS);
    // Once idle, the SQ event index is the tail the device saw, and the CQ's is the head it
    // saw minus one ("never": nothing waits for room). The device may have gone to sleep
    // before or after seeing the driver's head update (which needed no ring).
    wait_until("SQ event index", || d.event_idx(1, false) == 1);
    std::thread::sleep(Duration::from_millis(5));
    let cq_ev = d.event_idx(1, true);
    assert!(cq_ev == 0 || cq_ev == 0xffff, "CQ event index {cq_ev:#x}");

    // The device sleeps: a shadow update without a ring is not seen...
    let commands = d.nvme.stats().commands;
    let (shadow, _) = d.dbbuf.unwrap();
    d.push(1, rw(0x02, 0, 1, buf, 0));
    d.mem
        .store(2u32, GuestAddress(shadow + 8), Ordering::Release)
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.nvme.stats().commands, commands, "no polling while asleep");
    // ...and the event index asks for exactly this ring.
    assert!(crate::nvme::shadow::need_event(
        d.event_idx(1, false) as u16,
        2,
        1
    ));
    d.nvme.doorbell_eventfd().write(1).unwrap();
    assert_eq!(d.reap(1).status, Status::SUCCESS);
}

#[test]
fn rings_are_suppressed_when_the_event_index_is_behind() {
    let (mut d, _) = shadowed(Ring::IoEventFd);
    let buf = d.alloc(1);
    assert_eq!(d.submit(1, rw(0x02, 0, 1, buf, 0)).status, Status::SUCCESS);
    wait_until("SQ event index", || d.event_idx(1, false) == 1);
    // Twenty submissions in one go past an index of 1: exactly one ring.
    let rings = d.io_rings;
    let mut cids = Vec::new();
    for _ in 0..20 {
        let old = d.sq_tail(1);
        cids.push(d.push(1, rw(0x02, 0, 1, buf, 0)));
        // Shadow updated per command, as a driver submitting one at a time would; the device
        // may or may not have re-armed in between, so at most one ring per command.
        d.ring_sq(1, old);
    }
    let ring_count = d.io_rings - rings;
    assert!((1..=20).contains(&ring_count));
    for cid in cids {
        assert_eq!(d.reap(1).cid, cid);
    }
    // CQ head updates never needed a ring: nothing was held back.
    assert!(d.io_rings - rings == ring_count);
}

#[test]
fn batch_submission_rings_once() {
    let (mut d, _) = shadowed(Ring::IoEventFd);
    let buf = d.alloc(1);
    assert_eq!(d.submit(1, rw(0x02, 0, 1, buf, 0)).status, Status::SUCCESS);
    wait_until("SQ event index", || d.event_idx(1, false) == 1);
    let rings = d.io_rings;
    let old = d.sq_tail(1);
    for _ in 0..10 {
        d.push(1, rw(0x02, 0, 1, buf, 0));
    }
    d.ring_sq(1, old);
    assert_eq!(d.io_rings - rings, 1);
    for _ in 0..10 {
        assert_eq!(d.reap(1).status, Status::SUCCESS);
    }
    assert_eq!(d.io_rings - rings, 1, "CQ head updates did not ring");
}

#[test]
fn full_cq_asks_for_the_head_then_resumes() {
    let mut d = TestDriver::new(|_| {});
    d.enable();
    d.enable_shadow();
    d.create_io_queue(1, 4);
    d.ring = Ring::IoEventFd;
    let buf = d.alloc(1);
    let old = d.sq_tail(1);
    for _ in 0..3 {
        d.push(1, rw(0x02, 0, 1, buf, 0));
    }
    d.ring_sq(1, old);
    wait_until("CQ full", || d.nvme.stats().completions >= 6);
    let old = d.sq_tail(1);
    d.push(1, rw(0x02, 0, 1, buf, 0));
    d.ring_sq(1, old);
    // Held back: once idle, the device asks to hear about the CQ head (event index = the
    // head it saw, 0), where an unblocked CQ says "never" (head - 1).
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(d.nvme.stats().commands, 6);
    assert_eq!(d.event_idx(1, true), 0);
    let rings = d.io_rings;
    for _ in 0..4 {
        assert_eq!(d.reap(1).status, Status::SUCCESS);
    }
    assert!(d.io_rings > rings, "the head update rang");
}

#[test]
fn reset_turns_shadow_doorbells_off() {
    let (mut d, events) = shadowed(Ring::Mmio);
    d.disable();
    assert!(!d.nvme.shadow_doorbells_active());
    assert_eq!(*events.lock().unwrap(), [true, false]);
    d.enable();
    d.enable_shadow();
    d.nvme.reset();
    assert!(!d.nvme.shadow_doorbells_active());
    assert_eq!(*events.lock().unwrap(), [true, false, true, false]);
}

#[test]
fn doorbell_buffer_config_errors() {
    let mut d = TestDriver::new(|_| {});
    d.enable();
    let p = d.alloc(2);
    for (prp1, prp2) in [(p + 8, p + 0x1000), (p, p), (p, 1 << 40), (1 << 40, p)] {
        let c = d.admin(Command {
            opcode: 0x7c,
            prp1,
            prp2,
            ..Command::default()
        });
        assert_eq!(c.status, Status::INVALID_FIELD, "{prp1:#x} {prp2:#x}");
    }
    assert!(!d.nvme.shadow_doorbells_active());
}

#[test]
fn bad_shadow_tail_is_ignored_and_counted() {
    let (mut d, _) = shadowed(Ring::IoEventFd);
    let (shadow, _) = d.dbbuf.unwrap();
    let before = d.nvme.stats().invalid_doorbells;
    d.mem
        .store(1000u32, GuestAddress(shadow + 8), Ordering::Release)
        .unwrap();
    d.nvme.doorbell_eventfd().write(1).unwrap();
    wait_until("counted", || d.nvme.stats().invalid_doorbells == before + 1);
    // Put the shadow back in step with the driver and carry on.
    d.mem
        .store(0u32, GuestAddress(shadow + 8), Ordering::Release)
        .unwrap();
    let buf = d.alloc(1);
    assert_eq!(d.submit(1, rw(0x02, 0, 1, buf, 0)).status, Status::SUCCESS);
}

#[test]
fn an_interrupt_wakes_the_domain_after_completions() {
    let (mut d, _) = shadowed(Ring::IoEventFd);
    d.enable_interrupts();
    let before = d.wakes.count();
    let buf = d.alloc(1);
    assert_eq!(d.submit(1, rw(0x02, 0, 1, buf, 0)).status, Status::SUCCESS);
    wait_until("woken", || d.wakes.count() > before);
}

#[test]
fn mmio_doorbells_still_work_with_shadow_active() {
    let (mut d, _) = shadowed(Ring::Mmio);
    let data = pattern(8192, 3);
    assert_eq!(d.write_blocks(1, 0, &data), Status::SUCCESS);
    assert_eq!(d.read_blocks(1, 0, 8192), (Status::SUCCESS, data));
    d.nvme.set_bus_master(true);
}
