//! The supervisor of one driver domain, the recovery state machine of `docs/ARCHITECTURE.md`:
//! `Booting -> Running -> Failed(reason) -> Restarting -> Replaying -> Running`, or `-> GaveUp`.
//!
//! The VMM drives it with what it observes and does; the supervisor decides (restart when,
//! or give up), counts, times recoveries and queues events. It never reads a clock: every
//! call takes `now`.
//!
//! | call                        | from                                 | to                     |
//! |-----------------------------|--------------------------------------|------------------------|
//! | `boot_started(e)`           | `Stopped`                            | `Booting(e)`           |
//! |                             | `Failed`, once `now >= not_before`   | `Restarting(e)`        |
//! | `ready(e)`                  | `Booting(e)`                         | `Running` (serve)      |
//! |                             | `Restarting(e)`                      | `Replaying` (replay)   |
//! | `replay_done(n)`            | `Replaying`                          | `Running`              |
//! | `failure(e, reason)`        | `Booting`/`Running`/`Restarting`/`Replaying` of epoch `e` | `Failed` or `GaveUp` |
//! |                             | anything else                        | unchanged (duplicate)  |
//! | `operator(Kill)`            | as `failure` of the current domain   |                        |
//! | `operator(Restart/Update)`  | any state but `Stopped`              | `Failed`, restart now  |
//! | `stop()`                    | any                                  | `Stopped`              |
//!
//! Any other call is a [`TransitionError`]; nothing panics.
//!
//! Policy: the first failure after a healthy run (`Running` for at least
//! [`RestartPolicy::healthy_after`](crate::policy::RestartPolicy::healthy_after)) restarts at
//! once; each further consecutive failure (including one during recovery) waits
//! [`RestartPolicy::delay`](crate::policy::RestartPolicy::delay). A failure that would make
//! more than `max_restarts` restarts within `window` gives up instead; giving up is sticky until
//! an operator restart, which also clears the restart history.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::events::{EventKind, EventLog, Metrics};
use crate::hook::{HookCall, HookReport};
use crate::policy::{GiveUpAction, Policy, PolicyError};
use crate::reason::{FailureReason, OperatorAction, ReasonReport};

/// Where a domain is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Not started, or stopped by the VMM (no recovery).
    Stopped,
    /// First boot (not a recovery) in progress.
    Booting {
        /// Its epoch.
        epoch: u64,
        /// When its boot started.
        since: Instant,
    },
    /// Serving requests.
    Running {
        /// Its epoch.
        epoch: u64,
        /// Since when.
        since: Instant,
    },
    /// The domain is dead; a fresh one may boot from `not_before`. Requests queue.
    Failed {
        /// Why.
        reason: FailureReason,
        /// Consecutive failure number (0 for operator restarts).
        attempt: u32,
        /// End of the backoff delay.
        not_before: Instant,
    },
    /// A fresh domain is booting to replace a failed one.
    Restarting {
        /// The fresh domain's epoch.
        epoch: u64,
        /// Consecutive failure number it recovers from.
        attempt: u32,
        /// When its boot started.
        since: Instant,
    },
    /// The fresh domain is ready; the VMM resets the device and resubmits requests.
    Replaying {
        /// Its epoch.
        epoch: u64,
        /// Since when (its ready).
        since: Instant,
    },
    /// The policy gave up; only an operator restart leaves this state.
    GaveUp {
        /// The failure that exhausted the policy.
        reason: FailureReason,
        /// What happens to requests.
        action: GiveUpAction,
    },
}

impl State {
    /// Short name for status and logs.
    pub fn name(&self) -> &'static str {
        match self {
            State::Stopped => "stopped",
            State::Booting { .. } => "booting",
            State::Running { .. } => "running",
            State::Failed { .. } => "failed",
            State::Restarting { .. } => "restarting",
            State::Replaying { .. } => "replaying",
            State::GaveUp { .. } => "gave-up",
        }
    }

    /// Epoch of the live domain, if one is booting or running.
    fn live_epoch(&self) -> Option<u64> {
        match *self {
            State::Booting { epoch, .. }
            | State::Running { epoch, .. }
            | State::Restarting { epoch, .. }
            | State::Replaying { epoch, .. } => Some(epoch),
            _ => None,
        }
    }
}

/// What the VMM does after a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Tear the domain down now (keeping its shadow queue); boot a fresh one, with a new
    /// epoch, at `at` and call [`Supervisor::boot_started`].
    Restart {
        /// When the fresh domain may boot.
        at: Instant,
        /// The backoff delay (`at - now`).
        delay: Duration,
        /// Consecutive failure number (0 for operator restarts).
        attempt: u32,
    },
    /// Tear the domain down and apply the action.
    GiveUp(GiveUpAction),
    /// Nothing to do: the failure is already being handled (a second detection of it, a
    /// report about an old epoch) or the supervisor already gave up.
    Ignored,
}

/// What `ready` means for the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    /// A first boot: submit requests.
    Serve,
    /// A recovery: reset the device, replay the configuration log and the requests, then
    /// call [`Supervisor::replay_done`].
    Replay,
}

/// What to do with a client request arriving now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Send it to the domain.
    Submit,
    /// Keep it in the shadow queue behind the requests in flight.
    Queue,
    /// Complete it with VIRTIO_BLK_S_IOERR: the device is broken.
    Fail,
}

/// A call that is not valid in the current state.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransitionError {
    /// The call makes no sense in this state.
    #[error("{call} is not valid while the domain is {state}")]
    Illegal {
        /// The call.
        call: &'static str,
        /// The state's name.
        state: &'static str,
    },
    /// A fresh domain must get an epoch newer than any before it.
    #[error("epoch {epoch} is not newer than the last epoch {last}")]
    EpochNotNewer {
        /// Epoch given.
        epoch: u64,
        /// Last epoch used.
        last: u64,
    },
    /// `ready` for another epoch than the one booting.
    #[error("ready for epoch {epoch}, but the domain booting has epoch {current}")]
    WrongEpoch {
        /// Epoch given.
        epoch: u64,
        /// Epoch booting.
        current: u64,
    },
    /// `boot_started` before the backoff delay ended.
    #[error("restart {early:?} before its backoff delay ends")]
    TooEarly {
        /// Time left.
        early: Duration,
    },
}

/// A snapshot for `ddvm ctl status` (the VMM adds what it owns, such as requests in flight).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Status {
    /// Domain name.
    pub domain: String,
    /// [`State::name`].
    pub state: &'static str,
    /// Epoch of the latest boot.
    pub epoch: Option<u64>,
    /// The policy gave up and requests fail.
    pub broken: bool,
    /// Restarts decided by the policy.
    pub restarts: u64,
    /// Restarts the operator asked for.
    pub operator_restarts: u64,
    /// Policy restarts in the current window.
    pub restarts_in_window: u32,
    /// Failures since the last healthy run.
    pub consecutive_failures: u32,
    /// Time left before the scheduled restart.
    #[serde(rename = "next_restart_in_us", with = "crate::micros::option")]
    pub next_restart_in: Option<Duration>,
    /// The last failure (operator restarts and updates are not failures).
    pub last_failure: Option<LastFailure>,
    /// Failures detected, by reason name.
    pub detections: BTreeMap<&'static str, u64>,
    /// Duplicate detections.
    pub duplicates: u64,
    /// Times the policy gave up.
    pub give_ups: u64,
    /// Requests resubmitted by replays.
    pub replayed_requests: u64,
    /// Hook runs that did not exit 0.
    pub hook_failures: u64,
}

/// The last failure in a [`Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LastFailure {
    /// Name, message, details.
    #[serde(flatten)]
    pub reason: ReasonReport,
    /// How long ago.
    #[serde(rename = "ago_us", with = "crate::micros")]
    pub ago: Duration,
}

/// An open recovery, timed from its first detection.
#[derive(Clone, Copy, Debug)]
struct Recovery {
    detected: Instant,
    fault_at: Option<Instant>,
    ready_at: Option<Instant>,
}

/// The supervisor of one driver domain.
#[derive(Debug)]
pub struct Supervisor {
    domain: String,
    policy: Policy,
    state: State,
    /// Epoch of the latest boot.
    epoch: Option<u64>,
    consecutive: u32,
    /// Times of the policy restarts still inside the window, oldest first.
    window: VecDeque<Instant>,
    last_failure: Option<(FailureReason, Instant)>,
    fault_injected: Option<Instant>,
    recovery: Option<Recovery>,
    hook_call: Option<HookCall>,
    metrics: Metrics,
    outbox: VecDeque<(Instant, EventKind)>,
}

impl Supervisor {
    /// Events kept for [`drain_events`](Self::drain_events); older ones are dropped (and
    /// counted) when the VMM does not drain.
    pub const OUTBOX: usize = 256;

    /// A supervisor in `Stopped`; the policy is checked.
    pub fn new(domain: impl Into<String>, policy: Policy) -> Result<Self, PolicyError> {
        policy.validate()?;
        Ok(Supervisor {
            domain: domain.into(),
            policy,
            state: State::Stopped,
            epoch: None,
            consecutive: 0,
            window: VecDeque::new(),
            last_failure: None,
            fault_injected: None,
            recovery: None,
            hook_call: None,
            metrics: Metrics::default(),
            outbox: VecDeque::new(),
        })
    }

    /// The VMM started booting a domain with `epoch` (newer than any before): a first boot
    /// from `Stopped`, a restart from `Failed` once its delay has passed.
    pub fn boot_started(&mut self, epoch: u64, now: Instant) -> Result<(), TransitionError> {
        if let Some(last) = self.epoch.filter(|&last| epoch <= last) {
            return Err(TransitionError::EpochNotNewer { epoch, last });
        }
        let (next, attempt) = match self.state {
            State::Stopped => (State::Booting { epoch, since: now }, 0),
            State::Failed {
                attempt,
                not_before,
                ..
            } => {
                if now < not_before {
                    let early = not_before.saturating_duration_since(now);
                    return Err(TransitionError::TooEarly { early });
                }
                let since = now;
                (
                    State::Restarting {
                        epoch,
                        attempt,
                        since,
                    },
                    attempt,
                )
            }
            _ => return Err(self.illegal("boot_started")),
        };
        self.state = next;
        self.epoch = Some(epoch);
        self.emit(now, EventKind::Booting { epoch, attempt });
        Ok(())
    }

    /// The domain with `epoch` reported ready. Says whether to serve or to replay.
    pub fn ready(&mut self, epoch: u64, now: Instant) -> Result<Ready, TransitionError> {
        let (next, ready, since) = match self.state {
            State::Booting { epoch: e, since } if e == epoch => {
                (State::Running { epoch, since: now }, Ready::Serve, since)
            }
            State::Restarting {
                epoch: e, since, ..
            } if e == epoch => (State::Replaying { epoch, since: now }, Ready::Replay, since),
            State::Booting { epoch: current, .. } | State::Restarting { epoch: current, .. } => {
                return Err(TransitionError::WrongEpoch { epoch, current })
            }
            _ => return Err(self.illegal("ready")),
        };
        self.state = next;
        if let Some(r) = &mut self.recovery {
            r.ready_at = Some(now);
        }
        let boot_time = now.saturating_duration_since(since);
        self.emit(now, EventKind::Ready { epoch, boot_time });
        Ok(ready)
    }

    /// The VMM resubmitted `requests` requests to the fresh domain: it serves again. With
    /// nothing replayed, the recovery ends here; otherwise at the first completion.
    pub fn replay_done(&mut self, requests: usize, now: Instant) -> Result<(), TransitionError> {
        let State::Replaying { epoch, since } = self.state else {
            return Err(self.illegal("replay_done"));
        };
        self.state = State::Running { epoch, since: now };
        let replayed = u64::try_from(requests).unwrap_or(u64::MAX);
        self.metrics.replayed_requests = self.metrics.replayed_requests.saturating_add(replayed);
        let took = now.saturating_duration_since(since);
        self.emit(now, EventKind::Replayed { requests, took });
        if requests == 0 {
            self.close_recovery(now);
        }
        Ok(())
    }

    /// A request completed (call for every completion or only the first after a restart; it
    /// costs a branch). Returns the recovery time when this closes a recovery.
    pub fn completed(&mut self, now: Instant) -> Option<Duration> {
        let serving = matches!(self.state, State::Running { .. } | State::Replaying { .. });
        if serving && self.recovery.is_some_and(|r| r.ready_at.is_some()) {
            return self.close_recovery(now);
        }
        None
    }

    /// A failure of the domain with `epoch` was detected.
    pub fn failure(&mut self, epoch: u64, reason: FailureReason, now: Instant) -> Decision {
        if self.state.live_epoch() != Some(epoch) {
            self.metrics.duplicates += 1;
            return Decision::Ignored;
        }
        self.fail(reason, now)
    }

    /// The operator asks for `action`. `Kill` is handled as a crash of the current domain;
    /// `Restart` and `Update` restart at once with a fresh restart history, from any state
    /// but `Stopped` (also from `GaveUp`). For `Update` the VMM boots the new image.
    pub fn operator(
        &mut self,
        action: OperatorAction,
        now: Instant,
    ) -> Result<Decision, TransitionError> {
        if self.state == State::Stopped {
            return Err(self.illegal("operator"));
        }
        self.emit(
            now,
            EventKind::Operator {
                action: action.clone(),
            },
        );
        match action {
            OperatorAction::Kill if self.state.live_epoch().is_none() => {
                self.metrics.duplicates += 1;
                Ok(Decision::Ignored)
            }
            OperatorAction::Kill => Ok(self.fail(FailureReason::Operator(action), now)),
            OperatorAction::Restart | OperatorAction::Update { .. } => {
                Ok(self.operator_restart(action, now))
            }
        }
    }

    /// The VMM stops the domain in an orderly way (shutdown): no recovery; later failure
    /// reports are ignored. A later `boot_started` needs a newer epoch.
    pub fn stop(&mut self, now: Instant) {
        self.state = State::Stopped;
        self.recovery = None;
        self.emit(now, EventKind::Stopped);
    }

    /// The chaos runner injected a fault now: the next failure is timed from here.
    pub fn fault_injected(&mut self, now: Instant) {
        self.fault_injected = Some(now);
    }

    /// A [`FailureReason::BootTimeout`] when a booting domain is not ready within the boot
    /// timeout (exactly the timeout is still in time). Pass it to [`failure`](Self::failure).
    pub fn boot_overdue(&self, now: Instant) -> Option<FailureReason> {
        let (State::Booting { since, .. } | State::Restarting { since, .. }) = self.state else {
            return None;
        };
        let waited = now.saturating_duration_since(since);
        (waited > self.policy.detection.boot_timeout)
            .then_some(FailureReason::BootTimeout { waited })
    }

    /// When the VMM must call again: the end of the backoff delay (`boot_started`), or the
    /// boot timeout (`boot_overdue`).
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Failed { not_before, .. } => Some(not_before),
            State::Booting { since, .. } | State::Restarting { since, .. } => {
                since.checked_add(self.policy.detection.boot_timeout)
            }
            _ => None,
        }
    }

    /// What to do with a client request arriving now.
    pub fn admission(&self) -> Admission {
        match self.state {
            State::Running { .. } => Admission::Submit,
            State::GaveUp {
                action: GiveUpAction::FailRequests,
                ..
            } => Admission::Fail,
            _ => Admission::Queue,
        }
    }

    /// The policy gave up and requests fail: the device is broken.
    pub fn is_broken(&self) -> bool {
        self.admission() == Admission::Fail
    }

    /// The hook run due for the last restart decision or give-up, if the policy has a hook;
    /// hand it to [`HookRunner::spawn`](crate::hook::HookRunner::spawn).
    pub fn take_hook_call(&mut self) -> Option<HookCall> {
        self.hook_call.take()
    }

    /// A hook run for this domain ended: logged, and counted when it failed.
    pub fn hook_finished(&mut self, report: &HookReport, now: Instant) {
        if !report.status.is_success() {
            self.metrics.hook_failures += 1;
        }
        let kind = EventKind::HookRan {
            reason: report.reason,
            status: report.status.clone(),
            took: report.took,
        };
        self.emit(now, kind);
    }

    /// Takes the events queued since the last drain, with their times, oldest first.
    pub fn drain_events(&mut self) -> impl Iterator<Item = (Instant, EventKind)> + '_ {
        self.outbox.drain(..)
    }

    /// Moves the queued events into `log`, stamped with this domain's name.
    pub fn drain_into(&mut self, log: &mut EventLog) {
        for (at, kind) in self.outbox.drain(..) {
            log.record(&self.domain, at, kind);
        }
    }

    /// The state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Epoch of the latest boot.
    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }

    /// Domain name.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Counters and recovery times.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Policy restarts within the window ending now.
    pub fn restarts_in_window(&self, now: Instant) -> u32 {
        let n = self
            .window
            .iter()
            .filter(|&&t| self.in_window(t, now))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// A snapshot for `ddvm ctl status`.
    pub fn status(&self, now: Instant) -> Status {
        let next_restart_in = match self.state {
            State::Failed { not_before, .. } => Some(not_before.saturating_duration_since(now)),
            _ => None,
        };
        Status {
            domain: self.domain.clone(),
            state: self.state.name(),
            epoch: self.epoch,
            broken: self.is_broken(),
            restarts: self.metrics.restarts,
            operator_restarts: self.metrics.operator_restarts,
            restarts_in_window: self.restarts_in_window(now),
            consecutive_failures: self.consecutive,
            next_restart_in,
            last_failure: self.last_failure.as_ref().map(|(reason, at)| LastFailure {
                reason: reason.report(),
                ago: now.saturating_duration_since(*at),
            }),
            detections: self.metrics.detections.clone(),
            duplicates: self.metrics.duplicates,
            give_ups: self.metrics.give_ups,
            replayed_requests: self.metrics.replayed_requests,
            hook_failures: self.metrics.hook_failures,
        }
    }

    /// A new failure of the live domain: count it, then restart or give up.
    fn fail(&mut self, reason: FailureReason, now: Instant) -> Decision {
        self.count_detection(&reason);
        let healthy_after = self.policy.restart.healthy_after;
        if matches!(self.state, State::Running { since, .. }
            if now.saturating_duration_since(since) >= healthy_after)
        {
            self.consecutive = 0;
        }
        self.consecutive = self.consecutive.saturating_add(1);
        self.last_failure = Some((reason.clone(), now));
        let epoch = self.state.live_epoch();
        let failed = EventKind::Failed {
            epoch,
            reason: reason.clone(),
        };
        self.emit(now, failed);
        self.open_recovery(now);

        let window = self.policy.restart.window;
        self.window
            .retain(|&t| now.saturating_duration_since(t) < window);
        if self.window.len() >= self.policy.restart.max_restarts as usize {
            return self.give_up(reason, now);
        }
        self.window.push_back(now);
        self.metrics.restarts += 1;
        let attempt = self.consecutive;
        let delay = self.policy.restart.delay(attempt);
        self.schedule_restart(reason, attempt, delay, now)
    }

    /// The VMM's own bookkeeping of the device broke ([`FailureReason::VmmInvariant`]): give
    /// up now, from any state, with requests failing whatever the policy's give-up action
    /// (a held queue would wait on state nobody can trust). The event and the hook say why.
    /// Ignored once stopped or given up.
    pub fn abandon(&mut self, reason: FailureReason, now: Instant) -> Decision {
        if matches!(self.state, State::Stopped | State::GaveUp { .. }) {
            return Decision::Ignored;
        }
        self.count_detection(&reason);
        self.give_up_with(reason, GiveUpAction::FailRequests, now)
    }

    fn give_up(&mut self, reason: FailureReason, now: Instant) -> Decision {
        let action = self.policy.restart.give_up;
        self.give_up_with(reason, action, now)
    }

    fn give_up_with(
        &mut self,
        reason: FailureReason,
        action: GiveUpAction,
        now: Instant,
    ) -> Decision {
        self.metrics.give_ups += 1;
        self.recovery = None;
        self.hook_call = self.hook_call_for(&reason);
        let restarts_in_window = self.restarts_in_window(now);
        self.emit(
            now,
            EventKind::GaveUp {
                reason: reason.clone(),
                restarts_in_window,
                action,
            },
        );
        self.state = State::GaveUp { reason, action };
        Decision::GiveUp(action)
    }

    fn operator_restart(&mut self, action: OperatorAction, now: Instant) -> Decision {
        let reason = FailureReason::Operator(action);
        self.count_detection(&reason);
        self.metrics.operator_restarts += 1;
        self.consecutive = 0;
        self.window.clear();
        self.open_recovery(now);
        self.schedule_restart(reason, 0, Duration::ZERO, now)
    }

    fn schedule_restart(
        &mut self,
        reason: FailureReason,
        attempt: u32,
        delay: Duration,
        now: Instant,
    ) -> Decision {
        // A validated policy keeps delays within a day; never panic on the sum anyway.
        let at = now.checked_add(delay).unwrap_or(now);
        self.hook_call = self.hook_call_for(&reason);
        self.emit(now, EventKind::RestartScheduled { attempt, delay });
        self.state = State::Failed {
            reason,
            attempt,
            not_before: at,
        };
        Decision::Restart { at, delay, attempt }
    }

    /// Starts timing a recovery, or, for a failure during recovery, keeps the first detection
    /// (the clients' stall started there) and waits for the next ready.
    fn open_recovery(&mut self, now: Instant) {
        let fault_at = self.fault_injected.take();
        match &mut self.recovery {
            Some(r) => r.ready_at = None,
            None => {
                self.recovery = Some(Recovery {
                    detected: now,
                    fault_at,
                    ready_at: None,
                })
            }
        }
    }

    fn close_recovery(&mut self, now: Instant) -> Option<Duration> {
        let r = self.recovery.take()?;
        let ready_at = r.ready_at.unwrap_or(now);
        let detection_to_ready = ready_at.saturating_duration_since(r.detected);
        let recovery = now.saturating_duration_since(r.detected);
        let fault_to_detection = r.fault_at.map(|f| r.detected.saturating_duration_since(f));
        let times = &mut self.metrics.recovery;
        if let Some(d) = fault_to_detection {
            times.fault_to_detection.push(d);
        }
        times.detection_to_ready.push(detection_to_ready);
        times.recovery.push(recovery);
        self.emit(
            now,
            EventKind::Recovered {
                fault_to_detection,
                detection_to_ready,
                recovery,
            },
        );
        Some(recovery)
    }

    fn hook_call_for(&self, reason: &FailureReason) -> Option<HookCall> {
        let hook = self.policy.restart.hook.clone()?;
        Some(HookCall {
            hook,
            domain: self.domain.clone(),
            reason: reason.name(),
            restarts: self.metrics.restarts + self.metrics.operator_restarts,
        })
    }

    fn count_detection(&mut self, reason: &FailureReason) {
        *self.metrics.detections.entry(reason.name()).or_default() += 1;
    }

    fn in_window(&self, t: Instant, now: Instant) -> bool {
        now.saturating_duration_since(t) < self.policy.restart.window
    }

    fn emit(&mut self, at: Instant, kind: EventKind) {
        if self.outbox.len() >= Self::OUTBOX {
            self.outbox.pop_front();
            self.metrics.events_dropped += 1;
        }
        self.outbox.push_back((at, kind));
    }

    fn illegal(&self, call: &'static str) -> TransitionError {
        TransitionError::Illegal {
            call,
            state: self.state.name(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hook::{Hook, HookStatus};
    use crate::policy::PolicyConfig;
    use crate::reason::ProtocolViolation;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// Base 1 ms, cap 8 ms, healthy after 50 ms, `max` restarts per 1 s.
    fn supervisor(max: u32) -> Supervisor {
        let config = PolicyConfig {
            restart_delay_ms: 1,
            restart_delay_cap_ms: 8,
            max_restarts: max,
            window_ms: 1000,
            ..PolicyConfig::default()
        };
        Supervisor::new("dd0", config.to_policy().unwrap()).unwrap()
    }

    /// Boots epoch 1 at `t` and makes it ready.
    fn running(sup: &mut Supervisor, t: Instant) {
        sup.boot_started(1, t).unwrap();
        assert_eq!(sup.ready(1, t), Ok(Ready::Serve));
    }

    /// Restarts as decided: boot `epoch` at the decided time, ready, replay nothing.
    /// Returns the time it runs from.
    fn recover(sup: &mut Supervisor, decision: Decision, epoch: u64) -> Instant {
        let Decision::Restart { at, .. } = decision else {
            panic!("expected a restart, got {decision:?}");
        };
        sup.boot_started(epoch, at).unwrap();
        assert_eq!(sup.ready(epoch, at), Ok(Ready::Replay));
        sup.replay_done(0, at).unwrap();
        at
    }

    fn delay_of(d: Decision) -> Duration {
        match d {
            Decision::Restart { delay, .. } => delay,
            other => panic!("expected a restart, got {other:?}"),
        }
    }

    fn events(sup: &mut Supervisor) -> Vec<EventKind> {
        sup.drain_events().map(|(_, kind)| kind).collect()
    }

    #[test]
    fn crash_is_detected_restarted_replayed_and_timed() {
        let t0 = Instant::now();
        let mut sup = supervisor(10);
        running(&mut sup, t0);
        assert_eq!(sup.admission(), Admission::Submit);
        sup.fault_injected(t0 + ms(100));
        let d = sup.failure(1, FailureReason::Shutdown, t0 + ms(101));
        let at = t0 + ms(101);
        assert_eq!(
            d,
            Decision::Restart {
                at,
                delay: Duration::ZERO,
                attempt: 1
            }
        );
        assert_eq!(sup.admission(), Admission::Queue);
        assert_eq!(sup.next_deadline(), Some(at));
        sup.boot_started(2, at).unwrap();
        assert_eq!(sup.state().name(), "restarting");
        assert_eq!(sup.ready(2, at + ms(2)), Ok(Ready::Replay));
        assert_eq!(
            sup.completed(at + ms(3)),
            Some(ms(3)),
            "completion during replay"
        );
        sup.replay_done(5, at + ms(4)).unwrap();
        assert_eq!(sup.completed(at + ms(5)), None, "only the first completion");
        assert_eq!(
            sup.state(),
            &State::Running {
                epoch: 2,
                since: at + ms(4)
            }
        );

        let m = sup.metrics();
        assert_eq!((m.restarts, m.replayed_requests), (1, 5));
        assert_eq!(m.recovery.recovery.max(), Some(ms(3)));
        assert_eq!(m.recovery.detection_to_ready.max(), Some(ms(2)));
        assert_eq!(m.recovery.fault_to_detection.max(), Some(ms(1)));
        let names: Vec<String> = events(&mut sup)
            .iter()
            .map(|k| {
                serde_json::to_value(k).unwrap()["event"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            names,
            [
                "booting",
                "ready",
                "failed",
                "restart-scheduled",
                "booting",
                "ready",
                "recovered",
                "replayed"
            ]
        );
    }

    #[test]
    fn every_detection_source_is_counted_under_its_name() {
        let t0 = Instant::now();
        for (reason, name) in crate::reason::tests::examples() {
            let mut sup = supervisor(10);
            running(&mut sup, t0);
            let decision = match reason.clone() {
                FailureReason::Operator(action) => sup.operator(action, t0).unwrap(),
                reason => sup.failure(1, reason, t0),
            };
            assert!(matches!(decision, Decision::Restart { .. }), "{name}");
            assert_eq!(sup.metrics().detections.get(name), Some(&1), "{name}");
            assert_eq!(sup.metrics().detections.len(), 1, "{name}");
            let logged = events(&mut sup).into_iter().any(|k| match k {
                EventKind::Failed { reason: r, .. } => r == reason,
                EventKind::Operator { action } => FailureReason::Operator(action) == reason,
                _ => false,
            });
            assert!(logged, "{name} not in the events");
        }
    }

    #[test]
    fn crash_loop_backs_off_exponentially_up_to_the_cap() {
        let t0 = Instant::now();
        let mut sup = supervisor(100);
        running(&mut sup, t0);
        let mut now = t0;
        let mut delays = Vec::new();
        for epoch in 2..=7 {
            let d = sup.failure(epoch - 1, FailureReason::Halted, now);
            delays.push(delay_of(d).as_millis());
            now = recover(&mut sup, d, epoch);
        }
        assert_eq!(delays, [0, 1, 2, 4, 8, 8]);
        assert_eq!(sup.status(now).consecutive_failures, 6);
    }

    #[test]
    fn a_healthy_run_resets_the_backoff() {
        let t0 = Instant::now();
        let mut sup = supervisor(100);
        running(&mut sup, t0);
        let mut now = t0;
        for epoch in 2..=4 {
            let d = sup.failure(epoch - 1, FailureReason::Halted, now);
            now = recover(&mut sup, d, epoch);
        }
        // Just short of healthy: the backoff goes on.
        let d = sup.failure(4, FailureReason::Halted, now + ms(49));
        assert_eq!(delay_of(d), ms(4));
        now = recover(&mut sup, d, 5);
        // Healthy for exactly 50 ms: immediate restart, counting from one again.
        let d = sup.failure(5, FailureReason::Halted, now + ms(50));
        assert_eq!(
            d,
            Decision::Restart {
                at: now + ms(50),
                delay: Duration::ZERO,
                attempt: 1
            }
        );
    }

    #[test]
    fn too_many_restarts_in_the_window_gives_up() {
        let t0 = Instant::now();
        let mut sup = supervisor(3);
        running(&mut sup, t0);
        // Healthy runs of 100 ms: no backoff, but every restart counts in the 1 s window.
        let mut now = t0;
        for epoch in 2..=4 {
            now += ms(100);
            let d = sup.failure(epoch - 1, FailureReason::Halted, now);
            assert_eq!(delay_of(d), Duration::ZERO);
            recover(&mut sup, d, epoch);
        }
        assert_eq!(sup.restarts_in_window(now), 3);
        let d = sup.failure(4, FailureReason::Shutdown, now + ms(100));
        assert_eq!(d, Decision::GiveUp(GiveUpAction::FailRequests));
        assert_eq!(sup.state().name(), "gave-up");
        assert!(sup.is_broken());
        assert_eq!(sup.admission(), Admission::Fail);
        assert_eq!(sup.metrics().give_ups, 1);
        assert_eq!(sup.metrics().restarts, 3);
        let gave_up = events(&mut sup).into_iter().last().unwrap();
        assert_eq!(
            gave_up,
            EventKind::GaveUp {
                reason: FailureReason::Shutdown,
                restarts_in_window: 3,
                action: GiveUpAction::FailRequests,
            }
        );
    }

    #[test]
    fn the_window_slides() {
        let t0 = Instant::now();
        let mut sup = supervisor(2);
        running(&mut sup, t0);
        let d = sup.failure(1, FailureReason::Halted, t0 + ms(100));
        recover(&mut sup, d, 2);
        let d = sup.failure(2, FailureReason::Halted, t0 + ms(200));
        recover(&mut sup, d, 3);
        // The first restart left the window exactly 1 s after it.
        let d = sup.failure(3, FailureReason::Halted, t0 + ms(1100));
        assert!(matches!(d, Decision::Restart { .. }), "{d:?}");
        assert_eq!(sup.restarts_in_window(t0 + ms(1100)), 2);
    }

    #[test]
    fn giving_up_is_sticky_until_an_operator_restart() {
        let t0 = Instant::now();
        let mut sup = supervisor(1);
        running(&mut sup, t0);
        let d = sup.failure(1, FailureReason::Halted, t0);
        let now = recover(&mut sup, d, 2);
        assert!(matches!(
            sup.failure(2, FailureReason::Halted, now),
            Decision::GiveUp(_)
        ));
        for epoch in [1, 2, 3] {
            assert_eq!(
                sup.failure(epoch, FailureReason::Halted, now),
                Decision::Ignored
            );
        }
        assert_eq!(
            sup.operator(OperatorAction::Kill, now),
            Ok(Decision::Ignored)
        );
        assert_eq!(sup.boot_overdue(now + ms(10_000)), None);
        assert_eq!(sup.next_deadline(), None);
        assert_eq!(sup.metrics().give_ups, 1);
        assert!(sup.is_broken());

        let d = sup.operator(OperatorAction::Restart, now + ms(5)).unwrap();
        assert_eq!(
            d,
            Decision::Restart {
                at: now + ms(5),
                delay: Duration::ZERO,
                attempt: 0
            }
        );
        assert!(!sup.is_broken());
        assert_eq!(sup.admission(), Admission::Queue);
        let now = recover(&mut sup, d, 3);
        assert_eq!(sup.admission(), Admission::Submit);
        // A fresh history: one restart allowed again.
        let d = sup.failure(3, FailureReason::Halted, now);
        assert_eq!(delay_of(d), Duration::ZERO);
        assert_eq!(sup.metrics().operator_restarts, 1);
    }

    #[test]
    fn hold_keeps_requests_queued_after_giving_up() {
        let t0 = Instant::now();
        let config = PolicyConfig {
            max_restarts: 1,
            on_give_up: GiveUpAction::Hold,
            ..PolicyConfig::default()
        };
        let mut sup = Supervisor::new("dd0", config.to_policy().unwrap()).unwrap();
        running(&mut sup, t0);
        let d = sup.failure(1, FailureReason::Halted, t0);
        let now = recover(&mut sup, d, 2);
        assert_eq!(
            sup.failure(2, FailureReason::Halted, now),
            Decision::GiveUp(GiveUpAction::Hold)
        );
        assert_eq!(sup.admission(), Admission::Queue);
        assert!(!sup.is_broken());
    }

    #[test]
    fn a_broken_vmm_invariant_gives_up_at_once_failing_requests_whatever_the_policy() {
        let t0 = Instant::now();
        let config = PolicyConfig {
            max_restarts: 100,
            on_give_up: GiveUpAction::Hold,
            hook: Some(vec!["/bin/true".into()]),
            ..PolicyConfig::default()
        };
        let mut sup = Supervisor::new("dd0", config.to_policy().unwrap()).unwrap();
        let reason = FailureReason::VmmInvariant {
            what: "completion for tag 7 has no shadow entry".into(),
        };
        // Not started: nothing to give up.
        assert_eq!(sup.abandon(reason.clone(), t0), Decision::Ignored);
        running(&mut sup, t0);
        assert_eq!(
            sup.abandon(reason.clone(), t0),
            Decision::GiveUp(GiveUpAction::FailRequests)
        );
        assert!(sup.is_broken());
        assert_eq!(sup.admission(), Admission::Fail);
        assert_eq!(sup.take_hook_call().unwrap().reason, "vmm-invariant");
        assert!(sup.drain_events().any(|(_, kind)| matches!(
            &kind,
            EventKind::GaveUp { reason: r, .. } if *r == reason
        )));
        assert_eq!(sup.abandon(reason, t0), Decision::Ignored);
    }

    #[test]
    fn illegal_transitions_are_errors() {
        let t0 = Instant::now();
        let mut sup = supervisor(10);
        fn illegal<T>(call: &'static str, state: &'static str) -> Result<T, TransitionError> {
            Err(TransitionError::Illegal { call, state })
        }
        assert_eq!(sup.ready(1, t0), illegal("ready", "stopped"));
        assert_eq!(sup.replay_done(0, t0), illegal("replay_done", "stopped"));
        assert_eq!(
            sup.operator(OperatorAction::Restart, t0),
            illegal("operator", "stopped")
        );
        assert_eq!(sup.failure(1, FailureReason::Halted, t0), Decision::Ignored);
        sup.boot_started(5, t0).unwrap();
        assert_eq!(sup.boot_started(6, t0), illegal("boot_started", "booting"));
        assert_eq!(
            sup.ready(4, t0),
            Err(TransitionError::WrongEpoch {
                epoch: 4,
                current: 5
            })
        );
        sup.ready(5, t0).unwrap();
        assert_eq!(sup.ready(5, t0), illegal("ready", "running"));
        assert_eq!(sup.replay_done(0, t0), illegal("replay_done", "running"));
        let d = sup.failure(5, FailureReason::Halted, t0 + ms(10));
        let d2 = sup.failure(5, FailureReason::Halted, t0 + ms(10));
        assert_eq!(d2, Decision::Ignored);
        // Immediate first restart, then a backoff of 1 ms for the next.
        let now = recover(&mut sup, d, 6);
        let d = sup.failure(6, FailureReason::Halted, now);
        assert_eq!(
            sup.boot_started(7, now),
            Err(TransitionError::TooEarly { early: ms(1) })
        );
        assert_eq!(
            sup.boot_started(6, now + ms(1)),
            Err(TransitionError::EpochNotNewer { epoch: 6, last: 6 })
        );
        assert_eq!(sup.ready(7, now), illegal("ready", "failed"));
        recover(&mut sup, d, 7);
        assert_eq!(
            TransitionError::TooEarly { early: ms(1) }.to_string(),
            "restart 1ms before its backoff delay ends"
        );
    }

    #[test]
    fn a_second_detection_of_the_same_crash_is_counted_once() {
        let t0 = Instant::now();
        let mut sup = supervisor(10);
        running(&mut sup, t0);
        let panic = FailureReason::Panic {
            message: "oops".into(),
        };
        assert!(matches!(
            sup.failure(1, panic, t0),
            Decision::Restart { .. }
        ));
        // The heartbeat monitor notices too, and the vCPU thread reports the exit late.
        let stall = FailureReason::HeartbeatStall {
            last: 1,
            stalled_for: ms(200),
            period: ms(100),
        };
        assert_eq!(sup.failure(1, stall, t0 + ms(1)), Decision::Ignored);
        let d = sup.failure(1, FailureReason::Shutdown, t0 + ms(1));
        assert_eq!(d, Decision::Ignored);
        let m = sup.metrics();
        assert_eq!(m.detections.get("panic"), Some(&1));
        assert_eq!(m.detections.len(), 1);
        assert_eq!((m.restarts, m.duplicates), (1, 2));
        // After the restart, a report about the old epoch is stale.
        let d = Decision::Restart {
            at: t0,
            delay: Duration::ZERO,
            attempt: 1,
        };
        recover(&mut sup, d, 2);
        assert_eq!(
            sup.failure(1, FailureReason::Halted, t0 + ms(2)),
            Decision::Ignored
        );
        assert_eq!(sup.state().name(), "running");
        assert_eq!(sup.metrics().duplicates, 3);
    }

    #[test]
    fn a_failure_during_recovery_backs_off_and_keeps_the_first_detection() {
        let t0 = Instant::now();
        let mut sup = supervisor(10);
        running(&mut sup, t0);
        let d = sup.failure(1, FailureReason::Shutdown, t0 + ms(100));
        let Decision::Restart { at, .. } = d else {
            panic!()
        };
        // The fresh domain hangs while booting.
        sup.boot_started(2, at).unwrap();
        assert_eq!(
            sup.boot_overdue(at + ms(2000)),
            None,
            "exactly the boot timeout"
        );
        let overdue = sup.boot_overdue(at + ms(2001)).unwrap();
        assert_eq!(overdue, FailureReason::BootTimeout { waited: ms(2001) });
        assert_eq!(sup.next_deadline(), Some(at + ms(2000)));
        let d = sup.failure(2, overdue, at + ms(2001));
        assert_eq!(
            d,
            Decision::Restart {
                at: at + ms(2002),
                delay: ms(1),
                attempt: 2
            }
        );
        // The next one panics while replaying.
        sup.boot_started(3, at + ms(2002)).unwrap();
        sup.ready(3, at + ms(2004)).unwrap();
        let d = sup.failure(
            3,
            FailureReason::Panic {
                message: "replay".into(),
            },
            at + ms(2005),
        );
        assert_eq!(delay_of(d), ms(2));
        sup.boot_started(4, at + ms(2007)).unwrap();
        sup.ready(4, at + ms(2009)).unwrap();
        sup.replay_done(1, at + ms(2009)).unwrap();
        // One recovery, timed from the first detection.
        assert_eq!(sup.completed(at + ms(2010)), Some(ms(2010)));
        let times = &sup.metrics().recovery;
        assert_eq!(times.recovery.count(), 1);
        assert_eq!(times.detection_to_ready.max(), Some(ms(2009)));
        assert_eq!(sup.metrics().restarts, 3);
    }

    /// Boots that fail before ready, several in a row (a fresh domain that dies during its
    /// bring-up, one that never becomes ready): each is a failure of the epoch that was
    /// booting, so it backs off, counts in the window and calls the hook; the domain that
    /// finally comes up replays. A report for any other epoch (none is live) is ignored.
    #[test]
    fn failures_before_ready_back_off_count_and_end_in_a_replay() {
        let t0 = Instant::now();
        let config = PolicyConfig {
            restart_delay_ms: 1,
            restart_delay_cap_ms: 8,
            max_restarts: 5,
            window_ms: 1000,
            hook: Some(vec!["notify".into()]),
            ..PolicyConfig::default()
        };
        let mut sup = Supervisor::new("dd0", config.to_policy().unwrap()).unwrap();
        running(&mut sup, t0);
        let d = sup.failure(1, FailureReason::Shutdown, t0 + ms(100));
        assert!(sup.take_hook_call().is_some());
        let mut at = match d {
            Decision::Restart { at, .. } => at,
            other => panic!("{other:?}"),
        };
        let mut delays = Vec::new();
        for epoch in 2..=4 {
            sup.boot_started(epoch, at).unwrap();
            // Nothing is live but `epoch`: the report of a dead domain is not this failure.
            assert_eq!(
                sup.failure(epoch - 1, FailureReason::Halted, at),
                Decision::Ignored
            );
            let reason = FailureReason::Panic {
                message: "bring-up".into(),
            };
            let d = sup.failure(epoch, reason, at + ms(1));
            let call = sup
                .take_hook_call()
                .expect("the hook runs for every restart");
            assert_eq!(call.reason, "panic");
            delays.push(delay_of(d));
            at = match d {
                Decision::Restart { at, .. } => at,
                other => panic!("{other:?}"),
            };
        }
        assert_eq!(delays, [ms(1), ms(2), ms(4)], "backoff doubles");
        assert_eq!(sup.restarts_in_window(at), 4);
        assert_eq!(sup.metrics().duplicates, 3);
        sup.boot_started(5, at).unwrap();
        assert_eq!(sup.ready(5, at + ms(1)), Ok(Ready::Replay));
        sup.replay_done(3, at + ms(1)).unwrap();
        assert_eq!(sup.state().name(), "running");
        // One more failed boot after the next crash exhausts the window: give-up and hook.
        let d = sup.failure(5, FailureReason::Shutdown, at + ms(2));
        let Decision::Restart { at, .. } = d else {
            panic!("{d:?}")
        };
        sup.boot_started(6, at).unwrap();
        let d = sup.failure(6, FailureReason::BootTimeout { waited: ms(2) }, at + ms(3));
        assert!(matches!(d, Decision::GiveUp(_)), "{d:?}");
        assert_eq!(sup.take_hook_call().unwrap().reason, "boot-timeout");
        assert!(sup.is_broken());
    }

    #[test]
    fn operator_kill_is_a_crash_and_update_restarts_at_once() {
        let t0 = Instant::now();
        let mut sup = supervisor(10);
        running(&mut sup, t0);
        let d = sup.operator(OperatorAction::Kill, t0).unwrap();
        assert_eq!(delay_of(d), Duration::ZERO);
        assert_eq!(sup.metrics().restarts, 1);
        let now = recover(&mut sup, d, 2);
        let d = sup.operator(OperatorAction::Kill, now).unwrap();
        assert_eq!(
            delay_of(d),
            ms(1),
            "a kill in a crash loop backs off like a crash"
        );
        // An update during the backoff restarts now and clears the history.
        let update = OperatorAction::Update {
            image: "dd-v2.elf".into(),
        };
        let d = sup.operator(update, now).unwrap();
        assert_eq!(
            d,
            Decision::Restart {
                at: now,
                delay: Duration::ZERO,
                attempt: 0
            }
        );
        let status = sup.status(now);
        assert_eq!(
            (status.consecutive_failures, status.restarts_in_window),
            (0, 0)
        );
        assert_eq!(status.detections.get("operator-update"), Some(&1));
        assert_eq!(status.last_failure.unwrap().reason.name, "operator-kill");
        recover(&mut sup, d, 3);
    }

    #[test]
    fn stop_ends_supervision_without_recovery() {
        let t0 = Instant::now();
        let mut sup = supervisor(10);
        running(&mut sup, t0);
        sup.stop(t0);
        assert_eq!(sup.failure(1, FailureReason::Halted, t0), Decision::Ignored);
        assert_eq!(sup.metrics().restarts, 0);
        assert_eq!(
            sup.boot_started(1, t0),
            Err(TransitionError::EpochNotNewer { epoch: 1, last: 1 })
        );
        sup.boot_started(2, t0).unwrap();
        assert_eq!(sup.ready(2, t0), Ok(Ready::Serve));
    }

    #[test]
    fn hook_calls_carry_domain_reason_and_count() {
        let t0 = Instant::now();
        let config = PolicyConfig {
            hook: Some(vec!["notify".into(), "-q".into()]),
            max_restarts: 1,
            ..PolicyConfig::default()
        };
        let mut sup = Supervisor::new("nvme0", config.to_policy().unwrap()).unwrap();
        running(&mut sup, t0);
        assert_eq!(sup.take_hook_call(), None);
        let violation = ProtocolViolation::UnknownTag { tag: 3 };
        let d = sup.failure(1, violation.into(), t0);
        let call = sup.take_hook_call().unwrap();
        assert_eq!(sup.take_hook_call(), None);
        assert_eq!(
            call,
            HookCall {
                hook: Hook {
                    program: "notify".into(),
                    args: vec!["-q".into()],
                    timeout: ms(10_000),
                },
                domain: "nvme0".into(),
                reason: "protocol-unknown-tag",
                restarts: 1,
            }
        );
        let now = recover(&mut sup, d, 2);
        sup.failure(2, FailureReason::Halted, now);
        let call = sup.take_hook_call().unwrap();
        assert_eq!(
            (call.reason, call.restarts),
            ("halted", 1),
            "give-up runs the hook"
        );

        let report = HookReport {
            domain: "nvme0".into(),
            reason: "halted",
            restarts: 1,
            status: HookStatus::Exited { code: 2 },
            took: ms(3),
        };
        sup.hook_finished(&report, now);
        assert_eq!(sup.metrics().hook_failures, 1);
        let last = events(&mut sup).pop().unwrap();
        assert_eq!(
            last,
            EventKind::HookRan {
                reason: "halted",
                status: HookStatus::Exited { code: 2 },
                took: ms(3)
            }
        );
    }

    #[test]
    fn status_serializes_for_ctl() {
        let t0 = Instant::now();
        let mut sup = supervisor(10);
        running(&mut sup, t0);
        let d = sup.failure(1, FailureReason::Halted, t0);
        let now = recover(&mut sup, d, 2);
        sup.failure(
            2,
            FailureReason::Exception {
                vector: 6,
                rip: 0x1000,
                error_code: 0,
                cr2: 0,
            },
            now,
        );
        let json = serde_json::to_value(sup.status(now + ms(1))).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "domain": "dd0", "state": "failed", "epoch": 2, "broken": false,
                "restarts": 2, "operator_restarts": 0, "restarts_in_window": 2,
                "consecutive_failures": 2, "next_restart_in_us": 0,
                "last_failure": {
                    "name": "exception",
                    "message": "exception 6 (#UD invalid opcode) at rip=0x1000 error_code=0x0",
                    "detail": {"kind": "exception", "vector": 6, "rip": 4096, "error_code": 0, "cr2": 0},
                    "ago_us": 1000
                },
                "detections": {"exception": 1, "halted": 1},
                "duplicates": 0,
                "give_ups": 0,
                "replayed_requests": 0,
                "hook_failures": 0
            })
        );
    }

    #[test]
    fn events_go_to_the_log_and_the_outbox_is_bounded() {
        let t0 = Instant::now();
        let mut sup = supervisor(10);
        running(&mut sup, t0);
        let mut log = EventLog::new(t0, 16);
        sup.drain_into(&mut log);
        assert_eq!(log.len(), 2);
        assert!(log.since(0).all(|e| e.domain == "dd0"));
        for i in 0..(Supervisor::OUTBOX as u64 + 10) {
            sup.fault_injected(t0);
            sup.hook_finished(
                &HookReport {
                    domain: "dd0".into(),
                    reason: "halted",
                    restarts: i,
                    status: HookStatus::TimedOut,
                    took: ms(1),
                },
                t0,
            );
        }
        assert_eq!(sup.metrics().events_dropped, 10);
        assert_eq!(sup.drain_events().count(), Supervisor::OUTBOX);
        assert_eq!(sup.drain_events().count(), 0);
    }

    #[test]
    fn invalid_policy_is_refused() {
        let mut policy = Policy::default();
        policy.restart.max_restarts = 0;
        let e = Supervisor::new("dd0", policy).unwrap_err();
        assert_eq!(e.key, "max_restarts");
    }
}
