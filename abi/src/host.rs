//! `vm_memory::ByteValued` for the shared structures, so the VMM can copy them out of guest
//! memory with `Bytes::read_obj` and validate the copy.

use vm_memory::ByteValued;

use crate::boot::BootInfo;
use crate::channel::ChannelHeader;
use crate::channel::{blk, net};
use crate::log::LogHeader;
use crate::panic::PanicRecord;

// SAFETY: each type is `#[repr(C)]`, made only of integers and integer arrays with no padding
// (sizes are asserted), so every bit pattern is a valid value.
unsafe impl ByteValued for BootInfo {}
// SAFETY: as above.
unsafe impl ByteValued for ChannelHeader {}
// SAFETY: as above.
unsafe impl ByteValued for blk::DeviceInfo {}
// SAFETY: as above.
unsafe impl ByteValued for net::DeviceInfo {}
// SAFETY: as above.
unsafe impl ByteValued for LogHeader {}
// SAFETY: as above.
unsafe impl ByteValued for PanicRecord {}
