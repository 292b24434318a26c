//! The reincarnation server's parts that need no KVM: the shadow queue of each driver domain
//! (every request the VMM owes a client, in order, with what replay needs), the per-domain
//! supervisor state machine, detection reasons, restart policy, events and metrics, and the
//! kinds of fault the VMM can inject (with their driver-domain ABI codes).
//!
//! The VMM (`ddvm`) wires these to real domains; everything here is plain, safe code tested
//! on its own.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod events;
pub mod fault;
pub mod hook;
mod micros;
pub mod monitor;
pub mod policy;
pub mod reason;
pub mod shadow;
pub mod supervisor;
