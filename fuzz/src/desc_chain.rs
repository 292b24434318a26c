//! Descriptor chains, direct and indirect, as the VMM's parsers take them: the same chain
//! walked by the virtio-blk parser and by the virtio-net TX, RX and control parsers.
//!
//! Input: a queue size (a power of two from 1 to 256), the device (bit 0: 4 KiB blocks,
//! bit 1: read-only), then driver
//! steps ([`crate::virtq::Driver::step`], op byte first) that write the descriptor table,
//! an indirect table and memory; the head parsed is the last one published (or 0).
//!
//! Checked, on what each parser accepts: every buffer lies in guest memory and is
//! non-empty, the data has the length and direction its kind needs, the blk segments are at
//! most SEG_MAX and cover exactly the sectors asked, the request lies in the client's range,
//! a TX frame is at most the largest frame and an RX chain at most the descriptors walked.

use ddvm::blk::device::SEG_MAX;
use ddvm::blk::request::{self, Kind, Limits};
use ddvm::net::request::{parse_ctrl, parse_rx, parse_tx, MAX_CTRL_DATA, MAX_DESCRIPTORS};
use virtio_bindings::virtio_blk as b;
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::virtq::{Driver, SeedDriver, Step, DATA, F_INDIRECT, F_NEXT, F_WRITE, TABLE};
use crate::{guest_memory, Input, Seed};
use ddvm::memory::GuestMem;

const MEM: u64 = 1 << 20;
const CAPACITY: u64 = 1 << 16;

fn in_memory(mem: &GuestMem, addr: u64, len: u32) -> bool {
    len > 0 && mem.check_range(GuestAddress(addr), len as usize)
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let size = 1u16 << (input.u8() % 9);
    let device = input.u8();
    let mem = guest_memory(MEM);
    let mut driver = Driver::new(mem.clone(), 0, size);
    let mut head = None;
    let mut steps = 0;
    while !input.is_empty() && steps < 512 {
        steps += 1;
        let op = input.u8();
        if let Some(Step::Published(h)) = driver.step(op, &mut input) {
            head = Some(h);
        }
    }
    if head.is_none() {
        driver.publish(0);
    }
    // Each parser gets the chain afresh.
    let chain = |driver: &Driver| driver.queue();

    let limits = Limits {
        capacity: CAPACITY,
        max_data: ddvm::blk::device::MAX_REQUEST,
        read_only: device & 2 != 0,
        discard: true,
        write_zeroes: true,
        max_dwz_sectors: 1 << 16,
        block_sectors: if device & 1 != 0 { 8 } else { 1 },
        max_segments: SEG_MAX,
    };
    let mut q = chain(&driver);
    if let Ok(mut it) = q.iter(&mem) {
        if let Some(c) = it.next() {
            match request::parse(c, &mem, &limits) {
                Ok(req) => {
                    assert!(mem.check_range(GuestAddress(req.status), 1));
                    assert!(req.data.runs.len() <= SEG_MAX as usize);
                    let sum: u64 = req.data.runs.iter().map(|&(_, n)| u64::from(n)).sum();
                    assert_eq!(sum, req.data.len);
                    for &(a, n) in &req.data.runs {
                        assert!(in_memory(&mem, a, n), "blk segment ({a:#x}, {n})");
                    }
                    assert!(req.sector + req.sectors <= CAPACITY);
                    assert_eq!(req.sector % limits.block_sectors, 0);
                    assert_eq!(req.sectors % limits.block_sectors, 0);
                    if limits.read_only {
                        assert!(matches!(req.kind, Kind::Read | Kind::Flush | Kind::GetId));
                    }
                    match req.kind {
                        Kind::Read | Kind::Write => {
                            assert_eq!(req.data.len, req.sectors * 512);
                            assert!(req.data.len > 0 && req.data.len <= limits.max_data);
                        }
                        Kind::GetId => assert!(req.data.len >= request::ID_BYTES as u64),
                        Kind::Flush | Kind::Discard | Kind::WriteZeroes => {
                            assert!(req.data.runs.is_empty())
                        }
                    }
                }
                Err(request::Invalid::Status { status, value, .. }) => {
                    assert!(mem.check_range(GuestAddress(status), 1));
                    assert!(value == request::status::IOERR || value == request::status::UNSUPP);
                }
                Err(request::Invalid::Unusable(_)) => {}
            }
        }
    }
    let mut q = chain(&driver);
    if let Ok(mut it) = q.iter(&mem) {
        if let Some(c) = it.next() {
            let mut frame = Vec::new();
            if parse_tx(c, &mem, 1518, &mut frame).is_ok() {
                assert!(frame.len() <= 1518);
            }
        }
    }
    let mut q = chain(&driver);
    if let Ok(mut it) = q.iter(&mem) {
        if let Some(c) = it.next() {
            if let Ok(segs) = parse_rx(c, &mem) {
                assert!(segs.len() <= MAX_DESCRIPTORS);
                for &(a, n) in &segs {
                    assert!(in_memory(&mem, a, n), "rx segment ({a:#x}, {n})");
                }
            }
        }
    }
    let mut q = chain(&driver);
    if let Ok(mut it) = q.iter(&mem) {
        if let Some(c) = it.next() {
            if let Ok(cmd) = parse_ctrl(c, &mem) {
                assert!(cmd.data.len() <= MAX_CTRL_DATA);
                assert!(mem.check_range(GuestAddress(cmd.ack), 1));
            }
        }
    }
}

/// Seeds: a direct blk read, an indirect one, a chain whose header and status share a
/// descriptor with data, a loop, and an indirect table of many entries.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let header = |kind: u32, sector: u64| {
        let mut h = kind.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&sector.to_le_bytes());
        h
    };
    let mut s = Seed::new();
    s.u8(4).u8(1);
    s.poke(3, 0x8000, &header(b::VIRTIO_BLK_T_IN, 8));
    s.desc(0, 0, 0x8000, 16, F_NEXT, 1);
    s.desc(0, 1, DATA, 4096, F_WRITE | F_NEXT, 2);
    s.desc(0, 2, 0x9000, 1, F_WRITE, 0);
    s.publish(2, 0);
    out.push(("direct".into(), s.finish()));

    let mut s = Seed::new();
    s.u8(4).u8(1);
    s.poke(3, 0x8000, &header(b::VIRTIO_BLK_T_OUT, 8));
    s.indirect(1, 0, 0x8000, 16, F_NEXT, 1);
    s.indirect(1, 1, DATA, 512, F_NEXT, 2);
    s.indirect(1, 2, DATA + 512, 512, F_NEXT, 3);
    s.indirect(1, 3, 0x9000, 1, F_WRITE, 0);
    s.desc(0, 5, TABLE, 64, F_INDIRECT, 0);
    s.publish(2, 5);
    out.push(("indirect".into(), s.finish()));

    // A TX-shaped chain: a 12-byte header and a 60-byte frame in one descriptor.
    let mut s = Seed::new();
    s.u8(8).u8(1);
    let mut frame = vec![0u8; 72];
    frame[12..18].copy_from_slice(&[0xff; 6]);
    s.poke(3, DATA as u32, &frame);
    s.desc(0, 0, DATA, 72, 0, 0);
    s.publish(2, 0);
    out.push(("tx".into(), s.finish()));

    // A control command: class, command, data, ack.
    let mut s = Seed::new();
    s.u8(6).u8(1);
    s.poke(3, DATA as u32, &[0, 0, 1]);
    s.desc(0, 0, DATA, 3, F_NEXT, 1);
    s.desc(0, 1, 0x9000, 1, F_WRITE, 0);
    s.publish(2, 0);
    out.push(("ctrl".into(), s.finish()));

    // A loop: 0 -> 1 -> 0.
    let mut s = Seed::new();
    s.u8(4).u8(1);
    s.desc(0, 0, 0x8000, 16, F_NEXT, 1);
    s.desc(0, 1, 0x9000, 1, F_WRITE | F_NEXT, 0);
    s.publish(2, 0);
    out.push(("loop".into(), s.finish()));

    // 300 one-sector writes in an indirect table: more than SEG_MAX.
    let mut s = Seed::new();
    s.u8(8).u8(1);
    s.poke(3, 0x8000, &header(b::VIRTIO_BLK_T_OUT, 0));
    s.indirect(1, 0, 0x8000, 16, F_NEXT, 1);
    for i in 1..300u16 {
        s.indirect(1, i, DATA + u64::from(i) * 512, 512, F_NEXT, i + 1);
    }
    s.indirect(1, 300, 0x9000, 1, F_WRITE, 0);
    s.desc(0, 0, TABLE, 301 * 16, F_INDIRECT, 0);
    s.publish(2, 0);
    out.push(("long_indirect".into(), s.finish()));
    out
}
