//! Chaos runs: the configured clients run the verifying workload for a fixed time while faults
//! are injected into the disk domains; the same topology also runs fault-free for the same
//! time, for the throughput baseline.
//!
//! Two identical fault-free runs on these two-core machines differ by up to a third in
//! throughput (where the scheduler happens to place four busy threads, the page cache), so
//! one baseline run followed by one chaos run measures luck as much as faults. The time is
//! therefore split into rounds, each a fault-free segment and a chaos segment, in alternating
//! order (baseline first in even rounds, chaos first in odd ones); each side's throughput is
//! the mean over its segments. The chaos segments are laid end to end on one timeline for
//! the report and its plots.
//!
//! Faults go in one period apart, each into a domain that has recovered from the one before
//! (a fault waits for that at most eight periods): a fault sent into a domain still hung would
//! be taken by nobody and hide its kind.
//!
//! Fault injection is compiled in only with the `fault-injection` cargo feature; a build
//! without it (such as the release binary) has no injection code and refuses to inject.

#[cfg(feature = "fault-injection")]
mod runner;

#[cfg(feature = "fault-injection")]
pub use runner::run;

use std::time::Duration;

use ddvm_recovery::fault::FaultKind;

/// Whether this build can inject faults: whether the injection code (this module's runner,
/// the control socket's `inject`, the block service's handling of [`Command::Inject`]) was
/// compiled in at all.
///
/// [`Command::Inject`]: crate::reincarnation::Command::Inject
pub const ENABLED: bool = cfg!(feature = "fault-injection");

/// Errors of a chaos run.
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    /// Built without fault injection.
    #[error(
        "this ddvm was built without fault injection; rebuild with `--features fault-injection`"
    )]
    Disabled,
    /// The topology has no client on a driver domain.
    #[error("{0}: expected at least one [[client]] on a [[domain]] with a device")]
    NoTarget(String),
    /// Starting the topology failed.
    #[error(transparent)]
    Topology(#[from] crate::topology::TopologyError),
}

/// The chaos run's parameters.
#[derive(Clone, Debug)]
pub struct ChaosPlan {
    /// Fault kinds, injected in turn.
    pub faults: Vec<FaultKind>,
    /// Time between injections.
    pub every: Duration,
    /// Length of each run (baseline and chaos).
    pub duration: Duration,
    /// Skip the fault-free baseline run.
    pub skip_baseline: bool,
    /// Rounds the time is split into (at least 1); see the module docs.
    pub rounds: u32,
}

impl ChaosPlan {
    /// Rounds of at least 10 s each, at most 6: a 60 s run alternates 6 pairs of 10 s.
    pub fn default_rounds(duration: Duration) -> u32 {
        (duration.as_secs() / 10).clamp(1, 6) as u32
    }
}

/// A build without fault injection cannot run chaos: it refuses ([`ChaosError::Disabled`]).
#[cfg(not(feature = "fault-injection"))]
pub fn run(
    _hv: &std::sync::Arc<crate::hypervisor::Hypervisor>,
    _config: &crate::config::Config,
    _file: &std::path::Path,
    _plan: &ChaosPlan,
) -> Result<ddvm_chaos_report::ChaosReport, ChaosError> {
    Err(ChaosError::Disabled)
}
