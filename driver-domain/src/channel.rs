//! The domain's side of the channel header (DESIGN.md, "Channel ABI"): take it at boot, mark
//! ready for the VMM's epoch, heartbeat, and take fault-injection requests.

use core::fmt;
use core::mem::size_of;

use ddvm_abi::channel::{offset, state, ChannelHeader, CHANNEL_MAGIC, CHANNEL_VERSION};
use guest_kernel::shared::{publish_fence, SharedRegion};

/// Why the channel the VMM named cannot be used. The domain panics with it: a VMM that
/// writes a wrong header is a bug to report, not a state to serve in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelError {
    /// Header magic or version differ from this ABI's.
    Version {
        /// Magic found.
        magic: u32,
        /// Version found.
        version: u32,
    },
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ChannelError::Version { magic, version } => write!(
                f,
                "channel header magic {magic:#x} version {version}, expected {CHANNEL_MAGIC:#x} \
                 version {CHANNEL_VERSION}"
            ),
        }
    }
}

/// The channel header.
pub struct Channel {
    region: SharedRegion,
    epoch: u64,
    heartbeat: u64,
}

impl Channel {
    /// Opens the channel at `region` (validated by guest-kernel at boot) and checks its header.
    pub fn open(region: SharedRegion) -> Result<Self, ChannelError> {
        let header: ChannelHeader = region.read(0);
        if header.magic != CHANNEL_MAGIC || header.version != CHANNEL_VERSION {
            return Err(ChannelError::Version {
                magic: header.magic,
                version: header.version,
            });
        }
        Ok(Channel {
            region,
            epoch: header.epoch,
            heartbeat: header.heartbeat,
        })
    }

    /// The epoch the VMM set for this boot.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Tells the VMM the domain serves this epoch: `ready_epoch` first, then `state`.
    pub fn mark_ready(&self) {
        self.region.write(offset::READY_EPOCH, self.epoch);
        publish_fence();
        self.region.write(offset::STATE, state::READY);
        publish_fence();
    }

    /// Bumps the heartbeat and returns its new value.
    pub fn beat(&mut self) -> u64 {
        self.heartbeat = self.heartbeat.wrapping_add(1);
        self.region.write(offset::HEARTBEAT, self.heartbeat);
        self.heartbeat
    }

    /// Whether a fault-injection request is pending.
    pub fn fault_pending(&self) -> bool {
        self.region.read::<u32>(offset::FAULT) != 0
    }

    /// Takes a pending fault-injection request (clearing the word first), if any.
    pub fn take_fault(&self) -> Option<u32> {
        let fault: u32 = self.region.read(offset::FAULT);
        if fault == ddvm_abi::channel::fault::NONE {
            return None;
        }
        self.region
            .write(offset::FAULT, ddvm_abi::channel::fault::NONE);
        publish_fence();
        Some(fault)
    }
}

const _: () = assert!(offset::HEARTBEAT as usize + size_of::<u64>() <= size_of::<ChannelHeader>());
