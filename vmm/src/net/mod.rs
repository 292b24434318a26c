//! Network devices for client guests: the switch that decides which client receives a frame,
//! and the virtio-net device a client sees.

pub mod switch;
