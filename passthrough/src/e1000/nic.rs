//! The NIC's state: registers, EEPROM, PHY, interrupts, statistics. The passes over the rings
//! are in `tx` and `rx`.
//!
//! Everything here runs with the NIC lock held (see the module docs of [`super`]): a register
//! access on a vCPU thread, a pass on the worker's or the poller's thread, a reset on the VMM's.
//! A pass does all its DMA before it returns, so holding the lock also means no DMA is in
//! progress.

use std::sync::Arc;

use vm_memory::{MmapRegion, VolatileMemory};

use super::eeprom::{self, EEPROM_ERASED, EEPROM_WORDS, PHY_ADDRESS};
use super::regs::*;
use super::{E1000Stats, BAR0_SIZE, E1000_DEVICE_ID, E1000_VENDOR_ID};
use crate::dma::DmaWindow;
use crate::net::{Wire, WireError};
use crate::pci::WakeDomain;

/// Power-on value of CTRL: full duplex, set link up, 1000 Mb/s.
const CTRL_DEFAULT: u32 = CTRL_FD | CTRL_SLU | CTRL_SPD_1000;
/// Power-on value of PBA: 48 KiB of receive packet buffer.
const PBA_DEFAULT: u32 = 0x0030;
/// Power-on value of LEDCTL.
const LEDCTL_DEFAULT: u32 = 0x0706_8302;
/// Power-on value of TIPG.
const TIPG_DEFAULT: u32 = 0x0060_200A;

/// A partly assembled transmit frame (descriptors up to the one with EOP).
#[derive(Default)]
pub(super) struct TxChain {
    /// The bytes gathered so far.
    pub frame: Vec<u8>,
    /// The chain outgrew the largest frame: it is dropped at its EOP.
    pub oversize: bool,
    /// The chain held a descriptor the model does not support: dropped at its EOP.
    pub unsupported: bool,
}

/// The NIC (see the module docs).
pub(super) struct Nic {
    pub mac: [u8; 6],
    pub eeprom: [u16; EEPROM_WORDS],
    /// Register file, one word per 4 bytes of BAR0. Registers with side effects have their
    /// own fields; the rest are stored here as written, except those of [`TABLE_PAGE`].
    regs: Vec<u32>,
    /// The registers of `TABLE_PAGE..TABLE_PAGE_END`: a page of memory that a domain's VM may
    /// map (then the domain writes it without an exit), read and written here volatile only.
    tables: Arc<MmapRegion<()>>,
    /// Interrupt causes pending (ICR) and enabled (IMS).
    pub icr: u32,
    pub ims: u32,
    /// Statistics registers (`STATS_BASE..STATS_END`), cleared when read.
    hw_stats: [u32; 64],
    pub wire: Box<dyn Wire>,
    /// The wire is closed for good: nothing is received, sends are counted as errors.
    pub wire_closed: bool,
    /// A receive error other than closing: the worker waits a little before trying again.
    pub wire_backoff: bool,
    pub dma: DmaWindow,
    /// The domain's wake eventfd; `None` while detached.
    pub wake: Option<WakeDomain>,
    pub tx: TxChain,
    /// A DMA of the ring was refused: the ring does nothing until the driver enables it again
    /// (RCTL.EN or TCTL.EN written from 0 to 1) or resets the NIC.
    pub rx_halted: bool,
    pub tx_halted: bool,
    /// Receive scratch buffer: the largest frame the wire carries, or the shortest frame the
    /// ring gets (frames are padded to it).
    pub rx_buf: Vec<u8>,
    /// The packet buffer: frames from the wire waiting for the receiver or for descriptors,
    /// oldest first, with when each arrived (see `rx`).
    pub rx_fifo: std::collections::VecDeque<(std::time::Instant, Vec<u8>)>,
    /// Bytes of the frames in `rx_fifo`.
    pub rx_fifo_bytes: usize,
    /// The model's own counters (they survive resets).
    pub counters: E1000Stats,
}

impl Nic {
    pub fn new(
        mac: [u8; 6],
        wire: Box<dyn Wire>,
        dma: DmaWindow,
        tables: Arc<MmapRegion<()>>,
    ) -> Nic {
        let rx_buf = vec![0; wire.max_frame().max(super::MIN_RX_FRAME)];
        let mut nic = Nic {
            mac,
            eeprom: eeprom::image(mac, E1000_VENDOR_ID, E1000_DEVICE_ID),
            regs: vec![0; (BAR0_SIZE / 4) as usize],
            tables,
            icr: 0,
            ims: 0,
            hw_stats: [0; 64],
            wire,
            wire_closed: false,
            wire_backoff: false,
            dma,
            wake: None,
            tx: TxChain::default(),
            rx_halted: false,
            tx_halted: false,
            rx_buf,
            rx_fifo: std::collections::VecDeque::new(),
            rx_fifo_bytes: 0,
            counters: E1000Stats::default(),
        };
        nic.reset();
        nic
    }

    /// The page of tables in use.
    pub fn tables(&self) -> Arc<MmapRegion<()>> {
        self.tables.clone()
    }

    /// Makes `page` the page of tables, with the values of the one in use.
    pub fn use_tables(&mut self, page: Arc<MmapRegion<()>>) {
        if Arc::ptr_eq(&page, &self.tables) {
            return;
        }
        let words: Vec<u32> = (TABLE_PAGE..TABLE_PAGE_END)
            .step_by(4)
            .map(|off| self.reg(off))
            .collect();
        self.tables = page;
        for (off, v) in (TABLE_PAGE..TABLE_PAGE_END).step_by(4).zip(words) {
            self.set_reg(off, v);
        }
    }

    /// The register at `off` (a multiple of 4 inside BAR0).
    pub fn reg(&self, off: u64) -> u32 {
        if (TABLE_PAGE..TABLE_PAGE_END).contains(&off) {
            // The page is TABLE_PAGE_END - TABLE_PAGE bytes and `off` 4-aligned: in bounds.
            return self
                .tables
                .get_ref::<u32>((off - TABLE_PAGE) as usize)
                .map_or(0, |r| r.load());
        }
        self.regs[(off / 4) as usize]
    }

    pub fn set_reg(&mut self, off: u64, v: u32) {
        if (TABLE_PAGE..TABLE_PAGE_END).contains(&off) {
            if let Ok(r) = self.tables.get_ref::<u32>((off - TABLE_PAGE) as usize) {
                r.store(v);
            }
            return;
        }
        self.regs[(off / 4) as usize] = v;
    }

    /// Resets the MAC to its power-on state: registers, interrupts, rings, statistics,
    /// receive address 0 loaded from the EEPROM. The PHY and the link are not touched (the
    /// link stays up, no LSC), nor are the wire, the DMA window, the wake eventfd or the
    /// model's counters.
    pub fn reset(&mut self) {
        self.regs.fill(0);
        for off in (TABLE_PAGE..TABLE_PAGE_END).step_by(4) {
            self.set_reg(off, 0);
        }
        self.set_reg(CTRL, CTRL_DEFAULT);
        self.set_reg(PBA, PBA_DEFAULT);
        self.set_reg(LEDCTL, LEDCTL_DEFAULT);
        self.set_reg(TIPG, TIPG_DEFAULT);
        let m = self.mac;
        self.set_reg(RA, u32::from_le_bytes([m[0], m[1], m[2], m[3]]));
        self.set_reg(RA + 4, u32::from(u16::from_le_bytes([m[4], m[5]])) | RAH_AV);
        self.icr = 0;
        self.ims = 0;
        self.hw_stats = [0; 64];
        self.tx = TxChain::default();
        self.rx_halted = false;
        self.tx_halted = false;
    }

    /// Sets interrupt causes; wakes the domain if one of them is enabled.
    pub fn raise(&mut self, causes: u32) {
        let causes = causes & ICR_ALL;
        if causes == 0 {
            return;
        }
        self.icr |= causes;
        if causes & self.ims != 0 {
            self.wake();
        }
    }

    /// Writes the domain's wake eventfd (nothing while detached).
    fn wake(&mut self) {
        if let Some(w) = &self.wake {
            // EAGAIN means the counter is full: the domain is woken anyway.
            let _ = w.write(1);
            self.counters.interrupts += 1;
        }
    }

    /// Adds `n` to the statistics register at `off`, saturating.
    pub fn count(&mut self, off: u64, n: u32) {
        let i = ((off - STATS_BASE) / 4) as usize;
        self.hw_stats[i] = self.hw_stats[i].saturating_add(n);
    }

    /// Adds `n` to the 64-bit octet counter whose low half is at `low`, saturating.
    pub fn count64(&mut self, low: u64, n: u64) {
        let i = ((low - STATS_BASE) / 4) as usize;
        let v = (u64::from(self.hw_stats[i + 1]) << 32) | u64::from(self.hw_stats[i]);
        let v = v.saturating_add(n);
        self.hw_stats[i] = v as u32;
        self.hw_stats[i + 1] = (v >> 32) as u32;
    }

    /// Counts a frame of `len` bytes in the size buckets at `bucket64` (64, 65-127, 128-255,
    /// 256-511, 512-1023, 1024-1522 bytes; CRC included, as hardware counts).
    pub fn count_size(&mut self, bucket64: u64, len: usize) {
        let len = len + 4;
        let bucket = match len {
            ..=64 => 0,
            65..=127 => 1,
            128..=255 => 2,
            256..=511 => 3,
            512..=1023 => 4,
            _ => 5,
        };
        self.count(bucket64 + 4 * bucket, 1);
    }

    /// Notes a wire error; a closed wire is given up.
    pub fn wire_error(&mut self, e: &WireError) {
        self.counters.wire_errors += 1;
        match e {
            WireError::Closed { .. } => {
                if !self.wire_closed {
                    tracing::warn!("e1000 {}: {e}; the link stays up", mac_str(&self.mac));
                }
                self.wire_closed = true;
            }
            _ => self.wire_backoff = true,
        }
    }

    /// Stops the receive (`rx`) or transmit ring after a refused DMA. The domain can make
    /// this happen again and again, so it is logged only the 1st, 2nd, 4th, 8th, ... time.
    pub fn halt(&mut self, rx: bool, what: &str) {
        let halts = if rx {
            self.rx_halted = true;
            &mut self.counters.rx_halts
        } else {
            self.tx_halted = true;
            self.tx = TxChain::default();
            &mut self.counters.tx_halts
        };
        *halts += 1;
        if halts.is_power_of_two() {
            let (n, ring) = (*halts, if rx { "receive" } else { "transmit" });
            tracing::warn!(
                "e1000 {}: {what} refused by the DMA window; the {ring} ring stops until the \
                 driver enables it again ({n} times so far)",
                mac_str(&self.mac)
            );
        }
    }

    /// A register read of `data.len()` bytes at `off`.
    pub fn reg_read(&mut self, off: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 4 || !off.is_multiple_of(4) {
            return;
        }
        let v = self.read32(off);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn read32(&mut self, off: u64) -> u32 {
        match off {
            STATUS => STATUS_FD | STATUS_LU | STATUS_SPEED_1000 | STATUS_ASDV_1000,
            EECD => {
                let v = self.reg(EECD);
                let grant = if v & EECD_REQ != 0 { EECD_GNT } else { 0 };
                (v & EECD_REQ) | grant | EECD_PRES
            }
            ICR => std::mem::take(&mut self.icr),
            IMS => self.ims,
            ICS | IMC => 0,
            STATS_BASE..STATS_END => {
                let i = ((off - STATS_BASE) / 4) as usize;
                let v = self.hw_stats[i];
                let low_half = stat::HIGH_HALVES.contains(&(off + 4));
                if stat::HIGH_HALVES.contains(&off) {
                    self.hw_stats[i - 1] = 0;
                }
                if !low_half {
                    self.hw_stats[i] = 0;
                }
                v
            }
            _ if stored(off) => self.reg(off),
            _ => 0,
        }
    }

    /// A register write of `data` at `off`.
    pub fn reg_write(&mut self, off: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.counters.ignored_register_writes += 1;
            return;
        };
        if !off.is_multiple_of(4) {
            self.counters.ignored_register_writes += 1;
            return;
        }
        self.write32(off, u32::from_le_bytes(bytes));
    }

    fn write32(&mut self, off: u64, v: u32) {
        match off {
            CTRL => {
                if v & CTRL_RST != 0 {
                    self.reset();
                } else {
                    // PHY_RST resets the PHY, which has no state to lose: the link stays up.
                    self.set_reg(CTRL, v & !CTRL_PHY_RST);
                }
            }
            EECD => self.set_reg(EECD, v & EECD_REQ),
            EERD => {
                if v & EERD_START != 0 {
                    let addr = (v >> EERD_ADDR_SHIFT) & 0xFF;
                    let word = self
                        .eeprom
                        .get(addr as usize)
                        .copied()
                        .unwrap_or(EEPROM_ERASED);
                    self.set_reg(
                        EERD,
                        EERD_DONE | addr << EERD_ADDR_SHIFT | u32::from(word) << EERD_DATA_SHIFT,
                    );
                }
            }
            MDIC => self.mdic(v),
            ICR => self.icr &= !v,
            ICS => self.raise(v),
            IMS => {
                let newly = v & !self.ims & ICR_ALL;
                self.ims |= v & ICR_ALL;
                if newly & self.icr != 0 {
                    self.wake();
                }
            }
            IMC => self.ims &= !v,
            RCTL => {
                let was = self.reg(RCTL);
                if v & RCTL_EN != 0 && was & RCTL_EN == 0 {
                    self.rx_halted = false;
                }
                self.set_reg(RCTL, v);
                if v & RCTL_EN != 0 {
                    let causes = self.drain_fifo();
                    self.raise(causes);
                }
            }
            TCTL => {
                let was = self.reg(TCTL);
                self.set_reg(TCTL, v);
                if v & TCTL_EN == 0 {
                    // A chain half gathered when transmission stops is abandoned.
                    self.tx = TxChain::default();
                } else if was & TCTL_EN == 0 {
                    self.tx_halted = false;
                    self.tx_pass();
                }
            }
            RDBAL | TDBAL => {
                self.set_reg(off, v & RING_BASE_LOW_MASK);
                self.ring_moved(off);
            }
            RDBAH | TDBAH => {
                self.set_reg(off, v);
                self.ring_moved(off);
            }
            RDLEN | TDLEN => {
                if v & !RING_LEN_MASK != 0 {
                    self.counters.bad_ring_values += 1;
                }
                self.set_reg(off, v & RING_LEN_MASK);
                self.ring_moved(off);
            }
            RDH | RDT | TDH | TDT => {
                if v > RING_INDEX_MASK {
                    self.counters.bad_ring_values += 1;
                }
                let v = v & RING_INDEX_MASK;
                let len = if matches!(off, RDH | RDT) {
                    RDLEN
                } else {
                    TDLEN
                };
                if u64::from(v) >= ring_size(self.reg(len)) {
                    self.counters.bad_ring_values += 1;
                }
                self.set_reg(off, v);
                if off == TDT {
                    self.tx_pass();
                } else if off == RDT {
                    // Descriptors given back: frames waiting in the packet buffer go first.
                    let causes = self.drain_fifo();
                    self.raise(causes);
                }
            }
            STATS_BASE..STATS_END => self.counters.ignored_register_writes += 1,
            _ if stored(off) => self.set_reg(off, v),
            _ => self.counters.ignored_register_writes += 1,
        }
    }

    /// The transmit ring's base or length changed: a chain half gathered from the old ring
    /// is abandoned.
    fn ring_moved(&mut self, off: u64) {
        if matches!(off, TDBAL | TDBAH | TDLEN) {
            self.tx = TxChain::default();
        }
    }

    /// An MDIC write: a PHY register read or write, done at once.
    fn mdic(&mut self, v: u32) {
        let phy = (v >> MDIC_PHY_SHIFT) & 0x1F;
        let reg = (v >> MDIC_REG_SHIFT) & 0x1F;
        let op = v & MDIC_OP_MASK;
        let result = if phy != PHY_ADDRESS || (op != MDIC_OP_READ && op != MDIC_OP_WRITE) {
            v | MDIC_ERROR
        } else if op == MDIC_OP_READ {
            (v & !MDIC_DATA_MASK) | u32::from(eeprom::phy_read(reg))
        } else {
            // Accepted and ignored: the link stays up whatever the driver writes.
            v
        };
        self.set_reg(MDIC, result | MDIC_READY);
        if v & MDIC_INT_EN != 0 {
            self.raise(ICR_MDAC);
        }
    }
}

/// Descriptors in a ring of `len` bytes (RDLEN, TDLEN).
pub(super) fn ring_size(len: u32) -> u64 {
    u64::from(len) / DESC_SIZE
}

/// Whether `off` is a register stored as written (read back as written, no side effect).
fn stored(off: u64) -> bool {
    matches!(
        off,
        CTRL | CTRL_EXT
            | FCAL
            | FCAH
            | FCT
            | VET
            | ITR
            | FCTTV
            | TIPG
            | LEDCTL
            | PBA
            | FCRTL
            | FCRTH
            | EERD
            | MDIC
            | RCTL
            | TCTL
            | RDBAL
            | RDBAH
            | RDLEN
            | RDH
            | RDT
            | RDTR
            | RXDCTL
            | RADV
            | RSRPD
            | TDBAL
            | TDBAH
            | TDLEN
            | TDH
            | TDT
            | TIDV
            | TXDCTL
            | TADV
    ) || (TABLE_PAGE..TABLE_PAGE_END).contains(&off)
}

/// A MAC address as text.
pub(super) fn mac_str(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}
