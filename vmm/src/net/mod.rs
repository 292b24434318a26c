//! The network device class, VMM side: the channel to a NIC driver domain ([`channel`]), the
//! switch that decides which client receives a frame ([`switch`]), and the virtio-net device
//! a client sees ([`device`]). The class the reincarnation engine drives joins them.
//!
//! ```text
//! client TX ring -> NetPort::transmit -> TxBackend (switch: NIC and/or hairpin) ... complete_tx
//! NIC frame -> Switch::incoming -> NetPort::receive of each receiving client (or dropped)
//! client control queue -> NetPort::control -> ClientConfig -> Switch::set_config -> FilterSet
//! ```

pub mod channel;
pub mod class;
pub mod device;
pub mod direct;
pub mod replay;
pub mod request;
pub mod service;
pub mod switch;

pub use channel::{NetChannel, NetDone};

#[cfg(test)]
mod tests;
