//! The architecture layer: the only place with inline assembly.
//!
//! - [`io`]: typed I/O ports;
//! - [`cpu`]: TSC, CPUID, `hlt`, CR2, a calibrated spin loop;
//! - `entry`: the ddvm 64-bit entry, the PVH entry and its 32-bit trampoline, the PVH note;
//! - `descriptors`: the guest's GDT and IDT and the exception stubs.

mod x86_64;

pub use self::x86_64::{cpu, io};
pub(crate) use self::x86_64::{descriptors, entry};
