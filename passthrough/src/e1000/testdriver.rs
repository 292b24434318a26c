//! A mock e1000 driver for tests: programs the NIC through BAR0 writes, keeps its rings and
//! buffers in a `GuestMemoryMmap`, and counts the wake-ups of its domain.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::regs::*;
use super::{E1000Config, EmulatedE1000};
use crate::dma::DmaWindow;
use crate::net::{wire_pair, PairConfig, PairEnd, Wire};
use crate::pci::{PciBackend, WakeDomain};

/// Guest memory of the test domain.
pub const MEM_SIZE: u64 = 4 << 20;
/// Descriptors per ring.
pub const RING: u64 = 32;
pub const RX_RING: u64 = 0x10000;
pub const TX_RING: u64 = 0x11000;
pub const RX_BUFS: u64 = 0x20000;
pub const TX_BUFS: u64 = 0x40000;
/// Bytes per buffer (RCTL.BSIZE 2048 by default).
pub const BUF: u64 = 2048;
/// The receive control the driver uses by default: enabled, broadcast, strip CRC, 2 KiB.
pub const RCTL_DEFAULT: u32 = RCTL_EN | RCTL_BAM | RCTL_SECRC;

pub const MAC_A: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x01];
pub const MAC_B: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x02];
pub const BROADCAST: [u8; 6] = [0xFF; 6];

/// A domain's wake eventfd and the wake-ups seen on it.
pub struct WakeCounter {
    pub fd: WakeDomain,
    seen: AtomicU64,
}

impl WakeCounter {
    pub fn new() -> Arc<WakeCounter> {
        Arc::new(WakeCounter {
            fd: Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            seen: AtomicU64::new(0),
        })
    }

    /// Wake-ups so far.
    pub fn count(&self) -> u64 {
        let new = self.fd.read().unwrap_or(0);
        self.seen.fetch_add(new, Ordering::Relaxed) + new
    }
}

/// Waits for `cond`, panicking with `what` after 5 s.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// An Ethernet frame of `len` bytes from `src` to `dst` (EtherType 0x88B5, local
/// experimental), its payload a pattern of `n`.
pub fn frame(dst: [u8; 6], src: [u8; 6], n: u32, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xB5]);
    let mut x = n.wrapping_mul(2_654_435_761).wrapping_add(1);
    while f.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        f.push(x as u8);
    }
    f.truncate(len);
    f
}

/// The mock driver.
pub struct TestNic {
    pub nic: EmulatedE1000,
    pub mem: GuestMemoryMmap<()>,
    pub wakes: Arc<WakeCounter>,
    /// Next receive descriptor the driver expects the NIC to fill.
    rx_next: u64,
    /// Next transmit descriptor the driver fills.
    tx_next: u64,
}

pub fn memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

impl TestNic {
    /// A NIC on `wire` with `mac`, attached to a fresh domain with bus mastering on, and its
    /// worker running if `worker`.
    pub fn on(mac: [u8; 6], wire: Box<dyn Wire>, worker: bool) -> TestNic {
        let mem = memory();
        let dma = DmaWindow::detached();
        let mut nic = EmulatedE1000::new(E1000Config { mac, wire }, dma).unwrap();
        let wakes = WakeCounter::new();
        nic.attach(mem.clone(), wakes.fd.clone()).unwrap();
        nic.set_bus_master(true);
        if worker {
            nic.start_worker().unwrap();
        }
        TestNic {
            nic,
            mem,
            wakes,
            rx_next: 0,
            tx_next: 0,
        }
    }

    /// Two NICs (A and B, with workers) joined by an in-process wire with `cfg`, initialised.
    pub fn pair(cfg: PairConfig) -> (TestNic, TestNic) {
        let (wa, wb) = wire_pair(cfg).unwrap();
        let mut a = TestNic::on(MAC_A, Box::new(wa), true);
        let mut b = TestNic::on(MAC_B, Box::new(wb), true);
        a.init(RCTL_DEFAULT);
        b.init(RCTL_DEFAULT);
        (a, b)
    }

    /// A NIC with a worker whose wire's far end the test holds, initialised.
    pub fn with_peer() -> (TestNic, PairEnd) {
        let (ours, peer) = wire_pair(PairConfig::default()).unwrap();
        let mut t = TestNic::on(MAC_A, Box::new(ours), true);
        t.init(RCTL_DEFAULT);
        (t, peer)
    }

    pub fn read32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.nic.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    }

    /// A raw BAR0 write of any width.
    pub fn nic_write(&mut self, off: u64, data: &[u8]) {
        self.nic.bar_write(0, off, data);
    }

    pub fn write32(&mut self, off: u64, v: u32) {
        self.nic.bar_write(0, off, &v.to_le_bytes());
    }

    /// An EEPROM word through EERD.
    pub fn eeprom(&mut self, word: u32) -> u16 {
        self.write32(EERD, EERD_START | word << EERD_ADDR_SHIFT);
        let v = self.read32(EERD);
        assert!(v & EERD_DONE != 0, "EERD done");
        (v >> EERD_DATA_SHIFT) as u16
    }

    /// The MAC from EEPROM words 0 to 2.
    pub fn eeprom_mac(&mut self) -> [u8; 6] {
        let w: Vec<u16> = (0..3).map(|i| self.eeprom(i)).collect();
        let mut m = [0u8; 6];
        for i in 0..3 {
            m[2 * i..2 * i + 2].copy_from_slice(&w[i].to_le_bytes());
        }
        m
    }

    /// A PHY register through MDIC.
    pub fn phy_read(&mut self, reg: u32) -> u32 {
        self.write32(
            MDIC,
            MDIC_OP_READ | 1 << MDIC_PHY_SHIFT | reg << MDIC_REG_SHIFT,
        );
        self.read32(MDIC)
    }

    /// What a driver does to bring the NIC up: quiesce, reset, MAC from the EEPROM into
    /// receive address 0, MTA cleared, receive ring with every buffer posted and `rctl`,
    /// transmit ring with TCTL EN|PSP.
    pub fn init(&mut self, rctl: u32) {
        self.write32(IMC, !0);
        self.write32(RCTL, 0);
        self.write32(TCTL, 0);
        self.write32(CTRL, CTRL_RST);
        let mac = self.eeprom_mac();
        self.write32(RA, u32::from_le_bytes([mac[0], mac[1], mac[2], mac[3]]));
        self.write32(
            RA + 4,
            u32::from(u16::from_le_bytes([mac[4], mac[5]])) | RAH_AV,
        );
        for i in 0..128 {
            self.write32(MTA + 4 * i, 0);
        }
        self.write32(CTRL, CTRL_SLU | CTRL_ASDE);
        self.rx_ring(RX_RING, RING);
        self.write32(RCTL, rctl);
        self.write32(TDBAL, TX_RING as u32);
        self.write32(TDBAH, 0);
        self.write32(TDLEN, (RING * DESC_SIZE) as u32);
        self.write32(TDH, 0);
        self.write32(TDT, 0);
        self.tx_next = 0;
        self.write32(TIPG, 0x0060_200A);
        self.write32(TCTL, TCTL_EN | TCTL_PSP);
    }

    /// Programs a receive ring of `size` descriptors at `base`, every buffer posted.
    pub fn rx_ring(&mut self, base: u64, size: u64) {
        for i in 0..size {
            self.rx_desc(base, i);
        }
        self.write32(RDBAL, base as u32);
        self.write32(RDBAH, (base >> 32) as u32);
        self.write32(RDLEN, (size * DESC_SIZE) as u32);
        self.write32(RDH, 0);
        self.write32(RDT, (size - 1) as u32);
        self.rx_next = 0;
    }

    /// Writes receive descriptor `i` of the ring at `base`: its buffer, status cleared.
    fn rx_desc(&mut self, base: u64, i: u64) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&(RX_BUFS + i * BUF).to_le_bytes());
        self.mem
            .write_slice(&d, GuestAddress(base + i * DESC_SIZE))
            .unwrap();
    }

    /// Sends one frame from transmit buffer(s): `chunks` descriptors, the last with EOP,
    /// every one with RS; returns after the TDT write (which transmits on this thread).
    pub fn send_chunks(&mut self, frame: &[u8], chunks: usize) {
        let per = frame.len().div_ceil(chunks.max(1)).max(1);
        let parts: Vec<&[u8]> = frame.chunks(per).collect();
        let n = parts.len();
        for (k, part) in parts.into_iter().enumerate() {
            let i = self.tx_next;
            let buf = TX_BUFS + i * BUF;
            self.mem.write_slice(part, GuestAddress(buf)).unwrap();
            let cmd = TXD_CMD_RS | TXD_CMD_IFCS | if k == n - 1 { TXD_CMD_EOP } else { 0 };
            self.tx_desc(i, buf, part.len() as u16, cmd);
            self.tx_next = (i + 1) % RING;
        }
        self.write32(TDT, self.tx_next as u32);
    }

    /// Writes transmit descriptor `i` (status cleared).
    pub fn tx_desc(&mut self, i: u64, buf: u64, len: u16, cmd: u8) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&buf.to_le_bytes());
        d[8..10].copy_from_slice(&len.to_le_bytes());
        d[11] = cmd;
        self.mem
            .write_slice(&d, GuestAddress(TX_RING + i * DESC_SIZE))
            .unwrap();
    }

    /// Sends one frame and checks that its descriptor is done.
    pub fn send(&mut self, frame: &[u8]) {
        self.send_chunks(frame, 1);
        let last = (self.tx_next + RING - 1) % RING;
        assert!(self.tx_done(last), "descriptor {last} done after TDT");
    }

    /// Whether transmit descriptor `i` has DD.
    pub fn tx_done(&self, i: u64) -> bool {
        let s: u8 = self
            .mem
            .read_obj(GuestAddress(TX_RING + i * DESC_SIZE + 12))
            .unwrap();
        s & DESC_STA_DD != 0
    }

    /// The next received frame, if one is complete now (its descriptors given back).
    pub fn try_recv(&mut self) -> Option<Vec<u8>> {
        let base = u64::from(self.read32(RDBAL)) | u64::from(self.read32(RDBAH)) << 32;
        let size = u64::from(self.read32(RDLEN)) / DESC_SIZE;
        let mut frame = Vec::new();
        let mut i = self.rx_next;
        loop {
            let at = GuestAddress(base + i * DESC_SIZE);
            let mut d = [0u8; 16];
            self.mem.read_slice(&mut d, at).unwrap();
            if d[12] & DESC_STA_DD == 0 {
                return None;
            }
            let len = usize::from(u16::from_le_bytes([d[8], d[9]]));
            let buf = u64::from_le_bytes(d[..8].try_into().unwrap());
            let at = frame.len();
            frame.resize(at + len, 0);
            self.mem
                .read_slice(&mut frame[at..], GuestAddress(buf))
                .unwrap();
            let eop = d[12] & RXD_STA_EOP != 0;
            i = (i + 1) % size;
            if eop {
                break;
            }
        }
        // Give the descriptors back: status cleared, RDT at the last one.
        let mut j = self.rx_next;
        while j != i {
            self.rx_desc(base, j);
            self.write32(RDT, j as u32);
            j = (j + 1) % size;
        }
        self.rx_next = i;
        Some(frame)
    }

    /// The next received frame, waiting up to 5 s.
    pub fn recv(&mut self) -> Vec<u8> {
        let mut got = None;
        wait_until("a frame received", || {
            got = self.try_recv();
            got.is_some()
        });
        got.unwrap()
    }

    /// Asserts that nothing arrives within 20 ms.
    pub fn recv_nothing(&mut self) {
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(self.try_recv(), None, "a frame arrived");
    }
}
