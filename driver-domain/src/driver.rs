//! The drivers the channel services talk to, and how the domain picks one for the device it
//! is given.
//!
//! The block channel service (`service`) knows the block class of the channel ABI, not the
//! device: it turns requests into [`IoRequest`]s for a [`BlockDriver`] and the driver's
//! [`Completed`] commands into completions. `main` probes the PCI function the VMM gave the
//! domain, [`pick`]s the driver its class code (and, for NICs, its vendor and device ID) calls
//! for, brings it up and hands it to the service of its class (`Box<dyn BlockDriver>` or
//! `Box<dyn NetDriver>`). Block devices:
//! NVMe (class 01/08/02, `nvme`). Network devices: the Intel 8254x (class 02/00/00, `e1000`)
//! behind [`NetDriver`], which the network channel service (`net_service`) and the self-test
//! drive. [`Driver::class`] names the channel class each driver's service serves. Another
//! driver adds a [`Driver`] kind, a variant of [`DeviceStatus`] and of [`DriverError`], and
//! an implementation of its class's trait.
//!
//! Drivers keep to the rule of `nvme`: no `unsafe`; registers, DMA memory and configuration
//! space go through guest-kernel's HAL.

#![forbid(unsafe_code)]

use core::fmt;

use guest_kernel::pci::PciFunction;

use crate::e1000::device::{self as e1000_device, Status as E1000Status};
use crate::e1000::{self, E1000Error, Nic};
use crate::nvme::cmd::Status as NvmeStatus;
use crate::nvme::probe::NVME_CLASS;
use crate::nvme::{self, Controller, NvmeError};

pub use crate::nvme::{IoKind, IoRequest};

/// The drivers this image has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// NVM Express controllers (`nvme`).
    Nvme,
    /// Intel 8254x Ethernet controllers (`e1000`).
    E1000,
}

impl Driver {
    /// The channel class (`ddvm_abi::channel::class`) whose service drives this driver.
    pub fn class(self) -> u32 {
        match self {
            Driver::Nvme => ddvm_abi::channel::class::BLK,
            Driver::E1000 => ddvm_abi::channel::class::NET,
        }
    }

    /// The driver's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Driver::Nvme => "nvme",
            Driver::E1000 => "e1000",
        }
    }
}

/// The driver for `function`, if this image has one: by class code (base class, subclass,
/// programming interface); an Ethernet controller also by vendor and device ID, since the
/// class says nothing about the register interface.
pub fn pick(function: &PciFunction) -> Option<Driver> {
    match function.class {
        NVME_CLASS => Some(Driver::Nvme),
        e1000::probe::ETHERNET_CLASS => e1000::probe::model(function).map(|_| Driver::E1000),
        _ => None,
    }
}

/// What a block driver found out about its device: what the channel's device info says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockProperties {
    /// Capacity in blocks.
    pub blocks: u64,
    /// Block size in bytes (a multiple of 512).
    pub block_size: u32,
    /// Largest data transfer of one command in bytes, a multiple of the block size.
    pub max_transfer: u32,
    /// Writes are durable only after a flush.
    pub volatile_write_cache: bool,
    /// The device deallocates ranges ([`IoKind::Deallocate`]).
    pub discard: bool,
    /// The device zeroes ranges ([`IoKind::WriteZeroes`]).
    pub write_zeroes: bool,
    /// Serial number, ASCII, space or NUL padded.
    pub serial: [u8; 20],
    /// Model, ASCII, space or NUL padded.
    pub model: [u8; 40],
}

/// A command's status as the device gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceStatus {
    /// An NVMe completion's status field.
    Nvme(NvmeStatus),
    /// An e1000 descriptor's error bits.
    E1000(E1000Status),
}

impl DeviceStatus {
    /// The command succeeded.
    pub fn is_success(self) -> bool {
        match self {
            DeviceStatus::Nvme(s) => s.is_success(),
            DeviceStatus::E1000(s) => s.is_success(),
        }
    }

    /// The device does not do this command.
    pub fn is_unsupported(self) -> bool {
        match self {
            DeviceStatus::Nvme(s) => s.is_unsupported(),
            DeviceStatus::E1000(_) => false,
        }
    }

    /// The status as the channel's completion `detail` carries it.
    pub fn detail(self) -> u16 {
        match self {
            DeviceStatus::Nvme(s) => s.0,
            DeviceStatus::E1000(s) => s.bits(),
        }
    }
}

impl fmt::Display for DeviceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceStatus::Nvme(s) => s.fmt(f),
            DeviceStatus::E1000(s) => s.fmt(f),
        }
    }
}

/// A command the device completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completed {
    /// The token given at submission.
    pub token: u64,
    /// How it ended.
    pub status: DeviceStatus,
}

/// Why a command was not submitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// Every command slot is in use: poll, then retry.
    Full,
    /// The device does not do this operation.
    Unsupported,
    /// The range, length, block count or buffer is wrong for this device.
    Invalid,
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubmitError::Full => write!(f, "queue full"),
            SubmitError::Unsupported => write!(f, "operation not supported by the device"),
            SubmitError::Invalid => write!(f, "request invalid for the device"),
        }
    }
}

/// Why a driver cannot go on: the domain fails with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverError {
    /// The NVMe driver's.
    Nvme(NvmeError),
    /// The e1000 driver's.
    E1000(E1000Error),
}

impl fmt::Display for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriverError::Nvme(e) => e.fmt(f),
            DriverError::E1000(e) => e.fmt(f),
        }
    }
}

impl From<NvmeError> for DriverError {
    fn from(e: NvmeError) -> Self {
        DriverError::Nvme(e)
    }
}

impl From<E1000Error> for DriverError {
    fn from(e: E1000Error) -> Self {
        DriverError::E1000(e)
    }
}

/// A block device's driver, as the channel service uses it: polled, with a fixed number of
/// command slots, each command carrying the caller's token back in its completion.
pub trait BlockDriver {
    /// What the device is.
    fn properties(&self) -> BlockProperties;
    /// Commands that can be in flight at once.
    fn capacity(&self) -> usize;
    /// Commands in flight.
    fn in_flight(&self) -> usize;
    /// Queues `io` with `token` (not yet told to the device: see [`BlockDriver::ring`]).
    fn submit(&mut self, io: &IoRequest, token: u64) -> Result<(), SubmitError>;
    /// Tells the device about the commands queued since the last call.
    fn ring(&mut self);
    /// Whether the device has completions not yet polled.
    fn completion_pending(&self) -> bool;
    /// Whether the device wakes the domain when it completes commands (an interrupt), so a
    /// wait with commands in flight needs no short timeout.
    fn interrupts(&self) -> bool;
    /// Hands every completion the device has to `done`; returns how many.
    fn poll(&mut self, done: &mut dyn FnMut(Completed)) -> Result<usize, DriverError>;
    /// Starts the device's orderly shutdown (after the last command completed).
    fn begin_shutdown(&mut self);
    /// Whether the shutdown is complete; an error once it took too long.
    fn shutdown_done(&self) -> Result<bool, DriverError>;
}

impl BlockDriver for Controller {
    fn properties(&self) -> BlockProperties {
        let disk = self.info();
        let c = &disk.controller;
        BlockProperties {
            blocks: disk.blocks,
            block_size: disk.block_size,
            max_transfer: disk.max_transfer,
            volatile_write_cache: c.vwc,
            discard: c.dataset_management(),
            write_zeroes: c.write_zeroes(),
            serial: c.serial,
            model: c.model,
        }
    }

    fn capacity(&self) -> usize {
        Controller::capacity(self)
    }

    fn in_flight(&self) -> usize {
        Controller::in_flight(self)
    }

    fn submit(&mut self, io: &IoRequest, token: u64) -> Result<(), SubmitError> {
        Controller::submit(self, io, token).map_err(|e| match e {
            nvme::SubmitError::Full => SubmitError::Full,
            nvme::SubmitError::Unsupported => SubmitError::Unsupported,
            nvme::SubmitError::Invalid(_) | nvme::SubmitError::Prp(_) => SubmitError::Invalid,
        })
    }

    fn ring(&mut self) {
        Controller::ring(self);
    }

    fn completion_pending(&self) -> bool {
        Controller::completion_pending(self)
    }

    fn interrupts(&self) -> bool {
        Controller::interrupts(self)
    }

    fn poll(&mut self, done: &mut dyn FnMut(Completed)) -> Result<usize, DriverError> {
        Controller::poll(self, |d| {
            done(Completed {
                token: d.user,
                status: DeviceStatus::Nvme(d.status),
            })
        })
        .map_err(DriverError::from)
    }

    fn begin_shutdown(&mut self) {
        Controller::begin_shutdown(self);
    }

    fn shutdown_done(&self) -> Result<bool, DriverError> {
        Controller::shutdown_done(self).map_err(DriverError::from)
    }
}

/// An Ethernet MAC address, in transmission order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// A group (multicast or broadcast) address: the I/G bit is set.
    pub fn is_multicast(self) -> bool {
        self.0[0] & 1 != 0
    }

    /// An individual address other than all zeroes.
    pub fn is_valid_unicast(self) -> bool {
        !self.is_multicast() && self.0 != [0; 6]
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Which frames a NIC receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxFilters<'a> {
    /// The NIC's own address (it also becomes the address the driver reports).
    pub mac: MacAddress,
    /// More individual addresses to receive.
    pub unicast: &'a [MacAddress],
    /// Group addresses to receive (a hash filter: others may get through).
    pub multicast: &'a [MacAddress],
    /// Receive broadcast frames.
    pub broadcast: bool,
    /// Receive every individual address (promiscuous).
    pub all_unicast: bool,
    /// Receive every group address.
    pub all_multicast: bool,
}

impl RxFilters<'static> {
    /// Own address and broadcast only.
    pub fn own(mac: MacAddress) -> Self {
        RxFilters {
            mac,
            unicast: &[],
            multicast: &[],
            broadcast: true,
            all_unicast: false,
            all_multicast: false,
        }
    }
}

/// A NIC's link as the device reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkState {
    /// Link up.
    pub up: bool,
    /// Speed in Mb/s (meaningful with the link up).
    pub speed_mbps: u16,
    /// Full duplex.
    pub full_duplex: bool,
}

/// What a NIC driver found out about its device: what the channel's device info will say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetProperties {
    /// The address the NIC receives as its own.
    pub mac: MacAddress,
    /// Largest frame it transmits or receives, without the FCS.
    pub max_frame: u32,
    /// Smallest receive buffer it takes.
    pub rx_buffer_len: u32,
    /// Exact unicast addresses it filters besides its own.
    pub unicast_filters: u32,
}

/// The two rings of a NIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Frames sent.
    Transmit,
    /// Buffers posted for frames to arrive in.
    Receive,
}

/// A frame transmitted or received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetCompleted {
    /// The token given with the buffer.
    pub token: u64,
    /// Which ring.
    pub direction: Direction,
    /// Receive: the frame's length in bytes, without FCS (0 for a transmit).
    pub len: u32,
    /// How it ended.
    pub status: DeviceStatus,
}

/// Interrupt causes that happened since the last acknowledgement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetEvents {
    /// A frame was received.
    pub received: bool,
    /// A transmit was written back.
    pub transmitted: bool,
    /// The link went up or down.
    pub link_changed: bool,
}

/// A NIC's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames missed for lack of receive buffers.
    pub missed: u64,
    /// Good frames received, as the device counts them.
    pub good_rx: u64,
    /// Good frames transmitted, as the device counts them.
    pub good_tx: u64,
    /// Receive buffers completed with errors.
    pub rx_errors: u64,
    /// Transmits completed with errors.
    pub tx_errors: u64,
}

/// A network device's driver, as a channel service would use it: polled, with a fixed number
/// of transmit and receive slots, each buffer carrying the caller's token back in its
/// completion. Buffers are addresses the device reaches by DMA (channel slots); each stays the
/// device's until it completes or the device is shut down.
pub trait NetDriver {
    /// What the device is.
    fn properties(&self) -> NetProperties;
    /// Buffers that can be in flight at once on one ring.
    fn capacity(&self, ring: Direction) -> usize;
    /// Buffers in flight on one ring.
    fn in_flight(&self, ring: Direction) -> usize;
    /// Queues the frame of `len` bytes at `buf` with `token` (see [`NetDriver::ring`]).
    fn transmit(&mut self, buf: u64, len: u32, token: u64) -> Result<(), SubmitError>;
    /// Queues the receive buffer of `len` bytes at `buf` with `token` (see
    /// [`NetDriver::ring`]).
    fn post_receive(&mut self, buf: u64, len: u32, token: u64) -> Result<(), SubmitError>;
    /// Tells the device about the buffers queued since the last call.
    fn ring(&mut self);
    /// Whether the device has completions not yet polled.
    fn completion_pending(&self) -> bool;
    /// Hands every completion the device has to `done`; returns how many.
    fn poll(&mut self, done: &mut dyn FnMut(NetCompleted)) -> Result<usize, DriverError>;
    /// Sets which frames are received.
    fn set_filters(&mut self, filters: &RxFilters<'_>) -> Result<(), SubmitError>;
    /// The link now.
    fn link(&self) -> LinkState;
    /// Whether the device wakes the domain when it completes buffers or the link changes
    /// (an interrupt), so a wait with buffers in flight needs no short timeout.
    fn interrupts(&self) -> bool;
    /// Takes (and clears) the interrupt causes that happened.
    fn acknowledge(&mut self) -> NetEvents;
    /// The counters.
    fn stats(&mut self) -> NetStats;
    /// Starts the device's orderly shutdown: nothing more is received or sent.
    fn begin_shutdown(&mut self);
    /// Whether the shutdown is complete; an error when the device is gone.
    fn shutdown_done(&self) -> Result<bool, DriverError>;
}

fn net_submit_error(e: e1000_device::SubmitError) -> SubmitError {
    match e {
        e1000_device::SubmitError::Full => SubmitError::Full,
        e1000_device::SubmitError::Invalid => SubmitError::Invalid,
    }
}

impl NetDriver for Nic {
    fn properties(&self) -> NetProperties {
        NetProperties {
            mac: self.mac(),
            max_frame: e1000_device::MAX_FRAME,
            rx_buffer_len: e1000_device::RX_BUFFER_SIZE,
            unicast_filters: (e1000::regs::RAR_ENTRIES - 1) as u32,
        }
    }

    fn capacity(&self, ring: Direction) -> usize {
        match ring {
            Direction::Transmit => self.tx_capacity(),
            Direction::Receive => self.rx_capacity(),
        }
    }

    fn in_flight(&self, ring: Direction) -> usize {
        match ring {
            Direction::Transmit => self.tx_in_flight(),
            Direction::Receive => self.rx_posted(),
        }
    }

    fn transmit(&mut self, buf: u64, len: u32, token: u64) -> Result<(), SubmitError> {
        Nic::transmit(self, buf, len, token).map_err(net_submit_error)
    }

    fn post_receive(&mut self, buf: u64, len: u32, token: u64) -> Result<(), SubmitError> {
        Nic::post_receive(self, buf, len, token).map_err(net_submit_error)
    }

    fn ring(&mut self) {
        Nic::ring(self);
    }

    fn completion_pending(&self) -> bool {
        Nic::completion_pending(self)
    }

    fn poll(&mut self, done: &mut dyn FnMut(NetCompleted)) -> Result<usize, DriverError> {
        Nic::poll(self, |d| {
            done(NetCompleted {
                token: d.token,
                direction: if d.received.is_some() {
                    Direction::Receive
                } else {
                    Direction::Transmit
                },
                len: d.received.map_or(0, u32::from),
                status: DeviceStatus::E1000(d.status),
            })
        })
        .map_err(DriverError::from)
    }

    fn set_filters(&mut self, filters: &RxFilters<'_>) -> Result<(), SubmitError> {
        Nic::set_filters(self, filters).map_err(net_submit_error)
    }

    fn link(&self) -> LinkState {
        Nic::link(self)
    }

    fn interrupts(&self) -> bool {
        // The 8254x parts here have no MSI-X: only an INTx line the VMM routes to the
        // domain's wake-up (a VFIO NIC) interrupts; the emulated model's wake-up is not one
        // the driver can count on while a transmit is in flight.
        Nic::interrupts(self)
    }

    fn acknowledge(&mut self) -> NetEvents {
        let causes = Nic::acknowledge(self);
        NetEvents {
            received: causes & e1000::regs::int::RXT0 != 0,
            transmitted: causes & e1000::regs::int::TXDW != 0,
            link_changed: causes & e1000::regs::int::LSC != 0,
        }
    }

    fn stats(&mut self) -> NetStats {
        let s = Nic::stats(self);
        NetStats {
            missed: s.missed,
            good_rx: s.good_rx,
            good_tx: s.good_tx,
            rx_errors: s.rx_errors,
            tx_errors: s.tx_errors,
        }
    }

    fn begin_shutdown(&mut self) {
        Nic::begin_shutdown(self);
    }

    fn shutdown_done(&self) -> Result<bool, DriverError> {
        Nic::shutdown_done(self).map_err(DriverError::from)
    }
}
