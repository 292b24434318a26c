//! Chaos runs (`ddvm chaos`), presented: the command line's durations ([`parse_duration`]),
//! throughput over time ([`Timeline`]) and the report a run writes ([`ChaosReport`]): JSON, a
//! table for the terminal and two SVG plots. The faults themselves ([`FaultKind`]) are the
//! reincarnation side's (`ddvm_recovery::fault`); this crate only records and shows them.
//!
//! The runner feeds the report while the run goes ([`ChaosReport::injected`], `detected`,
//! `recovered`, `gave_up`, `completed`), pushes one [`ClientResult`] per client, then calls
//! [`ChaosReport::finish`] with the IOPS of a fault-free run of the same length. Everything
//! derived (summaries, totals, ratio, target checks) is computed there, from the raw data.
//!
//! No input makes anything here panic, and every float in a report is finite: a rate or
//! ratio that cannot be computed (zero time, no baseline) is 0.0, never NaN (which JSON cannot
//! hold). Durations are whole microseconds in `*_us` fields.
//!
//! [`FaultKind`]: ddvm_recovery::fault::FaultKind

#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod duration;
mod micros;
mod report;
mod svg;
mod table;
mod timeline;

use std::time::Duration;

pub use duration::{parse_duration, DurationError};
pub use report::{
    ChaosReport, ClientResult, Comparison, NetResult, NetSummary, RecoverySamples, RunInfo,
    Summary, TargetCheck, MAX_RECOVERY_P99, MIN_THROUGHPUT_RATIO,
};
pub use timeline::{FaultMark, RecoverySpan, Timeline, DEFAULT_BIN, MAX_BINS};

/// IOPS of `ops` over `elapsed`; 0.0 when `elapsed` is zero.
pub fn rate(ops: u64, elapsed: Duration) -> f64 {
    finite(ops as f64 / elapsed.as_secs_f64())
}

/// `v` when it is finite and positive, else 0.0.
pub(crate) fn finite(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 {
        v
    } else {
        0.0
    }
}

/// `d` in whole microseconds, saturating.
pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    pub(crate) fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }
}
