//! An emulated Intel 82540EM Gigabit Ethernet controller (the "e1000"), joined to a [`Wire`].
//!
//! It stands in for a real NIC behind a driver domain, so it behaves like the hardware where
//! a driver can tell, and stays within its [`DmaWindow`] whatever the driver programs.
//!
//! # Identity
//!
//! Vendor 0x8086, device 0x100E (82540EM), subsystem 0x8086:0x001E, class code 0x020000
//! (network, Ethernet). BAR0 is 128 KiB of 32-bit memory space holding the registers; there
//! is no I/O BAR (the I/O window of the real device only reaches the same registers) and no
//! flash BAR.
//!
//! # What is modelled
//!
//! - Registers: CTRL (RST resets the MAC; see below), STATUS (link up, full duplex,
//!   1000 Mb/s, always), EECD (request/grant, present), EERD (EEPROM reads), MDIC (the PHY),
//!   ICR/ICS/IMS/IMC, RCTL, TCTL, TIPG, the receive and transmit ring registers, the 16
//!   receive addresses (RAL/RAH with AV), the 128-word MTA, the statistics registers (clear
//!   on read; the octet counters' high half clears the pair), and registers a driver
//!   programs without effect here (RDTR, RADV, TIDV, TADV, ITR, flow control, VFTA, wake-up,
//!   ...) stored as written. Other offsets read 0 and ignore writes, which are counted
//!   ([`E1000Stats::ignored_register_writes`]), as are accesses that are not 4 bytes wide
//!   and aligned.
//! - The EEPROM: 64 words, the MAC in words 0 to 2, a valid checksum (`eeprom`).
//! - The PHY at MDIO address 1: link up and autonegotiated; writes ignored.
//! - Legacy receive and transmit descriptors (16 bytes): see `rx` and `tx` for what each
//!   pass does and how hostile values are handled.
//! - The receive filter: exact matches (RAR with AV), the MTA hash (RCTL.MO 0 to 3), BAM,
//!   UPE, MPE.
//! - Interrupts: the causes TXDW, TXQE, RXDMT0, RXO, RXT0 and MDAC are raised by the model,
//!   any cause by ICS; LSC never is, since the link never changes. The 82540EM has no MSI-X:
//!   an interrupt is a write of the domain's wake eventfd, made each time a cause enabled in
//!   IMS is raised, or an IMS write enables a cause already pending. Reading ICR clears it.
//!   Interrupt moderation (ITR, RDTR, RADV, TIDV, TADV) is not modelled: causes are raised
//!   at the end of each pass.
//!
//! Not modelled: extended (context and TCP/IP data) transmit descriptors (a chain holding one
//! is dropped and counted), checksum and segmentation offload, VLAN filtering and tag
//! handling, flow control frames, jumbo frames (LPE: frames stay within 1522 bytes),
//! loopback modes, the bit-banged Microwire EEPROM interface (EECD's data pins read 0; use
//! EERD), wake-up and manageability, and the I/O BAR.
//!
//! # Registers as memory
//!
//! The page `0x5000..0x6000` of BAR0 holds only registers without side effects: RXCSUM, the
//! MTA, the receive addresses, the VFTA, wake-up and manageability. The model keeps them in a
//! page of memory instead of its register file, so that a VMM can map that page into the
//! domain's VM and the driver writes the tables (every entry at each initialization: about
//! 160 registers) without an exit each. Every offset of that page reads back what was
//! written. Each domain has a page of its own, mapped when its VM is made, before its vCPU
//! runs (a memory slot costs a KVM SRCU grace period, which the recovery path should not
//! wait for); [`E1000Monitor::use_tables`] makes it the NIC's when the domain is handed the
//! NIC, after copying the current values into it, and gives the NIC its own page back when
//! the domain goes: a standby or a dead domain writing its page reaches nothing. The model
//! reads the page with volatile loads only, under the NIC lock, when it filters a frame; an
//! entry the domain is rewriting at that moment filters that frame by the old or the new
//! address, as on the hardware (the driver invalidates an address before changing it).
//!
//! # Reset and the link
//!
//! A function reset ([`PciBackend::reset`]) and CTRL.RST put the MAC back to its power-on
//! state: registers, rings, interrupt causes and mask, statistics, and receive address 0
//! reloaded from the EEPROM. Unlike QEMU's e1000, which ignores CTRL.RST, the reset is real,
//! so a new driver finds a clean device. The PHY and the link are never touched: STATUS.LU
//! stays 1 and no LSC is raised across any reset or PHY write, so a driver that restarts
//! waits for no autonegotiation.
//!
//! # Threads and locking
//!
//! One mutex guards the whole NIC (registers, rings, the wire); everything takes it for one
//! register access or one pass and does all its DMA inside, so a reset or a detach that
//! holds it knows no DMA is under way.
//!
//! - Transmission runs on the thread that writes TDT (a trapped MMIO write, the vCPU's), so
//!   the frames are on the wire when the driver resumes; also when TCTL.EN or bus mastering
//!   is switched on, and in [`E1000Poller::poll`]. A pass takes at most one ring's worth of
//!   descriptors.
//! - Reception is driven by the wire, in one of two ways, as the NVMe model's passes are:
//!   - [`EmulatedE1000::start_worker`] starts a worker thread that sleeps on the wire's
//!     descriptor (`worker`); dropping the NIC stops and joins it;
//!   - [`EmulatedE1000::poller`] gives an [`E1000Poller`] to a thread that already polls other
//!     work: it calls [`E1000Poller::poll`] in its loop and sleeps on [`E1000Poller::fd`]
//!     among its other descriptors.
//!
//!   A receive pass takes at most [`RX_BUDGET`] frames. A frame with nowhere to go is dropped
//!   and counted at once: the wire is never left unread because the ring is full.
//!
//! # A NIC that outlives its domain
//!
//! As with the NVMe model, [`crate::pci::PciDevice::quiesce`] resets the NIC (bus mastering
//! off, function reset) and detaches it ([`PciBackend::detach`]: the DMA window is detached
//! and the wake eventfd dropped, both under the NIC lock, so nothing reaches the old domain
//! once it returns); [`crate::pci::PciDevice::attach`] gives it the next domain's memory and
//! wake eventfd. The wire, the worker and [`E1000Stats`] stay with the VMM throughout.

mod eeprom;
mod nic;
mod regs;
mod rx;
mod tx;
mod worker;

#[cfg(test)]
mod testdriver;
#[cfg(test)]
mod tests;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vm_memory::{GuestMemoryMmap, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::dma::DmaWindow;
use crate::net::{Wire, WireStats, MIN_FRAME};
use crate::pci::{BarInfo, BarKind, PciBackend, PciIds, WakeDomain};
use crate::sync::lock;
use nic::{mac_str, Nic};

pub use eeprom::{EEPROM_SUM, EEPROM_WORDS};

/// PCI vendor ID (Intel).
pub const E1000_VENDOR_ID: u16 = 0x8086;
/// PCI device ID (82540EM).
pub const E1000_DEVICE_ID: u16 = 0x100E;
/// PCI subsystem vendor ID.
pub const E1000_SUBSYSTEM_VENDOR_ID: u16 = 0x8086;
/// PCI subsystem ID (PRO/1000 MT Desktop).
pub const E1000_SUBSYSTEM_ID: u16 = 0x001E;
/// PCI class code: network controller, Ethernet.
pub const E1000_CLASS_CODE: u32 = 0x020000;
/// Size of BAR0 (the registers).
pub const BAR0_SIZE: u64 = 128 << 10;
/// Frames shorter than this reach the receive ring padded with zeros (60 bytes: the shortest
/// Ethernet frame without its CRC).
pub const MIN_RX_FRAME: usize = 60;
/// Frames one receive pass takes from the wire at most.
pub const RX_BUDGET: usize = 64;

/// The page of BAR0 whose registers are plain memory (the filter tables and the other
/// registers without side effects): where it is in BAR0 and the memory behind it, which lives
/// as long as any clone of this handle.
#[derive(Clone)]
pub struct TablePage {
    /// Offset in BAR0.
    pub offset: u64,
    region: Arc<MmapRegion<()>>,
}

impl TablePage {
    /// A fresh page of zeros, to give a NIC with [`E1000Monitor::use_tables`].
    pub fn new() -> Result<TablePage, vm_memory::mmap::MmapRegionError> {
        Ok(TablePage {
            offset: regs::TABLE_PAGE,
            region: Arc::new(MmapRegion::new(
                (regs::TABLE_PAGE_END - regs::TABLE_PAGE) as usize,
            )?),
        })
    }

    /// Whether `self` and `other` are the same memory.
    pub fn same(&self, other: &TablePage) -> bool {
        Arc::ptr_eq(&self.region, &other.region)
    }

    /// Its size in bytes (a page).
    pub fn size(&self) -> u64 {
        self.region.size() as u64
    }

    /// The host address of the memory: valid, for [`TablePage::size`] bytes, while this handle
    /// (or another clone) lives.
    pub fn host_addr(&self) -> u64 {
        self.region.as_ptr() as u64
    }
}

/// How to build an emulated e1000.
pub struct E1000Config {
    /// The permanent MAC address (EEPROM words 0 to 2, receive address 0 after reset): a
    /// unicast address, not all zeros.
    pub mac: [u8; 6],
    /// Where frames go and come from.
    pub wire: Box<dyn Wire>,
}

/// Errors building or starting an emulated e1000.
#[derive(Debug, thiserror::Error)]
pub enum E1000Error {
    /// The MAC address is multicast or all zeros.
    #[error("e1000 {mac}: expected a unicast MAC address that is not all zeros")]
    Mac {
        /// The address given.
        mac: String,
    },
    /// The wire cannot carry a frame of the shortest padded size.
    #[error("e1000 {mac}: the wire carries frames of at most {max} bytes; expected at least {MIN_RX_FRAME}")]
    WireFrame {
        /// The NIC's address.
        mac: String,
        /// The wire's largest frame.
        max: usize,
    },
    /// The stop eventfd cannot be created.
    #[error("e1000 {mac}: cannot create the stop eventfd: {source}")]
    EventFd {
        /// The NIC's address.
        mac: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The page of filter tables cannot be mapped.
    #[error("e1000 {mac}: cannot map the page of filter tables: {source}")]
    Tables {
        /// The NIC's address.
        mac: String,
        /// Cause.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// `start_worker` was called twice.
    #[error("e1000 {mac}: the worker thread is already running")]
    WorkerRunning {
        /// The NIC's address.
        mac: String,
    },
    /// The worker thread cannot be spawned.
    #[error("e1000 {mac}: cannot spawn the worker thread: {source}")]
    Spawn {
        /// The NIC's address.
        mac: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Counters of an emulated e1000, across resets and domains (the statistics registers the
/// driver reads are separate: they clear on read and on reset).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct E1000Stats {
    /// Frames handed to the wire.
    pub frames_sent: u64,
    /// Frames written to the receive ring.
    pub frames_received: u64,
    /// Frames for us dropped for want of a free receive descriptor or a usable ring (MPC).
    pub rx_missed: u64,
    /// Frames the receive filter refused.
    pub rx_filtered: u64,
    /// Frames waiting in the packet buffer now (for descriptors, the receiver, or a domain).
    pub rx_waiting: u64,
    /// Frames that arrived while receive was disabled.
    pub rx_disabled: u64,
    /// Transmit chains dropped: longer than the largest frame, shorter than an Ethernet
    /// header, holding an unsupported descriptor, or refused by the wire.
    pub tx_dropped: u64,
    /// Extended (DEXT) transmit descriptors seen.
    pub tx_unsupported: u64,
    /// Times the receive ring stopped on a refused DMA.
    pub rx_halts: u64,
    /// Times the transmit ring stopped on a refused DMA.
    pub tx_halts: u64,
    /// Whether the receive ring is stopped now.
    pub rx_halted: bool,
    /// Whether the transmit ring is stopped now.
    pub tx_halted: bool,
    /// Ring registers written with values the hardware cannot hold: lengths not a multiple
    /// of 128 (clamped down), heads or tails beyond the ring or 16 bits (the ring then does
    /// nothing until they are inside).
    pub bad_ring_values: u64,
    /// Register writes ignored: unknown or read-only offsets, accesses that are not 4 bytes
    /// wide and aligned.
    pub ignored_register_writes: u64,
    /// Wake-ups of the domain (interrupts).
    pub interrupts: u64,
    /// Errors from the wire (sending or receiving).
    pub wire_errors: u64,
    /// Whether the wire closed for good.
    pub wire_closed: bool,
    /// Accesses the DMA window refused, for any reason ([`DmaWindow::refused`]).
    pub dma_refused: u64,
}

/// State shared by the NIC handle, its worker and its pollers.
struct Shared {
    nic: Mutex<Nic>,
    /// The NIC's own page of tables, in use when no domain's page is.
    own_tables: Arc<MmapRegion<()>>,
    /// The wire's descriptor, fixed for its life.
    wire_fd: RawFd,
    stop: AtomicBool,
    stop_fd: EventFd,
    dma: DmaWindow,
}

impl Shared {
    fn with_nic<R>(&self, f: impl FnOnce(&mut Nic) -> R) -> R {
        f(&mut lock(&self.nic))
    }

    fn stats(&self) -> E1000Stats {
        self.with_nic(|n| E1000Stats {
            rx_waiting: n.rx_fifo.len() as u64,
            rx_halted: n.rx_halted,
            tx_halted: n.tx_halted,
            wire_closed: n.wire_closed,
            dma_refused: self.dma.refused(),
            ..n.counters
        })
    }
}

/// A handle on a NIC's counters that stays valid after the NIC is boxed into a
/// [`crate::pci::PciDevice`].
#[derive(Clone)]
pub struct E1000Monitor {
    shared: Arc<Shared>,
}

impl E1000Monitor {
    /// The counters now.
    pub fn stats(&self) -> E1000Stats {
        self.shared.stats()
    }

    /// The wire's counters now.
    pub fn wire_stats(&self) -> WireStats {
        self.shared.with_nic(|n| n.wire.stats())
    }

    /// From now on the registers of the table page are `page` (`None`: the NIC's own page
    /// again), which first gets their current values. Give a domain's page when it is handed
    /// the NIC, and take it back (`None`) when the domain goes: whatever the domain writes in
    /// its page before or after then reaches nothing.
    pub fn use_tables(&self, page: Option<&TablePage>) {
        let own = &self.shared.own_tables;
        self.shared
            .with_nic(|n| n.use_tables(page.map_or(own, |p| &p.region).clone()));
    }
}

/// Runs a NIC's passes on a thread that polls other work too (see the module docs).
#[derive(Clone)]
pub struct E1000Poller {
    shared: Arc<Shared>,
}

impl E1000Poller {
    /// A transmit pass, then a receive pass (up to [`RX_BUDGET`] frames). Returns the
    /// descriptors and frames taken: zero means nothing was waiting. After a return of
    /// [`RX_BUDGET`] or more, poll again before sleeping.
    pub fn poll(&self) -> usize {
        self.shared.with_nic(|n| n.tx_pass() + n.rx_pass(RX_BUDGET))
    }

    /// Readable when frames may be waiting on the wire: sleep on it among other descriptors.
    /// Once [`E1000Stats::wire_closed`], it may poll readable for ever: stop waiting on it.
    pub fn fd(&self) -> RawFd {
        self.shared.wire_fd
    }
}

/// An emulated 82540EM; implements [`PciBackend`] (BAR0 = registers).
pub struct EmulatedE1000 {
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
    mac: [u8; 6],
}

impl EmulatedE1000 {
    /// Builds a NIC in its power-on state with link up; `dma` is the window over the domain's
    /// memory. No thread runs until [`EmulatedE1000::start_worker`].
    pub fn new(cfg: E1000Config, dma: DmaWindow) -> Result<EmulatedE1000, E1000Error> {
        let mac = cfg.mac;
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(E1000Error::Mac { mac: mac_str(&mac) });
        }
        let max = cfg.wire.max_frame();
        if max < MIN_RX_FRAME.max(MIN_FRAME) {
            return Err(E1000Error::WireFrame {
                mac: mac_str(&mac),
                max,
            });
        }
        let stop_fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| E1000Error::EventFd {
            mac: mac_str(&mac),
            source,
        })?;
        let wire_fd = cfg.wire.fd();
        let tables = Arc::new(
            MmapRegion::new((regs::TABLE_PAGE_END - regs::TABLE_PAGE) as usize).map_err(
                |source| E1000Error::Tables {
                    mac: mac_str(&mac),
                    source,
                },
            )?,
        );
        Ok(EmulatedE1000 {
            shared: Arc::new(Shared {
                own_tables: tables.clone(),
                nic: Mutex::new(Nic::new(mac, cfg.wire, dma.clone(), tables)),
                wire_fd,
                stop: AtomicBool::new(false),
                stop_fd,
                dma,
            }),
            worker: Mutex::new(None),
            mac,
        })
    }

    /// Starts the worker thread that receives from the wire.
    pub fn start_worker(&self) -> Result<(), E1000Error> {
        let mut worker = lock(&self.worker);
        if worker.is_some() {
            return Err(E1000Error::WorkerRunning {
                mac: mac_str(&self.mac),
            });
        }
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("e1000-worker".into())
            .spawn(move || {
                crate::thread_started();
                worker::run(shared)
            })
            .map_err(|source| E1000Error::Spawn {
                mac: mac_str(&self.mac),
                source,
            })?;
        *worker = Some(handle);
        Ok(())
    }

    /// A handle to run the NIC's passes on the caller's thread (see the module docs). Use it
    /// instead of a worker, not beside one.
    pub fn poller(&self) -> E1000Poller {
        E1000Poller {
            shared: self.shared.clone(),
        }
    }

    /// The page of BAR0 that is plain memory in use now (see "Registers as memory" in the
    /// module docs).
    pub fn table_page(&self) -> TablePage {
        TablePage {
            offset: regs::TABLE_PAGE,
            region: self.shared.with_nic(|n| n.tables()),
        }
    }

    /// A handle on the counters that outlives boxing into a PciDevice.
    pub fn monitor(&self) -> E1000Monitor {
        E1000Monitor {
            shared: self.shared.clone(),
        }
    }

    /// The counters now.
    pub fn stats(&self) -> E1000Stats {
        self.shared.stats()
    }

    /// The permanent MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// A clone of the NIC's DMA window, to watch [`DmaWindow::refused`].
    pub fn dma(&self) -> DmaWindow {
        self.shared.dma.clone()
    }
}

impl Drop for EmulatedE1000 {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.shared.stop_fd.write(1);
        if let Some(h) = lock(&self.worker).take() {
            let _ = h.join();
        }
    }
}

impl PciBackend for EmulatedE1000 {
    fn ids(&self) -> PciIds {
        PciIds {
            vendor: E1000_VENDOR_ID,
            device: E1000_DEVICE_ID,
            subsystem_vendor: E1000_SUBSYSTEM_VENDOR_ID,
            subsystem: E1000_SUBSYSTEM_ID,
            class_code: E1000_CLASS_CODE,
            revision: 3,
        }
    }

    fn bars(&self) -> Vec<BarInfo> {
        vec![BarInfo {
            index: 0,
            size: BAR0_SIZE,
            kind: BarKind::Mmio32,
            prefetchable: false,
        }]
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar != 0 {
            data.fill(0xff);
        } else {
            self.shared.with_nic(|n| n.reg_read(offset, data));
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar == 0 {
            self.shared.with_nic(|n| n.reg_write(offset, data));
        }
    }

    /// Back to power-on state (see "Reset and the link" in the module docs); waits for a
    /// pass under way.
    fn reset(&mut self) {
        self.shared.with_nic(Nic::reset);
    }

    /// Switching it on runs a transmit pass: descriptors the driver posted before are sent.
    fn set_bus_master(&mut self, enabled: bool) {
        self.shared.dma.set_bus_master(enabled);
        if enabled {
            self.shared.with_nic(|n| n.tx_pass());
        }
    }

    /// Detaches the DMA window and drops the wake eventfd, under the NIC lock: once this
    /// returns, nothing reaches the old domain. The worker keeps receiving: frames arriving
    /// now are dropped (counted as missed).
    fn detach(&mut self) {
        self.shared.with_nic(|n| {
            n.dma.detach();
            n.wake = None;
        });
    }

    fn attach(&mut self, mem: GuestMemoryMmap<()>, wake: WakeDomain) -> Result<(), String> {
        self.shared.with_nic(|n| {
            n.dma.retarget(mem);
            n.wake = Some(wake);
        });
        Ok(())
    }

    /// The quiesce's function reset and CTRL.RST put the MAC back to its power-on state
    /// entirely (see "Reset and the link"; the packet buffer and the link are not registers).
    fn clean_at_handover(&self) -> bool {
        true
    }
}

impl AsRawFd for E1000Poller {
    fn as_raw_fd(&self) -> RawFd {
        self.fd()
    }
}
