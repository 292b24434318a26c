//! Throughput over time: completions in fixed bins, with the faults and recoveries of the run.

use std::time::{Duration, Instant};

use ddvm_recovery::fault::FaultKind;
use serde::{Deserialize, Serialize};

use crate::{micros, rate};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::ms;

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
}
