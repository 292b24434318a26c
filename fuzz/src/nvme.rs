//! The emulated NVMe controller driven through `PciBackend`, as a driver domain drives it:
//! register reads and writes, doorbells, submission queue entries and PRP lists in the
//! domain's memory (1 MiB behind the controller's DMA window), resets and bus mastering.
//!
//! Input: ops. `op % 9`: 0 writes a register (offset, width 4 or 8, value), 1 reads one, 2
//! writes a doorbell (any slot, any value, any width), 3 writes the domain's memory, 4
//! submits an admin command (64 bytes of SQE at the admin queue's tail, then the doorbell),
//! 5 submits an I/O command on queue 1 to 4, 6 a function reset, 7 turns bus mastering on or
//! off, 8 enables the controller the way a driver does (AQA, ASQ, ACQ, CC.EN).
//!
//! Checked: while the admin queues are where op 8 put them, every completion posted there
//! answers a command that was submitted and not yet answered (by command identifier), names
//! submission queue 0 and a head inside the queue; the controller never touches memory
//! outside its window (its DMA window refuses, and counts); a reset leaves CSTS.RDY clear.

use std::path::PathBuf;
use std::sync::OnceLock;

use ddvm_passthrough::nvme::DOORBELL_BASE;
use ddvm_passthrough::pci::PciBackend;
use ddvm_passthrough::{DmaWindow, EmulatedNvme, NvmeConfig};
use vm_memory::{Bytes, GuestAddress};

use crate::{guest_memory, Input, Seed};

const MEM: u64 = 1 << 20;
const ASQ: u64 = 0x10000;
const ACQ: u64 = 0x11000;
/// Admin queue entries (both queues).
const AQ: u16 = 16;
/// I/O queue `q`'s submission queue (its completion queue is 0x800 after it).
fn io_sq(q: u16) -> u64 {
    0x20000 + u64::from(q) * 0x1000
}
const IOQ: u16 = 16;
const MAX_IO_QUEUES: u16 = 4;

fn backing() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("ddvm-fuzz-nvme-{}.img", std::process::id()))
    })
}

fn reg_read32(c: &mut EmulatedNvme, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    c.bar_read(0, offset, &mut b);
    u32::from_le_bytes(b)
}

/// The admin completion queue as the harness follows it.
struct AdminCq {
    /// Whether the queues are where op 8 put them (and the model holds).
    valid: bool,
    head: u16,
    phase: bool,
    sq_tail: u16,
    /// Command identifiers submitted and not yet answered.
    owed: Vec<u16>,
}

impl AdminCq {
    fn fresh() -> AdminCq {
        AdminCq {
            valid: false,
            head: 0,
            phase: true,
            sq_tail: 0,
            owed: Vec::new(),
        }
    }

    /// Stops following the queue if the command `sqe` may make the controller write into the
    /// admin completion queue's memory other than by completing (a data buffer, a PRP list
    /// entry, a new queue or a shadow-doorbell buffer over it): the driver's own doing, after
    /// which what the harness reads there is not only completions.
    fn watch(&mut self, mem: &crate::GuestMem, sqe: &[u8; 64]) {
        // An address from which the controller may write into the queue: a data page, a
        // PRP list, or a queue of up to 64 KiB (1024 entries of 64 bytes) starting there.
        let near = |addr: u64| (ACQ.saturating_sub(0x1_0000)..ACQ + 0x1000).contains(&addr);
        let prp1 = u64::from_le_bytes(sqe[24..32].try_into().unwrap_or_default());
        let prp2 = u64::from_le_bytes(sqe[32..40].try_into().unwrap_or_default());
        let mut list = [0u8; 4096];
        let len = 4096 - (prp2 & 0xfff) as usize;
        let listed = mem.read_slice(&mut list[..len], GuestAddress(prp2)).is_ok()
            && list[..len]
                .chunks_exact(8)
                .any(|e| near(u64::from_le_bytes(e.try_into().unwrap_or_default())));
        if near(prp1) || near(prp2) || listed {
            self.valid = false;
        }
    }

    /// Takes the completions posted since the last look and rings the head doorbell.
    fn collect(&mut self, c: &mut EmulatedNvme, mem: &crate::GuestMem) {
        if !self.valid {
            return;
        }
        let mut taken = 0;
        loop {
            let at = ACQ + u64::from(self.head) * 16;
            let mut cqe = [0u8; 16];
            mem.read_slice(&mut cqe, GuestAddress(at))
                .expect("in memory");
            let status = u16::from_le_bytes([cqe[14], cqe[15]]);
            if (status & 1 == 1) != self.phase {
                break;
            }
            let sq_head = u16::from_le_bytes([cqe[8], cqe[9]]);
            let sq_id = u16::from_le_bytes([cqe[10], cqe[11]]);
            let cid = u16::from_le_bytes([cqe[12], cqe[13]]);
            assert_eq!(sq_id, 0, "admin completion for SQ {sq_id}");
            assert!(sq_head < AQ, "SQ head {sq_head}");
            let i = self
                .owed
                .iter()
                .position(|&o| o == cid)
                .unwrap_or_else(|| panic!("completion for command {cid}, never submitted"));
            self.owed.swap_remove(i);
            self.head = (self.head + 1) % AQ;
            if self.head == 0 {
                self.phase = !self.phase;
            }
            taken += 1;
            assert!(taken <= AQ, "more completions than the queue holds");
        }
        if taken > 0 {
            c.bar_write(0, DOORBELL_BASE + 4, &u32::from(self.head).to_le_bytes());
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mem = guest_memory(MEM);
    let cfg = NvmeConfig {
        backing: backing().clone(),
        size: 1 << 20,
        lba_size: if input.u8() & 1 == 0 { 512 } else { 4096 },
        volatile_write_cache: true,
        max_io_queues: MAX_IO_QUEUES,
        serial: "FUZZ".into(),
        model: "ddvm fuzz".into(),
    };
    let mut c = EmulatedNvme::new(cfg, DmaWindow::new(mem.clone())).expect("controller");
    c.set_bus_master(true);
    let window = c.dma();
    let mut cq = AdminCq::fresh();
    let mut io_tails = [0u16; MAX_IO_QUEUES as usize + 1];
    let mut ops = 0;
    while !input.is_empty() && ops < 256 {
        ops += 1;
        match input.u8() % 9 {
            0 => {
                let offset = u64::from(input.u16() % 0x1000);
                let value = input.u64();
                if input.u8() & 1 == 0 {
                    c.bar_write(0, offset, &(value as u32).to_le_bytes());
                } else {
                    c.bar_write(0, offset, &value.to_le_bytes());
                }
                if (0x14..0x38).contains(&offset) {
                    cq.valid = false;
                }
            }
            1 => {
                let offset = u64::from(input.u16() % 0x1000);
                let mut b = [0u8; 8];
                let width = [1, 2, 4, 8][usize::from(input.u8() % 4)];
                c.bar_read(0, offset, &mut b[..width]);
            }
            2 => {
                let slot = u64::from(input.u16() % (2 * (MAX_IO_QUEUES + 2)));
                let value = input.u32();
                let width = [1, 2, 4, 8][usize::from(input.u8() % 4)];
                let mut b = [0u8; 8];
                b[..4].copy_from_slice(&value.to_le_bytes());
                c.bar_write(0, DOORBELL_BASE + slot * 4, &b[..width]);
                if slot < 2 {
                    cq.valid = false;
                }
                cq.collect(&mut c, &mem);
            }
            3 => {
                let at = u64::from(input.u32()) % MEM;
                let bytes = input.blob();
                let end = at + bytes.len() as u64;
                // Not the admin completion queue: the harness reads it back.
                if !(at < ACQ + 0x1000 && end > ACQ) {
                    let _ = mem.write_slice(bytes, GuestAddress(at));
                }
                // Commands rewritten before the controller fetched them (it may not have:
                // bus mastering off) are not the ones the harness counts as submitted.
                if at < ASQ + 64 * u64::from(AQ) && end > ASQ {
                    cq.valid = false;
                }
            }
            4 => {
                let mut sqe = [0u8; 64];
                let b = input.bytes(64);
                sqe[..b.len()].copy_from_slice(b);
                let cid = u16::from_le_bytes([sqe[2], sqe[3]]);
                cq.watch(&mem, &sqe);
                mem.write_slice(&sqe, GuestAddress(ASQ + u64::from(cq.sq_tail) * 64))
                    .expect("in memory");
                cq.sq_tail = (cq.sq_tail + 1) % AQ;
                if cq.valid {
                    cq.owed.push(cid);
                }
                c.bar_write(0, DOORBELL_BASE, &u32::from(cq.sq_tail).to_le_bytes());
                cq.collect(&mut c, &mem);
            }
            5 => {
                let q = 1 + u16::from(input.u8()) % MAX_IO_QUEUES;
                let mut sqe = [0u8; 64];
                let b = input.bytes(64);
                sqe[..b.len()].copy_from_slice(b);
                cq.watch(&mem, &sqe);
                let tail = &mut io_tails[usize::from(q)];
                mem.write_slice(&sqe, GuestAddress(io_sq(q) + u64::from(*tail) * 64))
                    .expect("in memory");
                *tail = (*tail + 1) % IOQ;
                let doorbell = DOORBELL_BASE + u64::from(q) * 8;
                c.bar_write(0, doorbell, &u32::from(*tail).to_le_bytes());
                // Consume every completion: the CQ head follows the SQ tail.
                c.bar_write(0, doorbell + 4, &u32::from(*tail).to_le_bytes());
            }
            6 => {
                c.reset();
                assert_eq!(reg_read32(&mut c, 0x1c) & 1, 0, "ready after a reset");
                cq = AdminCq::fresh();
                io_tails = [0; MAX_IO_QUEUES as usize + 1];
            }
            7 => {
                c.set_bus_master(input.u8() & 1 == 1);
            }
            _ => {
                c.bar_write(0, 0x14, &0u32.to_le_bytes());
                let aqa = u32::from(AQ - 1) << 16 | u32::from(AQ - 1);
                c.bar_write(0, 0x24, &aqa.to_le_bytes());
                c.bar_write(0, 0x28, &ASQ.to_le_bytes());
                c.bar_write(0, 0x30, &ACQ.to_le_bytes());
                let _ = mem.write_slice(&[0u8; 16 * AQ as usize], GuestAddress(ACQ));
                // EN, 4 KiB pages, IOSQES 6, IOCQES 4.
                c.bar_write(0, 0x14, &(1u32 | 6 << 16 | 4 << 20).to_le_bytes());
                cq = AdminCq::fresh();
                cq.valid = reg_read32(&mut c, 0x1c) & 1 == 1;
                io_tails = [0; MAX_IO_QUEUES as usize + 1];
            }
        }
    }
    // Whatever it did, the window's bounds held: the memory the controller could reach is
    // the domain's, and a refusal is counted, never a write elsewhere.
    let _ = window.refused();
}

/// An SQE: opcode, command identifier, namespace, PRP1, PRP2, and CDW10 to 12.
fn sqe(opcode: u8, cid: u16, nsid: u32, prp1: u64, prp2: u64, cdw: [u32; 3]) -> Vec<u8> {
    let mut e = vec![0u8; 64];
    e[0] = opcode;
    e[2..4].copy_from_slice(&cid.to_le_bytes());
    e[4..8].copy_from_slice(&nsid.to_le_bytes());
    e[24..32].copy_from_slice(&prp1.to_le_bytes());
    e[32..40].copy_from_slice(&prp2.to_le_bytes());
    for (i, v) in cdw.iter().enumerate() {
        e[40 + 4 * i..44 + 4 * i].copy_from_slice(&v.to_le_bytes());
    }
    e
}

/// Seeds: bring-up (identify, queue creation), then I/O: a one-page write, a write over two
/// pages (PRP2), one over a PRP list, a read back, a flush; and a reset in the middle.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut s = Seed::new();
    s.u8(0); // 512-byte blocks
    s.u8(8);
    s.u8(4).bytes(&sqe(0x06, 1, 0, 0x40000, 0, [1, 0, 0])); // identify controller
    s.u8(4).bytes(&sqe(0x06, 2, 1, 0x41000, 0, [0, 0, 0])); // identify namespace 1
    for q in 1..=2u16 {
        let cq = io_sq(q) + 0x800;
        let qsize = u32::from(IOQ - 1) << 16;
        // Create I/O CQ (physically contiguous, no interrupts), then SQ on it.
        s.u8(4)
            .bytes(&sqe(0x05, 10 + q, 0, cq, 0, [qsize | u32::from(q), 1, 0]));
        s.u8(4).bytes(&sqe(
            0x01,
            20 + q,
            0,
            io_sq(q),
            0,
            [qsize | u32::from(q), u32::from(q) << 16 | 1, 0],
        ));
    }
    let bring_up = s.finish();

    let mut io = Seed::new();
    io.bytes(&bring_up);
    io.u8(3).u32(0x50000).blob(&[0x5a; 64]);
    io.u8(5)
        .u8(0)
        .bytes(&sqe(0x01, 1, 1, 0x50000, 0, [0, 0, 7])); // write 8 blocks
    io.u8(5)
        .u8(0)
        .bytes(&sqe(0x01, 2, 1, 0x50800, 0x51000, [16, 0, 7])); // two pages
    let list: Vec<u8> = [0x53000u64, 0x54000, 0x55000]
        .iter()
        .flat_map(|p| p.to_le_bytes())
        .collect();
    io.u8(3).u32(0x52000).blob(&list);
    io.u8(5)
        .u8(1)
        .bytes(&sqe(0x01, 3, 1, 0x5f000, 0x52000, [32, 0, 31])); // PRP list
    io.u8(5)
        .u8(1)
        .bytes(&sqe(0x02, 4, 1, 0x56000, 0, [0, 0, 7])); // read back
    io.u8(5).u8(0).bytes(&sqe(0x00, 5, 1, 0, 0, [0, 0, 0])); // flush
    let io = io.finish();

    let mut reset = Seed::new();
    reset.bytes(&bring_up);
    reset.u8(6);
    reset.u8(8);
    reset.u8(4).bytes(&sqe(0x06, 7, 0, 0x40000, 0, [1, 0, 0]));
    vec![
        ("bring_up".into(), bring_up),
        ("io".into(), io),
        ("reset".into(), reset.finish()),
    ]
}
