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
    _stop: &crate::stop::Stop,
) -> Result<ddvm_chaos_report::ChaosReport, ChaosError> {
    Err(ChaosError::Disabled)
}

/// Where and when a chaos run runs: ddvm's version, the KVM `platform` its guests saw, the
/// host's name and the time now (UTC, RFC 3339).
pub fn run_info(platform: &str) -> ddvm_chaos_report::RunInfo {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    ddvm_chaos_report::RunInfo {
        ddvm_version: env!("CARGO_PKG_VERSION").to_string(),
        platform: platform.to_string(),
        host,
        started: rfc3339(secs),
    }
}

/// `secs` since the Unix epoch as `YYYY-MM-DDThh:mm:ssZ` (the proleptic Gregorian calendar's
/// civil date from a day count: Howard Hinnant's `civil_from_days`).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod rfc3339_tests {
    #[test]
    fn epoch_seconds_become_civil_utc_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_796_615_839), "2026-12-07T03:57:19Z");
    }
}
