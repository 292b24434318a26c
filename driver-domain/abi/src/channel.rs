//! The channel between the VMM and a driver domain (DESIGN.md, "Channel ABI").
//!
//! One region inside the domain's memory, at the address given in the boot info. This module
//! holds its header; the VMM writes the geometry and the epoch at every boot, the domain writes
//! its state, its heartbeat and the epoch it saw when it became ready.

use crate::assert_abi_size;

/// `ChannelHeader::magic`.
pub const CHANNEL_MAGIC: u32 = 0x6464_6368; // "ddch"
/// `ChannelHeader::version`.
pub const CHANNEL_VERSION: u32 = 1;

/// Domain states written by the domain into `ChannelHeader::state`.
pub mod state {
    /// Booting: the VMM wrote the header, the domain has not taken it yet.
    pub const BOOTING: u32 = 0;
    /// The domain has initialised its device and serves the rings.
    pub const READY: u32 = 1;
    /// The domain saw an error it cannot recover from and is about to panic.
    pub const FAILED: u32 = 2;
}

/// Fault-injection requests the VMM may put in `ChannelHeader::fault` (chaos runs and tests).
/// The domain acts on a non-zero value in its main loop and clears the word first.
pub mod fault {
    /// Nothing.
    pub const NONE: u32 = 0;
    /// Call `panic!`.
    pub const PANIC: u32 = 1;
    /// Execute `ud2` (#UD through the IDT).
    pub const INVALID_OPCODE: u32 = 2;
    /// Touch an unmapped address (#PF through the IDT).
    pub const PAGE_FAULT: u32 = 3;
    /// Stop heartbeating and spin forever.
    pub const HANG: u32 = 4;
    /// Load an empty IDT and raise an exception: the CPU cannot deliver it (triple fault,
    /// a shutdown exit).
    pub const TRIPLE_FAULT: u32 = 5;
}

/// Header at the start of the channel. Everything in it may be written by the domain at any
/// time; the VMM copies fields out and validates them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelHeader {
    /// [`CHANNEL_MAGIC`] (VMM).
    pub magic: u32,
    /// [`CHANNEL_VERSION`] (VMM).
    pub version: u32,
    /// Boot generation of the domain, set by the VMM at every boot (VMM).
    pub epoch: u64,
    /// One of [`state`] (domain).
    pub state: u32,
    /// Fault-injection word, see [`fault`] (VMM sets, domain clears).
    pub fault: u32,
    /// The epoch the domain saw when it became ready (domain).
    pub ready_epoch: u64,
    /// Bumped by the domain on every pass of its main loop (domain).
    pub heartbeat: u64,
    /// The domain asks for a kick when it posts nothing but waits (domain). Reserved for the
    /// request/completion rings.
    pub domain_flags: u32,
    /// The VMM asks for a notification on completions (VMM). Reserved for the rings.
    pub vmm_flags: u32,
    /// Total size of the channel in bytes (VMM).
    pub size: u64,
    /// Reserved, zero.
    pub reserved: [u64; 3],
}
assert_abi_size!(ChannelHeader, 80);

/// Byte offsets of the header fields, for single-field volatile access.
pub mod offset {
    /// `epoch`.
    pub const EPOCH: u64 = 8;
    /// `state`.
    pub const STATE: u64 = 16;
    /// `fault`.
    pub const FAULT: u64 = 20;
    /// `ready_epoch`.
    pub const READY_EPOCH: u64 = 24;
    /// `heartbeat`.
    pub const HEARTBEAT: u64 = 32;
}

impl ChannelHeader {
    /// A header as the VMM writes it at boot.
    pub fn new(epoch: u64, size: u64) -> Self {
        ChannelHeader {
            magic: CHANNEL_MAGIC,
            version: CHANNEL_VERSION,
            epoch,
            size,
            ..Default::default()
        }
    }

    /// Whether the domain has marked itself ready for the VMM's current epoch `epoch`.
    pub fn is_ready_for(&self, epoch: u64) -> bool {
        self.state == state::READY && self.ready_epoch == epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn field_offsets_match_the_published_constants() {
        assert_eq!(offset_of!(ChannelHeader, epoch) as u64, offset::EPOCH);
        assert_eq!(offset_of!(ChannelHeader, state) as u64, offset::STATE);
        assert_eq!(offset_of!(ChannelHeader, fault) as u64, offset::FAULT);
        assert_eq!(
            offset_of!(ChannelHeader, ready_epoch) as u64,
            offset::READY_EPOCH
        );
        assert_eq!(
            offset_of!(ChannelHeader, heartbeat) as u64,
            offset::HEARTBEAT
        );
    }

    #[test]
    fn ready_needs_the_current_epoch() {
        let mut h = ChannelHeader::new(7, 4096);
        assert!(!h.is_ready_for(7));
        h.state = state::READY;
        h.ready_epoch = 6;
        assert!(
            !h.is_ready_for(7),
            "a ready mark from an old epoch is stale"
        );
        h.ready_epoch = 7;
        assert!(h.is_ready_for(7));
    }
}
