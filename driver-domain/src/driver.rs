//! The block driver the channel service talks to, and how the domain picks one for the device
//! it is given.
//!
//! The channel service (`service`) knows the block class of the channel ABI, not the device:
//! it turns requests into [`IoRequest`]s for a [`BlockDriver`] and the driver's [`Completed`]
//! commands into completions. `main` probes the PCI function the VMM gave the domain, [`pick`]s
//! the driver its class code calls for, brings it up and hands it to the service as a
//! `Box<dyn BlockDriver>`. NVMe (class 01/08/02, `nvme`) is the only driver today; another
//! adds a [`Driver`] kind, a variant of [`DeviceStatus`] and of [`DriverError`], and an
//! implementation of the trait.
//!
//! Drivers keep to the rule of `nvme`: no `unsafe`; registers, DMA memory and configuration
//! space go through guest-kernel's HAL.

#![forbid(unsafe_code)]

use core::fmt;

use crate::nvme::cmd::Status as NvmeStatus;
use crate::nvme::probe::NVME_CLASS;
use crate::nvme::{self, Controller, NvmeError};

pub use crate::nvme::{IoKind, IoRequest};

/// The drivers this image has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// NVM Express controllers (`nvme`).
    Nvme,
}

/// The driver for a PCI function of class code `class` (base class, subclass, programming
/// interface), if this image has one.
pub fn pick(class: u32) -> Option<Driver> {
    match class {
        NVME_CLASS => Some(Driver::Nvme),
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
}

impl DeviceStatus {
    /// The command succeeded.
    pub fn is_success(self) -> bool {
        match self {
            DeviceStatus::Nvme(s) => s.is_success(),
        }
    }

    /// The device does not do this command.
    pub fn is_unsupported(self) -> bool {
        match self {
            DeviceStatus::Nvme(s) => s.is_unsupported(),
        }
    }

    /// The status as the channel's completion `detail` carries it.
    pub fn detail(self) -> u16 {
        match self {
            DeviceStatus::Nvme(s) => s.0,
        }
    }
}

impl fmt::Display for DeviceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceStatus::Nvme(s) => s.fmt(f),
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
}

impl fmt::Display for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriverError::Nvme(e) => e.fmt(f),
        }
    }
}

impl From<NvmeError> for DriverError {
    fn from(e: NvmeError) -> Self {
        DriverError::Nvme(e)
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
