//! The report of a chaos run: what was injected, detected and recovered, how long recoveries
//! took, what the clients saw, and the run's targets.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ddvm_recovery::fault::FaultKind;
use serde::{Deserialize, Serialize};

use crate::{finite, micros, Timeline};

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
    /// Its IOPS over its own run time ([`rate`](crate::rate)); for a network client, frames
    /// (or TCP messages) per second.
    pub iops: f64,
    /// What a network client saw of the network, if it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetResult>,
}

/// What a network client saw of the network beside its verified operations.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NetResult {
    /// Frames it sent again because their echo did not come back in time: the frames the
    /// network lost (a recovery drops what the dead domain held).
    pub lost: u64,
    /// Frames that arrived twice (a transmit replayed after a restart is at-least-once).
    pub duplicated: u64,
    /// Readings of its link down (the VMM keeps the link up through every restart: 0).
    pub link_down: u64,
    /// TCP segments retransmitted, for a TCP client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retransmits: Option<u64>,
    /// TCP connections reset or timed out, for a TCP client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resets: Option<u64>,
}

/// The network clients' losses, over the run and per recovery.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NetSummary {
    /// Sum of [`NetResult::lost`].
    pub lost: u64,
    /// Sum of [`NetResult::duplicated`].
    pub duplicated: u64,
    /// Sum of [`NetResult::link_down`].
    pub link_down: u64,
    /// Sum of [`NetResult::retransmits`] (TCP clients).
    pub retransmits: u64,
    /// Sum of [`NetResult::resets`] (TCP clients).
    pub resets: u64,
    /// `lost` per recovery (0 without recoveries).
    pub lost_per_recovery: f64,
    /// `duplicated` per recovery (0 without recoveries).
    pub duplicated_per_recovery: f64,
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
    /// The network clients' losses, if there are network clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetSummary>,
    /// [`targets`](Self::targets), as of [`finish`](Self::finish).
    #[serde(default)]
    pub targets: Vec<TargetCheck>,
    /// The run was stopped (SIGINT, SIGTERM) before its end: the figures cover what ran.
    #[serde(default)]
    pub stopped: bool,
    /// The target for recovery p99, milliseconds (default [`MAX_RECOVERY_P99`]).
    #[serde(default = "default_p99_ms")]
    pub target_recovery_p99_ms: f64,
    /// The target for the throughput ratio (default [`MIN_THROUGHPUT_RATIO`]).
    #[serde(default = "default_throughput")]
    pub target_throughput_ratio: f64,
    /// Where and when it ran: filled in by the caller.
    #[serde(default)]
    pub run: RunInfo,
}

fn default_p99_ms() -> f64 {
    MAX_RECOVERY_P99.as_micros() as f64 / 1000.0
}

fn default_throughput() -> f64 {
    MIN_THROUGHPUT_RATIO
}

/// Where and when a chaos run ran.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// The ddvm version that ran it.
    pub ddvm_version: String,
    /// The KVM platform (`pvm`, `vmx`, `svm`).
    pub platform: String,
    /// The host's name.
    pub host: String,
    /// When it started, UTC, RFC 3339.
    pub started: String,
}

impl ChaosReport {
    /// An empty report of a run of `config` injecting `faults` every `every` for `duration`
    /// from `start`; its timeline has bins of `bin` (e.g. [`DEFAULT_BIN`](crate::DEFAULT_BIN)).
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
            network: None,
            targets: Vec::new(),
            stopped: false,
            target_recovery_p99_ms: default_p99_ms(),
            target_throughput_ratio: default_throughput(),
            run: RunInfo::default(),
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
        self.network = self.network_summary();
        self.targets = self.targets();
    }

    fn network_summary(&self) -> Option<NetSummary> {
        let nets: Vec<&NetResult> = self.clients.iter().filter_map(|c| c.net.as_ref()).collect();
        if nets.is_empty() {
            return None;
        }
        let sum = |f: fn(&NetResult) -> u64| nets.iter().fold(0u64, |a, n| a.saturating_add(f(n)));
        let lost = sum(|n| n.lost);
        let duplicated = sum(|n| n.duplicated);
        let per = |v: u64| {
            if self.recoveries == 0 {
                0.0
            } else {
                finite(v as f64 / self.recoveries as f64)
            }
        };
        Some(NetSummary {
            lost,
            duplicated,
            link_down: sum(|n| n.link_down),
            retransmits: sum(|n| n.retransmits.unwrap_or(0)),
            resets: sum(|n| n.resets.unwrap_or(0)),
            lost_per_recovery: per(lost),
            duplicated_per_recovery: per(duplicated),
        })
    }

    /// The run's targets: no client-visible errors, no data mismatches, recovery p99
    /// (detection to first completion) at most `target_recovery_p99_ms` (by default
    /// [`MAX_RECOVERY_P99`]), throughput at least `target_throughput_ratio` of the baseline (by
    /// default [`MIN_THROUGHPUT_RATIO`]). Uses the fields [`finish`](Self::finish) sets.
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
            self.target_recovery_p99_ms,
        );
        if p99.is_none() {
            recovery.pass = true;
            recovery.note = Some("no recoveries to time".into());
        }
        let mut throughput = TargetCheck::new(
            "throughput_ratio",
            (self.baseline_iops > 0.0).then_some(self.throughput_ratio),
            Comparison::AtLeast,
            self.target_throughput_ratio,
        );
        if self.baseline_iops <= 0.0 {
            throughput.note = Some("no baseline to compare with".into());
        } else if self.target_throughput_ratio == MIN_THROUGHPUT_RATIO
            && (self.faults != [FaultKind::Kill] || self.every_ms != 1000)
        {
            throughput.note = Some("the target is set for --faults kill --every 1s".into());
        }
        vec![errors, mismatches, recovery, throughput]
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::rate;
    use crate::tests::ms;

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

    /// A report of 2 s, kill and panic every 500 ms, two clients, 3 recoveries.
    pub(crate) fn sample_report() -> ChaosReport {
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
                net: None,
            },
            ClientResult {
                name: "client1".into(),
                ops: 910,
                errors: 0,
                mismatches: 0,
                verified: 400,
                iops: rate(910, ms(2000)),
                net: None,
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
}
