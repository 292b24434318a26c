//! Registers, enable and disable, shutdown.

use crate::nvme::queue::Command;
use crate::nvme::regs::{cap, MQES};
use crate::nvme::testdriver::{wait_until, TestDriver};
use crate::nvme::{Status, NVME_VERSION};

#[test]
fn cap_and_version_describe_the_controller() {
    let mut d = TestDriver::new(|_| {});
    let c = d.read64(0);
    assert_eq!(c, cap());
    assert_eq!(c & 0xffff, u64::from(MQES));
    assert_eq!((c >> 16) & 1, 1, "CQR");
    assert_eq!((c >> 24) & 0xff, 1, "TO");
    assert_eq!((c >> 32) & 0xf, 0, "DSTRD");
    assert_eq!((c >> 37) & 1, 1, "CSS NVM");
    assert_eq!((c >> 48) & 0xff, 0, "MPSMIN/MAX");
    assert_eq!(d.read32(8), NVME_VERSION);
    // Read-only registers ignore writes, and the writes are counted.
    d.write32(8, 0);
    d.write64(0, 0);
    assert_eq!(d.read32(8), NVME_VERSION);
    assert_eq!(d.nvme.stats().ignored_register_writes, 3);
}

#[test]
fn enable_disable_and_reenable() {
    let mut d = TestDriver::new(|_| {});
    assert_eq!(d.read32(0x1c), 0);
    d.enable();
    // Admin queue registers are frozen while enabled.
    d.write32(0x24, 0);
    assert_eq!(d.read32(0x24), 31 | (31 << 16));
    let c = d.admin(Command {
        opcode: 0x0a,
        cdw: [0x07, 0, 0, 0, 0, 0],
        ..Command::default()
    });
    assert_eq!(c.status, Status::SUCCESS);
    assert_eq!((c.sqid, c.sqhd), (0, 1));
    d.disable();
    assert_eq!(d.read32(0x1c), 0);
    d.enable();
    let c = d.admin(Command {
        opcode: 0x0a,
        cdw: [0x07, 0, 0, 0, 0, 0],
        ..Command::default()
    });
    assert_eq!(c.status, Status::SUCCESS);
    assert_eq!(c.dw0, 3 | (3 << 16));
}

#[test]
fn bad_admin_queue_configuration_is_fatal() {
    let mut d = TestDriver::new(|_| {});
    let sq = d.alloc(1);
    d.write32(0x24, 31 | (31 << 16));
    d.write64(0x28, sq + 0x100);
    d.write64(0x30, sq + 0x1000);
    d.write32(0x14, 1);
    assert_eq!(d.read32(0x1c) & 3, 2, "CFS without RDY");
    d.write32(0x14, 0);
    assert_eq!(d.read32(0x1c), 0);
    // Outside the window.
    d.write64(0x28, 1 << 40);
    d.write64(0x30, sq);
    d.write32(0x14, 1);
    assert_eq!(d.read32(0x1c) & 3, 2);
    d.write32(0x14, 0);
    // A single-entry queue.
    d.write32(0x24, 0);
    d.write64(0x28, sq);
    d.write64(0x30, sq + 0x1000);
    d.write32(0x14, 1);
    assert_eq!(d.read32(0x1c) & 3, 2);
}

#[test]
fn shutdown_notification_completes() {
    let mut d = TestDriver::new(|_| {});
    d.enable();
    d.write32(0x14, 1 | (6 << 16) | (4 << 20) | (1 << 14));
    wait_until("shutdown complete", || d.read32(0x1c) & 0xc == 0x8);
    d.write32(0x14, 0);
    assert_eq!(d.read32(0x1c), 0);
}

#[test]
fn interrupt_mask_registers_are_accepted() {
    let mut d = TestDriver::new(|_| {});
    d.write32(0x0c, 0b101);
    assert_eq!(d.read32(0x0c), 0b101);
    d.write32(0x10, 0b001);
    assert_eq!(d.read32(0x10), 0b100);
}

#[test]
fn drop_stops_and_joins_the_worker() {
    let mut d = TestDriver::new(|_| {});
    d.enable();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(d);
        let _ = tx.send(());
    });
    // Drop joins the worker, so returning at all proves the thread is gone.
    rx.recv_timeout(std::time::Duration::from_secs(5))
        .expect("drop returned after joining the worker");
}
