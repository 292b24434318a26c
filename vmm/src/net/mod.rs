//! Network devices for client guests: the switch that decides which client receives a frame,
//! and the virtio-net device a client sees.
//!
//! ```text
//! client TX ring -> NetPort::transmit -> TxBackend (switch: NIC and/or hairpin) ... complete_tx
//! NIC frame -> Switch::incoming -> NetPort::receive of each receiving client (or dropped)
//! client control queue -> NetPort::control -> ClientConfig -> Switch::set_config -> FilterSet
//! ```

pub mod device;
pub mod request;
pub mod switch;

#[cfg(test)]
mod tests;
