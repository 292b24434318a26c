//! Detection from samples the VMM takes: a heartbeat counter that stops moving, a request that
//! stays in flight too long. Both are fed the time; neither reads a clock.

use std::time::{Duration, Instant};

use crate::reason::FailureReason;

/// Watches a domain's heartbeat counter. Start it (or [`reset`](Self::reset) it) when the
/// domain becomes ready; feed it samples from the event loop.
///
/// A counter that stands still only says the domain did not run its loop; a host that did not
/// run the domain's vCPU (an overloaded or stalled host) looks the same on the wall clock. When
/// samples carry the vCPU's run time ([`sample_running`](Self::sample_running)), a stall is a
/// hang only once the vCPU has also *run* for longer than the period without beating.
#[derive(Clone, Debug)]
pub struct HeartbeatMonitor {
    period: Duration,
    /// Last counter value, when it was first seen with that value, and the vCPU's run time
    /// then (taken at the next sample after a touch).
    last: Option<(u64, Instant, Option<Duration>)>,
    /// A stall was reported and the counter has not moved since.
    reported: bool,
}

impl HeartbeatMonitor {
    /// A monitor reporting a counter that stands still for longer than `period`.
    pub fn new(period: Duration) -> Self {
        HeartbeatMonitor {
            period,
            last: None,
            reported: false,
        }
    }

    /// Forgets everything (a fresh domain): the next sample is the new baseline.
    pub fn reset(&mut self) {
        self.last = None;
        self.reported = false;
    }

    /// Takes a sample on the wall clock alone. Returns a [`FailureReason::HeartbeatStall`]
    /// once when the counter has not changed for longer than the period (exactly the period
    /// is not a stall); the next report needs the counter to move first. The first sample
    /// only sets the baseline.
    pub fn sample(&mut self, counter: u64, now: Instant) -> Option<FailureReason> {
        self.sample_running(counter, now, None)
    }

    /// As [`sample`](Self::sample), with `ran`, the total time the domain's vCPU has run so
    /// far (`None` when unknown): a counter still for longer than the period is reported only
    /// if the vCPU also ran for longer than the period since it last moved.
    pub fn sample_running(
        &mut self,
        counter: u64,
        now: Instant,
        ran: Option<Duration>,
    ) -> Option<FailureReason> {
        match &mut self.last {
            Some((last, since, ran_since)) if *last == counter => {
                if ran_since.is_none() {
                    *ran_since = ran;
                }
                let stalled_for = now.saturating_duration_since(*since);
                if stalled_for <= self.period || self.reported {
                    return None;
                }
                if let (Some(r), Some(r0)) = (ran, *ran_since) {
                    if r.saturating_sub(r0) <= self.period {
                        // The host has not run the domain that long: not a hang (yet).
                        return None;
                    }
                }
                self.reported = true;
                Some(FailureReason::HeartbeatStall {
                    last: *last,
                    stalled_for,
                    period: self.period,
                })
            }
            _ => {
                self.last = Some((counter, now, ran));
                self.reported = false;
                None
            }
        }
    }

    /// The domain is known to be alive without its counter moving (for instance its vCPU is
    /// blocked in a wait exit the VMM holds): restarts the stall clock.
    pub fn touch(&mut self, now: Instant) {
        if let Some((counter, _, _)) = self.last {
            self.last = Some((counter, now, None));
            self.reported = false;
        }
    }

    /// The earliest time a sample with an unchanged counter would report a stall.
    pub fn deadline(&self) -> Option<Instant> {
        let (_, since, _) = self.last?;
        since.checked_add(self.period)
    }
}

/// Finds a request in flight past its deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeadlineMonitor {
    deadline: Duration,
}

impl DeadlineMonitor {
    /// A monitor for requests that may be in flight for at most `deadline`.
    pub fn new(deadline: Duration) -> Self {
        DeadlineMonitor { deadline }
    }

    /// Given the requests in flight in the running domain as `(tag, time submitted to it)`,
    /// the oldest one in flight for longer than the deadline, as a
    /// [`FailureReason::Deadline`]. Requests queued while no domain runs must not be passed
    /// (their clock starts when they are (re)submitted).
    pub fn check(
        &self,
        in_flight: impl IntoIterator<Item = (u32, Instant)>,
        now: Instant,
    ) -> Option<FailureReason> {
        let (tag, submitted) = in_flight.into_iter().min_by_key(|&(_, at)| at)?;
        let age = now.saturating_duration_since(submitted);
        (age > self.deadline).then_some(FailureReason::Deadline {
            tag,
            age,
            deadline: self.deadline,
        })
    }

    /// When the oldest of these requests passes its deadline.
    pub fn next_deadline(
        &self,
        in_flight: impl IntoIterator<Item = (u32, Instant)>,
    ) -> Option<Instant> {
        let oldest = in_flight.into_iter().map(|(_, at)| at).min()?;
        oldest.checked_add(self.deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn heartbeat_stall_is_reported_only_past_the_period() {
        let t0 = Instant::now();
        let mut hb = HeartbeatMonitor::new(ms(100));
        assert_eq!(hb.deadline(), None);
        assert_eq!(hb.sample(5, t0), None);
        assert_eq!(hb.deadline(), Some(t0 + ms(100)));
        assert_eq!(
            hb.sample(5, t0 + ms(100)),
            None,
            "exactly the period is no stall"
        );
        let stall = hb
            .sample(5, t0 + ms(100) + Duration::from_nanos(1))
            .unwrap();
        assert_eq!(stall.name(), "heartbeat");
        assert_eq!(
            stall,
            FailureReason::HeartbeatStall {
                last: 5,
                stalled_for: ms(100) + Duration::from_nanos(1),
                period: ms(100),
            }
        );
        assert_eq!(hb.sample(5, t0 + ms(500)), None, "reported once");
    }

    #[test]
    fn a_moving_counter_is_never_a_stall() {
        let t0 = Instant::now();
        let mut hb = HeartbeatMonitor::new(ms(100));
        for i in 0..100u64 {
            assert_eq!(hb.sample(i, t0 + ms(90 * i)), None);
        }
        // Any change counts as movement, even a smaller value.
        assert_eq!(hb.sample(3, t0 + ms(90 * 100)), None);
    }

    #[test]
    fn a_vcpu_the_host_did_not_run_is_not_hung_until_it_ran_the_period() {
        let t0 = Instant::now();
        let mut hb = HeartbeatMonitor::new(ms(20));
        let ran = |v| Some(ms(v));
        assert_eq!(hb.sample_running(7, t0, ran(100)), None);
        // 50 ms of wall clock, 5 ms of run time: the host starved it.
        assert_eq!(hb.sample_running(7, t0 + ms(50), ran(105)), None);
        assert_eq!(
            hb.sample_running(7, t0 + ms(80), ran(120)),
            None,
            "exactly the period"
        );
        // It ran 21 ms without a beat: a hang.
        let r = hb.sample_running(7, t0 + ms(90), ran(121)).expect("a hang");
        assert!(
            matches!(r, FailureReason::HeartbeatStall { last: 7, .. }),
            "{r:?}"
        );
        assert_eq!(
            hb.sample_running(7, t0 + ms(95), ran(200)),
            None,
            "reported once"
        );
        // Run time unknown: the wall clock decides.
        hb.reset();
        assert_eq!(hb.sample_running(1, t0, None), None);
        assert!(hb.sample_running(1, t0 + ms(21), None).is_some());
        // After a touch, the run-time baseline is the next sample's.
        hb.reset();
        assert_eq!(hb.sample_running(2, t0, ran(0)), None);
        hb.touch(t0 + ms(100));
        assert_eq!(hb.sample_running(2, t0 + ms(101), ran(500)), None);
        assert_eq!(hb.sample_running(2, t0 + ms(130), ran(510)), None);
        assert!(hb.sample_running(2, t0 + ms(131), ran(521)).is_some());
    }

    #[test]
    fn stall_clock_restarts_when_the_counter_moves_after_a_report() {
        let t0 = Instant::now();
        let mut hb = HeartbeatMonitor::new(ms(10));
        hb.sample(1, t0);
        assert!(hb.sample(1, t0 + ms(11)).is_some());
        assert_eq!(hb.sample(2, t0 + ms(12)), None);
        assert_eq!(hb.sample(2, t0 + ms(22)), None);
        assert!(hb.sample(2, t0 + ms(23)).is_some());
    }

    #[test]
    fn no_stall_before_the_first_sample_plus_period_and_after_reset_or_touch() {
        let t0 = Instant::now();
        let mut hb = HeartbeatMonitor::new(ms(10));
        // The first sample comes late: it is only a baseline.
        assert_eq!(hb.sample(0, t0 + ms(1000)), None);
        assert_eq!(hb.sample(0, t0 + ms(1010)), None);
        hb.touch(t0 + ms(1010));
        assert_eq!(hb.sample(0, t0 + ms(1020)), None);
        assert!(hb.sample(0, t0 + ms(1021)).is_some());
        hb.reset();
        assert_eq!(hb.sample(0, t0 + ms(5000)), None);
        // Touch before any sample does nothing.
        let mut fresh = HeartbeatMonitor::new(ms(10));
        fresh.touch(t0);
        assert_eq!(fresh.deadline(), None);
    }

    #[test]
    fn deadline_reports_the_oldest_overdue_request() {
        let t0 = Instant::now();
        let dm = DeadlineMonitor::new(ms(50));
        let in_flight = [(7, t0 + ms(20)), (3, t0), (9, t0 + ms(40))];
        assert_eq!(dm.check([], t0 + ms(1000)), None);
        assert_eq!(
            dm.check(in_flight, t0 + ms(50)),
            None,
            "exactly the deadline"
        );
        assert_eq!(dm.next_deadline(in_flight), Some(t0 + ms(50)));
        let overdue = dm.check(in_flight, t0 + ms(80)).unwrap();
        assert_eq!(overdue.name(), "deadline");
        assert_eq!(
            overdue,
            FailureReason::Deadline {
                tag: 3,
                age: ms(80),
                deadline: ms(50),
            }
        );
        // Submissions "in the future" (clock skew between threads) are age zero, not a panic.
        assert_eq!(dm.check([(1, t0 + ms(10))], t0), None);
    }
}
