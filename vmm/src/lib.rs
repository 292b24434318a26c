//! ddvm: a KVM-based VMM that makes device drivers crash-proof for the machines around them.
//!
//! Each device is handed to its own driver domain, a small unikernel VM; this crate boots and
//! runs those VMs and the client guests, serves the clients' virtio devices through the
//! domains, and restarts a domain that fails. `docs/ARCHITECTURE.md` has the whole picture.

#![deny(missing_docs)]

pub mod arch;
pub mod blk;
pub mod chaos;
pub mod client;
pub mod config;
pub mod console;
pub mod control;
pub mod demo;
pub mod devices;
pub mod domain;
pub mod host;
pub mod host_channel;
pub mod hoststall;
pub mod hypervisor;
pub mod isolation;
pub mod jail;
pub mod launcher;
pub mod linux;
pub mod loader;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod ratelimit;
pub mod reincarnation;
pub mod seccomp;
pub mod stats;
pub mod stop;
pub mod sync;
pub mod sys;
pub mod testclient;
pub mod topology;
pub mod vcpu;
pub mod virtio;
pub mod vm;

use loader::Image;

/// The driver-domain image built into this binary.
pub fn builtin_driver_domain() -> Image {
    Image::from_static(
        crate::config::BUILTIN_DRIVER_DOMAIN,
        ddvm_images::DRIVER_DOMAIN,
    )
}
