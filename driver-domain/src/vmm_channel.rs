//! The domain's side of the channel header: take it at boot, check its geometry and device
//! class, publish the device info, mark ready for the VMM's epoch, heartbeat, take
//! fault-injection requests (word and argument), and the event-suppression flags. The rings
//! are served by `service`.

use core::fmt;
use core::mem::size_of;

use ddvm_abi::channel::{
    class, domain_flags, offset, state, vmm_flags, ChannelHeader, GeometryError, CHANNEL_MAGIC,
    CHANNEL_VERSION, DEVICE_INFO_OFFSET,
};
use guest_kernel::shared::{full_fence, publish_fence, Plain, SharedRegion};

use crate::faults::Injection;

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
    /// The ring and data-area geometry is refused.
    Geometry(GeometryError),
    /// The header names a device class this domain does not serve.
    Class {
        /// `ChannelHeader::class`.
        class: u32,
        /// The class the domain serves.
        serves: u32,
    },
    /// The header says the channel is larger than the region the boot info gives.
    Size {
        /// `ChannelHeader::size`.
        header: u64,
        /// Boot info's channel size.
        region: u64,
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
            ChannelError::Geometry(e) => write!(f, "channel geometry refused: {e:?}"),
            ChannelError::Class { class, serves } => write!(
                f,
                "channel device class {class} ({}), this domain serves class {serves} ({})",
                class::name(class),
                class::name(serves)
            ),
            ChannelError::Size { header, region } => write!(
                f,
                "channel header size {header:#x} exceeds the {region:#x}-byte channel region"
            ),
        }
    }
}

/// The channel header.
pub struct Channel {
    region: SharedRegion,
    /// The header as read once at open (the VMM's fields do not change during a boot).
    header: ChannelHeader,
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
            header,
            epoch: header.epoch,
            heartbeat: header.heartbeat,
        })
    }

    /// The epoch the VMM set for this boot.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The region (channel offsets are from its start).
    pub fn region(&self) -> SharedRegion {
        self.region
    }

    /// The header as read at open.
    pub fn header(&self) -> &ChannelHeader {
        &self.header
    }

    /// Checks the ring and data-area geometry and that it fits the region.
    pub fn check_geometry(&self) -> Result<(), ChannelError> {
        if self.header.size > self.region.len() {
            return Err(ChannelError::Size {
                header: self.header.size,
                region: self.region.len(),
            });
        }
        self.header.check_geometry().map_err(ChannelError::Geometry)
    }

    /// Checks that the header names one of the device classes in `serves` (of
    /// `ddvm_abi::channel::class`; the first is named in the error).
    pub fn check_class(&self, serves: &[u32]) -> Result<(), ChannelError> {
        if !serves.contains(&self.header.class) {
            return Err(ChannelError::Class {
                class: self.header.class,
                serves: serves.first().copied().unwrap_or(0),
            });
        }
        Ok(())
    }

    /// Publishes the device info of the channel's class (`blk::DeviceInfo` or
    /// `net::DeviceInfo`), before [`Channel::mark_ready`].
    pub fn write_device_info<T: Plain>(&self, info: &T) {
        self.region.write(DEVICE_INFO_OFFSET, *info);
        publish_fence();
    }

    /// Rewrites the network device info's link word (`net::offset::LINK`), the one field of
    /// the device info that changes after ready.
    pub fn write_link(&self, link: u32) {
        self.region
            .write(ddvm_abi::channel::net::offset::LINK, link);
        publish_fence();
    }

    /// Tells the VMM the domain is about to fail (it panics next).
    pub fn mark_failed(&self) {
        self.region.write(offset::STATE, state::FAILED);
        publish_fence();
    }

    /// Sets or clears `domain_flags::WAITING`. Setting it is followed by a full fence, so a
    /// re-check of the request ring afterwards cannot miss a request published before the VMM
    /// read the flag.
    pub fn set_waiting(&self, waiting: bool) {
        let flags = if waiting { domain_flags::WAITING } else { 0 };
        self.region.write(offset::DOMAIN_FLAGS, flags);
        full_fence();
    }

    /// Whether the VMM asks to be notified of published completions (read after a full fence
    /// that orders the publication before it).
    pub fn vmm_wants_notify(&self) -> bool {
        full_fence();
        self.region.read::<u32>(offset::VMM_FLAGS) & vmm_flags::NOTIFY_ME != 0
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

    /// Takes a pending fault-injection request and its argument (clearing the word first), if
    /// any. The VMM writes the argument before the word, so reading it after the word (x86
    /// keeps loads in order) gets the request's own.
    pub fn take_fault(&self) -> Option<Injection> {
        let code: u32 = self.region.read(offset::FAULT);
        if code == ddvm_abi::channel::fault::NONE {
            return None;
        }
        self.region
            .write(offset::FAULT, ddvm_abi::channel::fault::NONE);
        publish_fence();
        let arg = self.region.read(offset::FAULT_ARG);
        Some(Injection { code, arg })
    }
}

const _: () = assert!(offset::HEARTBEAT as usize + size_of::<u64>() <= size_of::<ChannelHeader>());
