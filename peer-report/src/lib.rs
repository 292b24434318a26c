//! `scripts/rig peer`'s report: the same stock Linux client ran the same fio jobs under
//! ddvm (through an NVMe driver domain, and from a file) and under QEMU (virtio-blk with an
//! iothread, and vhost-user-blk to a separate qemu-storage-daemon), in one rig boot; this
//! crate reads the rig's output ([`PeerLog::parse`]: the runs of
//! `images/linux-client/peer.sh`, with fio's JSON reports the clients printed, gzipped and in
//! base64), summarises it ([`Report::new`]: medians over the rounds, ratios to peer (b),
//! the kill job's errors and stalls, the targets) and presents it as JSON and markdown.
//!
//! Nothing here trusts the log to be whole: a run that hung, a job whose report was cut
//! short, a peer that never ran, each shows as such in the report, never as a panic or a
//! figure made up.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod fio;
pub mod log;
mod report;

pub use log::{Cost, JobCost, LogError, Mode, PeerLog};
pub use report::{CostRow, JobRow, KillRow, Report, Spread, Target, PEERS};
