//! guest-kernel: the tiny runtime every ddvm guest image is built on.
//!
//! An image is one static ELF with two entries (see `arch::entry`): the ddvm 64-bit entry
//! (the ELF entry point; the VMM's boot info in `rdi`) and a Xen PVH entry for
//! `qemu-system-x86_64 -kernel`. Both reach the same boot path: load the guest's GDT and IDT,
//! take the boot info, pick the console, give the heap its memory, calibrate the clock, then
//! call the image's main (declared with [`entry_point!`]).
//!
//! What an image gets:
//! - [`boot`]: the boot info and platform; [`cmdline`]: `key=value` and `flag` tokens;
//! - [`console`] with [`print!`]/[`println!`]: the VMM's log ring, or COM1 under QEMU;
//! - a global allocator ([`heap`]) so `alloc` works;
//! - [`time`]: a TSC clock and `delay_us`; [`vmm`]: wait, exit;
//! - [`pci`] configuration access and bus-0 enumeration; [`mmio`] typed device registers;
//!   [`shared`] volatile access to memory shared with the VMM (and the channel rings over it);
//!   [`dma`] page-aligned, physically contiguous buffers for devices;
//! - panic and CPU-exception reporting through the panic record and the panic port;
//! - [`fault`]: deliberate faults for fault injection.
//!
//! PVM rules this crate follows (`docs/ARCHITECTURE.md`, "Platforms"): no `cli`/`sti`, no
//! `int $n`, privileged instructions only at boot, `hlt` only in a loop, and the VMM's page
//! tables stay loaded on the ddvm path. `unsafe` lives in `arch` (assembly, ports, descriptor tables) and in the small
//! wrappers [`shared`], [`dma`], [`mmio`], [`pci`], `boot` and `heap`, each block with its
//! invariant.

#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

extern crate alloc;

pub mod arch;
pub mod boot;
pub mod cmdline;
pub mod console;
pub mod dma;
pub mod fault;
pub mod heap;
pub mod mmio;
mod panic;
pub mod pci;
pub mod shared;
mod start;
mod sync;
pub mod time;
pub mod vmm;

pub use ddvm_abi as abi;
