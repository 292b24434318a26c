//! End-to-end tests of the emulated controller, driven by the mock driver.

mod admin;
mod cache;
mod controller;
mod flush;
mod interrupts;
mod io;
mod malformed;
mod pci;
mod poller;
mod restart;
mod shadow;
