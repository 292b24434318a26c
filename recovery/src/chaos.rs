//! Chaos runs (`ddvm chaos`): the faults a run injects ([`FaultKind`], from `--faults`), its
//! command-line durations ([`parse_duration`]), throughput over time ([`Timeline`]) and the
//! report it writes ([`ChaosReport`]): JSON, a table for the terminal and two SVG plots.
//!
//! The runner feeds the report while the run goes ([`ChaosReport::injected`], `detected`,
//! `recovered`, `gave_up`, `completed`), pushes one [`ClientResult`] per client, then calls
//! [`ChaosReport::finish`] with the IOPS of a fault-free run of the same length. Everything
//! derived (summaries, totals, ratio, target checks) is computed there, from the raw data.
//!
//! No input makes anything here panic, and every float in a report is finite: a rate or
//! ratio that cannot be computed (zero time, no baseline) is 0.0, never NaN (which JSON cannot
//! hold). Durations are whole microseconds in `*_us` fields.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A fault the chaos runner injects into a driver domain.
///
/// Its [`name`](Self::name) (kebab-case, also its JSON form) is stable: it appears on the
/// command line and as a key of [`ChaosReport::faults_injected`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// The VMM tears the domain down abruptly, as `ddvm ctl kill` does.
    Kill,
    /// The domain panics.
    Panic,
    /// The domain stops heartbeating and spins.
    Hang,
    /// The domain scribbles garbage into the channel's rings and header.
    WildWrite,
    /// The domain completes a tag it was never given.
    BogusTag,
    /// The domain completes a request claiming more bytes than it had.
    BogusLen,
    /// The domain completes a request with an old epoch.
    StaleEpoch,
    /// The domain programs its device to DMA outside the domain's memory.
    DmaOutside,
    /// The domain holds back its completions.
    Slow,
    /// Random bit flips in the domain's code and data (SWIFI).
    Bitflip,
    /// A second fault, injected while the domain recovers from a first one.
    DuringRecovery,
    /// A CPU exception in the domain (invalid opcode or page fault).
    Exception,
    /// An exception the CPU cannot deliver: the domain's vCPU shuts down.
    TripleFault,
    /// The domain is killed, and the restarts that follow fail before ready: the next fresh or
    /// promoted domain dies during its device's bring-up, the one after it hangs there until
    /// the boot timeout fails it (as on a host that starves the restart). The domain after
    /// those must replay everything the clients are owed.
    FailedRestart,
    /// The domain is killed, and the next one fails the first write the VMM replays to it
    /// (completes it with an I/O error without writing it): the write stays owed and is
    /// replayed again on the domain after that.
    FailedReplay,
}

impl FaultKind {
    /// Every kind, in the order `all` expands to.
    pub const ALL: [FaultKind; 15] = [
        FaultKind::Kill,
        FaultKind::Panic,
        FaultKind::Hang,
        FaultKind::WildWrite,
        FaultKind::BogusTag,
        FaultKind::BogusLen,
        FaultKind::StaleEpoch,
        FaultKind::DmaOutside,
        FaultKind::Slow,
        FaultKind::Bitflip,
        FaultKind::DuringRecovery,
        FaultKind::Exception,
        FaultKind::TripleFault,
        FaultKind::FailedRestart,
        FaultKind::FailedReplay,
    ];

    /// The stable name: `kill`, `wild-write`, `triple-fault`, ...
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Panic => "panic",
            FaultKind::Hang => "hang",
            FaultKind::WildWrite => "wild-write",
            FaultKind::BogusTag => "bogus-tag",
            FaultKind::BogusLen => "bogus-len",
            FaultKind::StaleEpoch => "stale-epoch",
            FaultKind::DmaOutside => "dma-outside",
            FaultKind::Slow => "slow",
            FaultKind::Bitflip => "bitflip",
            FaultKind::DuringRecovery => "during-recovery",
            FaultKind::Exception => "exception",
            FaultKind::TripleFault => "triple-fault",
            FaultKind::FailedRestart => "failed-restart",
            FaultKind::FailedReplay => "failed-replay",
        }
    }

    /// All names, comma-separated, for messages.
    fn names() -> String {
        let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
        names.join(", ")
    }

    /// Position in [`ALL`](Self::ALL), for colours.
    fn index(self) -> usize {
        Self::ALL.iter().position(|&k| k == self).unwrap_or(0)
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One name (`all` is a list word: see [`parse_fault_list`]).
impl FromStr for FaultKind {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        let item = s.trim();
        Self::ALL
            .into_iter()
            .find(|k| k.name() == item)
            .ok_or_else(|| ParseError::UnknownFault {
                item: item.to_string(),
            })
    }
}

/// A bad `--faults` list or duration; the message names the bad part and what is accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// An item of a fault list is not a fault kind.
    #[error("unknown fault kind {item:?}: valid kinds are {valid}, or all", valid = FaultKind::names())]
    UnknownFault {
        /// The item, trimmed.
        item: String,
    },
    /// The fault list has no items.
    #[error("no fault kinds given: expected a comma-separated list of {valid}, or all", valid = FaultKind::names())]
    NoFaults,
    /// A duration that is malformed, zero or too large.
    #[error("invalid duration {input:?}: {problem} (expected a number and a unit: ns, us, ms, s, m or h, as in 500us, 100ms, 1.5s, 2m)")]
    Duration {
        /// The text given.
        input: String,
        /// What is wrong with it.
        problem: &'static str,
    },
}

/// Parses `--faults`: comma-separated [`FaultKind`] names, or `all` for every kind.
/// Whitespace around items is ignored, duplicates are dropped (first position kept).
pub fn parse_fault_list(s: &str) -> Result<Vec<FaultKind>, ParseError> {
    if s.trim().is_empty() {
        return Err(ParseError::NoFaults);
    }
    let mut kinds = Vec::new();
    for item in s.split(',') {
        let add: Vec<FaultKind> = if item.trim() == "all" {
            FaultKind::ALL.to_vec()
        } else {
            vec![item.parse()?]
        };
        for kind in add {
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
    }
    Ok(kinds)
}

/// Parses a command-line duration: a decimal number and a unit (`ns`, `us` or `µs`, `ms`,
/// `s`, `m`, `h`), as in `500us`, `100ms`, `1.5s`, `60s`, `2m`. Fractions finer than a
/// nanosecond are cut off. Zero is refused (every chaos duration must be positive), as is
/// anything above `u64::MAX` nanoseconds (about 584 years).
pub fn parse_duration(input: &str) -> Result<Duration, ParseError> {
    let err = |problem| ParseError::Duration {
        input: input.to_string(),
        problem,
    };
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty() {
        return Err(err("it does not start with a number"));
    }
    if frac.contains('.') {
        return Err(err("the number has more than one decimal point"));
    }
    let unit_ns: u128 = match unit.trim() {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "" => return Err(err("the unit is missing")),
        _ => return Err(err("the unit is unknown")),
    };
    let too_large = || err("it is too large");
    // Digits only: parsing fails on overflow alone.
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| too_large())?
    };
    // At most 18 fraction digits (finer than any unit's nanosecond), so nothing overflows.
    let frac = &frac[..frac.len().min(18)];
    let frac_ns = if frac.is_empty() {
        0
    } else {
        let digits: u128 = frac.parse().map_err(|_| too_large())?;
        let scale = 10u128.pow(u32::try_from(frac.len()).unwrap_or(18));
        digits * unit_ns / scale
    };
    let ns = int
        .checked_mul(unit_ns)
        .and_then(|ns| ns.checked_add(frac_ns))
        .and_then(|ns| u64::try_from(ns).ok())
        .ok_or_else(too_large)?;
    if ns == 0 {
        return Err(err("it must be greater than zero"));
    }
    Ok(Duration::from_nanos(ns))
}

/// IOPS of `ops` over `elapsed`; 0.0 when `elapsed` is zero.
pub fn rate(ops: u64, elapsed: Duration) -> f64 {
    finite(ops as f64 / elapsed.as_secs_f64())
}

/// `v` when it is finite and positive, else 0.0.
fn finite(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 {
        v
    } else {
        0.0
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Default width of a [`Timeline`] bin.
pub const DEFAULT_BIN: Duration = Duration::from_millis(100);

/// Most bins a [`Timeline`] holds: a finer bin width is widened to fit.
pub const MAX_BINS: u64 = 100_000;

/// Completions over time in fixed bins, with the faults and the recoveries of the run, for
/// plotting. It covers the window `[start, start + length)`:
/// - completions outside the window are not binned, but counted in [`dropped`](Self::dropped)
///   (warm-up before it, the drain after it), so the bins measure the window's throughput;
/// - fault marks outside the window are dropped (the report's counters still count them);
/// - recovery spans are clipped to the window, and dropped when wholly outside it or when they
///   end before they begin.
///
/// Times are kept as whole microseconds since `start`; the bin width is at least 1 µs. A
/// deserialized timeline has lost its start `Instant` (it counts from the time it was read):
/// it is for reading, not for recording more.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Timeline {
    #[serde(skip, default = "Instant::now")]
    start: Instant,
    #[serde(rename = "bin_us", with = "crate::micros")]
    bin: Duration,
    #[serde(rename = "length_us", with = "crate::micros")]
    length: Duration,
    bins: Vec<u64>,
    marks: Vec<FaultMark>,
    recoveries: Vec<RecoverySpan>,
    dropped: u64,
}

/// A fault injected at `at` (since the timeline's start).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultMark {
    /// When.
    #[serde(rename = "at_us", with = "crate::micros")]
    pub at: Duration,
    /// What.
    pub kind: FaultKind,
}

/// A domain down: from detection to its first completion after the restart (since the
/// timeline's start).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoverySpan {
    /// Failure detected.
    #[serde(rename = "detected_us", with = "crate::micros")]
    pub detected: Duration,
    /// First completion after the restart.
    #[serde(rename = "recovered_us", with = "crate::micros")]
    pub recovered: Duration,
}

impl Timeline {
    /// An empty timeline of `length` from `start`, in bins of `bin` (at least 1 µs, widened to
    /// keep at most [`MAX_BINS`]); the last bin is shorter when `bin` does not divide `length`.
    pub fn new(start: Instant, bin: Duration, length: Duration) -> Self {
        let length_us = micros(length);
        let bin_us = micros(bin).max(1).max(length_us.div_ceil(MAX_BINS));
        // At most MAX_BINS.
        let n = length_us.div_ceil(bin_us) as usize;
        Timeline {
            start,
            bin: Duration::from_micros(bin_us),
            length: Duration::from_micros(length_us),
            bins: vec![0; n],
            marks: Vec::new(),
            recoveries: Vec::new(),
            dropped: 0,
        }
    }

    /// `at` as an offset into the window, if it falls in it.
    fn offset(&self, at: Instant) -> Option<Duration> {
        at.checked_duration_since(self.start)
            .filter(|&o| o < self.length)
    }

    /// Counts `n` completions at `at`.
    pub fn record(&mut self, at: Instant, n: u64) {
        let bin_us = micros(self.bin).max(1);
        let bin = self
            .offset(at)
            .and_then(|o| usize::try_from(micros(o) / bin_us).ok())
            .and_then(|i| self.bins.get_mut(i));
        match bin {
            Some(count) => *count = count.saturating_add(n),
            None => self.dropped = self.dropped.saturating_add(n),
        }
    }

    /// Marks a fault of `kind` injected at `at`.
    pub fn mark(&mut self, at: Instant, kind: FaultKind) {
        if let Some(at) = self.offset(at) {
            self.marks.push(FaultMark { at, kind });
        }
    }

    /// Adds a recovery: the failure detected at `detected`, the first completion after the
    /// restart at `recovered`.
    pub fn recovery(&mut self, detected: Instant, recovered: Instant) {
        let Some(end) = recovered.checked_duration_since(self.start) else {
            return;
        };
        let begin = detected.saturating_duration_since(self.start);
        if recovered < detected || begin >= self.length {
            return;
        }
        self.recoveries.push(RecoverySpan {
            detected: begin,
            recovered: end.min(self.length),
        });
    }

    /// Bin width.
    pub fn bin(&self) -> Duration {
        self.bin
    }

    /// The window's length.
    pub fn length(&self) -> Duration {
        self.length
    }

    /// Completions per bin.
    pub fn bins(&self) -> &[u64] {
        &self.bins
    }

    /// Faults injected in the window, in the order marked.
    pub fn marks(&self) -> &[FaultMark] {
        &self.marks
    }

    /// Recoveries (clipped to the window), in the order added.
    pub fn recoveries(&self) -> &[RecoverySpan] {
        &self.recoveries
    }

    /// Completions outside the window.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Completions in the window.
    pub fn total(&self) -> u64 {
        self.bins.iter().fold(0, |a, &b| a.saturating_add(b))
    }

    /// Start and width of bin `i` (the last one may be shorter; zero past the end).
    pub fn bin_span(&self, i: usize) -> (Duration, Duration) {
        let begin = self
            .bin
            .checked_mul(u32::try_from(i).unwrap_or(u32::MAX))
            .unwrap_or(Duration::MAX)
            .min(self.length);
        (begin, self.bin.min(self.length - begin))
    }

    /// IOPS of each bin (over its own width).
    pub fn iops(&self) -> Vec<f64> {
        (0..self.bins.len())
            .map(|i| rate(self.bins[i], self.bin_span(i).1))
            .collect()
    }
}

/// Count and nearest-rank percentiles of a series of microsecond samples (`null` when there
/// are none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: Option<u64>,
    /// 99th percentile.
    pub p99: Option<u64>,
    /// Largest.
    pub max: Option<u64>,
}

impl Summary {
    /// Summarizes `samples` (any order).
    pub fn of(samples: &[u64]) -> Self {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        Summary {
            count: sorted.len() as u64,
            p50: nearest_rank(&sorted, 50.0),
            p99: nearest_rank(&sorted, 99.0),
            max: sorted.last().copied(),
        }
    }
}

/// The nearest-rank percentile (`pct` in 0..=100) of `sorted`: the value of rank
/// `ceil(pct / 100 * n)`, at least 1; `None` when empty or `pct` is out of range.
fn nearest_rank(sorted: &[u64], pct: f64) -> Option<u64> {
    if sorted.is_empty() || !(0.0..=100.0).contains(&pct) {
        return None;
    }
    let n = sorted.len();
    // Within 0..=n: pct is in range.
    let rank = ((pct / 100.0) * n as f64).ceil() as usize;
    sorted.get(rank.clamp(1, n) - 1).copied()
}

/// The raw recovery time samples, in microseconds, one per recovery in the order they
/// happened.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoverySamples {
    /// Fault injection to detection (recoveries whose injection time is known).
    pub fault_to_detection_us: Vec<u64>,
    /// Detection to the first completion after the restart: the clients' stall.
    pub detection_to_first_completion_us: Vec<u64>,
    /// Fault injection to that completion (recoveries whose injection time is known).
    pub fault_to_first_completion_us: Vec<u64>,
    /// Detection to first completion again, by the [`FaultKind::name`] of the fault that led
    /// to it (recoveries whose fault is known).
    #[serde(default)]
    pub detection_to_first_completion_us_by_fault: BTreeMap<String, Vec<u64>>,
}

/// What one client guest's verifying workload saw.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientResult {
    /// Client name.
    pub name: String,
    /// Requests completed.
    pub ops: u64,
    /// Requests that completed with an error (client-visible errors).
    pub errors: u64,
    /// Reads whose data differed from what the client had written.
    pub mismatches: u64,
    /// Reads whose data was checked and matched.
    pub verified: u64,
    /// Its IOPS over its own run time ([`rate`]).
    pub iops: f64,
}

/// The largest recovery p99 (detection to first completion) a run may have.
pub const MAX_RECOVERY_P99: Duration = Duration::from_millis(10);

/// The smallest throughput a run may keep, relative to the fault-free baseline (the target is
/// set for `--faults kill --every 1s`).
pub const MIN_THROUGHPUT_RATIO: f64 = 0.95;

/// How a measured value must compare with its threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Comparison {
    /// `measured <= threshold`.
    AtMost,
    /// `measured >= threshold`.
    AtLeast,
}

/// One target of the chaos run, checked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetCheck {
    /// Stable name: `client_errors`, `mismatches`, `recovery_p99_ms`, `throughput_ratio`.
    pub name: String,
    /// The measured value; `None` when the run could not measure it (no recoveries: the
    /// target holds vacuously; no baseline: it fails).
    pub measured: Option<f64>,
    /// The threshold.
    pub threshold: f64,
    /// How `measured` must compare with `threshold`.
    pub comparison: Comparison,
    /// Whether the target is met.
    pub pass: bool,
    /// What to keep in mind reading it, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl TargetCheck {
    fn new(name: &str, measured: Option<f64>, comparison: Comparison, threshold: f64) -> Self {
        let pass = measured.is_some_and(|m| match comparison {
            Comparison::AtMost => m <= threshold,
            Comparison::AtLeast => m >= threshold,
        });
        TargetCheck {
            name: name.to_string(),
            measured,
            threshold,
            comparison,
            pass,
            note: None,
        }
    }
}

/// What a chaos run did and how the system held up; the JSON of `--json FILE`.
///
/// Build it with [`new`](Self::new), feed it during the run, then call
/// [`finish`](Self::finish); the fields are public for reading (and for tests).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChaosReport {
    /// The configuration file of the run.
    pub config: String,
    /// The fault kinds the run injects.
    pub faults: Vec<FaultKind>,
    /// The injection period, whole milliseconds.
    pub every_ms: u64,
    /// The run's length, whole milliseconds.
    pub duration_ms: u64,
    /// Faults injected, by [`FaultKind::name`] (every kind of `faults` present, maybe 0).
    pub faults_injected: BTreeMap<String, u64>,
    /// Failures detected, by the VMM's reason name.
    pub detections: BTreeMap<String, u64>,
    /// Recoveries completed (the domain served again).
    pub recoveries: u64,
    /// Times the restart policy gave up on a domain.
    pub give_ups: u64,
    /// Fault injection to detection.
    pub fault_to_detection_us: Summary,
    /// Detection to the first completion after the restart (first replayed completion).
    pub detection_to_first_completion_us: Summary,
    /// Fault injection to that completion.
    pub fault_to_first_completion_us: Summary,
    /// Detection to first completion, by the fault that led to the recovery (a slow kind
    /// shows here rather than only in the overall tail): the last fault injected before the
    /// failure was detected. A fault detected only after the next injection (`slow`, whose
    /// deadline is longer than `--every 100ms`) is counted under that next one.
    #[serde(default)]
    pub recovery_by_fault: BTreeMap<String, Summary>,
    /// The samples the summaries come from.
    pub samples: RecoverySamples,
    /// Requests the clients saw fail (sum over `clients`).
    pub client_errors: u64,
    /// Reads with wrong data (sum over `clients`).
    pub mismatches: u64,
    /// Requests completed (sum over `clients`).
    pub requests: u64,
    /// IOPS under chaos (sum over `clients`).
    pub chaos_iops: f64,
    /// IOPS of a fault-free run of the same length.
    pub baseline_iops: f64,
    /// `chaos_iops / baseline_iops`; 0.0 without a baseline.
    pub throughput_ratio: f64,
    /// Throughput over time, faults and recoveries.
    pub timeline: Timeline,
    /// Per client.
    pub clients: Vec<ClientResult>,
    /// [`targets`](Self::targets), as of [`finish`](Self::finish).
    #[serde(default)]
    pub targets: Vec<TargetCheck>,
}

impl ChaosReport {
    /// An empty report of a run of `config` injecting `faults` every `every` for `duration`
    /// from `start`; its timeline has bins of `bin` (e.g. [`DEFAULT_BIN`]).
    pub fn new(
        config: impl Into<String>,
        faults: &[FaultKind],
        every: Duration,
        duration: Duration,
        start: Instant,
        bin: Duration,
    ) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        ChaosReport {
            config: config.into(),
            faults: faults.to_vec(),
            every_ms: ms(every),
            duration_ms: ms(duration),
            faults_injected: faults.iter().map(|k| (k.name().to_string(), 0)).collect(),
            detections: BTreeMap::new(),
            recoveries: 0,
            give_ups: 0,
            fault_to_detection_us: Summary::default(),
            detection_to_first_completion_us: Summary::default(),
            fault_to_first_completion_us: Summary::default(),
            recovery_by_fault: BTreeMap::new(),
            samples: RecoverySamples::default(),
            client_errors: 0,
            mismatches: 0,
            requests: 0,
            chaos_iops: 0.0,
            baseline_iops: 0.0,
            throughput_ratio: 0.0,
            timeline: Timeline::new(start, bin, duration),
            clients: Vec::new(),
            targets: Vec::new(),
        }
    }

    /// A fault of `kind` was injected at `at`.
    pub fn injected(&mut self, kind: FaultKind, at: Instant) {
        let n = self
            .faults_injected
            .entry(kind.name().to_string())
            .or_default();
        *n = n.saturating_add(1);
        self.timeline.mark(at, kind);
    }

    /// A failure was detected, for `reason` (the VMM's name for it, e.g. `panic`).
    pub fn detected(&mut self, reason: &str) {
        let n = self.detections.entry(reason.to_string()).or_default();
        *n = n.saturating_add(1);
    }

    /// A domain recovered from a fault of `kind` (when it is known): its failure was detected
    /// at `detected_at`, `fault_to_detection` after the injection when that is known, and the
    /// first completion after the restart came `detection_to_first_completion` after detection.
    pub fn recovered(
        &mut self,
        kind: Option<FaultKind>,
        detected_at: Instant,
        fault_to_detection: Option<Duration>,
        detection_to_first_completion: Duration,
    ) {
        self.recoveries = self.recoveries.saturating_add(1);
        let s = &mut self.samples;
        s.detection_to_first_completion_us
            .push(micros(detection_to_first_completion));
        if let Some(kind) = kind {
            s.detection_to_first_completion_us_by_fault
                .entry(kind.name().to_string())
                .or_default()
                .push(micros(detection_to_first_completion));
        }
        if let Some(f2d) = fault_to_detection {
            s.fault_to_detection_us.push(micros(f2d));
            s.fault_to_first_completion_us
                .push(micros(f2d.saturating_add(detection_to_first_completion)));
        }
        let recovered_at = detected_at
            .checked_add(detection_to_first_completion)
            .unwrap_or(detected_at);
        self.timeline.recovery(detected_at, recovered_at);
    }

    /// The restart policy gave up on a domain.
    pub fn gave_up(&mut self) {
        self.give_ups = self.give_ups.saturating_add(1);
    }

    /// `n` client requests completed at `at`.
    pub fn completed(&mut self, at: Instant, n: u64) {
        self.timeline.record(at, n);
    }

    /// Computes everything derived, from the samples, `clients` and `baseline_iops` (the IOPS
    /// of a fault-free run of the same length, summed over clients as `chaos_iops` is):
    /// summaries, totals, IOPS, ratio and targets. Calling it again recomputes them.
    pub fn finish(&mut self, baseline_iops: f64) {
        self.fault_to_detection_us = Summary::of(&self.samples.fault_to_detection_us);
        self.detection_to_first_completion_us =
            Summary::of(&self.samples.detection_to_first_completion_us);
        self.fault_to_first_completion_us = Summary::of(&self.samples.fault_to_first_completion_us);
        self.recovery_by_fault = self
            .samples
            .detection_to_first_completion_us_by_fault
            .iter()
            .map(|(k, v)| (k.clone(), Summary::of(v)))
            .collect();
        let sum = |f: fn(&ClientResult) -> u64| {
            self.clients
                .iter()
                .fold(0u64, |a, c| a.saturating_add(f(c)))
        };
        self.requests = sum(|c| c.ops);
        self.client_errors = sum(|c| c.errors);
        self.mismatches = sum(|c| c.mismatches);
        for c in &mut self.clients {
            c.iops = finite(c.iops);
        }
        self.chaos_iops = finite(self.clients.iter().map(|c| c.iops).sum());
        self.baseline_iops = finite(baseline_iops);
        self.throughput_ratio = if self.baseline_iops > 0.0 {
            finite(self.chaos_iops / self.baseline_iops)
        } else {
            0.0
        };
        self.targets = self.targets();
    }

    /// The run's targets: no client-visible errors, no data mismatches, recovery p99
    /// (detection to first completion) at most [`MAX_RECOVERY_P99`], throughput at least
    /// [`MIN_THROUGHPUT_RATIO`] of the baseline. Uses the fields [`finish`](Self::finish) sets.
    pub fn targets(&self) -> Vec<TargetCheck> {
        let errors = TargetCheck::new(
            "client_errors",
            Some(self.client_errors as f64),
            Comparison::AtMost,
            0.0,
        );
        let mismatches = TargetCheck::new(
            "mismatches",
            Some(self.mismatches as f64),
            Comparison::AtMost,
            0.0,
        );
        let p99 = self.detection_to_first_completion_us.p99;
        let mut recovery = TargetCheck::new(
            "recovery_p99_ms",
            p99.map(|us| us as f64 / 1000.0),
            Comparison::AtMost,
            MAX_RECOVERY_P99.as_micros() as f64 / 1000.0,
        );
        if p99.is_none() {
            recovery.pass = true;
            recovery.note = Some("no recoveries to time".into());
        }
        let mut throughput = TargetCheck::new(
            "throughput_ratio",
            (self.baseline_iops > 0.0).then_some(self.throughput_ratio),
            Comparison::AtLeast,
            MIN_THROUGHPUT_RATIO,
        );
        if self.baseline_iops <= 0.0 {
            throughput.note = Some("no baseline to compare with".into());
        } else if self.faults != [FaultKind::Kill] || self.every_ms != 1000 {
            throughput.note = Some("the target is set for --faults kill --every 1s".into());
        }
        vec![errors, mismatches, recovery, throughput]
    }

    /// The report as a table for the terminal.
    pub fn table(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_table(&mut out);
        out
    }

    fn write_table(&self, o: &mut String) -> fmt::Result {
        let faults: Vec<&str> = self.faults.iter().map(|k| k.name()).collect();
        writeln!(o, "chaos run of {}", self.config)?;
        writeln!(
            o,
            "faults {} every {} ms for {} ms",
            faults.join(","),
            self.every_ms,
            self.duration_ms
        )?;
        for (title, counts) in [
            ("faults injected", &self.faults_injected),
            ("detections", &self.detections),
        ] {
            writeln!(o, "\n{title:<34}{:>8}", "count")?;
            if counts.is_empty() {
                writeln!(o, "  (none)")?;
            }
            for (name, n) in counts {
                writeln!(o, "  {name:<32}{n:>8}")?;
            }
        }
        writeln!(
            o,
            "\nrecoveries {}, give-ups {}",
            self.recoveries, self.give_ups
        )?;
        writeln!(
            o,
            "\n{:<34}{:>8}{:>10}{:>10}{:>10}",
            "recovery times (ms)", "count", "p50", "p99", "max"
        )?;
        let ms = |v: Option<u64>| v.map_or("-".to_string(), |us| format!("{:.2}", us as f64 / 1e3));
        for (name, s) in [
            ("fault -> detection", &self.fault_to_detection_us),
            (
                "detection -> first completion",
                &self.detection_to_first_completion_us,
            ),
            (
                "fault -> first completion",
                &self.fault_to_first_completion_us,
            ),
        ] {
            writeln!(
                o,
                "  {name:<32}{:>8}{:>10}{:>10}{:>10}",
                s.count,
                ms(s.p50),
                ms(s.p99),
                ms(s.max)
            )?;
        }
        if !self.recovery_by_fault.is_empty() {
            writeln!(
                o,
                "\n{:<34}{:>8}{:>10}{:>10}{:>10}",
                "detection -> first completion", "count", "p50", "p99", "max"
            )?;
            for (kind, s) in &self.recovery_by_fault {
                writeln!(
                    o,
                    "  after {kind:<26}{:>8}{:>10}{:>10}{:>10}",
                    s.count,
                    ms(s.p50),
                    ms(s.p99),
                    ms(s.max)
                )?;
            }
        }
        writeln!(
            o,
            "\nrequests {}, client errors {}, mismatches {}",
            self.requests, self.client_errors, self.mismatches
        )?;
        writeln!(
            o,
            "throughput: chaos {:.1} IOPS, baseline {:.1} IOPS, ratio {:.3}",
            self.chaos_iops, self.baseline_iops, self.throughput_ratio
        )?;
        if !self.clients.is_empty() {
            writeln!(
                o,
                "\n{:<20}{:>12}{:>8}{:>12}{:>12}{:>12}",
                "client", "ops", "errors", "mismatches", "verified", "IOPS"
            )?;
            for c in &self.clients {
                writeln!(
                    o,
                    "  {:<18}{:>12}{:>8}{:>12}{:>12}{:>12.1}",
                    c.name, c.ops, c.errors, c.mismatches, c.verified, c.iops
                )?;
            }
        }
        writeln!(o, "\ntargets")?;
        for t in self.targets() {
            let cmp = match t.comparison {
                Comparison::AtMost => "<=",
                Comparison::AtLeast => ">=",
            };
            let value = |v: f64| match t.name.as_str() {
                "recovery_p99_ms" => format!("{v:.2} ms"),
                "throughput_ratio" => format!("{v:.3}"),
                _ => format!("{v:.0}"),
            };
            let measured = t.measured.map_or("n/a".to_string(), value);
            write!(
                o,
                "  {}  {:<18}{:>12}  (target {cmp} {})",
                if t.pass { "PASS" } else { "FAIL" },
                t.name,
                measured,
                value(t.threshold)
            )?;
            match &t.note {
                Some(note) => writeln!(o, ": {note}")?,
                None => writeln!(o)?,
            }
        }
        Ok(())
    }

    /// Throughput over time as a self-contained SVG (900x360): per-bin IOPS as a polyline,
    /// the baseline as a dashed line, each fault as a thin vertical line (`class="fault"`,
    /// red, or coloured by kind when there are several), recoveries shaded, a legend at the
    /// right.
    pub fn throughput_svg(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_throughput_svg(&mut out);
        out
    }

    fn write_throughput_svg(&self, o: &mut String) -> fmt::Result {
        let t = &self.timeline;
        let iops = t.iops();
        let (x_step, x_top) = axis(t.length().as_secs_f64(), 10.0);
        let peak = iops.iter().copied().fold(self.baseline_iops, f64::max);
        let (y_step, y_top) = axis(peak * 1.05, 6.0);
        let plot = Plot {
            right: LEGEND_LEFT - 16.0,
            x_lo: 0.0,
            x_hi: x_top,
            log_x: false,
            y_top,
        };
        let faults: Vec<&str> = self.faults.iter().map(|k| k.name()).collect();
        let title = format!(
            "Throughput under chaos: {} (faults {}, every {} ms)",
            self.config,
            faults.join(","),
            self.every_ms
        );
        plot.begin(o, &title)?;
        for r in t.recoveries() {
            let x0 = plot.x(r.detected.as_secs_f64());
            let x1 = plot.x(r.recovered.as_secs_f64());
            writeln!(
                o,
                r##"<rect class="recovery" x="{x0:.1}" y="{TOP}" width="{:.1}" height="{}" fill="{RECOVERY}" fill-opacity="0.35"/>"##,
                (x1 - x0).max(1.0),
                BOTTOM - TOP
            )?;
        }
        let ticks_x: Vec<(f64, String)> = ticks(0.0, x_top, x_step)
            .into_iter()
            .map(|v| (v, fmt_tick(v, x_step)))
            .collect();
        plot.axes(o, &ticks_x, "time (s)", y_step, "IOPS")?;
        let points: Vec<String> = iops
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let (begin, width) = t.bin_span(i);
                let mid = begin.as_secs_f64() + width.as_secs_f64() / 2.0;
                format!("{:.1},{:.1}", plot.x(mid), plot.y(*v))
            })
            .collect();
        writeln!(
            o,
            r#"<polyline points="{}" fill="none" stroke="{THROUGHPUT}" stroke-width="1.5"/>"#,
            points.join(" ")
        )?;
        if self.baseline_iops > 0.0 {
            let y = plot.y(self.baseline_iops);
            writeln!(
                o,
                r#"<line class="baseline" x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="{BASELINE}" stroke-dasharray="6 4"/>"#,
                plot.right
            )?;
        }
        let kinds: BTreeSet<FaultKind> = t.marks().iter().map(|m| m.kind).collect();
        let colour = |k: FaultKind| {
            if kinds.len() > 1 {
                PALETTE[k.index() % PALETTE.len()]
            } else {
                PALETTE[0]
            }
        };
        for m in t.marks() {
            let secs = m.at.as_secs_f64();
            let x = plot.x(secs);
            writeln!(
                o,
                r#"<line class="fault" x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{BOTTOM}" stroke="{}" stroke-width="1"><title>{} at {secs:.3} s</title></line>"#,
                colour(m.kind),
                m.kind
            )?;
        }
        let mut legend = vec![
            ("throughput".to_string(), THROUGHPUT, ""),
            (
                "baseline (fault-free)".into(),
                BASELINE,
                r#" stroke-dasharray="6 4""#,
            ),
            (
                "recovery".into(),
                RECOVERY,
                r#" stroke-width="8" stroke-opacity="0.5""#,
            ),
        ];
        legend.extend(
            kinds
                .iter()
                .map(|&k| (format!("fault: {k}"), colour(k), "")),
        );
        for (i, (label, colour, style)) in legend.iter().enumerate() {
            let y = TOP + 8.0 + i as f64 * 16.0;
            writeln!(
                o,
                r#"<line class="legend" x1="{LEGEND_LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="{colour}"{style}/><text x="{}" y="{}">{}</text>"#,
                LEGEND_LEFT + 20.0,
                LEGEND_LEFT + 26.0,
                y + 4.0,
                escape(label)
            )?;
        }
        writeln!(o, "</svg>")
    }

    /// A histogram of the recovery times (detection to first completion) as a self-contained
    /// SVG (900x360), p50 and p99 marked. Bins are linear (20 to 50 over the samples' range,
    /// at least 1% of the largest wide) when the samples span less than a factor of 50, logarithmic (5 per decade) otherwise, so that a few
    /// slow recoveries do not squash the common case into one bar.
    pub fn recovery_histogram_svg(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_histogram_svg(&mut out);
        out
    }

    fn write_histogram_svg(&self, o: &mut String) -> fmt::Result {
        let samples = &self.samples.detection_to_first_completion_us;
        let ms: Vec<f64> = samples.iter().map(|&us| us as f64 / 1000.0).collect();
        let hist = Histogram::of(&ms);
        let peak = hist.counts.iter().copied().max().unwrap_or(0);
        let (y_step, y_top) = axis(peak as f64, 5.0);
        let plot = Plot {
            right: WIDTH - 24.0,
            x_lo: hist.lo,
            x_hi: hist.hi,
            log_x: hist.log,
            y_top,
        };
        let summary = Summary::of(samples);
        let pct = |v: Option<u64>| v.map_or("-".into(), |us| format!("{:.2}", us as f64 / 1e3));
        let title = format!(
            "Recovery time, detection to first completion: {} recoveries, p50 {} ms, p99 {} ms",
            samples.len(),
            pct(summary.p50),
            pct(summary.p99)
        );
        plot.begin(o, &title)?;
        if ms.is_empty() {
            writeln!(
                o,
                r#"<text x="{}" y="{}" text-anchor="middle">no recoveries</text>"#,
                (LEFT + plot.right) / 2.0,
                (TOP + BOTTOM) / 2.0
            )?;
        }
        for (i, &count) in hist.counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let x0 = plot.x(hist.edges[i]);
            let x1 = plot.x(hist.edges[i + 1]);
            let y = plot.y(count as f64);
            writeln!(
                o,
                r#"<rect class="bar" x="{x0:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{THROUGHPUT}" stroke="white"><title>{count}</title></rect>"#,
                (x1 - x0).max(1.0),
                BOTTOM - y
            )?;
        }
        let ticks_x: Vec<(f64, String)> = if hist.log {
            let (d0, d1) = (hist.lo.log10().round(), hist.hi.log10().round());
            // Decades: a few dozen at most.
            (d0 as i32..=d1 as i32)
                .map(|d| {
                    let decimals = usize::try_from(-d).unwrap_or(0);
                    let v = 10f64.powi(d);
                    (v, format!("{v:.decimals$}"))
                })
                .collect()
        } else {
            let (step, _) = axis(hist.hi - hist.lo, 8.0);
            ticks(hist.lo, hist.hi, step)
                .into_iter()
                .map(|v| (v, fmt_tick(v, step)))
                .collect()
        };
        let x_label = if hist.log { "ms (log scale)" } else { "ms" };
        plot.axes(o, &ticks_x, x_label, y_step.max(1.0), "recoveries")?;
        // Short labels above the plot: p50 to the left of its line, p99 to the right.
        for (name, value, colour, anchor, dx) in [
            ("p50", summary.p50, "#2ca02c", "end", -3.0),
            ("p99", summary.p99, "#d62728", "start", 3.0),
        ] {
            let Some(us) = value else { continue };
            let x = plot.x(us as f64 / 1000.0);
            writeln!(
                o,
                r#"<line class="{name}" x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{BOTTOM}" stroke="{colour}" stroke-dasharray="4 3"/><text x="{:.1}" y="{}" fill="{colour}" text-anchor="{anchor}">{name}</text>"#,
                x + dx,
                TOP - 5.0
            )?;
        }
        writeln!(o, "</svg>")
    }
}

/// SVG size and plot area (pixels); plots end at their own right edge.
const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 360.0;
const LEFT: f64 = 72.0;
const TOP: f64 = 52.0;
const BOTTOM: f64 = 308.0;
/// The throughput plot's legend, right of the plot.
const LEGEND_LEFT: f64 = 736.0;

const THROUGHPUT: &str = "#1f77b4";
const BASELINE: &str = "#555555";
const RECOVERY: &str = "#f5b041";
/// Fault colours; the first (red) when there is one kind.
const PALETTE: [&str; 15] = [
    "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#ff7f0e",
    "#2ca02c", "#393b79", "#637939", "#843c39", "#000000", "#e7ba52", "#7b4173",
];

/// Escapes text for SVG content and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// 1, 2 or 5 times a power of ten: the nearest at or above `raw` (`up`), or at or below it.
/// `raw` must be finite and positive.
fn nice(raw: f64, up: bool) -> f64 {
    let magnitude = 10f64.powf(raw.log10().floor());
    let f = raw / magnitude;
    let m = if up {
        [1.0, 2.0, 5.0, 10.0]
            .into_iter()
            .find(|&m| f <= m)
            .unwrap_or(10.0)
    } else {
        [5.0, 2.0, 1.0].into_iter().find(|&m| f >= m).unwrap_or(1.0)
    };
    m * magnitude
}

/// A tick step giving about `ticks` ticks over `0..=max`, and the axis top (a multiple of
/// the step, at least `max`). Degenerate ranges (zero, negative, not finite) give 0..=1.
fn axis(max: f64, ticks: f64) -> (f64, f64) {
    let raw = max / ticks;
    if !(raw.is_finite() && raw > 0.0) {
        return (0.2, 1.0);
    }
    let step = nice(raw, true);
    (step, ((max / step).ceil() * step).max(step))
}

/// The multiples of `step` in `lo..=hi` (at most 100), computed each from its index so that
/// rounding does not build up.
fn ticks(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    if !(step > 0.0 && lo.is_finite() && hi.is_finite()) {
        return Vec::new();
    }
    let first = (lo / step - 1e-6).ceil() as i64;
    let last = (hi / step + 1e-6).floor() as i64;
    (first..=last).take(100).map(|k| k as f64 * step).collect()
}

/// `v` with as many decimals as `step` needs.
fn fmt_tick(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()).clamp(0.0, 9.0) as usize
    };
    format!("{v:.decimals$}")
}

fn finite_or_zero(v: f64) -> f64 {
    if v.is_finite() {
        v
    } else {
        0.0
    }
}

/// Maps data to a plot area from `LEFT` to `right` and `TOP` to `BOTTOM`: x over
/// `x_lo..=x_hi` (logarithmic when `log_x`, then `x_lo > 0`), y over `0..=y_top`; values
/// outside are clamped to the edges.
struct Plot {
    right: f64,
    x_lo: f64,
    x_hi: f64,
    log_x: bool,
    y_top: f64,
}

impl Plot {
    fn x(&self, v: f64) -> f64 {
        let f = if self.log_x {
            let lo = self.x_lo.log10();
            (v.max(self.x_lo).log10() - lo) / (self.x_hi.log10() - lo)
        } else {
            (v - self.x_lo) / (self.x_hi - self.x_lo)
        };
        LEFT + finite_or_zero(f).clamp(0.0, 1.0) * (self.right - LEFT)
    }

    fn y(&self, v: f64) -> f64 {
        BOTTOM - finite_or_zero(v / self.y_top).clamp(0.0, 1.0) * (BOTTOM - TOP)
    }

    /// The SVG's start, background and title.
    fn begin(&self, o: &mut String, title: &str) -> fmt::Result {
        writeln!(
            o,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">"#
        )?;
        writeln!(
            o,
            r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
        )?;
        writeln!(
            o,
            r#"<text x="{}" y="24" text-anchor="middle" font-size="14">{}</text>"#,
            WIDTH / 2.0,
            escape(title)
        )
    }

    /// Axes: x ticks at the given values and labels, y ticks every `y_step` from 0, grid
    /// lines, axis labels.
    fn axes(
        &self,
        o: &mut String,
        x_ticks: &[(f64, String)],
        x_label: &str,
        y_step: f64,
        y_label: &str,
    ) -> fmt::Result {
        for v in ticks(0.0, self.y_top, y_step) {
            let y = self.y(v);
            writeln!(
                o,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#e8e8e8"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                self.right,
                LEFT - 6.0,
                y + 4.0,
                fmt_tick(v, y_step)
            )?;
        }
        for (v, label) in x_ticks {
            let x = self.x(*v);
            writeln!(
                o,
                r#"<line x1="{x:.1}" y1="{BOTTOM}" x2="{x:.1}" y2="{}" stroke="black"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#,
                BOTTOM + 5.0,
                BOTTOM + 18.0,
                escape(label)
            )?;
        }
        writeln!(
            o,
            r#"<path d="M{LEFT},{TOP} V{BOTTOM} H{}" fill="none" stroke="black"/>"#,
            self.right
        )?;
        writeln!(
            o,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            (LEFT + self.right) / 2.0,
            HEIGHT - 14.0,
            escape(x_label)
        )?;
        writeln!(
            o,
            r#"<text transform="translate(18 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
            (TOP + BOTTOM) / 2.0,
            escape(y_label)
        )
    }
}

/// Recovery times binned for the histogram (ms).
struct Histogram {
    log: bool,
    /// The axis range: `edges` first and last.
    lo: f64,
    hi: f64,
    edges: Vec<f64>,
    counts: Vec<u64>,
}

impl Histogram {
    /// Smallest time on a log axis (1 µs): zero has no logarithm.
    const LOG_FLOOR: f64 = 0.001;
    const PER_DECADE: f64 = 5.0;

    fn of(ms: &[f64]) -> Self {
        if ms.is_empty() {
            return Histogram {
                log: false,
                lo: 0.0,
                hi: 1.0,
                edges: vec![0.0, 1.0],
                counts: vec![0],
            };
        }
        let lo = ms.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ms.iter().copied().fold(0.0, f64::max);
        let floor = lo.max(Self::LOG_FLOOR);
        let (log, edges): (bool, Vec<f64>) = if hi / floor > 50.0 {
            let d0 = floor.log10().floor();
            let d1 = hi.log10().ceil().max(d0 + 1.0);
            // A few dozen: samples are at most u64::MAX µs.
            let n = ((d1 - d0) * Self::PER_DECADE) as usize;
            let edges = (0..=n)
                .map(|i| 10f64.powf(d0 + i as f64 / Self::PER_DECADE))
                .collect();
            (true, edges)
        } else {
            // About a twentieth of the span (rounded down: at most 50 bins), but at least a
            // hundredth of the largest time: a tight cluster gets a few bars, not a comb.
            let span = (hi - lo).max(hi * 0.2).max(Self::LOG_FLOOR);
            let step = nice(span / 20.0, false);
            let first = (lo / step + 1e-9).floor();
            let n = ((hi / step - first + 1e-9).floor() as usize).saturating_add(1);
            let edges = (0..=n).map(|i| (first + i as f64) * step).collect();
            (false, edges)
        };
        let bins = edges.len() - 1;
        let mut counts = vec![0u64; bins];
        for &v in ms {
            let i = edges[1..].iter().position(|&e| v < e).unwrap_or(bins - 1);
            counts[i] += 1;
        }
        Histogram {
            log,
            lo: edges[0],
            hi: edges[bins],
            edges,
            counts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn fault_lists_parse_names_and_all() {
        assert_eq!(
            parse_fault_list("kill, panic,hang").unwrap(),
            [FaultKind::Kill, FaultKind::Panic, FaultKind::Hang]
        );
        assert_eq!(parse_fault_list("all").unwrap(), FaultKind::ALL);
        assert_eq!(parse_fault_list("slow,all").unwrap()[0], FaultKind::Slow);
        assert_eq!(parse_fault_list("slow,all").unwrap().len(), 15);
        assert_eq!(parse_fault_list("kill,kill").unwrap(), [FaultKind::Kill]);
        for k in FaultKind::ALL {
            assert_eq!(k.name().parse::<FaultKind>(), Ok(k));
            assert_eq!(serde_json::to_value(k).unwrap(), k.name());
        }
    }

    #[test]
    fn bad_fault_lists_name_the_item_and_the_valid_kinds() {
        let err = parse_fault_list("kill,explode").unwrap_err();
        assert_eq!(
            err,
            ParseError::UnknownFault {
                item: "explode".into()
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("\"explode\""), "{msg}");
        assert!(msg.contains("wild-write") && msg.contains("failed-replay, or all"));
        assert!(matches!(
            parse_fault_list("kill,,panic"),
            Err(ParseError::UnknownFault { item }) if item.is_empty()
        ));
        assert_eq!(parse_fault_list(" "), Err(ParseError::NoFaults));
        assert!("all".parse::<FaultKind>().is_err());
    }

    #[test]
    fn durations_parse_with_units_and_fractions() {
        assert_eq!(parse_duration("100ms"), Ok(ms(100)));
        assert_eq!(parse_duration("1s"), Ok(ms(1000)));
        assert_eq!(parse_duration("1.5s"), Ok(ms(1500)));
        assert_eq!(parse_duration("60s"), Ok(ms(60_000)));
        assert_eq!(parse_duration("2m"), Ok(ms(120_000)));
        assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("500µs"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration(" .25 s "), Ok(ms(250)));
        assert_eq!(parse_duration("1h"), Ok(ms(3_600_000)));
        assert_eq!(parse_duration("7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(parse_duration("0.0000000015s"), Ok(Duration::from_nanos(1)));
    }

    #[test]
    fn bad_durations_say_what_is_wrong() {
        for (input, problem) in [
            ("", "it does not start with a number"),
            ("s", "it does not start with a number"),
            ("-1s", "it does not start with a number"),
            ("100", "the unit is missing"),
            ("10 parsecs", "the unit is unknown"),
            ("1e3ms", "the unit is unknown"),
            ("1.2.3s", "the number has more than one decimal point"),
            ("0ms", "it must be greater than zero"),
            ("0.0000000001s", "it must be greater than zero"),
            ("99999999999999h", "it is too large"),
            (
                "9999999999999999999999999999999999999999s",
                "it is too large",
            ),
        ] {
            let err = parse_duration(input).unwrap_err();
            assert_eq!(
                err,
                ParseError::Duration {
                    input: input.into(),
                    problem
                },
                "{input}"
            );
        }
        let msg = parse_duration("100").unwrap_err().to_string();
        assert!(msg.starts_with("invalid duration \"100\": the unit is missing"));
        assert!(msg.contains("100ms"));
    }

    #[test]
    fn summaries_use_nearest_rank() {
        let data: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(
            Summary::of(&data),
            Summary {
                count: 100,
                p50: Some(50),
                p99: Some(99),
                max: Some(100)
            }
        );
        // n = 10: p50 is rank 5, p99 rank ceil(9.9) = 10.
        let ten: Vec<u64> = (1..=10).map(|v| v * 10).collect();
        let s = Summary::of(&ten);
        assert_eq!((s.p50, s.p99, s.max), (Some(50), Some(100), Some(100)));
        assert_eq!(Summary::of(&[7]).p50, Some(7));
        assert_eq!(Summary::of(&[7]).p99, Some(7));
        assert_eq!(Summary::of(&[]), Summary::default());
        assert_eq!(nearest_rank(&[1, 2, 3], 0.0), Some(1));
        assert_eq!(nearest_rank(&[1, 2, 3], f64::NAN), None);
        assert_eq!(
            serde_json::to_value(Summary::of(&[])).unwrap(),
            serde_json::json!({"count": 0, "p50": null, "p99": null, "max": null})
        );
    }

    #[test]
    fn timeline_bins_the_window_and_drops_the_rest() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut t = Timeline::new(t0, ms(100), ms(1050));
        assert_eq!(t.bins().len(), 11);
        assert_eq!(t.bin_span(10), (ms(1000), ms(50)));
        t.record(t0, 1);
        t.record(t0 + ms(99), 2);
        t.record(t0 + ms(100), 4);
        t.record(t0 + ms(1049), 5);
        t.record(t0 - ms(1), 100); // before the start: dropped
        t.record(t0 + ms(1050), 1000); // at the end: dropped
        assert_eq!(&t.bins()[..2], [3, 4]);
        assert_eq!(t.bins()[10], 5);
        assert_eq!((t.total(), t.dropped()), (12, 1100));
        let iops = t.iops();
        assert!((iops[0] - 30.0).abs() < 1e-9, "{iops:?}");
        assert!(
            (iops[10] - 100.0).abs() < 1e-9,
            "the last bin is 50 ms wide"
        );

        t.mark(t0 + ms(500), FaultKind::Kill);
        t.mark(t0 - ms(1), FaultKind::Panic);
        t.mark(t0 + ms(2000), FaultKind::Panic);
        assert_eq!(
            t.marks(),
            [FaultMark {
                at: ms(500),
                kind: FaultKind::Kill
            }]
        );

        t.recovery(t0 + ms(500), t0 + ms(502));
        t.recovery(t0 + ms(1040), t0 + ms(5000)); // clipped to the end
        t.recovery(t0 - ms(10), t0 + ms(1)); // clipped to the start
        t.recovery(t0 + ms(600), t0 + ms(599)); // backwards: dropped
        t.recovery(t0 - ms(10), t0 - ms(5)); // before: dropped
        t.recovery(t0 + ms(1050), t0 + ms(1060)); // after: dropped
        let spans: Vec<(u64, u64)> = t
            .recoveries()
            .iter()
            .map(|r| {
                (
                    r.detected.as_millis() as u64,
                    r.recovered.as_millis() as u64,
                )
            })
            .collect();
        assert_eq!(spans, [(500, 502), (1040, 1050), (0, 1)]);
    }

    #[test]
    fn degenerate_timelines_do_not_panic() {
        let t0 = Instant::now();
        let mut empty = Timeline::new(t0, ms(100), Duration::ZERO);
        empty.record(t0, 3);
        empty.mark(t0, FaultKind::Kill);
        empty.recovery(t0, t0);
        assert_eq!((empty.bins().len(), empty.dropped()), (0, 3));
        assert!(empty.iops().is_empty() && empty.marks().is_empty());

        let zero_bin = Timeline::new(t0, Duration::ZERO, ms(1));
        assert_eq!(
            (zero_bin.bin(), zero_bin.bins().len()),
            (Duration::from_micros(1), 1000)
        );
        let huge = Timeline::new(t0, Duration::from_nanos(1), Duration::from_secs(3600));
        assert_eq!(huge.bins().len() as u64, MAX_BINS);
        let endless = Timeline::new(t0, ms(1), Duration::MAX);
        assert!(endless.bins().len() as u64 <= MAX_BINS);
        assert_eq!(endless.bin_span(usize::MAX).1, Duration::ZERO);
    }

    /// A report of 2 s, kill and panic every 500 ms, two clients, 3 recoveries.
    fn sample_report() -> ChaosReport {
        let t0 = Instant::now();
        let faults = [FaultKind::Kill, FaultKind::Panic];
        let mut r = ChaosReport::new(
            "configs/chaos <&> test.toml",
            &faults,
            ms(500),
            ms(2000),
            t0,
            ms(100),
        );
        for i in 0..20u64 {
            r.completed(t0 + ms(i * 100 + 50), if i == 5 { 10 } else { 100 });
        }
        r.injected(FaultKind::Kill, t0 + ms(500));
        r.detected("operator-kill");
        r.recovered(
            None,
            t0 + ms(500),
            Some(Duration::ZERO),
            Duration::from_micros(1500),
        );
        r.injected(FaultKind::Panic, t0 + ms(1000));
        r.detected("panic");
        r.recovered(
            Some(FaultKind::Panic),
            t0 + ms(1001),
            Some(ms(1)),
            Duration::from_micros(2500),
        );
        r.injected(FaultKind::Kill, t0 + ms(1500));
        r.detected("operator-kill");
        r.recovered(Some(FaultKind::Kill), t0 + ms(1500), None, ms(12));
        r.clients = vec![
            ClientResult {
                name: "client0".into(),
                ops: 1000,
                errors: 0,
                mismatches: 0,
                verified: 500,
                iops: rate(1000, ms(2000)),
            },
            ClientResult {
                name: "client1".into(),
                ops: 910,
                errors: 0,
                mismatches: 0,
                verified: 400,
                iops: rate(910, ms(2000)),
            },
        ];
        r.finish(1000.0);
        r
    }

    #[test]
    fn finish_derives_summaries_totals_and_ratio() {
        let r = sample_report();
        assert_eq!(r.faults_injected["kill"], 2);
        assert_eq!(r.faults_injected["panic"], 1);
        assert_eq!(r.detections["operator-kill"], 2);
        assert_eq!(r.recoveries, 3);
        assert_eq!(r.samples.fault_to_detection_us, [0, 1000]);
        assert_eq!(r.samples.fault_to_first_completion_us, [1500, 3500]);
        // The first kill's recovery came without its fault kind: it is in no per-kind row.
        assert_eq!(r.recovery_by_fault.len(), 2);
        assert_eq!(r.recovery_by_fault["panic"].p50, Some(2500));
        assert_eq!(r.recovery_by_fault["kill"].count, 1);
        assert_eq!(r.recovery_by_fault["kill"].max, Some(12_000));
        assert_eq!(
            r.detection_to_first_completion_us,
            Summary {
                count: 3,
                p50: Some(2500),
                p99: Some(12_000),
                max: Some(12_000)
            }
        );
        assert_eq!(r.requests, 1910);
        assert_eq!(r.chaos_iops, 955.0);
        assert_eq!(r.throughput_ratio, 0.955);
        assert_eq!(r.timeline.marks().len(), 3);
        assert_eq!(r.timeline.recoveries().len(), 3);
    }

    #[test]
    fn report_json_round_trips_without_nan() {
        let mut r = sample_report();
        r.clients[0].iops = f64::NAN;
        r.finish(f64::NAN);
        assert_eq!((r.baseline_iops, r.throughput_ratio), (0.0, 0.0));
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("NaN") && !json.contains("\"chaos_iops\":null"));
        let back: ChaosReport = serde_json::from_str(&json).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        assert_eq!(back.timeline.bins(), r.timeline.bins());
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["every_ms"], 500);
        assert_eq!(v["faults"], serde_json::json!(["kill", "panic"]));
        assert_eq!(v["timeline"]["bin_us"], 100_000);
        assert_eq!(
            v["timeline"]["marks"][0],
            serde_json::json!({"at_us": 500_000, "kind": "kill"})
        );
        assert_eq!(v["detection_to_first_completion_us"]["p99"], 12_000);
        assert_eq!(
            v["samples"]["detection_to_first_completion_us"],
            serde_json::json!([1500, 2500, 12_000])
        );
    }

    fn check(r: &ChaosReport, name: &str) -> TargetCheck {
        r.targets().into_iter().find(|t| t.name == name).unwrap()
    }

    #[test]
    fn targets_pass_and_fail_at_their_thresholds() {
        let mut r = sample_report();
        // p99 is 12 ms, ratio 0.955.
        assert!(!check(&r, "recovery_p99_ms").pass);
        assert_eq!(check(&r, "recovery_p99_ms").measured, Some(12.0));
        assert!(check(&r, "throughput_ratio").pass);
        assert!(check(&r, "client_errors").pass && check(&r, "mismatches").pass);

        r.samples.detection_to_first_completion_us = vec![10_000];
        (r.clients[0].iops, r.clients[1].iops) = (95.0, 0.0);
        r.finish(100.0);
        assert!(check(&r, "recovery_p99_ms").pass, "exactly 10 ms passes");
        assert!(check(&r, "throughput_ratio").pass, "exactly 0.95 passes");
        r.samples.detection_to_first_completion_us = vec![10_001];
        r.clients[0].iops = 94.99;
        r.finish(100.0);
        assert!(!check(&r, "recovery_p99_ms").pass);
        assert!(!check(&r, "throughput_ratio").pass);

        r.clients[1].errors = 1;
        r.clients[0].mismatches = 2;
        r.finish(0.0);
        assert!(!check(&r, "client_errors").pass && !check(&r, "mismatches").pass);
        assert_eq!(check(&r, "mismatches").measured, Some(2.0));
        let ratio = check(&r, "throughput_ratio");
        assert!(!ratio.pass && ratio.measured.is_none() && ratio.note.is_some());

        r.samples.detection_to_first_completion_us.clear();
        r.finish(0.0);
        let recovery = check(&r, "recovery_p99_ms");
        assert!(recovery.pass && recovery.measured.is_none());
        assert_eq!(r.targets, r.targets());
    }

    #[test]
    fn table_shows_counts_timings_throughput_and_targets() {
        let table = sample_report().table();
        for line in [
            "faults kill,panic every 500 ms for 2000 ms",
            "  kill                                   2",
            "  operator-kill                          2",
            "recoveries 3, give-ups 0",
            "  detection -> first completion          3      2.50     12.00     12.00",
            "  fault -> detection                     2      0.00      1.00      1.00",
            "requests 1910, client errors 0, mismatches 0",
            "throughput: chaos 955.0 IOPS, baseline 1000.0 IOPS, ratio 0.955",
            "  PASS  client_errors                0  (target <= 0)",
            "  FAIL  recovery_p99_ms       12.00 ms  (target <= 10.00 ms)",
            "  PASS  throughput_ratio         0.955  (target >= 0.950): the target is set for --faults kill --every 1s",
            "  client0                   1000       0           0         500       500.0",
            "  after kill                             1     12.00     12.00     12.00",
            "  after panic                            1      2.50      2.50      2.50",
        ] {
            assert!(table.contains(line), "missing {line:?} in\n{table}");
        }
    }

    /// Tags balance, text and attributes hold no raw `<`, `>` or stray `&`.
    fn assert_well_formed(svg: &str) {
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"));
        let entities_only = |s: &str| {
            s.match_indices('&').all(|(i, _)| {
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                    .iter()
                    .any(|e| s[i..].starts_with(e))
            })
        };
        let mut open = Vec::new();
        let mut rest = svg;
        while let Some(i) = rest.find('<') {
            assert!(!rest[..i].contains('>') && entities_only(&rest[..i]));
            let end = i + rest[i..].find('>').expect("unclosed tag");
            let tag = &rest[i + 1..end];
            assert!(!tag.contains('<') && entities_only(tag), "{tag}");
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(open.pop(), Some(name), "{svg}");
            } else if !tag.ends_with('/') {
                open.push(tag.split_whitespace().next().unwrap_or(""));
            }
            rest = &rest[end + 1..];
        }
        assert!(open.is_empty(), "unclosed {open:?}");
    }

    #[test]
    fn throughput_svg_has_a_point_per_bin_and_a_line_per_fault() {
        let r = sample_report();
        let svg = r.throughput_svg();
        assert_well_formed(&svg);
        assert_eq!(svg.matches("<polyline").count(), 1);
        let points = svg
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(points.split_whitespace().count(), 20);
        assert_eq!(svg.matches(r#"class="fault""#).count(), 3);
        assert_eq!(svg.matches(r#"class="recovery""#).count(), 3);
        assert_eq!(svg.matches(r#"class="baseline""#).count(), 1);
        assert!(svg.contains("chaos &lt;&amp;&gt; test.toml"));
        assert!(!svg.contains("chaos <&> test"));
        assert!(svg.contains(">fault: kill<") && svg.contains(">fault: panic<"));
        assert!(svg.contains(">time (s)<") && svg.contains(">IOPS<"));

        // Nothing recorded, no baseline, zero length: still a well-formed plot.
        let mut empty = ChaosReport::new("x", &[], ms(1), Duration::ZERO, Instant::now(), ms(100));
        empty.finish(0.0);
        let svg = empty.throughput_svg();
        assert_well_formed(&svg);
        assert!(svg.contains(r#"<polyline points="""#));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn histogram_svg_marks_percentiles_on_sensible_bins() {
        let r = sample_report();
        let svg = r.recovery_histogram_svg();
        assert_well_formed(&svg);
        assert!(svg.contains(r#"class="p50""#) && svg.contains(r#"class="p99""#));
        assert!(svg.contains("3 recoveries, p50 2.50 ms, p99 12.00 ms"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));

        let narrow = Histogram::of(&[4.9, 5.0, 5.1, 5.1]);
        assert!(!narrow.log);
        assert_eq!(narrow.counts.iter().sum::<u64>(), 4);
        assert_eq!(narrow.counts.len(), 5, "50 us bins: 4.9 to 5.15 ms");
        let wide = Histogram::of(&[0.0, 0.05, 1.0, 1.0, 300.0]);
        assert!(wide.log);
        assert_eq!(wide.counts.iter().sum::<u64>(), 5);
        assert!((wide.lo - 0.001).abs() < 1e-9 && (wide.hi - 1000.0).abs() < 1e-6);
        assert_eq!(wide.counts.len(), 30, "5 bins per decade from 1 us to 1 s");
        let same = Histogram::of(&[0.0, 0.0]);
        assert_eq!(same.counts.iter().sum::<u64>(), 2);

        let mut none = sample_report();
        none.samples.detection_to_first_completion_us.clear();
        let svg = none.recovery_histogram_svg();
        assert_well_formed(&svg);
        assert!(svg.contains(">no recoveries<") && !svg.contains("class=\"bar\""));
        assert!(!svg.contains(r#"class="p50""#));
    }
}
