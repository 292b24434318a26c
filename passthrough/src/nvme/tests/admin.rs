//! Identify, queues, features.

use vm_memory::{Bytes, GuestAddress};

use crate::nvme::queue::Command;
use crate::nvme::testdriver::{create_cq, create_sq, TestDriver, NS_SIZE};
use crate::nvme::{Status, NVME_VENDOR_ID, NVME_VERSION};

fn identify(d: &mut TestDriver, cns: u32, nsid: u32) -> (Status, Vec<u8>) {
    let buf = d.alloc(1);
    let c = d.admin(Command {
        opcode: 0x06,
        nsid,
        prp1: buf,
        cdw: [cns, 0, 0, 0, 0, 0],
        ..Command::default()
    });
    let mut page = vec![0u8; 4096];
    d.mem.read_slice(&mut page, GuestAddress(buf)).unwrap();
    (c.status, page)
}

fn u16_at(p: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([p[at], p[at + 1]])
}

fn u32_at(p: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}

#[test]
fn identify_controller() {
    let mut d = TestDriver::new(|c| c.volatile_write_cache = true);
    d.enable();
    let (s, p) = identify(&mut d, 1, 0);
    assert_eq!(s, Status::SUCCESS);
    assert_eq!(u16_at(&p, 0), NVME_VENDOR_ID);
    assert_eq!(&p[4..24], b"DDVM0001            ");
    assert!(p[24..64].starts_with(b"ddvm emulated NVMe "));
    assert_eq!(p[77], 5, "MDTS");
    assert_eq!(u32_at(&p, 80), NVME_VERSION);
    assert_ne!(u16_at(&p, 256) & (1 << 8), 0, "OACS doorbell buffer config");
    assert_eq!(p[512], 0x66);
    assert_eq!(p[513], 0x44);
    assert_eq!(u32_at(&p, 516), 1, "NN");
    assert_eq!(u16_at(&p, 520) & 0b1100, 0b1100, "ONCS write zeroes + DSM");
    assert_eq!(p[525] & 1, 1, "VWC present");

    let mut d = TestDriver::new(|_| {});
    d.enable();
    let (_, p) = identify(&mut d, 1, 0);
    assert_eq!(p[525] & 1, 0, "no VWC");
}

#[test]
fn identify_namespace_and_list() {
    let mut d = TestDriver::new(|c| c.lba_size = 4096);
    d.enable();
    let (s, p) = identify(&mut d, 0, 1);
    assert_eq!(s, Status::SUCCESS);
    let nsze = u64::from_le_bytes(p[0..8].try_into().unwrap());
    assert_eq!(nsze, NS_SIZE / 4096);
    assert_eq!(p[26] & 0xf, 0, "FLBAS");
    assert_eq!((u32_at(&p, 128) >> 16) & 0xff, 12, "LBADS");
    assert_eq!(p[33] & 0x7, 1, "deallocated reads zeroes");
    let (s, p) = identify(&mut d, 2, 0);
    assert_eq!(s, Status::SUCCESS);
    assert_eq!((u32_at(&p, 0), u32_at(&p, 4)), (1, 0));
    let (_, p) = identify(&mut d, 2, 1);
    assert_eq!(u32_at(&p, 0), 0);
    assert_eq!(identify(&mut d, 0, 2).0, Status::INVALID_NAMESPACE);
    assert_eq!(identify(&mut d, 0x55, 0).0, Status::INVALID_FIELD);
}

#[test]
fn create_and_delete_io_queues() {
    let mut d = TestDriver::new(|_| {});
    d.enable();
    d.create_io_queue(1, 64);
    d.create_io_queue(2, 2);
    let cq_in_use = d.admin(Command {
        opcode: 0x04,
        cdw: [1, 0, 0, 0, 0, 0],
        ..Command::default()
    });
    assert_eq!(cq_in_use.status, Status::INVALID_QUEUE_DELETION);
    for (opcode, qid) in [(0x00, 1), (0x04, 1)] {
        let c = d.admin(Command {
            opcode,
            cdw: [qid, 0, 0, 0, 0, 0],
            ..Command::default()
        });
        assert_eq!(c.status, Status::SUCCESS);
    }
    for (opcode, qid) in [(0x00, 1), (0x04, 1), (0x00, 0), (0x04, 0), (0x00, 9)] {
        let c = d.admin(Command {
            opcode,
            cdw: [qid, 0, 0, 0, 0, 0],
            ..Command::default()
        });
        assert_eq!(
            c.status,
            Status::INVALID_QID,
            "delete {opcode:#x} qid {qid}"
        );
    }
}

#[test]
fn create_queue_errors() {
    let mut d = TestDriver::new(|_| {});
    d.enable();
    let base = d.alloc(16);
    let cases = [
        (create_cq(0, 16, base), Status::INVALID_QID),
        (create_cq(5, 16, base), Status::INVALID_QID),
        (create_cq(1, 1, base), Status::INVALID_QUEUE_SIZE),
        (create_cq(1, 2, base + 8), Status::PRP_OFFSET_INVALID),
        (create_cq(1, 16, 1 << 40), Status::INVALID_FIELD),
        (
            Command {
                cdw: [1 | (15 << 16), 0, 0, 0, 0, 0],
                ..create_cq(1, 16, base)
            },
            Status::INVALID_FIELD,
        ),
        (create_sq(1, 16, base, 1), Status::CQ_INVALID),
        (create_sq(1, 16, base, 0), Status::CQ_INVALID),
    ];
    for (cmd, want) in cases {
        assert_eq!(d.admin(cmd).status, want, "{cmd:?}");
    }
    let mut big = create_cq(1, 2, base);
    big.cdw[0] = 1 | (0xffff << 16);
    assert_eq!(d.admin(big).status, Status::INVALID_QUEUE_SIZE);
    assert_eq!(d.admin(create_cq(1, 16, base)).status, Status::SUCCESS);
    assert_eq!(d.admin(create_cq(1, 16, base)).status, Status::INVALID_QID);
    assert_eq!(
        d.admin(create_sq(1, 16, base + 0x1000, 1)).status,
        Status::SUCCESS
    );
}

#[test]
fn features() {
    let mut d = TestDriver::new(|c| c.volatile_write_cache = true);
    d.enable();
    let get = |d: &mut TestDriver, fid: u32| {
        d.admin(Command {
            opcode: 0x0a,
            cdw: [fid, 0, 0, 0, 0, 0],
            ..Command::default()
        })
    };
    let set = |d: &mut TestDriver, fid: u32, v: u32| {
        d.admin(Command {
            opcode: 0x09,
            cdw: [fid, v, 0, 0, 0, 0],
            ..Command::default()
        })
    };
    assert_eq!(get(&mut d, 0x06).dw0, 1, "VWC on by default when present");
    assert_eq!(set(&mut d, 0x06, 0).status, Status::SUCCESS);
    assert_eq!(get(&mut d, 0x06).dw0, 0);
    let c = set(&mut d, 0x07, 1 | (7 << 16));
    assert_eq!((c.status, c.dw0), (Status::SUCCESS, 1 | (3 << 16)));
    // Only two SQs granted now.
    let base = d.alloc(8);
    assert_eq!(d.admin(create_cq(4, 2, base)).status, Status::SUCCESS);
    assert_eq!(
        d.admin(create_sq(3, 2, base + 0x1000, 4)).status,
        Status::INVALID_QID
    );
    assert_eq!(set(&mut d, 0x07, 0xffff).status, Status::INVALID_FIELD);
    assert_eq!(get(&mut d, 0x42).status, Status::INVALID_FIELD);
    assert_eq!(set(&mut d, 0x42, 0).status, Status::INVALID_FIELD);
    assert_eq!(
        set(&mut d, 0x07 | (1 << 31), 0).status,
        Status::FEATURE_NOT_SAVEABLE
    );

    let mut d = TestDriver::new(|_| {});
    d.enable();
    assert_eq!(get(&mut d, 0x06).status, Status::INVALID_FIELD);
    assert_eq!(set(&mut d, 0x06, 1).status, Status::INVALID_FIELD);
}

#[test]
fn abort_async_events_and_log_pages() {
    let mut d = TestDriver::new(|_| {});
    d.enable();
    let abort = d.admin(Command {
        opcode: 0x08,
        ..Command::default()
    });
    assert_eq!((abort.status, abort.dw0 & 1), (Status::SUCCESS, 1));
    // Four AERs stay outstanding; the fifth exceeds the limit.
    for _ in 0..4 {
        let old = d.sq_tail(0);
        d.push(
            0,
            Command {
                opcode: 0x0c,
                ..Command::default()
            },
        );
        d.ring_sq(0, old);
    }
    let c = d.admin(Command {
        opcode: 0x0c,
        ..Command::default()
    });
    assert_eq!(c.status, Status::AER_LIMIT_EXCEEDED);
    let buf = d.alloc(1);
    let log = |lid: u32| Command {
        opcode: 0x02,
        prp1: buf,
        cdw: [lid | (127 << 16), 0, 0, 0, 0, 0],
        ..Command::default()
    };
    assert_eq!(d.admin(log(2)).status, Status::SUCCESS);
    assert_eq!(d.admin(log(0x70)).status, Status::INVALID_LOG_PAGE);
}
