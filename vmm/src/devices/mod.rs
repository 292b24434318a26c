//! Devices of the ddvm machine and the buses that dispatch port and MMIO exits to them.

pub mod bus;
pub mod pci;
pub mod serial;

pub use bus::{Bus, BusDevice};
