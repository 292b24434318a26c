//! The ABI shared by the ddvm VMM and the guests it boots.
//!
//! Everything here is plain `#[repr(C)]` data with fixed layout, shared across a trust boundary:
//! the VMM writes [`boot::BootInfo`] and reads what guests write into the log ring, the panic
//! record and the channel. Readers on either side copy a value out of shared memory first and
//! validate the copy; nothing here hands out references into shared memory.
//!
//! `no_std` so the unikernels can use it; the `vm-memory` feature implements
//! `vm_memory::ByteValued` for the host side.

#![no_std]
#![deny(unsafe_code)]

pub mod boot;
pub mod channel;
pub mod layout;
pub mod log;
pub mod panic;
pub mod port;

#[cfg(feature = "vm-memory")]
#[allow(unsafe_code)]
mod host;

/// Implemented by every shared structure: its size is fixed by the ABI and checked at compile
/// time so that a change of layout is a deliberate ABI version bump.
#[macro_export]
#[doc(hidden)]
macro_rules! assert_abi_size {
    ($t:ty, $size:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $size);
    };
}
