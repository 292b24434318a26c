//! Net hostile mode (`workload=net-hostile kind=KIND [count=N]`): a virtio-net driver that gets
//! one thing wrong, `count` times (default 50), through its own split virtqueues (RX, TX and
//! control, 16 descriptors each, no event index, no indirect descriptors, no MRG_RXBUF) on the
//! raw virtio-mmio registers — virtio-drivers cannot build such chains. Each bad chain must get
//! the device's defined answer (given back with length 0, or a control command answered ERR),
//! the device must never need a reset, and a good frame must still go out afterwards. The
//! report: `ddvm-hostile: {"net_kind":K,"count":N,"answered":N,"expected":N,"needs_reset":
//! false,"after_ok":true}`; exit 0 when every chain got its answer.
//!
//! Kinds: `oversized` (a TX frame of 1600 bytes, over MTU + 18), `zero-length` (a TX chain
//! with a 0-byte frame descriptor), `wrong-direction` (a TX frame in a device-writable
//! descriptor), `ctrl-garbage` (control commands of an unknown class, a bad value, a MAC table
//! claiming 2^32 - 1 entries, and a command without an ack byte), `small-rx` (RX buffers of 32
//! bytes: every frame the VMM has for this client gives one back empty; the frames come from
//! elsewhere, so the run lasts until `count` came back or `timeout_ms`, default 30 s).

use alloc::format;
use alloc::string::String;
use core::sync::atomic::{fence, Ordering};

use guest_kernel::cmdline::Cmdline;
use guest_kernel::dma::DmaBuffer;
use guest_kernel::mmio::MmioRegion;
use guest_kernel::time::Instant;
use guest_kernel::{println, vmm};

use crate::device::{reg, Found};

/// The `workload` value of this mode.
pub const WORKLOAD: &str = "net-hostile";

/// What the driver gets wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A TX frame over MTU + 18 bytes.
    Oversized,
    /// A TX chain with a 0-byte descriptor.
    ZeroLength,
    /// A TX frame in a device-writable descriptor.
    WrongDirection,
    /// Control commands the device cannot accept.
    CtrlGarbage,
    /// RX buffers too small for any frame.
    SmallRx,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Oversized,
        Kind::ZeroLength,
        Kind::WrongDirection,
        Kind::CtrlGarbage,
        Kind::SmallRx,
    ];

    /// The name on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Oversized => "oversized",
            Kind::ZeroLength => "zero-length",
            Kind::WrongDirection => "wrong-direction",
            Kind::CtrlGarbage => "ctrl-garbage",
            Kind::SmallRx => "small-rx",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

const QSIZE: u16 = 16;
const RX: u16 = 0;
const TX: u16 = 1;
const CTRL: u16 = 2;
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const DEVICE_NEEDS_RESET: u32 = 0x40;
/// VIRTIO_NET_F_MAC, CTRL_VQ, CTRL_RX (first feature word).
const FEATURES_LOW: u32 = 1 << 5 | 1 << 17 | 1 << 18;
/// VIRTIO_F_VERSION_1 (second feature word).
const VERSION_1_HIGH: u32 = 1;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// Layout of a queue's page.
const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
/// Layout of the buffer pages: header, frame, control command, ack byte, RX buffers.
const HDR: u64 = 0;
const FRAME: u64 = 0x100;
const CMD: u64 = 0x1000;
const ACK: u64 = 0x1100;
const RXBUF: u64 = 0x2000;
const SMALL: u32 = 32;
/// Virtio-net header bytes (VERSION_1).
const HDR_LEN: u32 = 12;
/// VIRTIO_NET_ERR.
const ACK_ERR: u8 = 1;
/// How long one answer may take.
const REACT_US: u64 = 2_000_000;

struct RawNet {
    regs: MmioRegion,
    rings: [DmaBuffer; 3],
    buf: DmaBuffer,
    avail: [u16; 3],
    used: [u16; 3],
    mac: [u8; 6],
}

/// What came back.
enum Answer {
    Used { head: u16, len: u32 },
    NeedsReset,
    Nothing,
}

impl RawNet {
    fn init(regs: MmioRegion) -> Result<Self, String> {
        let page = || DmaBuffer::new(1).ok_or("no memory for the queues");
        let mut q = RawNet {
            regs,
            rings: [page()?, page()?, page()?],
            buf: DmaBuffer::new(4).ok_or("no memory for the buffers")?,
            avail: [0; 3],
            used: [0; 3],
            mac: [0; 6],
        };
        q.w32(reg::STATUS, 0);
        let start = Instant::now();
        while q.r32(reg::STATUS) != 0 {
            if start.elapsed_us() > 1_000_000 {
                return Err("Status not 0 after a reset".into());
            }
            vmm::wait(100);
        }
        q.w32(reg::STATUS, ACKNOWLEDGE | DRIVER);
        q.w32(reg::DEVICE_FEATURES_SEL, 0);
        let offered = q.r32(reg::DEVICE_FEATURES);
        if offered & FEATURES_LOW != FEATURES_LOW {
            return Err(format!(
                "features {offered:#x} lack MAC, CTRL_VQ or CTRL_RX"
            ));
        }
        q.w32(reg::DRIVER_FEATURES_SEL, 0);
        q.w32(reg::DRIVER_FEATURES, FEATURES_LOW);
        q.w32(reg::DRIVER_FEATURES_SEL, 1);
        q.w32(reg::DRIVER_FEATURES, VERSION_1_HIGH);
        q.w32(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        if q.r32(reg::STATUS) & FEATURES_OK == 0 {
            return Err("the device refused the features".into());
        }
        for i in 0..3u16 {
            q.w32(reg::QUEUE_SEL, u32::from(i));
            if q.r32(reg::QUEUE_NUM_MAX) < u32::from(QSIZE) {
                return Err(format!("queue {i} is too small"));
            }
            q.w32(reg::QUEUE_NUM, u32::from(QSIZE));
            let base = q.rings[usize::from(i)].addr();
            for (low, addr) in [
                (reg::QUEUE_DESC_LOW, base + DESC),
                (reg::QUEUE_DRIVER_LOW, base + AVAIL),
                (reg::QUEUE_DEVICE_LOW, base + USED),
            ] {
                q.w32(low, addr as u32);
                q.w32(low + 4, (addr >> 32) as u32);
            }
            q.w32(reg::QUEUE_READY, 1);
        }
        q.w32(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        let (lo, hi) = (q.r32(reg::CONFIG), q.r32(reg::CONFIG + 4));
        let (lo, hi) = (lo.to_le_bytes(), hi.to_le_bytes());
        q.mac = [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1]];
        Ok(q)
    }

    fn r32(&self, off: u64) -> u32 {
        self.regs.read_only::<u32>(off).read()
    }

    fn w32(&self, off: u64, v: u32) {
        self.regs.write_only::<u32>(off).write(v)
    }

    fn desc(&self, q: u16, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let ring = &self.rings[usize::from(q)];
        let at = DESC + 16 * u64::from(i);
        ring.write(at, addr);
        ring.write(at + 8, len);
        ring.write(at + 12, flags);
        ring.write(at + 14, next);
    }

    /// A chain of `bufs` (offset in the buffer pages, length, device-writable) at
    /// descriptors `first..`, published on queue `q`.
    fn submit(&mut self, q: u16, first: u16, bufs: &[(u64, u32, bool)]) {
        let n = bufs.len() as u16;
        for (k, &(off, len, write)) in bufs.iter().enumerate() {
            let i = first + k as u16;
            let next = if k as u16 + 1 < n { F_NEXT } else { 0 };
            let flags = next | if write { F_WRITE } else { 0 };
            self.desc(q, i, self.buf.addr() + off, len, flags, i + 1);
        }
        let ring = &self.rings[usize::from(q)];
        let idx = self.avail[usize::from(q)];
        ring.write(AVAIL + 4 + 2 * u64::from(idx % QSIZE), first);
        fence(Ordering::SeqCst);
        let idx = idx.wrapping_add(1);
        ring.write(AVAIL + 2, idx);
        self.avail[usize::from(q)] = idx;
        fence(Ordering::SeqCst);
        self.w32(reg::QUEUE_NOTIFY, u32::from(q));
    }

    /// The next used entry of queue `q`, waiting up to `us`.
    fn answer(&mut self, q: u16, us: u64) -> Answer {
        let ring = &self.rings[usize::from(q)];
        let start = Instant::now();
        loop {
            let last = self.used[usize::from(q)];
            if ring.read::<u16>(USED + 2) != last {
                fence(Ordering::Acquire);
                let at = USED + 4 + 8 * u64::from(last % QSIZE);
                let head = ring.read::<u32>(at) as u16;
                let len = ring.read::<u32>(at + 4);
                self.used[usize::from(q)] = last.wrapping_add(1);
                return Answer::Used { head, len };
            }
            if self.r32(reg::STATUS) & DEVICE_NEEDS_RESET != 0 {
                return Answer::NeedsReset;
            }
            if start.elapsed_us() > us {
                return Answer::Nothing;
            }
            vmm::wait(200);
        }
    }

    /// A frame of `len` bytes to ourselves (the switch keeps it: nobody else sees it).
    fn write_frame(&self, len: usize) {
        self.buf.fill(HDR, u64::from(HDR_LEN), 0);
        self.buf.write_bytes(FRAME, &self.mac);
        self.buf.write_bytes(FRAME + 6, &self.mac);
        self.buf.write_bytes(FRAME + 12, &[0x88, 0xb6]);
        self.buf.fill(FRAME + 14, len as u64 - 14, 0x5a);
    }

    /// A control command: `class`, `command`, `data`; the ack byte preset to 0xaa.
    fn write_command(&self, class: u8, command: u8, data: &[u8]) {
        self.buf.write(CMD, class);
        self.buf.write(CMD + 1, command);
        self.buf.write_bytes(CMD + 2, data);
        self.buf.write(ACK, 0xaau8);
    }
}

/// One bad TX chain of `kind`; whether the device gave it back with length 0.
fn bad_tx(q: &mut RawNet, kind: Kind) -> Result<bool, &'static str> {
    q.write_frame(64);
    let frame: (u64, u32, bool) = match kind {
        Kind::Oversized => {
            q.write_frame(1600);
            (FRAME, 1600, false)
        }
        Kind::ZeroLength => (FRAME, 0, false),
        _ => (FRAME, 64, true),
    };
    q.submit(TX, 0, &[(HDR, HDR_LEN, false), frame]);
    match q.answer(TX, REACT_US) {
        Answer::Used { head: 0, len: 0 } => Ok(true),
        Answer::Used { .. } => Ok(false),
        Answer::NeedsReset => Err("needs-reset"),
        Answer::Nothing => Err("no answer"),
    }
}

/// One bad control command (variant `i % 4`); whether it got ERR (or, without an ack byte,
/// was given back with length 0).
fn bad_ctrl(q: &mut RawNet, i: u64) -> Result<bool, &'static str> {
    let (data_len, ack) = match i % 4 {
        0 => {
            q.write_command(0xee, 0x77, &[1, 2, 3, 4]);
            (4, true)
        }
        1 => {
            // RX PROMISC with a value neither 0 nor 1.
            q.write_command(0, 0, &[7]);
            (1, true)
        }
        2 => {
            // MAC_TABLE_SET claiming 2^32 - 1 unicast entries.
            q.write_command(1, 0, &[0xff, 0xff, 0xff, 0xff, 0, 0]);
            (6, true)
        }
        _ => {
            q.write_command(0, 0, &[1]);
            (1, false)
        }
    };
    let mut bufs = alloc::vec![(CMD, 2 + data_len, false)];
    if ack {
        bufs.push((ACK, 1, true));
    }
    q.submit(CTRL, 0, &bufs);
    match q.answer(CTRL, REACT_US) {
        Answer::Used { head: 0, len } => {
            let got: u8 = q.buf.read(ACK);
            Ok(if ack {
                len == 1 && got == ACK_ERR
            } else {
                len == 0 && got == 0xaa
            })
        }
        Answer::Used { .. } => Ok(false),
        Answer::NeedsReset => Err("needs-reset"),
        Answer::Nothing => Err("no answer"),
    }
}

/// Keeps every RX descriptor posted with a 32-byte buffer; counts those given back empty
/// until `count` or `timeout_us`.
fn small_rx(q: &mut RawNet, count: u64, timeout_us: u64) -> Result<(u64, u64), &'static str> {
    for i in 0..QSIZE {
        let off = RXBUF + u64::from(i) * u64::from(SMALL);
        q.desc(RX, i, q.buf.addr() + off, SMALL, F_WRITE, 0);
        let ring = &q.rings[usize::from(RX)];
        ring.write(AVAIL + 4 + 2 * u64::from(i), i);
    }
    fence(Ordering::SeqCst);
    q.avail[usize::from(RX)] = QSIZE;
    q.rings[usize::from(RX)].write(AVAIL + 2, QSIZE);
    fence(Ordering::SeqCst);
    q.w32(reg::QUEUE_NOTIFY, u32::from(RX));
    let start = Instant::now();
    let (mut answered, mut empty) = (0, 0);
    while answered < count {
        let left = timeout_us.saturating_sub(start.elapsed_us());
        if left == 0 {
            break;
        }
        match q.answer(RX, left) {
            Answer::Used { head, len } => {
                answered += 1;
                empty += u64::from(len == 0);
                // Post it again.
                let ring = &q.rings[usize::from(RX)];
                let idx = q.avail[usize::from(RX)];
                ring.write(AVAIL + 4 + 2 * u64::from(idx % QSIZE), head);
                fence(Ordering::SeqCst);
                let idx = idx.wrapping_add(1);
                ring.write(AVAIL + 2, idx);
                q.avail[usize::from(RX)] = idx;
                fence(Ordering::SeqCst);
                q.w32(reg::QUEUE_NOTIFY, u32::from(RX));
            }
            Answer::NeedsReset => return Err("needs-reset"),
            Answer::Nothing => break,
        }
    }
    Ok((answered, empty))
}

/// A good frame (64 bytes, to ourselves) goes out and its chain comes back.
fn good_tx(q: &mut RawNet) -> bool {
    q.write_frame(64);
    q.submit(TX, 0, &[(HDR, HDR_LEN, false), (FRAME, 64, false)]);
    matches!(q.answer(TX, REACT_US), Answer::Used { head: 0, .. })
}

/// Runs the mode; never returns.
pub fn main(cmdline: Cmdline<'_>, found: Result<Found, String>) -> ! {
    let kind = match cmdline.value("kind").and_then(Kind::parse) {
        Some(k) => k,
        None => {
            println!(
                "ddvm-workload: bad command line: kind: expected oversized, zero-length, \
                 wrong-direction, ctrl-garbage or small-rx"
            );
            vmm::exit(1)
        }
    };
    let number = |key: &str, default: u64| {
        cmdline
            .value(key)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(default)
    };
    let count = number("count", 50).max(1);
    let timeout_us = number("timeout_ms", 30_000) * 1000;
    let mut q = match found.and_then(|f| RawNet::init(f.regs)) {
        Ok(q) => q,
        Err(e) => {
            println!("ddvm-hostile: cannot bring the device up: {e}");
            vmm::exit(2)
        }
    };
    println!(
        "ddvm-workload: net-hostile {} x{count} at {:02x?}",
        kind.name(),
        q.mac
    );
    let (mut answered, mut expected, mut failure) = (0u64, 0u64, None);
    match kind {
        Kind::SmallRx => match small_rx(&mut q, count, timeout_us) {
            Ok((a, e)) => (answered, expected) = (a, e),
            Err(e) => failure = Some(e),
        },
        _ => {
            for i in 0..count {
                let r = if kind == Kind::CtrlGarbage {
                    bad_ctrl(&mut q, i)
                } else {
                    bad_tx(&mut q, kind)
                };
                match r {
                    Ok(ok) => {
                        answered += 1;
                        expected += u64::from(ok);
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
        }
    }
    let needs_reset = q.r32(reg::STATUS) & DEVICE_NEEDS_RESET != 0;
    let after_ok = !needs_reset && good_tx(&mut q);
    if let Some(e) = failure {
        println!("ddvm-hostile: {}: {e}", kind.name());
    }
    println!(
        "ddvm-hostile: {{\"net_kind\":\"{}\",\"count\":{count},\"answered\":{answered},\
         \"expected\":{expected},\"needs_reset\":{needs_reset},\"after_ok\":{after_ok}}}",
        kind.name()
    );
    let ok = answered == count && expected == count && !needs_reset && after_ok;
    vmm::exit(if ok { 0 } else { 2 })
}
