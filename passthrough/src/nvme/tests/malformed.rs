//! Hostile commands and doorbells get the status a real controller gives, or are ignored and
//! counted.

use vm_memory::{Bytes, GuestAddress};

use crate::nvme::queue::Command;
use crate::nvme::regs::DOORBELL_BASE;
use crate::nvme::testdriver::{rw, wait_until, TestDriver, MEM_SIZE, NS_SIZE};
use crate::nvme::Status;

fn ready() -> TestDriver {
    let mut d = TestDriver::new(|_| {});
    d.enable();
    d.create_io_queue(1, 32);
    d
}

#[test]
fn unknown_opcodes() {
    let mut d = ready();
    let c = d.admin(Command {
        opcode: 0x7f,
        ..Command::default()
    });
    assert_eq!(c.status, Status::INVALID_OPCODE);
    let c = d.submit(
        1,
        Command {
            opcode: 0x7f,
            nsid: 1,
            ..Command::default()
        },
    );
    assert_eq!(c.status, Status::INVALID_OPCODE);
    // SGLs and fused operations are not supported.
    let buf = d.alloc(1);
    let mut sgl = rw(0x02, 0, 1, buf, 0);
    sgl.psdt = 1;
    assert_eq!(d.submit(1, sgl).status, Status::INVALID_FIELD);
}

#[test]
fn prp_outside_the_domain_is_a_data_transfer_error() {
    let mut d = ready();
    let buf = d.alloc(1);
    let before = d.nvme.dma_errors();
    let cases = [
        rw(0x02, 0, 1, MEM_SIZE, 0),
        rw(0x01, 0, 1, u64::MAX - 0xfff, 0),
        rw(0x02, 0, 16, buf, MEM_SIZE),
        // A PRP list outside the domain.
        rw(0x02, 0, 24, buf, MEM_SIZE + 0x1000),
    ];
    for cmd in cases {
        assert_eq!(
            d.submit(1, cmd).status,
            Status::DATA_TRANSFER_ERROR,
            "{cmd:?}"
        );
    }
    // A list inside the domain whose entry points outside.
    let list = d.alloc(1);
    d.mem.write_obj(MEM_SIZE, GuestAddress(list)).unwrap();
    d.mem.write_obj(buf, GuestAddress(list + 8)).unwrap();
    assert_eq!(
        d.submit(1, rw(0x02, 0, 24, buf, list)).status,
        Status::DATA_TRANSFER_ERROR
    );
    assert_eq!(d.nvme.dma_errors() - before, 5);
    // Nothing was written outside, nothing leaked: the next command works.
    assert_eq!(d.submit(1, rw(0x02, 0, 1, buf, 0)).status, Status::SUCCESS);
}

#[test]
fn misaligned_prps() {
    let mut d = ready();
    let buf = d.alloc(4);
    let list = d.alloc(1);
    d.mem.write_obj(buf + 0x1000, GuestAddress(list)).unwrap();
    d.mem
        .write_obj(buf + 0x2008, GuestAddress(list + 8))
        .unwrap();
    let cases = [
        // A list entry that is not page aligned.
        rw(0x02, 0, 24, buf, list),
        // PRP2 as a data pointer with an offset.
        rw(0x02, 0, 16, buf, buf + 0x1200),
        // A list pointer that is not qword aligned.
        rw(0x02, 0, 24, buf, list + 4),
        // PRP1 not dword aligned.
        rw(0x02, 0, 1, buf + 2, 0),
    ];
    for cmd in cases {
        assert_eq!(
            d.submit(1, cmd).status,
            Status::PRP_OFFSET_INVALID,
            "{cmd:?}"
        );
    }
}

#[test]
fn lba_range_namespace_and_transfer_size() {
    let mut d = ready();
    let buf = d.alloc(1);
    let blocks = NS_SIZE / 512;
    let cases = [
        (rw(0x02, blocks, 1, buf, 0), Status::LBA_OUT_OF_RANGE),
        (rw(0x01, blocks - 1, 2, buf, 0), Status::LBA_OUT_OF_RANGE),
        (rw(0x02, u64::MAX, 1, buf, 0), Status::LBA_OUT_OF_RANGE),
        (
            Command {
                opcode: 0x08,
                nsid: 1,
                cdw: [(blocks - 1) as u32, 0, 1, 0, 0, 0],
                ..Command::default()
            },
            Status::LBA_OUT_OF_RANGE,
        ),
        (
            Command {
                nsid: 2,
                ..rw(0x02, 0, 1, buf, 0)
            },
            Status::INVALID_NAMESPACE,
        ),
        (
            Command {
                opcode: 0x00,
                nsid: 0,
                ..Command::default()
            },
            Status::INVALID_NAMESPACE,
        ),
        // 128 KiB + 512 bytes: over MDTS.
        (rw(0x02, 0, 257, buf, 0), Status::INVALID_FIELD),
    ];
    for (cmd, want) in cases {
        assert_eq!(d.submit(1, cmd).status, want, "{cmd:?}");
    }
    assert_eq!(
        d.submit(1, rw(0x02, blocks - 1, 1, buf, 0)).status,
        Status::SUCCESS
    );
}

#[test]
fn doorbells_for_missing_queues_or_beyond_the_queue_are_ignored_and_counted() {
    let mut d = ready();
    let base = d.nvme.stats().invalid_doorbells;
    let commands = d.nvme.stats().commands;
    // QID 3 exists in range but was never created; QID 9 is beyond the controller.
    d.write32(DOORBELL_BASE + 8 * 3, 1);
    d.write32(DOORBELL_BASE + 8 * 9, 1);
    // Tail beyond a 32-entry queue, and a value over 16 bits.
    d.write32(DOORBELL_BASE + 8, 40);
    d.write32(DOORBELL_BASE + 8, 0x1_0000);
    // A CQ head the controller never posted up to.
    d.write32(DOORBELL_BASE + 8 + 4, 5);
    // A 2-byte doorbell write.
    d.nvme_bar_write(DOORBELL_BASE + 8, &[1, 0]);
    wait_until("six invalid doorbells", || {
        d.nvme.stats().invalid_doorbells - base == 6
    });
    assert_eq!(d.nvme.stats().commands, commands, "nothing was fetched");
    // The queue still works.
    let buf = d.alloc(1);
    assert_eq!(d.submit(1, rw(0x02, 0, 1, buf, 0)).status, Status::SUCCESS);
}

#[test]
fn garbage_submission_entries_never_hurt_the_controller() {
    let mut d = ready();
    // Fill the I/O queue with pseudo-random entries.
    let mut x = 0x1234_5678_9abc_def0u64;
    for _ in 0..31 {
        let mut raw = [0u8; 64];
        for b in raw.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let mut cmd = Command::parse(&raw);
        // Keep namespace 1 half the time so the I/O paths are reached.
        if x & 1 == 0 {
            cmd.nsid = 1;
        }
        let old = d.sq_tail(1);
        d.push(1, cmd);
        d.ring_sq(1, old);
        let c = d.reap(1);
        assert_eq!(c.sqid, 1);
    }
    assert_eq!(d.read32(0x1c) & 3, 1, "still ready, not fatal");
}

impl TestDriver {
    fn nvme_bar_write(&mut self, off: u64, data: &[u8]) {
        crate::pci::PciBackend::bar_write(&mut self.nvme, 0, off, data);
    }
}
