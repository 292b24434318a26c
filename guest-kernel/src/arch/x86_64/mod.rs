//! x86-64 (the only architecture ddvm guests run on).

pub mod cpu;
pub(crate) mod descriptors;
pub(crate) mod entry;
pub mod io;
