//! What happened to the domains (events, for `ddvm ctl events`) and how often and how fast
//! (metrics, for `ddvm ctl metrics` and chaos reports). All serialize to JSON; durations as
//! whole microseconds in `*_us` fields.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};

use crate::hook::HookStatus;
use crate::policy::GiveUpAction;
use crate::reason::{FailureReason, OperatorAction};

/// One thing that happened to a domain.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// Position in the log, from 0, never reused.
    pub seq: u64,
    /// Time since the log started.
    #[serde(rename = "at_us", with = "crate::micros")]
    pub at: Duration,
    /// Domain name.
    pub domain: String,
    /// What happened (flattened: `"event": "failed", ...`).
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum EventKind {
    /// A domain started booting (`attempt` 0: not a restart after a failure).
    Booting {
        /// Its epoch.
        epoch: u64,
        /// Consecutive failure it recovers from.
        attempt: u32,
    },
    /// The domain reported ready.
    Ready {
        /// Its epoch.
        epoch: u64,
        /// From boot start to ready.
        #[serde(rename = "boot_time_us", with = "crate::micros")]
        boot_time: Duration,
    },
    /// A failure was detected (duplicates are counted, not logged).
    Failed {
        /// Epoch of the domain that failed.
        epoch: Option<u64>,
        /// Why: `{"name", "message", "detail"}`.
        #[serde(serialize_with = "crate::reason::serialize_report")]
        reason: FailureReason,
    },
    /// A restart was scheduled.
    RestartScheduled {
        /// Consecutive failure number (0 for operator restarts).
        attempt: u32,
        /// Backoff delay before it.
        #[serde(rename = "delay_us", with = "crate::micros")]
        delay: Duration,
    },
    /// The fresh domain took the replayed requests.
    Replayed {
        /// Requests resubmitted.
        requests: usize,
        /// From ready to the end of replay.
        #[serde(rename = "took_us", with = "crate::micros")]
        took: Duration,
    },
    /// The domain serves again: first completion after a restart (or end of replay when
    /// there was nothing to replay).
    Recovered {
        /// From fault injection to detection (chaos runs, when the injection time is known).
        #[serde(rename = "fault_to_detection_us", with = "crate::micros::option")]
        fault_to_detection: Option<Duration>,
        /// From detection to the fresh domain's ready.
        #[serde(rename = "detection_to_ready_us", with = "crate::micros")]
        detection_to_ready: Duration,
        /// From detection to this point: the clients' stall.
        #[serde(rename = "recovery_us", with = "crate::micros")]
        recovery: Duration,
    },
    /// The policy gave up on the domain.
    GaveUp {
        /// The failure that exhausted the policy.
        #[serde(serialize_with = "crate::reason::serialize_report")]
        reason: FailureReason,
        /// Restarts in the window at that point.
        restarts_in_window: u32,
        /// What happens to requests.
        action: GiveUpAction,
    },
    /// A hook finished (or could not run).
    HookRan {
        /// Reason name it was run for.
        reason: &'static str,
        /// How it ended.
        status: HookStatus,
        /// How long it ran.
        #[serde(rename = "took_us", with = "crate::micros")]
        took: Duration,
    },
    /// The operator asked for something.
    Operator {
        /// What.
        action: OperatorAction,
    },
    /// The VMM stopped the domain in an orderly way (no recovery).
    Stopped,
}

/// The last `capacity` events of all domains.
#[derive(Clone, Debug)]
pub struct EventLog {
    start: Instant,
    capacity: usize,
    events: VecDeque<Event>,
    next_seq: u64,
}

impl EventLog {
    /// Events kept by default.
    pub const DEFAULT_CAPACITY: usize = 1024;

    /// An empty log whose times count from `start`, keeping at most `capacity` events (at
    /// least one).
    pub fn new(start: Instant, capacity: usize) -> Self {
        EventLog {
            start,
            capacity: capacity.max(1),
            events: VecDeque::new(),
            next_seq: 0,
        }
    }

    /// Appends an event, dropping the oldest when full; returns its sequence number.
    pub fn record(&mut self, domain: &str, at: Instant, kind: EventKind) -> u64 {
        if self.events.len() == self.capacity {
            self.events.pop_front();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.events.push_back(Event {
            seq,
            at: at.saturating_duration_since(self.start),
            domain: domain.to_string(),
            kind,
        });
        seq
    }

    /// Events with `seq >= since`, oldest first. A client polls with the last seq it saw
    /// plus one; when that is below [`first_seq`](Self::first_seq), events were lost.
    pub fn since(&self, since: u64) -> impl Iterator<Item = &Event> {
        let skip = since.saturating_sub(self.first_seq());
        self.events
            .iter()
            .skip(usize::try_from(skip).unwrap_or(usize::MAX))
    }

    /// Sequence number of the oldest event kept (= `next_seq` when empty).
    pub fn first_seq(&self) -> u64 {
        self.events.front().map_or(self.next_seq, |e| e.seq)
    }

    /// Sequence number the next event will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Events kept.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether no event is kept.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// Counters and recovery times of one domain.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Metrics {
    /// Failures detected, by [`FailureReason::name`] (duplicates not included).
    pub detections: BTreeMap<&'static str, u64>,
    /// Detections of a failure already being handled (or of a domain no longer current).
    pub duplicates: u64,
    /// Restarts decided by the policy.
    pub restarts: u64,
    /// Restarts the operator asked for (restart, update).
    pub operator_restarts: u64,
    /// Times the policy gave up.
    pub give_ups: u64,
    /// Hook runs that did not exit 0.
    pub hook_failures: u64,
    /// Requests resubmitted by replays.
    pub replayed_requests: u64,
    /// Events the supervisor dropped because the VMM did not drain them.
    pub events_dropped: u64,
    /// Recovery times.
    pub recovery: RecoveryTimes,
}

/// Recovery time samples, one per completed recovery.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RecoveryTimes {
    /// Fault injection to detection (only when the injection time was known).
    pub fault_to_detection: Samples,
    /// Detection to the fresh domain's ready.
    pub detection_to_ready: Samples,
    /// Detection to the first completion after the restart: the clients' stall.
    pub recovery: Samples,
}

/// The most recent [`Samples::KEPT`] durations of a series, with percentiles over them.
/// Serializes as `{"count", "p50_us", "p99_us", "max_us"}`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Samples {
    kept: VecDeque<Duration>,
    count: u64,
}

impl Samples {
    /// Samples kept for percentiles.
    pub const KEPT: usize = 65_536;

    /// Adds a sample (dropping the oldest past [`KEPT`](Self::KEPT)).
    pub fn push(&mut self, d: Duration) {
        if self.kept.len() == Self::KEPT {
            self.kept.pop_front();
        }
        self.kept.push_back(d);
        self.count += 1;
    }

    /// Samples ever pushed.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Nearest-rank percentile (`pct` in 0..=100) of the kept samples; `None` when there are
    /// none or `pct` is out of range.
    pub fn percentile(&self, pct: f64) -> Option<Duration> {
        if self.kept.is_empty() || !(0.0..=100.0).contains(&pct) {
            return None;
        }
        let mut sorted: Vec<Duration> = self.kept.iter().copied().collect();
        sorted.sort_unstable();
        let n = sorted.len();
        // Rank ceil(pct/100 * n), 1-based, at least 1; the float is within 0..=n.
        let rank = ((pct / 100.0) * n as f64).ceil() as usize;
        sorted.get(rank.clamp(1, n) - 1).copied()
    }

    /// Median.
    pub fn p50(&self) -> Option<Duration> {
        self.percentile(50.0)
    }

    /// 99th percentile.
    pub fn p99(&self) -> Option<Duration> {
        self.percentile(99.0)
    }

    /// The kept samples, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = Duration> + '_ {
        self.kept.iter().copied()
    }

    /// Largest kept sample.
    pub fn max(&self) -> Option<Duration> {
        self.kept.iter().max().copied()
    }
}

impl Serialize for Samples {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let us = |d: Option<Duration>| d.map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let mut st = s.serialize_struct("Samples", 4)?;
        st.serialize_field("count", &self.count)?;
        st.serialize_field("p50_us", &us(self.p50()))?;
        st.serialize_field("p99_us", &us(self.p99()))?;
        st.serialize_field("max_us", &us(self.max()))?;
        st.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn log_keeps_the_last_events_with_increasing_seq() {
        let t0 = Instant::now();
        let mut log = EventLog::new(t0, 3);
        assert!(log.is_empty());
        assert_eq!(log.since(0).count(), 0);
        for i in 0..5u64 {
            let seq = log.record("dd0", t0 + ms(i), EventKind::Stopped);
            assert_eq!(seq, i);
        }
        assert_eq!(log.len(), 3);
        assert_eq!((log.first_seq(), log.next_seq()), (2, 5));
        let seqs = |since| log.since(since).map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(0), [2, 3, 4]);
        assert_eq!(seqs(3), [3, 4]);
        assert_eq!(seqs(5), [] as [u64; 0]);
        assert_eq!(seqs(u64::MAX), [] as [u64; 0]);
        assert_eq!(log.since(4).next().unwrap().at, ms(4));
    }

    #[test]
    fn event_json_is_flat_with_a_reason_report() {
        let t0 = Instant::now();
        let mut log = EventLog::new(t0, 8);
        let reason = FailureReason::Panic {
            message: "oops".into(),
        };
        log.record(
            "nvme0",
            t0 + ms(3),
            EventKind::Failed {
                epoch: Some(2),
                reason,
            },
        );
        let json = serde_json::to_value(log.since(0).next().unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "seq": 0, "at_us": 3000, "domain": "nvme0", "event": "failed", "epoch": 2,
                "reason": {"name": "panic", "message": "panicked: oops",
                           "detail": {"kind": "panic", "message": "oops"}}
            })
        );
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut s = Samples::default();
        assert_eq!(s.p50(), None);
        for v in 1..=100 {
            s.push(ms(v));
        }
        assert_eq!(s.p50(), Some(ms(50)));
        assert_eq!(s.p99(), Some(ms(99)));
        assert_eq!(s.percentile(100.0), Some(ms(100)));
        assert_eq!(s.percentile(0.0), Some(ms(1)));
        assert_eq!(s.max(), Some(ms(100)));
        assert_eq!(s.percentile(f64::NAN), None);
        assert_eq!(s.percentile(101.0), None);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"count": 100, "p50_us": 50_000, "p99_us": 99_000, "max_us": 100_000})
        );
    }

    #[test]
    fn samples_keep_a_bounded_window() {
        let mut s = Samples::default();
        for _ in 0..Samples::KEPT {
            s.push(ms(100));
        }
        for _ in 0..Samples::KEPT {
            s.push(ms(1));
        }
        assert_eq!(s.count(), 2 * Samples::KEPT as u64);
        assert_eq!(s.max(), Some(ms(1)));
    }
}
