//! The network device class, VMM side: the channel to a NIC driver domain ([`channel`]).
//! The class the reincarnation engine drives, the frame switch and the virtio-net frontend
//! build on it.

pub mod channel;

pub use channel::{NetChannel, NetDone};
