//! Reads and writes through every PRP shape, Write Zeroes, Dataset Management, Flush.

use vm_memory::{Bytes, GuestAddress};

use crate::nvme::queue::Command;
use crate::nvme::testdriver::{pattern, rw, TestDriver, PAGE};
use crate::nvme::Status;

fn ready(edit: impl FnOnce(&mut crate::nvme::NvmeConfig)) -> TestDriver {
    let mut d = TestDriver::new(edit);
    d.enable();
    d.create_io_queue(1, 32);
    d
}

#[test]
fn write_then_read_prp1_only() {
    let mut d = ready(|_| {});
    let data = pattern(4096, 1);
    assert_eq!(d.write_blocks(1, 8, &data), Status::SUCCESS);
    let (s, back) = d.read_blocks(1, 8, 4096);
    assert_eq!(s, Status::SUCCESS);
    assert_eq!(back, data);
    // PRP1 with an offset inside its page, one block.
    let buf = d.alloc(1);
    let c = d.submit(1, rw(0x02, 8, 1, buf + 0x200, 0));
    assert_eq!(c.status, Status::SUCCESS);
    let mut b = vec![0u8; 512];
    d.mem.read_slice(&mut b, GuestAddress(buf + 0x200)).unwrap();
    assert_eq!(b, data[..512]);
}

#[test]
fn write_then_read_prp1_and_prp2() {
    let mut d = ready(|_| {});
    let data = pattern(8192, 2);
    assert_eq!(d.write_blocks(1, 100, &data), Status::SUCCESS);
    assert_eq!(d.read_blocks(1, 100, 8192), (Status::SUCCESS, data.clone()));
    // Offset PRP1: 4 KiB spanning two non-adjacent pages.
    let (a, b) = (d.alloc(1), d.alloc(2) + PAGE);
    let c = d.submit(1, rw(0x02, 100, 8, a + 0x800, b));
    assert_eq!(c.status, Status::SUCCESS);
    let mut got = vec![0u8; 4096];
    d.mem
        .read_slice(&mut got[..2048], GuestAddress(a + 0x800))
        .unwrap();
    d.mem.read_slice(&mut got[2048..], GuestAddress(b)).unwrap();
    assert_eq!(got, data[..4096]);
}

#[test]
fn write_then_read_with_prp_lists_64k_and_128k() {
    for len in [64 << 10, 128 << 10] {
        let mut d = ready(|_| {});
        let data = pattern(len, 3);
        assert_eq!(d.write_blocks(1, 1000, &data), Status::SUCCESS);
        let (s, back) = d.read_blocks(1, 1000, len);
        assert_eq!(s, Status::SUCCESS);
        assert!(back == data, "{len} bytes read back differently");
        // Data really is in the file.
        let file = std::fs::read(&d.path.0).unwrap();
        assert!(file[1000 * 512..1000 * 512 + len] == data[..]);
    }
}

#[test]
fn scattered_prp_list_pages() {
    let mut d = ready(|c| c.lba_size = 4096);
    let data = pattern(3 * 4096, 4);
    let pages = [d.alloc(1), d.alloc(2) + PAGE, d.alloc(1)];
    for (i, p) in pages.iter().enumerate() {
        d.mem
            .write_slice(&data[i * 4096..(i + 1) * 4096], GuestAddress(*p))
            .unwrap();
    }
    let list = d.alloc(1) + 0x10;
    d.mem.write_obj(pages[1], GuestAddress(list)).unwrap();
    d.mem.write_obj(pages[2], GuestAddress(list + 8)).unwrap();
    let c = d.submit(1, rw(0x01, 5, 3, pages[0], list));
    assert_eq!(c.status, Status::SUCCESS);
    assert_eq!(d.read_blocks(1, 5, 3 * 4096), (Status::SUCCESS, data));
}

#[test]
fn write_zeroes_and_deallocate_read_back_zeroes() {
    let mut d = ready(|_| {});
    let data = pattern(16 * 512, 5);
    assert_eq!(d.write_blocks(1, 0, &data), Status::SUCCESS);
    // Write Zeroes blocks 2..4.
    let wz = Command {
        opcode: 0x08,
        nsid: 1,
        cdw: [2, 0, 1, 0, 0, 0],
        ..Command::default()
    };
    assert_eq!(d.submit(1, wz).status, Status::SUCCESS);
    // Deallocate blocks 8..16 (two ranges) through Dataset Management.
    let ranges = d.alloc(1);
    for (i, (slba, nlb)) in [(8u64, 4u32), (12, 4)].iter().enumerate() {
        let at = ranges + 16 * i as u64;
        d.mem.write_obj(*nlb, GuestAddress(at + 4)).unwrap();
        d.mem.write_obj(*slba, GuestAddress(at + 8)).unwrap();
    }
    let dsm = Command {
        opcode: 0x09,
        nsid: 1,
        prp1: ranges,
        cdw: [1, 1 << 2, 0, 0, 0, 0],
        ..Command::default()
    };
    assert_eq!(d.submit(1, dsm).status, Status::SUCCESS);
    let (s, back) = d.read_blocks(1, 0, 16 * 512);
    assert_eq!(s, Status::SUCCESS);
    let mut want = data.clone();
    want[2 * 512..4 * 512].fill(0);
    want[8 * 512..].fill(0);
    assert!(back == want);
    // A range beyond the namespace fails the whole command.
    d.mem
        .write_obj(u64::MAX - 1, GuestAddress(ranges + 8))
        .unwrap();
    assert_eq!(d.submit(1, dsm).status, Status::LBA_OUT_OF_RANGE);
}

#[test]
fn flush_succeeds_for_namespace_and_broadcast() {
    let mut d = ready(|_| {});
    for nsid in [1, 0xffff_ffff] {
        let c = d.submit(
            1,
            Command {
                opcode: 0x00,
                nsid,
                ..Command::default()
            },
        );
        assert_eq!(c.status, Status::SUCCESS);
    }
}

#[test]
fn completions_wake_the_domain_and_are_counted() {
    let mut d = ready(|_| {});
    d.enable_interrupts();
    let before = d.nvme.stats();
    assert_eq!(d.write_blocks(1, 0, &pattern(512, 6)), Status::SUCCESS);
    let after = d.nvme.stats();
    assert_eq!(after.commands - before.commands, 1);
    assert_eq!(after.completions - before.completions, 1);
    crate::nvme::testdriver::wait_until("a wake for the completion", || d.wakes.count() >= 1);
    assert_eq!(d.nvme.stats().interrupts - before.interrupts, 1);
}

#[test]
fn full_completion_queue_holds_commands_back() {
    let mut d = TestDriver::new(|_| {});
    d.enable();
    d.create_io_queue(1, 4);
    // Three commands fill a 4-entry CQ; the driver does not consume them yet.
    let old = d.sq_tail(1);
    let buf = d.alloc(1);
    for _ in 0..3 {
        d.push(1, rw(0x02, 0, 1, buf, 0));
    }
    d.ring_sq(1, old);
    crate::nvme::testdriver::wait_until("three completions", || d.nvme.stats().completions >= 5);
    // A fourth must wait for room.
    let old = d.sq_tail(1);
    d.push(1, rw(0x02, 0, 1, buf, 0));
    d.ring_sq(1, old);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(d.nvme.stats().commands, 5, "held back while the CQ is full");
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(d.reap(1));
    }
    assert!(seen.iter().all(|c| c.status == Status::SUCCESS));
    assert_eq!(
        seen.iter().map(|c| c.cid).collect::<Vec<_>>(),
        (seen[0].cid..seen[0].cid + 4).collect::<Vec<_>>()
    );
}
