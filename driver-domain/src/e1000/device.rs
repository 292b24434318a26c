//! One 8254x: bring-up, receive filters, the transmit and receive rings, link state and
//! statistics.
//!
//! Bring-up, in order: quiesce (IMC all ones, RCTL = TCTL = 0), CTRL.RST, then every register
//! the driver depends on written explicitly, because a reset does not always reset (QEMU's
//! model ignores CTRL.RST) and a restarted driver must not inherit its predecessor's state:
//! CTRL (SLU and ASDE; no PHY reset, no link reset, no forced speed), flow control off, the
//! interrupt delays, the rings, TIPG, every RAR entry and the whole multicast table, RCTL,
//! TCTL, and last the interrupt mask. The PHY is never touched (no MDIC access at all):
//! restarting autonegotiation would drop the link for hundreds of milliseconds (seconds on
//! real parts), longer than a restart of the domain should take.
//!
//! The MAC address comes from EEPROM words 0–2 and is cross-checked with RAR0, which the
//! device loads from the EEPROM at reset (and which a predecessor may have rewritten).
//!
//! The I/O path never reads a register: completions are descriptors with DD set (transmit
//! descriptors ask for it with RS), the tails are written by [`Nic::ring`], and only a
//! transmit that has not completed for a long time reads STATUS (a stalled ring with the link
//! down is not an error). Interrupts: IMS holds only RXT0, TXDW and LSC, the causes that are
//! to wake the domain; the driver itself polls.

#![forbid(unsafe_code)]

use guest_kernel::shared::publish_fence;
use guest_kernel::time::{self, Instant};

use super::eeprom;
use super::error::E1000Error;
use super::probe::{Found, Model};
use super::regs::{self, ctrl, int, rctl, status, tctl, Registers};
use super::ring::{stat, txcmd, Ring, MAX_DESCRIPTORS};
use crate::driver::{LinkState, MacAddress, RxFilters};

/// Receive buffer size the device is told (RCTL.BSIZE): every receive buffer has at least
/// this many bytes.
pub const RX_BUFFER_SIZE: u32 = 2048;
/// Largest frame without its FCS: no jumbo frames (RCTL.LPE is off); one VLAN tag fits.
pub const MAX_FRAME: u32 = 1518;
/// Shortest frame handed to the device: an Ethernet header.
pub const MIN_FRAME: u32 = 14;
/// How long CTRL.RST may take to clear.
const RESET_TIMEOUT_US: u64 = 10_000;
/// Wait after setting CTRL.RST before the first register access (the manual asks for at
/// least 1 µs).
const RESET_SETTLE_US: u64 = 5;
/// Interrupt causes that wake the domain.
const WAKE_CAUSES: u32 = int::RXT0 | int::TXDW | int::LSC;
/// Receive-error bit the driver adds for a frame that did not end in its descriptor.
const FRAGMENT: u16 = 1 << 8;

/// Driver settings.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Receive descriptors (a multiple of 8, at most 256).
    pub rx_descriptors: u16,
    /// Transmit descriptors (a multiple of 8, at most 256).
    pub tx_descriptors: u16,
    /// A transmit not written back after this long with the link up is fatal.
    pub tx_timeout_ms: u64,
    /// The function's INTx line wakes the domain (the VMM routes it: a VFIO NIC), so a wait
    /// needs no short timeout; the causes are acknowledged before each wait.
    pub intx: bool,
    /// The VMM hands the function over at its power-on state (the VMM's own model, whose
    /// every hand-over is a complete reset): the driver skips quiescing and resetting it, the
    /// writes of values the reset already set (flow control, VLAN type, interrupt delays, ring
    /// heads and high bases), and takes the MAC from receive address 0, which the reset loaded
    /// from the EEPROM. About 30 register accesses fewer: each an exit to an emulated device.
    pub clean: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rx_descriptors: 64,
            tx_descriptors: 64,
            tx_timeout_ms: 5_000,
            intx: false,
            clean: false,
        }
    }
}

/// Where the MAC address came from and whether the two sources agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacOrigin {
    /// EEPROM words 0–2, if an EEPROM is present.
    pub eeprom: Option<MacAddress>,
    /// RAR0, if its Address Valid bit is set.
    pub rar0: Option<MacAddress>,
}

/// A descriptor's outcome, as the completion's device status carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status(pub u16);

impl Status {
    /// Success: no error bits.
    pub fn is_success(self) -> bool {
        self.0 == 0
    }

    /// Receive errors byte (CE, SE, SEQ, CXE, TCPE, IPE, RXE) and bit 8 for a frame without
    /// EOP; transmit: the EC and LC status bits.
    pub fn bits(self) -> u16 {
        self.0
    }
}

impl core::fmt::Display for Status {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.is_success() {
            write!(f, "e1000: ok")
        } else {
            write!(f, "e1000: descriptor errors {:#05x}", self.0)
        }
    }
}

/// A completed descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    /// The caller's token.
    pub token: u64,
    /// Receive: bytes of the frame (without FCS); `None` for a transmit.
    pub received: Option<u16>,
    /// How it ended.
    pub status: Status,
}

/// Why a buffer was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The ring is full: poll, then retry.
    Full,
    /// Null address or a length out of range.
    Invalid,
}

/// Counters: the device's statistics registers (clear on read, accumulated here) and the
/// driver's own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames missed for lack of receive buffers (MPC).
    pub missed: u64,
    /// Good frames received (GPRC).
    pub good_rx: u64,
    /// Good frames transmitted (GPTC).
    pub good_tx: u64,
    /// Receive descriptors completed with errors (or without EOP).
    pub rx_errors: u64,
    /// Transmit descriptors completed with collisions reported.
    pub tx_errors: u64,
}

/// A driven 8254x.
#[derive(Debug)]
pub struct Nic {
    regs: Registers,
    mac: MacAddress,
    origin: MacOrigin,
    rx: Ring,
    tx: Ring,
    options: Options,
    /// RCTL as last written.
    rctl: u32,
    /// The receive address table as last written (RAL, RAH per entry).
    rar: [(u32, u32); regs::RAR_ENTRIES],
    /// The multicast table as last written.
    mta: [u32; regs::MTA_ENTRIES as usize],
    /// Since when the oldest transmit has been waiting (reset on progress).
    tx_waiting: Option<Instant>,
    stats: Stats,
    shutting_down: bool,
}

impl Nic {
    /// Brings up the device `found`, receiving what the default filters pass (own address and
    /// broadcast).
    pub fn init(found: &Found, options: Options) -> Result<Nic, E1000Error> {
        if found.registers.len() < regs::WINDOW {
            return Err(E1000Error::BarTooSmall {
                len: found.registers.len(),
                need: regs::WINDOW,
            });
        }
        let ok = |n: u16| n.is_multiple_of(8) && (8..=MAX_DESCRIPTORS).contains(&n);
        assert!(
            ok(options.rx_descriptors) && ok(options.tx_descriptors),
            "e1000 ring sizes must be multiples of 8 from 8 to {MAX_DESCRIPTORS}"
        );
        let regs = Registers::new(found.registers);
        if regs.read(regs::STATUS) == u32::MAX {
            return Err(E1000Error::NotResponding);
        }

        let control = if options.clean {
            // At its power-on state: nothing to quiesce, nothing to reset.
            regs.read(regs::CTRL)
        } else {
            // Quiesce, then reset the MAC (not the PHY).
            regs.write(regs::IMC, int::ALL);
            regs.write(regs::RCTL, 0);
            regs.write(regs::TCTL, 0);
            let control = regs.read(regs::CTRL);
            regs.write(regs::CTRL, control | ctrl::RST);
            time::delay_us(RESET_SETTLE_US);
            let start = Instant::now();
            let control = loop {
                let v = regs.read(regs::CTRL);
                if v == u32::MAX {
                    return Err(E1000Error::NotResponding);
                }
                if v & ctrl::RST == 0 {
                    break v;
                }
                let us = start.elapsed_us();
                if us > RESET_TIMEOUT_US {
                    return Err(E1000Error::ResetTimeout { us });
                }
                core::hint::spin_loop();
            };
            regs.write(regs::IMC, int::ALL);
            regs.read(regs::ICR);
            control
        };

        // Link: up, speed from the PHY's autonegotiation result; nothing forced, nothing reset.
        let clear = ctrl::LRST
            | ctrl::PHY_RST
            | ctrl::ILOS
            | ctrl::FRCSPD
            | ctrl::FRCDPLX
            | ctrl::VME
            | ctrl::RFCE
            | ctrl::TFCE;
        let wanted = (control & !clear) | ctrl::SLU | ctrl::ASDE;
        if !options.clean || wanted != control {
            regs.write(regs::CTRL, wanted);
        }
        if !options.clean {
            // No flow control, no VLAN filtering, no interrupt delays (the power-on values).
            for r in [regs::FCAL, regs::FCAH, regs::FCT, regs::FCTTV] {
                regs.write(r, 0);
            }
            regs.write(regs::VET, 0x8100);
            for r in [regs::ITR, regs::RDTR, regs::RADV, regs::TIDV, regs::TADV] {
                regs.write(r, 0);
            }
        }

        let (mac, origin) = if options.clean {
            mac_from_rar0(&regs)?
        } else {
            mac_address(&regs, found.model)?
        };

        let rx = Ring::new(options.rx_descriptors)?;
        let tx = Ring::new(options.tx_descriptors)?;
        // After a reset the heads, tails and high bases are 0: a clean function needs only
        // what differs.
        let set = |r: u64, v: u32| {
            if !options.clean || v != 0 {
                regs.write(r, v);
            }
        };
        set(regs::RDBAL, rx.addr() as u32);
        set(regs::RDBAH, (rx.addr() >> 32) as u32);
        set(regs::RDLEN, rx.bytes());
        set(regs::RDH, 0);
        set(regs::RDT, 0);
        set(regs::TDBAL, tx.addr() as u32);
        set(regs::TDBAH, (tx.addr() >> 32) as u32);
        set(regs::TDLEN, tx.bytes());
        set(regs::TDH, 0);
        set(regs::TDT, 0);
        regs.write(regs::TIPG, regs::TIPG_COPPER);

        let mut nic = Nic {
            regs,
            mac,
            origin,
            rx,
            tx,
            options,
            rctl: 0,
            rar: [(0, 0); regs::RAR_ENTRIES],
            mta: [0; regs::MTA_ENTRIES as usize],
            tx_waiting: None,
            stats: Stats::default(),
            shutting_down: false,
        };
        // Every entry written, whatever it held: nothing is assumed about a reset's effect.
        let filters = RxFilters::own(mac);
        let (rar, mta, filter_bits) = layout(&filters);
        for (i, entry) in rar.iter().enumerate() {
            nic.write_rar(i, *entry);
        }
        for (i, word) in mta.iter().enumerate() {
            nic.regs.write(regs::MTA + 4 * i as u64, *word);
        }
        nic.mta = mta;
        nic.write_rctl(filter_bits);
        nic.regs
            .write(regs::TCTL, tctl::EN | tctl::PSP | tctl::CT | tctl::COLD);
        nic.regs.read(regs::ICR);
        nic.regs.write(regs::IMS, WAKE_CAUSES);
        Ok(nic)
    }

    /// The MAC address in use (RAR0).
    pub fn mac(&self) -> MacAddress {
        self.mac
    }

    /// Where the MAC address was read.
    pub fn mac_origin(&self) -> MacOrigin {
        self.origin
    }

    /// Receive descriptors that can be posted at once.
    pub fn rx_capacity(&self) -> usize {
        self.rx.capacity()
    }

    /// Transmit descriptors that can be in flight at once.
    pub fn tx_capacity(&self) -> usize {
        self.tx.capacity()
    }

    /// Receive buffers posted and not yet completed.
    pub fn rx_posted(&self) -> usize {
        self.rx.in_flight()
    }

    /// Transmits not yet completed.
    pub fn tx_in_flight(&self) -> usize {
        self.tx.in_flight()
    }

    /// Queues the frame of `len` bytes at `buf` (DMA-reachable, unchanged until it completes)
    /// for transmission with `token`; the device learns of it at [`Nic::ring`].
    pub fn transmit(&mut self, buf: u64, len: u32, token: u64) -> Result<(), SubmitError> {
        if buf == 0 || !(MIN_FRAME..=MAX_FRAME).contains(&len) {
            return Err(SubmitError::Invalid);
        }
        if self.shutting_down || self.tx.in_flight() == self.tx.capacity() {
            return Err(SubmitError::Full);
        }
        let cmd = txcmd::EOP | txcmd::IFCS | txcmd::RS;
        self.tx
            .push(buf, u64::from(len) | u64::from(cmd) << 24, token);
        Ok(())
    }

    /// Posts the receive buffer of `len` bytes (at least [`RX_BUFFER_SIZE`]) at `buf` with
    /// `token`; the device learns of it at [`Nic::ring`].
    pub fn post_receive(&mut self, buf: u64, len: u32, token: u64) -> Result<(), SubmitError> {
        if buf == 0 || len < RX_BUFFER_SIZE {
            return Err(SubmitError::Invalid);
        }
        if self.shutting_down || self.rx.in_flight() == self.rx.capacity() {
            return Err(SubmitError::Full);
        }
        self.rx.push(buf, 0, token);
        Ok(())
    }

    /// Tells the device about the buffers queued since the last call (a tail write per ring
    /// that moved).
    pub fn ring(&mut self) {
        publish_fence();
        if let Some(tail) = self.rx.untold() {
            self.regs.write(regs::RDT, u32::from(tail));
        }
        if let Some(tail) = self.tx.untold() {
            if self.tx_waiting.is_none() {
                self.tx_waiting = Some(Instant::now());
            }
            self.regs.write(regs::TDT, u32::from(tail));
        }
    }

    /// Whether a descriptor in flight is done (no register access).
    pub fn completion_pending(&self) -> bool {
        let done = |w: Option<super::ring::WriteBack>| w.is_some_and(|w| w.status & stat::DD != 0);
        done(self.tx.peek()) || done(self.rx.peek())
    }

    /// Hands every completed descriptor to `done`, transmits first; returns how many.
    pub fn poll(&mut self, mut done: impl FnMut(Done)) -> Result<usize, E1000Error> {
        let mut n = 0;
        let mut tx_progress = false;
        while let Some(w) = self.tx.peek().filter(|w| w.status & stat::DD != 0) {
            let errors = u16::from(w.status & (stat::EC | stat::LC));
            if errors != 0 {
                self.stats.tx_errors += 1;
            }
            let token = self.tx.pop();
            done(Done {
                token,
                received: None,
                status: Status(errors),
            });
            n += 1;
            tx_progress = true;
        }
        while let Some(w) = self.rx.peek().filter(|w| w.status & stat::DD != 0) {
            let mut errors = u16::from(w.errors);
            if w.status & stat::EOP == 0 {
                errors |= FRAGMENT;
            }
            if errors != 0 {
                self.stats.rx_errors += 1;
            }
            let token = self.rx.pop();
            done(Done {
                token,
                received: Some(w.length),
                status: Status(errors),
            });
            n += 1;
        }
        self.check_tx_stall(tx_progress)?;
        Ok(n)
    }

    /// A transmit that waits too long with the link up means the device is broken.
    fn check_tx_stall(&mut self, progress: bool) -> Result<(), E1000Error> {
        if self.tx.in_flight() == 0 {
            self.tx_waiting = None;
            return Ok(());
        }
        if progress {
            self.tx_waiting = Some(Instant::now());
            return Ok(());
        }
        let Some(since) = self.tx_waiting else {
            return Ok(());
        };
        let ms = since.elapsed_us() / 1000;
        if ms < self.options.tx_timeout_ms {
            return Ok(());
        }
        let status = self.regs.read(regs::STATUS);
        if status == u32::MAX {
            return Err(E1000Error::NotResponding);
        }
        if status & status::LU != 0 {
            return Err(E1000Error::TxTimeout {
                index: self.tx.head(),
                ms,
            });
        }
        // Link down: the ring waits for the link, not for a broken device.
        self.tx_waiting = Some(Instant::now());
        Ok(())
    }

    /// Programs the receive filters: `filters.mac` in RAR0, the extra unicast addresses in
    /// RAR1.. (more than fit: unicast promiscuous), multicast addresses in the hash table,
    /// broadcast and promiscuous modes in RCTL. Only what changed is written; RCTL in
    /// particular (QEMU's model stops receiving for a second after each RCTL write).
    pub fn set_filters(&mut self, filters: &RxFilters<'_>) -> Result<(), SubmitError> {
        let valid = !filters.mac.is_multicast()
            && filters.unicast.iter().all(|m| !m.is_multicast())
            && filters.multicast.iter().all(|m| m.is_multicast());
        if !valid {
            return Err(SubmitError::Invalid);
        }
        let (rar, mta, bits) = layout(filters);
        for (i, entry) in rar.iter().enumerate() {
            if self.rar[i] != *entry {
                self.write_rar(i, *entry);
            }
        }
        for (i, word) in mta.iter().enumerate() {
            if self.mta[i] != *word {
                self.regs.write(regs::MTA + 4 * i as u64, *word);
            }
        }
        self.mta = mta;
        self.mac = filters.mac;
        if !self.shutting_down {
            self.write_rctl(bits);
        }
        Ok(())
    }

    fn write_rar(&mut self, i: usize, (low, high): (u32, u32)) {
        // Invalidate first, so no half-written address ever matches.
        self.regs.write(regs::rah(i), 0);
        self.regs.write(regs::ral(i), low);
        if high != 0 {
            self.regs.write(regs::rah(i), high);
        }
        self.rar[i] = (low, high);
    }

    fn write_rctl(&mut self, filter_bits: u32) {
        let value = rctl::EN | rctl::SECRC | rctl::BSIZE_2048 | filter_bits;
        if value != self.rctl {
            self.regs.write(regs::RCTL, value);
            self.rctl = value;
        }
    }

    /// The link as STATUS reports it (one register read).
    pub fn link(&self) -> LinkState {
        let s = self.regs.read(regs::STATUS);
        LinkState {
            up: s != u32::MAX && s & status::LU != 0,
            speed_mbps: match (s >> status::SPEED_SHIFT) & 3 {
                0 => 10,
                1 => 100,
                _ => 1000,
            },
            full_duplex: s & status::FD != 0,
        }
    }

    /// Whether the device's interrupts wake the domain ([`Options::intx`]).
    pub fn interrupts(&self) -> bool {
        self.options.intx
    }

    /// Reads and clears the interrupt causes (ICR), returns those that wake the domain.
    pub fn acknowledge(&mut self) -> u32 {
        self.regs.read(regs::ICR) & WAKE_CAUSES
    }

    /// The counters, after adding the device's statistics registers (three reads).
    pub fn stats(&mut self) -> Stats {
        self.stats.missed += u64::from(self.regs.read(regs::MPC));
        self.stats.good_rx += u64::from(self.regs.read(regs::GPRC));
        self.stats.good_tx += u64::from(self.regs.read(regs::GPTC));
        self.stats
    }

    /// Stops the device: no interrupts, receiver and transmitter off. Buffers still posted are
    /// the caller's again once [`Nic::shutdown_done`] says so.
    pub fn begin_shutdown(&mut self) {
        self.shutting_down = true;
        self.regs.write(regs::IMC, int::ALL);
        self.regs.write(regs::RCTL, 0);
        self.rctl = 0;
        self.regs.write(regs::TCTL, 0);
    }

    /// Whether the device is stopped: the receiver and transmitter read back disabled.
    pub fn shutdown_done(&self) -> Result<bool, E1000Error> {
        let rctl = self.regs.read(regs::RCTL);
        let tctl = self.regs.read(regs::TCTL);
        if rctl == u32::MAX || tctl == u32::MAX {
            return Err(E1000Error::NotResponding);
        }
        Ok(self.shutting_down && rctl & rctl::EN == 0 && tctl & tctl::EN == 0)
    }
}

/// Reads the MAC address: the EEPROM's when there is one, else RAR0's; each compared with the
/// other when both exist (a mismatch is reported through [`MacOrigin`], the EEPROM wins).
fn mac_address(regs: &Registers, model: Model) -> Result<(MacAddress, MacOrigin), E1000Error> {
    let eeprom = if eeprom::present(regs) {
        let mut bytes = [0u8; 6];
        for word in 0..3u8 {
            let w = eeprom::read_word(regs, model, word)?.to_le_bytes();
            bytes[2 * usize::from(word)..][..2].copy_from_slice(&w);
        }
        Some(MacAddress(bytes)).filter(|m| m.is_valid_unicast())
    } else {
        None
    };
    let high = regs.read(regs::rah(0));
    let rar0 = (high & regs::RAH_AV != 0)
        .then(|| {
            let low = regs.read(regs::ral(0)).to_le_bytes();
            let high = high.to_le_bytes();
            MacAddress([low[0], low[1], low[2], low[3], high[0], high[1]])
        })
        .filter(|m| m.is_valid_unicast());
    let mac = eeprom.or(rar0).ok_or(E1000Error::NoMacAddress)?;
    Ok((mac, MacOrigin { eeprom, rar0 }))
}

/// The MAC address of a function at its power-on state: receive address 0, which the reset
/// loaded from the EEPROM (a clean hand-over, [`Options::clean`]).
fn mac_from_rar0(regs: &Registers) -> Result<(MacAddress, MacOrigin), E1000Error> {
    let high = regs.read(regs::rah(0));
    let low = regs.read(regs::ral(0)).to_le_bytes();
    let h = high.to_le_bytes();
    let mac = MacAddress([low[0], low[1], low[2], low[3], h[0], h[1]]);
    if high & regs::RAH_AV == 0 || !mac.is_valid_unicast() {
        return Err(E1000Error::NoMacAddress);
    }
    Ok((
        mac,
        MacOrigin {
            eeprom: None,
            rar0: Some(mac),
        },
    ))
}

/// The RAR entries, multicast table and RCTL filter bits for `filters`.
fn layout(
    filters: &RxFilters<'_>,
) -> (
    [(u32, u32); regs::RAR_ENTRIES],
    [u32; regs::MTA_ENTRIES as usize],
    u32,
) {
    let mut rar = [(0, 0); regs::RAR_ENTRIES];
    let mut bits = 0;
    rar[0] = rar_entry(filters.mac);
    if filters.unicast.len() > regs::RAR_ENTRIES - 1 {
        bits |= rctl::UPE;
    } else {
        for (slot, mac) in rar[1..].iter_mut().zip(filters.unicast) {
            *slot = rar_entry(*mac);
        }
    }
    let mut mta = [0u32; regs::MTA_ENTRIES as usize];
    for mac in filters.multicast {
        let hash = mta_hash(*mac);
        mta[usize::from(hash >> 5)] |= 1 << (hash & 31);
    }
    if filters.broadcast {
        bits |= rctl::BAM;
    }
    if filters.all_unicast {
        bits |= rctl::UPE;
    }
    if filters.all_multicast {
        bits |= rctl::MPE;
    }
    (rar, mta, bits)
}

/// RAL and RAH (with Address Valid) for `mac`.
fn rar_entry(mac: MacAddress) -> (u32, u32) {
    let m = mac.0;
    (
        u32::from_le_bytes([m[0], m[1], m[2], m[3]]),
        u32::from_le_bytes([m[4], m[5], 0, 0]) | regs::RAH_AV,
    )
}

/// The multicast table bit for `mac` with RCTL.MO = 00: destination address bits 47:36.
fn mta_hash(mac: MacAddress) -> u16 {
    (u16::from(mac.0[4]) >> 4 | u16::from(mac.0[5]) << 4) & 0xfff
}
