//! The NVMe driver: one controller, one namespace, one polled I/O queue pair whose completion
//! queue interrupts (wakes the domain) when the device has MSI-X.
//!
//! - [`probe`]: find the controller on PCI bus 0, place BAR0 if nobody did, enable it;
//! - [`irq`]: MSI-X set up for the I/O completion queue;
//! - [`regs`]: typed registers; [`cmd`]: queue entries and commands; [`prp`]: data pointers;
//! - [`queue`]: queues in DMA memory and their doorbells (shadow doorbells + event index);
//! - [`identify`]: Identify data; [`admin`]: admin queue and enable/disable handshakes;
//! - [`controller`]: bring-up and the I/O path ([`io`]); [`info`]: what was found;
//! - [`error`]: why the driver stops.
//!
//! No `unsafe` here: register access, DMA memory and configuration space go through
//! guest-kernel's HAL (`mmio`, `dma`, `pci`).

#![forbid(unsafe_code)]

pub mod admin;
pub mod cmd;
pub mod controller;
pub mod error;
pub mod identify;
pub mod info;
pub mod io;
pub mod irq;
pub mod probe;
pub mod prp;
pub mod queue;
pub mod regs;

pub use controller::{Controller, Options};
pub use error::NvmeError;
pub use io::{IoKind, IoRequest, SubmitError};
