//! End-to-end tests of the emulated e1000, driven by the mock driver.

mod exchange;
mod filter;
mod hostile;
mod interrupts;
mod pci;
mod registers;
mod reset;
mod tap;
