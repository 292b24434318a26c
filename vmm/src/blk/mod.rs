//! Block devices for client guests: the virtio-blk frontend, the block service that serves it
//! through a driver domain (or, as a baseline, from a file), and request parsing.
//!
//! ```text
//! client vCPU --QueueNotify ioeventfd--> block service thread
//!     parse chain (request.rs) -> shadow entry per part -> backend (backend.rs):
//!         channel -> driver domain -> device        or        file (pread/pwrite)
//!     <- completion: copy read data to the client, status byte, used ring, wake the client
//! ```

pub mod backend;
pub mod class;
pub mod device;
pub mod replay;
pub mod request;
pub mod service;

pub use backend::{Backend, BackendError, ChannelBackend, DiskInfo, FileBackend};
pub use device::{BlockGeometry, ClientPort, LbaRange, VirtioBlock, MAX_QUEUES};
pub use service::BlockService;

#[cfg(test)]
mod tests;
