//! The Intel 8254x (e1000) driver: one function, one receive and one transmit ring of legacy
//! descriptors whose buffers the caller gives, polled.
//!
//! - [`probe`]: find the 82540/82544/82545 functions on PCI bus 0, place BAR0 if nobody did,
//!   enable them;
//! - [`regs`]: registers and bits; [`eeprom`]: the MAC address (EERD, or Microwire through
//!   EECD on the 82544);
//! - [`ring`]: descriptor rings and the caller's tokens;
//! - [`device`]: bring-up, receive filters, the I/O path, link state and statistics;
//! - [`error`]: why the driver stops.
//!
//! No `unsafe` here: register access, DMA memory and configuration space go through
//! guest-kernel's HAL (`mmio`, `dma`, `pci`).

#![forbid(unsafe_code)]

pub mod device;
pub mod eeprom;
pub mod error;
pub mod probe;
pub mod regs;
pub mod ring;

pub use device::{Nic, Options};
pub use error::E1000Error;
