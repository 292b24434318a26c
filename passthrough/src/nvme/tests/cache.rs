//! The volatile write cache: durable after Flush, lost by a reset before it.

use crate::nvme::queue::Command;
use crate::nvme::testdriver::{flush, pattern, TestDriver};
use crate::nvme::Status;
use crate::pci::PciBackend;

#[test]
fn controller_reset_drops_unflushed_writes_and_keeps_flushed_ones() {
    let mut d = TestDriver::new(|c| c.volatile_write_cache = true);
    d.enable();
    d.create_io_queue(1, 16);
    let kept = pattern(4096, 7);
    let lost = pattern(4096, 8);
    assert_eq!(d.write_blocks(1, 0, &kept), Status::SUCCESS);
    assert_eq!(flush(&mut d), Status::SUCCESS);
    assert_eq!(d.write_blocks(1, 64, &lost), Status::SUCCESS);
    // Reads see the cache; the file does not have it yet.
    assert_eq!(d.read_blocks(1, 64, 4096), (Status::SUCCESS, lost.clone()));
    assert_eq!(d.nvme.cached_blocks(), 8);
    let file = std::fs::read(&d.path.0).unwrap();
    assert!(file[64 * 512..64 * 512 + 4096].iter().all(|&b| b == 0));

    d.disable();
    assert_eq!(d.nvme.stats().dropped_cached_writes, 8);
    d.enable();
    d.create_io_queue(1, 16);
    assert_eq!(d.read_blocks(1, 0, 4096), (Status::SUCCESS, kept));
    assert_eq!(
        d.read_blocks(1, 64, 4096),
        (Status::SUCCESS, vec![0u8; 4096])
    );
}

#[test]
fn function_reset_drops_unflushed_writes() {
    let mut d = TestDriver::new(|c| c.volatile_write_cache = true);
    d.enable();
    d.create_io_queue(1, 16);
    assert_eq!(d.write_blocks(1, 3, &pattern(512, 9)), Status::SUCCESS);
    d.nvme.reset();
    assert_eq!(d.nvme.stats().dropped_cached_writes, 1);
    assert_eq!(d.read32(0x1c), 0);
    assert_eq!(d.read32(0x24), 0, "AQA back to its power-on value");
}

#[test]
fn flushed_data_survives_a_new_controller_on_the_same_file() {
    let mut d = TestDriver::new(|c| c.volatile_write_cache = true);
    d.enable();
    d.create_io_queue(1, 16);
    let data = pattern(2048, 10);
    assert_eq!(d.write_blocks(1, 40, &data), Status::SUCCESS);
    assert_eq!(flush(&mut d), Status::SUCCESS);
    assert_eq!(d.write_blocks(1, 50, &data), Status::SUCCESS);
    let mut d = reopened(d);
    assert_eq!(d.read_blocks(1, 40, 2048), (Status::SUCCESS, data));
    assert_eq!(
        d.read_blocks(1, 50, 2048),
        (Status::SUCCESS, vec![0u8; 2048])
    );
}

#[test]
fn disabling_the_cache_writes_it_back_and_fua_is_durable() {
    let mut d = TestDriver::new(|c| c.volatile_write_cache = true);
    d.enable();
    d.create_io_queue(1, 16);
    assert_eq!(d.write_blocks(1, 0, &pattern(512, 11)), Status::SUCCESS);
    let off = d.admin(Command {
        opcode: 0x09,
        cdw: [0x06, 0, 0, 0, 0, 0],
        ..Command::default()
    });
    assert_eq!(off.status, Status::SUCCESS);
    assert_eq!(d.nvme.cached_blocks(), 0);
    assert_eq!(d.write_blocks(1, 1, &pattern(512, 12)), Status::SUCCESS);
    assert_eq!(d.nvme.cached_blocks(), 0, "written through while disabled");
    // Back on, a FUA write bypasses the cache.
    let on = d.admin(Command {
        opcode: 0x09,
        cdw: [0x06, 1, 0, 0, 0, 0],
        ..Command::default()
    });
    assert_eq!(on.status, Status::SUCCESS);
    let buf = d.alloc(1);
    let mut w = crate::nvme::testdriver::rw(0x01, 2, 1, buf, 0);
    w.cdw[2] |= 1 << 30;
    assert_eq!(d.submit(1, w).status, Status::SUCCESS);
    assert_eq!(d.nvme.cached_blocks(), 0);
    d.nvme.reset();
    assert_eq!(d.nvme.stats().dropped_cached_writes, 0);
}

/// The normal shutdown notification (CC.SHN = 01b, the rest of CC kept), as a driver gives it
/// before the device is reset: the cache is on the file once CSTS.SHST reads 10b, so the reset
/// that follows drops nothing, and a controller on the same file reads every write back.
#[test]
fn a_shutdown_notification_writes_the_cache_back_before_the_reset() {
    let mut d = TestDriver::new(|c| c.volatile_write_cache = true);
    d.enable();
    d.create_io_queue(1, 16);
    let data = pattern(8192, 13);
    assert_eq!(d.write_blocks(1, 16, &data), Status::SUCCESS);
    assert_eq!(d.nvme.cached_blocks(), 16);
    let cc = d.read32(0x14);
    d.write32(0x14, cc | (0b01 << 14));
    assert_eq!(d.read32(0x1c) & 0xc, 0x8, "CSTS.SHST = 10b: complete");
    assert_eq!(
        d.read32(0x1c) & 1,
        1,
        "still ready until the host resets it"
    );
    assert_eq!(d.nvme.cached_blocks(), 0);
    let file = std::fs::read(&d.path.0).unwrap();
    assert_eq!(&file[16 * 512..16 * 512 + 8192], &data[..], "on the file");
    d.nvme.reset();
    assert_eq!(d.nvme.stats().dropped_cached_writes, 0);
    assert_eq!(d.read32(0x1c), 0, "the reset clears SHST");
    let mut d = reopened(d);
    assert_eq!(d.read_blocks(1, 16, 8192), (Status::SUCCESS, data));
}

/// A new controller on the same backing file as `d`'s (dropped first), enabled, with I/O queue
/// 1 of 16 entries.
fn reopened(d: TestDriver) -> TestDriver {
    let TestDriver {
        nvme, path, cfg, ..
    } = d;
    drop(nvme);
    let mut d = TestDriver::with_path(path, cfg);
    d.enable();
    d.create_io_queue(1, 16);
    d
}
