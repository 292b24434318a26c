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

/// The request deadline, adapted to how long the disk's requests take, the way TCP's
/// retransmission timer adapts to round-trip times (RFC 6298).
///
/// A fixed deadline cannot tell a domain that lost a request from a host too busy to serve it
/// in time: on a slow or overloaded host every request outlives a deadline tuned on a fast
/// one, each restart makes the host busier still, and the disk ends in a storm of recoveries
/// that serve nothing (measured in the TCG rig: a 100 ms deadline, first requests after a
/// restart at 150–400 ms, dozens of restarts and no request served). So the deadline in force
/// is the configured one or, when larger, the smoothed latency of completed requests plus four
/// times its mean deviation; and each deadline failure with no completion since doubles it
/// (at most [`AdaptiveDeadline::MAX_BACKOFF`] times), until a request completes. The
/// configured deadline is a floor: where requests are fast, detection is as quick as it was.
/// Nothing exceeds [`AdaptiveDeadline::CAP`] times the configured deadline.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaptiveDeadline {
    base: Duration,
    /// Smoothed latency and its mean deviation, in seconds (none until a completion).
    smoothed: Option<(f64, f64)>,
    /// Deadline failures since the last completion.
    backoff: u32,
}

impl AdaptiveDeadline {
    /// Most doublings after consecutive deadline failures.
    pub const MAX_BACKOFF: u32 = 6;
    /// Largest deadline, in multiples of the configured one.
    pub const CAP: u32 = 64;

    /// A deadline of at least `base`.
    pub fn new(base: Duration) -> Self {
        AdaptiveDeadline {
            base,
            smoothed: None,
            backoff: 0,
        }
    }

    /// A request completed `latency` after it was posted to the domain.
    pub fn completed(&mut self, latency: Duration) {
        let r = latency.as_secs_f64();
        self.smoothed = Some(match self.smoothed {
            None => (r, r / 2.0),
            Some((srtt, rttvar)) => (
                0.875 * srtt + 0.125 * r,
                0.75 * rttvar + 0.25 * (srtt - r).abs(),
            ),
        });
        self.backoff = 0;
    }

    /// A request outlived the deadline and the domain is being replaced.
    pub fn expired(&mut self) {
        self.backoff = (self.backoff + 1).min(Self::MAX_BACKOFF);
    }

    /// The deadline in force.
    pub fn current(&self) -> Duration {
        let learned = self.smoothed.map_or(Duration::ZERO, |(srtt, rttvar)| {
            Duration::try_from_secs_f64(srtt + 4.0 * rttvar).unwrap_or(Duration::MAX)
        });
        let cap = self.base.saturating_mul(Self::CAP);
        crate::policy::doubled(self.base.max(learned), self.backoff, cap)
    }

    /// Given the oldest request in flight in the running domain as `(tag, time posted to it)`,
    /// a [`FailureReason::Deadline`] if it has been in flight longer than the deadline in
    /// force. Requests queued while no domain runs have no posting time: their clock starts
    /// when they are (re)posted.
    pub fn check(&self, oldest: Option<(u32, Instant)>, now: Instant) -> Option<FailureReason> {
        let (tag, posted) = oldest?;
        let age = now.saturating_duration_since(posted);
        let deadline = self.current();
        (age > deadline).then_some(FailureReason::Deadline { tag, age, deadline })
    }
}

/// The time a disk's domain had to serve: the wall clock, less the time the host kept the
/// domain or its service from running.
///
/// A request's age and a still heartbeat are evidence against the domain only for time the
/// domain could have used. On a machine that is itself a VM, the hypervisor below takes CPUs
/// away for tens or hundreds of milliseconds (measured here: 30–67% of the machine's CPU in
/// bursts), and on a busy host the domain's vCPU thread waits for a CPU behind other threads;
/// neither is the domain's doing, and a wall-clock deadline reads both as a hang. The VMM
/// measures that lost time (steal from the hypervisor, run-queue delay of the threads that
/// serve the disk) and reports it here; detection then ages requests and heartbeats on this
/// clock. Lost time only delays a detection: a domain that really hangs is found once it has
/// had the deadline's worth of time.
///
/// The time lost is applied no faster than the wall clock runs, so the clock never goes back
/// between reports (host counters are coarse: steal advances in ticks); what is reported ahead
/// is owed and applied over the following reports, at most [`ServiceClock::MAX_OWED`] of it.
#[derive(Clone, Copy, Debug)]
pub struct ServiceClock {
    origin: Instant,
    last: Instant,
    lost: Duration,
    owed: Duration,
}

impl ServiceClock {
    /// Most lost time carried ahead of the wall clock (a counter that jumps, say on a CPU
    /// coming online, must not stop the clock for long).
    pub const MAX_OWED: Duration = Duration::from_secs(1);

    /// A clock that starts at `origin`, nothing lost.
    pub fn new(origin: Instant) -> Self {
        ServiceClock {
            origin,
            last: origin,
            lost: Duration::ZERO,
            owed: Duration::ZERO,
        }
    }

    /// Reports, at wall time `now`, `lost` more time in which the domain could not run.
    pub fn stalled(&mut self, now: Instant, lost: Duration) {
        self.owed = self.owed.saturating_add(lost).min(Self::MAX_OWED);
        if now > self.last {
            let applied = self.owed.min(now - self.last);
            self.lost += applied;
            self.owed -= applied;
            self.last = now;
        }
    }

    /// The service time at wall time `now`: `now` less the time lost up to the last report.
    pub fn at(&self, now: Instant) -> Instant {
        let run = now.saturating_duration_since(self.origin);
        self.origin + run.saturating_sub(self.lost)
    }

    /// All the time lost so far.
    pub fn lost(&self) -> Duration {
        self.lost
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
    fn deadline_reports_a_request_older_than_the_deadline() {
        let t0 = Instant::now();
        let dl = AdaptiveDeadline::new(ms(50));
        assert_eq!(dl.check(None, t0 + ms(1000)), None);
        assert_eq!(
            dl.check(Some((3, t0)), t0 + ms(50)),
            None,
            "exactly the deadline"
        );
        let overdue = dl.check(Some((3, t0)), t0 + ms(80)).unwrap();
        assert_eq!(overdue.name(), "deadline");
        assert_eq!(
            overdue,
            FailureReason::Deadline {
                tag: 3,
                age: ms(80),
                deadline: ms(50),
            }
        );
        // Posted "in the future" (clock skew between threads) is age zero, not a panic.
        assert_eq!(dl.check(Some((1, t0 + ms(10))), t0), None);
    }

    #[test]
    fn fast_requests_keep_the_configured_deadline() {
        let mut dl = AdaptiveDeadline::new(ms(100));
        for i in 0..1000 {
            dl.completed(Duration::from_micros(200 + (i % 7) * 100));
        }
        assert_eq!(dl.current(), ms(100));
    }

    #[test]
    fn the_deadline_follows_slow_completions_and_comes_back() {
        let mut dl = AdaptiveDeadline::new(ms(100));
        for _ in 0..50 {
            dl.completed(ms(300));
        }
        // Steady 300 ms: the deviation decays, the deadline settles just above the latency.
        let settled = dl.current();
        assert!(settled > ms(300) && settled < ms(400), "{settled:?}");
        // Latencies that jump around widen it.
        for i in 0..50 {
            dl.completed(ms(if i % 2 == 0 { 100 } else { 500 }));
        }
        assert!(dl.current() > ms(700), "{:?}", dl.current());
        // Fast again: back to the floor.
        for _ in 0..200 {
            dl.completed(ms(1));
        }
        assert_eq!(dl.current(), ms(100));
    }

    #[test]
    fn deadline_failures_double_it_until_a_request_completes() {
        let mut dl = AdaptiveDeadline::new(ms(100));
        dl.expired();
        assert_eq!(dl.current(), ms(200));
        dl.expired();
        assert_eq!(dl.current(), ms(400));
        for _ in 0..10 {
            dl.expired();
        }
        assert_eq!(dl.current(), ms(100) * (1 << AdaptiveDeadline::MAX_BACKOFF));
        // A completion ends the backoff; what it took is learned.
        dl.completed(ms(350));
        assert_eq!(dl.current(), ms(350) + ms(350) * 2, "srtt + 4 * srtt/2");
        // Never beyond the cap, however slow.
        dl.completed(Duration::from_secs(3600));
        assert_eq!(dl.current(), ms(100) * AdaptiveDeadline::CAP);
    }

    #[test]
    fn the_service_clock_stops_for_time_lost_and_never_goes_back() {
        let t0 = Instant::now();
        let mut c = ServiceClock::new(t0);
        assert_eq!(
            c.at(t0 + ms(10)),
            t0 + ms(10),
            "nothing lost: the wall clock"
        );
        // 30 ms of a 50 ms interval were lost: a request posted at t0 is 20 ms old.
        c.stalled(t0 + ms(50), ms(30));
        assert_eq!(c.at(t0 + ms(50)) - c.at(t0), ms(20));
        assert_eq!(c.lost(), ms(30));
        // A coarse counter reports 40 ms in a 10 ms interval: the clock stands still, and
        // the rest is owed to the next intervals.
        let at50 = c.at(t0 + ms(50));
        c.stalled(t0 + ms(60), ms(40));
        assert_eq!(c.at(t0 + ms(60)), at50);
        c.stalled(t0 + ms(90), Duration::ZERO);
        assert_eq!(c.at(t0 + ms(90)), at50, "30 ms owed, 30 applied");
        c.stalled(t0 + ms(100), Duration::ZERO);
        assert_eq!(c.at(t0 + ms(100)) - at50, ms(10), "runs again");
        assert_eq!(c.lost(), ms(70));
        // Reports at the same instant or out of order only add to what is owed.
        c.stalled(t0 + ms(100), ms(5));
        c.stalled(t0 + ms(99), ms(5));
        assert_eq!(c.lost(), ms(70));
        c.stalled(t0 + ms(120), Duration::ZERO);
        assert_eq!(c.lost(), ms(80));
        // Monotonic at every report, however much is reported.
        let mut prev = c.at(t0 + ms(120));
        for i in 0..100u64 {
            let now = t0 + ms(121 + i);
            c.stalled(now, ms(i * 37 % 50));
            assert!(c.at(now) >= prev);
            prev = c.at(now);
        }
        // What is owed is bounded: a counter jump stops the clock for at most MAX_OWED.
        let t1 = t0 + ms(10_000);
        c.stalled(t1, Duration::ZERO);
        let at1 = c.at(t1);
        c.stalled(t1, Duration::from_secs(3600));
        let later = t1 + ServiceClock::MAX_OWED + ms(5);
        c.stalled(later, Duration::ZERO);
        assert_eq!(c.at(later) - at1, ms(5));
    }

    #[test]
    fn a_deadline_checked_on_the_service_clock_ignores_time_lost() {
        let t0 = Instant::now();
        let mut c = ServiceClock::new(t0);
        let dl = AdaptiveDeadline::new(ms(100));
        let posted = c.at(t0);
        // 300 ms of wall clock, 250 of them stolen: 50 ms of service, no failure.
        c.stalled(t0 + ms(300), ms(250));
        assert_eq!(dl.check(Some((1, posted)), c.at(t0 + ms(300))), None);
        // Another 60 ms with nothing lost: 110 ms of service, a failure.
        c.stalled(t0 + ms(360), Duration::ZERO);
        let r = dl.check(Some((1, posted)), c.at(t0 + ms(360))).unwrap();
        assert_eq!(
            r,
            FailureReason::Deadline {
                tag: 1,
                age: ms(110),
                deadline: ms(100)
            }
        );
    }
}
