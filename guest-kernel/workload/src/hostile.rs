//! Hostile mode: one deliberately malformed request, through our own split virtqueue (16
//! descriptors, no event index, no indirect descriptors) on the raw virtio-mmio registers —
//! not virtio-drivers, which would refuse to build such requests. Reports what the device did
//! and, if it reacted, whether it works again for this client after a reset.

use alloc::format;
use alloc::string::String;
use core::sync::atomic::{fence, Ordering};

use guest_kernel::dma::DmaBuffer;
use guest_kernel::mmio::MmioRegion;
use guest_kernel::time::{self, Instant};
use guest_kernel::{println, vmm};

use crate::blk::{req, status, ReqHeader};
use crate::device::{reg, Found};

pub use ddvm_cmdline::hostile::Case;

/// Queue size of the raw queue.
const QSIZE: u16 = 16;
/// Device status bits (2.1).
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const DEVICE_NEEDS_RESET: u32 = 0x40;
/// VIRTIO_F_VERSION_1, in the second feature word.
const VERSION_1_HIGH: u32 = 1;
/// Descriptor flags.
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// Layout of the ring page: descriptor table, avail ring, used ring.
const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
/// Layout of the control page: header, status byte.
const HEADER: u64 = 0;
const STATUS: u64 = 0x40;
/// Bytes of the data buffer.
const DATA_LEN: u32 = 4096;
/// An address far beyond any guest memory this image runs in.
const OUTSIDE: u64 = 0x8_0000_0000;
/// How long the device has to react.
const REACT_US: u64 = 2_000_000;

// Each queue address register's high half follows its low half (`init` relies on it).
const _: () = assert!(
    reg::QUEUE_DESC_HIGH == reg::QUEUE_DESC_LOW + 4
        && reg::QUEUE_DRIVER_HIGH == reg::QUEUE_DRIVER_LOW + 4
        && reg::QUEUE_DEVICE_HIGH == reg::QUEUE_DEVICE_LOW + 4
);

/// What the device did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// It set DEVICE_NEEDS_RESET.
    NeedsReset,
    /// It completed the request with this status byte.
    Status(u8),
    /// Nothing within [`REACT_US`].
    Nothing,
}

/// Our split virtqueue on the device's registers.
struct RawQueue {
    regs: MmioRegion,
    ring: DmaBuffer,
    ctl: DmaBuffer,
    data: DmaBuffer,
    capacity: u64,
    avail_idx: u16,
    last_used: u16,
}

impl RawQueue {
    /// Resets the device and brings it up with one 16-entry queue and only VERSION_1.
    fn init(regs: MmioRegion) -> Result<Self, String> {
        let alloc = |pages| DmaBuffer::new(pages).ok_or("no memory for the queue");
        let q = RawQueue {
            regs,
            ring: alloc(1)?,
            ctl: alloc(1)?,
            data: alloc(4)?,
            capacity: 0,
            avail_idx: 0,
            last_used: 0,
        };
        q.reset()?;
        q.set_status(ACKNOWLEDGE | DRIVER);
        q.w32(reg::DEVICE_FEATURES_SEL, 1);
        if q.r32(reg::DEVICE_FEATURES) & VERSION_1_HIGH == 0 {
            return Err("the device does not offer VERSION_1".into());
        }
        q.w32(reg::DRIVER_FEATURES_SEL, 0);
        q.w32(reg::DRIVER_FEATURES, 0);
        q.w32(reg::DRIVER_FEATURES_SEL, 1);
        q.w32(reg::DRIVER_FEATURES, VERSION_1_HIGH);
        q.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
        if q.status() & FEATURES_OK == 0 {
            return Err("the device refused VERSION_1 alone".into());
        }
        q.w32(reg::QUEUE_SEL, 0);
        let max = q.r32(reg::QUEUE_NUM_MAX);
        if max < u32::from(QSIZE) {
            return Err(format!(
                "queue 0 holds {max} descriptors, fewer than {QSIZE}"
            ));
        }
        q.w32(reg::QUEUE_NUM, u32::from(QSIZE));
        for (low, addr) in [
            (reg::QUEUE_DESC_LOW, q.ring.addr() + DESC),
            (reg::QUEUE_DRIVER_LOW, q.ring.addr() + AVAIL),
            (reg::QUEUE_DEVICE_LOW, q.ring.addr() + USED),
        ] {
            q.w32(low, addr as u32);
            q.w32(low + 4, (addr >> 32) as u32);
        }
        q.w32(reg::QUEUE_READY, 1);
        q.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        let capacity = u64::from(q.r32(reg::CONFIG)) | (u64::from(q.r32(reg::CONFIG + 4)) << 32);
        Ok(RawQueue { capacity, ..q })
    }

    fn r32(&self, off: u64) -> u32 {
        self.regs.read_only::<u32>(off).read()
    }

    fn w32(&self, off: u64, v: u32) {
        self.regs.write_only::<u32>(off).write(v)
    }

    fn status(&self) -> u32 {
        self.r32(reg::STATUS)
    }

    fn set_status(&self, s: u32) {
        self.w32(reg::STATUS, s)
    }

    /// Writes 0 to Status and waits (up to 1 s) until it reads back 0 (4.2.3.1).
    fn reset(&self) -> Result<(), String> {
        self.set_status(0);
        let start = Instant::now();
        while self.status() != 0 {
            if start.elapsed_us() > 1_000_000 {
                return Err(format!("Status reads {:#x} after a reset", self.status()));
            }
            vmm::wait(100);
        }
        Ok(())
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC + 16 * u64::from(i);
        self.ring.write(at, addr);
        self.ring.write(at + 8, len);
        self.ring.write(at + 12, flags);
        self.ring.write(at + 14, next);
    }

    fn header(&self, type_: u32, sector: u64) {
        let h = ReqHeader {
            type_,
            reserved: 0,
            sector,
        };
        self.ctl.write(HEADER, h.type_);
        self.ctl.write(HEADER + 4, h.reserved);
        self.ctl.write(HEADER + 8, h.sector);
        self.ctl.write(STATUS, status::UNSET);
    }

    /// A well-formed 3-descriptor request at descriptors 0..3 (data: `len` bytes).
    fn request(&self, type_: u32, sector: u64, len: u32) {
        self.header(type_, sector);
        let data_flags = if type_ == req::IN { F_WRITE } else { 0 };
        self.desc(0, self.ctl.addr() + HEADER, 16, F_NEXT, 1);
        self.desc(1, self.data.addr(), len, data_flags | F_NEXT, 2);
        self.desc(2, self.ctl.addr() + STATUS, 1, F_WRITE, 0);
    }

    /// Publishes head 0 with `avail.idx` = `idx` and notifies.
    fn publish(&mut self, idx: u16) {
        self.ring
            .write(AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE), 0u16);
        fence(Ordering::SeqCst);
        self.ring.write(AVAIL + 2, idx);
        self.avail_idx = idx;
        fence(Ordering::SeqCst);
        self.w32(reg::QUEUE_NOTIFY, 0);
    }

    fn used_idx(&self) -> u16 {
        self.ring.read(USED + 2)
    }

    /// Waits up to `us` for a used element (its status byte) or NEEDS_RESET.
    fn react(&mut self, us: u64) -> Outcome {
        let start = Instant::now();
        loop {
            if self.used_idx() != self.last_used {
                fence(Ordering::Acquire);
                self.last_used = self.last_used.wrapping_add(1);
                return Outcome::Status(self.ctl.read(STATUS));
            }
            if self.status() & DEVICE_NEEDS_RESET != 0 {
                return Outcome::NeedsReset;
            }
            if start.elapsed_us() > us {
                return Outcome::Nothing;
            }
            vmm::wait(1_000);
        }
    }

    /// One well-formed request; its status.
    fn roundtrip(&mut self, type_: u32, sector: u64, len: u32) -> Result<u8, String> {
        self.request(type_, sector, len);
        let next = self.avail_idx.wrapping_add(1);
        self.publish(next);
        match self.react(REACT_US) {
            Outcome::Status(s) => Ok(s),
            other => Err(format!("{other:?}")),
        }
    }

    /// Writes block 0 (4 KiB) and reads it back.
    fn write_read_block0(&mut self) -> Result<(), String> {
        for i in 0..u64::from(DATA_LEN) / 8 {
            self.data.write(8 * i, 0xd0d0_0000_0000_0000 | i);
        }
        let s = self.roundtrip(req::OUT, 0, DATA_LEN)?;
        if s != status::OK {
            return Err(format!("write status {s}"));
        }
        self.data.fill(0, u64::from(DATA_LEN), 0);
        let s = self.roundtrip(req::IN, 0, DATA_LEN)?;
        if s != status::OK {
            return Err(format!("read status {s}"));
        }
        for i in 0..u64::from(DATA_LEN) / 8 {
            let w: u64 = self.data.read(8 * i);
            if w != 0xd0d0_0000_0000_0000 | i {
                return Err(format!("read back {w:#x} at byte {}", 8 * i));
            }
        }
        Ok(())
    }

    /// Builds and submits `case`.
    fn submit(&mut self, case: Case) {
        let (ctl, data) = (self.ctl.addr(), self.data.addr());
        self.request(req::IN, 0, DATA_LEN);
        match case {
            Case::DescLoop => self.desc(1, data, DATA_LEN, F_WRITE | F_NEXT, 1),
            Case::AddrOutside => self.desc(1, OUTSIDE, DATA_LEN, F_WRITE | F_NEXT, 2),
            Case::WriteOnlyHeader => self.desc(0, ctl + HEADER, 16, F_WRITE | F_NEXT, 1),
            Case::ReadOnlyStatus => self.desc(2, ctl + STATUS, 1, 0, 0),
            Case::ZeroLength => self.desc(1, data, 0, F_WRITE | F_NEXT, 2),
            Case::ChainTooLong => {
                for i in 1..QSIZE - 1 {
                    let piece = data + 512 * u64::from(i - 1);
                    self.desc(i, piece, 512, F_WRITE | F_NEXT, i + 1);
                }
                self.desc(QSIZE - 1, ctl + STATUS, 1, F_WRITE | F_NEXT, 0);
            }
            Case::SectorOutOfRange => self.header(req::IN, self.capacity),
            Case::AvailJump => {}
        }
        let idx = if case == Case::AvailJump {
            self.used_idx().wrapping_add(QSIZE + 5)
        } else {
            self.avail_idx.wrapping_add(1)
        };
        self.publish(idx);
    }
}

/// Runs `case` on `found` and prints the `ddvm-hostile:` line. Returns whether it could run.
pub fn run(case: Case, found: &Found) -> bool {
    if found.version != 2 {
        println!(
            "ddvm-hostile: the device at {:#x} is virtio-mmio version {}; hostile mode needs 2",
            found.window.base, found.version
        );
        return false;
    }
    let mut q = match RawQueue::init(found.regs) {
        Ok(q) => q,
        Err(e) => {
            println!("ddvm-hostile: cannot bring the device up: {e}");
            return false;
        }
    };
    let start = Instant::now();
    q.submit(case);
    let outcome = q.react(REACT_US);
    let reacted_us = start.elapsed_us();
    let (name, status) = match outcome {
        Outcome::NeedsReset => ("needs-reset", None),
        Outcome::Status(s) => ("status", Some(s)),
        Outcome::Nothing => ("nothing", None),
    };
    let after_reset = match outcome {
        Outcome::Nothing => None,
        _ => Some(RawQueue::init(found.regs).and_then(|mut q| q.write_read_block0())),
    };
    if let Some(Err(e)) = &after_reset {
        println!("ddvm-hostile: after the reset: {e}");
    }
    println!(
        "ddvm-hostile: {} reacted in {} us (tsc {} kHz)",
        case.name(),
        reacted_us,
        time::tsc_khz()
    );
    let status = status.map_or(String::from("null"), |s| format!("{s}"));
    let after = match after_reset {
        None => "null",
        Some(Ok(())) => "true",
        Some(Err(_)) => "false",
    };
    println!(
        "ddvm-hostile: {{\"case\":\"{}\",\"outcome\":\"{name}\",\"status\":{status},\"after_reset_ok\":{after}}}",
        case.name()
    );
    true
}
