//! Processing without a worker: trapped doorbells on the writer's thread, shadow doorbells
//! by whoever holds the poller.

use crate::nvme::queue::Command;
use crate::nvme::testdriver::{pattern, rw, Ring, TestDriver};
use crate::nvme::worker::wait_readable as readable;
use crate::nvme::Status;

#[test]
fn a_trapped_doorbell_write_completes_the_command_before_it_returns() {
    let mut d = TestDriver::without_worker();
    d.enable_interrupts();
    d.enable();
    let page = d.alloc(1);
    let old = d.sq_tail(0);
    d.push(
        0,
        Command {
            opcode: 0x06,
            prp1: page,
            cdw: [1, 0, 0, 0, 0, 0],
            ..Command::default()
        },
    );
    d.ring_sq(0, old);
    // No worker and no poller: the completion was posted by the doorbell write itself.
    let cqe = d
        .try_reap(0)
        .expect("completion posted during the doorbell write");
    assert_eq!(cqe.status, Status::SUCCESS);
    assert!(d.wakes.count() > 0, "the domain is told");
    // I/O through trapped doorbells (no shadow doorbells) works the same way.
    d.create_io_queue(1, 16);
    let data = pattern(4096, 7);
    assert_eq!(d.write_blocks(1, 16, &data), Status::SUCCESS);
    assert_eq!(d.read_blocks(1, 16, 4096), (Status::SUCCESS, data));
}

/// A controller served by a poller only, its driver using shadow doorbells on I/O queue 1
/// (32 entries) and ringing through the ioeventfd.
fn shadowed_without_worker() -> (TestDriver, crate::nvme::NvmePoller) {
    let mut d = TestDriver::without_worker();
    let poller = d.nvme.poller();
    d.enable();
    d.enable_shadow();
    d.create_io_queue(1, 32);
    d.ring = Ring::IoEventFd;
    (d, poller)
}

#[test]
fn shadow_doorbells_are_served_only_by_the_poller() {
    let (mut d, poller) = shadowed_without_worker();
    // Idle and armed: the driver's next submission must ring (the event index is the tail).
    assert!(!poller.arm(), "nothing pending");
    poller.clear();
    let buf = d.alloc(1);
    let old = d.sq_tail(1);
    d.push(1, rw(0x02, 0, 1, buf, 0));
    d.ring_sq(1, old);
    assert!(
        readable(poller.eventfd(), 1000),
        "the ring reached the eventfd"
    );
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert!(d.try_reap(1).is_none(), "nobody polled, nothing was served");
    assert!(poller.arm(), "arming sees the submitted command");
    assert_eq!(poller.poll(), 1);
    assert_eq!(d.try_reap(1).map(|c| c.status), Some(Status::SUCCESS));
    assert_eq!(poller.poll(), 0, "nothing left");
    poller.clear();
    assert!(!readable(poller.eventfd(), 0), "clear resets the eventfd");
}

/// A driver whose waits run the poller's passes is told that submissions need no doorbell
/// (the SQ's event index is one behind its tail); its completions are still served by the
/// poll. Told otherwise again, the next submission rings.
#[test]
fn a_driver_whose_waits_poll_is_not_asked_to_ring() {
    let (mut d, poller) = shadowed_without_worker();
    poller.set_driver_waits(true);
    for round in 0..3u64 {
        assert!(!poller.arm(), "nothing pending");
        poller.clear();
        let tail = d.sq_tail(1);
        assert_eq!(
            d.event_idx(1, false),
            u32::from(tail.wrapping_sub(1)),
            "the SQ's event index says never"
        );
        let buf = d.alloc(1);
        d.push(1, rw(0x02, round, 1, buf, 0));
        d.ring_sq(1, tail);
        assert!(
            !readable(poller.eventfd(), 0),
            "round {round}: the submission did not ring"
        );
        // The driver's wait runs the pass.
        assert_eq!(poller.poll(), 1, "round {round}");
        assert_eq!(d.try_reap(1).map(|c| c.status), Some(Status::SUCCESS));
        // The pass before the next wait takes the new CQ head.
        assert_eq!(poller.poll(), 0);
    }
    poller.set_driver_waits(false);
    assert!(!poller.arm());
    poller.clear();
    let old = d.sq_tail(1);
    let buf = d.alloc(1);
    d.push(1, rw(0x02, 9, 1, buf, 0));
    d.ring_sq(1, old);
    assert!(readable(poller.eventfd(), 1000), "a polling driver rings");
}

#[test]
fn bus_mastering_back_on_wakes_the_poller() {
    let d = TestDriver::without_worker();
    let poller = d.nvme.poller();
    poller.clear();
    use crate::pci::PciBackend;
    let mut nvme = d.nvme;
    nvme.set_bus_master(false);
    nvme.set_bus_master(true);
    assert!(readable(poller.eventfd(), 0));
}
