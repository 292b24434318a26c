//! Per-domain recovery policy: how failures are detected (heartbeat period, request deadline,
//! boot timeout) and what a failure leads to (restart delay with binary exponential backoff,
//! maximum restarts per window, hook, give-up action).
//!
//! [`PolicyConfig`] is the TOML table (`[domain.recovery]`), durations in integer milliseconds
//! in `*_ms` keys; [`PolicyConfig::to_policy`] turns it into a checked [`Policy`]. Every key is
//! optional:
//!
//! ```toml
//! heartbeat_ms = 100           # heartbeat stall: counter still for longer than this
//! request_deadline_ms = 5000   # a request in flight for longer than this (raised where the
//!                              # disk's requests take longer: monitor::AdaptiveDeadline)
//! boot_timeout_ms = 2000       # a fresh domain not ready after this (doubled after each
//!                              # boot that was not, up to 16x, until one is)
//! restart_delay_ms = 10        # backoff base: the 2nd consecutive failure waits this, then x2
//! restart_delay_cap_ms = 1000  # backoff cap
//! healthy_after_ms = 50        # a domain running this long restarts without delay next time
//! max_restarts = 10            # restarts allowed in any window of window_ms; then give up
//! window_ms = 10000
//! hook = ["/usr/local/bin/notify", "--from-ddvm"]   # + DOMAIN REASON RESTARTS
//! hook_timeout_ms = 10000
//! on_give_up = "fail-requests" # or "hold"
//! standbys = 2                 # warm standby domains kept booted for the next restarts
//! ```
//!
//! Why these defaults: a domain boots to ready in about 2 ms, so recovery is dominated by the
//! restart delay. The first failure after a healthy run restarts at once (as MINIX's
//! reincarnation server does), and a run of 50 ms counts as healthy, so a fault every 100 ms
//! recovers with no delay at all. A crash loop (failing within 50 ms of every restart) waits
//! 0, 10, 20, 40 ... ms up to 1 s, and its 11th failure within 10 s (about 3 s into the loop)
//! gives up and pushes errors up. Chaos runs that inject a fault every 100 ms restart about 100
//! times per 10 s: they must raise `max_restarts` (e.g. to 1000).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::hook::Hook;

/// Default heartbeat period (ms). An idle domain still wakes every 10 ms.
pub const DEFAULT_HEARTBEAT_MS: u64 = 100;
/// Default request deadline (ms).
pub const DEFAULT_REQUEST_DEADLINE_MS: u64 = 5_000;
/// Default boot timeout (ms); boot to ready takes about 2 ms on an emulated device.
pub const DEFAULT_BOOT_TIMEOUT_MS: u64 = 2_000;
/// Default backoff base (ms).
pub const DEFAULT_RESTART_DELAY_MS: u64 = 10;
/// Default backoff cap (ms).
pub const DEFAULT_RESTART_DELAY_CAP_MS: u64 = 1_000;
/// Default run time after which a domain counts as healthy again (ms).
pub const DEFAULT_HEALTHY_AFTER_MS: u64 = 50;
/// Default restarts allowed per window.
pub const DEFAULT_MAX_RESTARTS: u32 = 10;
/// Default window (ms).
pub const DEFAULT_WINDOW_MS: u64 = 10_000;
/// Default number of warm standby domains.
pub const DEFAULT_STANDBYS: u32 = 2;
/// Most warm standby domains a disk may keep.
pub const MAX_STANDBYS: u32 = 8;
/// Default hook timeout (ms).
pub const DEFAULT_HOOK_TIMEOUT_MS: u64 = 10_000;
/// Upper bound of every duration in a policy (one day), so that deadlines never overflow.
pub const MAX_MS: u64 = 86_400_000;

/// A checked recovery policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Detection thresholds.
    pub detection: Detection,
    /// What failures lead to.
    pub restart: RestartPolicy,
}

/// Detection thresholds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detection {
    /// The heartbeat counter may stand still this long ([`crate::monitor::HeartbeatMonitor`]).
    pub heartbeat_period: Duration,
    /// A request may stay in flight this long, or longer where the disk's requests take
    /// longer ([`crate::monitor::AdaptiveDeadline`]).
    pub request_deadline: Duration,
    /// A fresh domain must be ready this long after its boot started.
    pub boot_timeout: Duration,
}

/// What failures lead to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Backoff base: the delay before the second consecutive restart.
    pub delay_base: Duration,
    /// Backoff cap.
    pub delay_cap: Duration,
    /// A domain that ran this long before failing counts as healthy: its restart is immediate.
    pub healthy_after: Duration,
    /// Restarts allowed in any window; one more failure gives up.
    pub max_restarts: u32,
    /// The sliding window of `max_restarts`.
    pub window: Duration,
    /// Command run on every restart decision and give-up.
    pub hook: Option<Hook>,
    /// What giving up does.
    pub give_up: GiveUpAction,
    /// Warm standbys to keep: fresh domains booted ahead, up to where they need the device, so
    /// a restart skips VM creation and guest boot. Two cover a failure during recovery (the
    /// second restart finds a standby that has finished booting). Each costs a domain's
    /// memory (most of it never touched: ~2 MiB resident) and a vCPU thread that sleeps; none
    /// touches the device before it is handed over. 0 boots every domain cold.
    pub standbys: u32,
}

/// What giving up on a domain does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GiveUpAction {
    /// Fail pending and new requests with VIRTIO_BLK_S_IOERR and mark the device broken:
    /// errors are pushed up to the clients, as MINIX does.
    #[default]
    FailRequests,
    /// Keep pending and new requests queued until an operator restart (clients stall).
    Hold,
}

/// The TOML shape of a policy (`[domain.recovery]`); every key optional.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// See [`Detection::heartbeat_period`].
    pub heartbeat_ms: u64,
    /// See [`Detection::request_deadline`].
    pub request_deadline_ms: u64,
    /// See [`Detection::boot_timeout`].
    pub boot_timeout_ms: u64,
    /// See [`RestartPolicy::delay_base`].
    pub restart_delay_ms: u64,
    /// See [`RestartPolicy::delay_cap`].
    pub restart_delay_cap_ms: u64,
    /// See [`RestartPolicy::healthy_after`].
    pub healthy_after_ms: u64,
    /// See [`RestartPolicy::max_restarts`].
    pub max_restarts: u32,
    /// See [`RestartPolicy::window`].
    pub window_ms: u64,
    /// Program and its first arguments.
    pub hook: Option<Vec<String>>,
    /// See [`Hook::timeout`].
    pub hook_timeout_ms: u64,
    /// See [`RestartPolicy::give_up`].
    pub on_give_up: GiveUpAction,
    /// See [`RestartPolicy::standbys`].
    pub standbys: u32,
}

/// A policy value out of range. `key` is the TOML key.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error("key `{key}`: {message}")]
pub struct PolicyError {
    /// The TOML key.
    pub key: &'static str,
    /// The value and what was expected.
    pub message: String,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            request_deadline_ms: DEFAULT_REQUEST_DEADLINE_MS,
            boot_timeout_ms: DEFAULT_BOOT_TIMEOUT_MS,
            restart_delay_ms: DEFAULT_RESTART_DELAY_MS,
            restart_delay_cap_ms: DEFAULT_RESTART_DELAY_CAP_MS,
            healthy_after_ms: DEFAULT_HEALTHY_AFTER_MS,
            max_restarts: DEFAULT_MAX_RESTARTS,
            window_ms: DEFAULT_WINDOW_MS,
            hook: None,
            hook_timeout_ms: DEFAULT_HOOK_TIMEOUT_MS,
            on_give_up: GiveUpAction::FailRequests,
            standbys: DEFAULT_STANDBYS,
        }
    }
}

impl PolicyConfig {
    /// The checked policy; the error names the key at fault.
    pub fn to_policy(&self) -> Result<Policy, PolicyError> {
        let ms = Duration::from_millis;
        let hook = match self.hook.as_deref() {
            None => None,
            Some([program, args @ ..]) => Some(Hook {
                program: PathBuf::from(program),
                args: args.to_vec(),
                timeout: ms(self.hook_timeout_ms),
            }),
            Some([]) => return Err(invalid("hook", "[]: expected [program, args...]")),
        };
        let policy = Policy {
            detection: Detection {
                heartbeat_period: ms(self.heartbeat_ms),
                request_deadline: ms(self.request_deadline_ms),
                boot_timeout: ms(self.boot_timeout_ms),
            },
            restart: RestartPolicy {
                delay_base: ms(self.restart_delay_ms),
                delay_cap: ms(self.restart_delay_cap_ms),
                healthy_after: ms(self.healthy_after_ms),
                max_restarts: self.max_restarts,
                window: ms(self.window_ms),
                hook,
                give_up: self.on_give_up,
                standbys: self.standbys,
            },
        };
        policy.validate()?;
        Ok(policy)
    }
}

impl Default for Policy {
    fn default() -> Self {
        let ms = Duration::from_millis;
        Policy {
            detection: Detection {
                heartbeat_period: ms(DEFAULT_HEARTBEAT_MS),
                request_deadline: ms(DEFAULT_REQUEST_DEADLINE_MS),
                boot_timeout: ms(DEFAULT_BOOT_TIMEOUT_MS),
            },
            restart: RestartPolicy {
                delay_base: ms(DEFAULT_RESTART_DELAY_MS),
                delay_cap: ms(DEFAULT_RESTART_DELAY_CAP_MS),
                healthy_after: ms(DEFAULT_HEALTHY_AFTER_MS),
                max_restarts: DEFAULT_MAX_RESTARTS,
                window: ms(DEFAULT_WINDOW_MS),
                hook: None,
                give_up: GiveUpAction::FailRequests,
                standbys: DEFAULT_STANDBYS,
            },
        }
    }
}

impl Policy {
    /// Checks every value; the error names the TOML key of the first one out of range.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let (d, r) = (&self.detection, &self.restart);
        positive("heartbeat_ms", d.heartbeat_period)?;
        positive("request_deadline_ms", d.request_deadline)?;
        positive("boot_timeout_ms", d.boot_timeout)?;
        at_most_a_day("restart_delay_ms", r.delay_base)?;
        at_most_a_day("restart_delay_cap_ms", r.delay_cap)?;
        if r.delay_cap < r.delay_base {
            return Err(invalid(
                "restart_delay_cap_ms",
                format!(
                    "{}: expected at least restart_delay_ms ({})",
                    r.delay_cap.as_millis(),
                    r.delay_base.as_millis()
                ),
            ));
        }
        at_most_a_day("healthy_after_ms", r.healthy_after)?;
        if r.max_restarts == 0 {
            return Err(invalid("max_restarts", "0: expected at least 1"));
        }
        positive("window_ms", r.window)?;
        if r.standbys > MAX_STANDBYS {
            return Err(invalid(
                "standbys",
                format!("{}: expected at most {MAX_STANDBYS}", r.standbys),
            ));
        }
        if let Some(hook) = &r.hook {
            if hook.program.as_os_str().is_empty() {
                return Err(invalid(
                    "hook",
                    "empty program: expected [program, args...]",
                ));
            }
            positive("hook_timeout_ms", hook.timeout)?;
        }
        Ok(())
    }
}

impl RestartPolicy {
    /// The delay before restart number `attempt` of a run of consecutive failures (1-based):
    /// 0 for the first, then `min(cap, base * 2^(attempt - 2))`. Never overflows.
    pub fn delay(&self, attempt: u32) -> Duration {
        let Some(doublings) = attempt.checked_sub(2) else {
            return Duration::ZERO;
        };
        doubled(self.delay_base, doublings, self.delay_cap)
    }
}

/// `base` doubled `times` times, at most `cap` (the backoffs of restarts, deadlines and boot
/// timeouts). Never overflows.
pub fn doubled(base: Duration, times: u32, cap: Duration) -> Duration {
    1u32.checked_shl(times)
        .and_then(|factor| base.checked_mul(factor))
        .map_or(cap, |d| d.min(cap))
}

fn invalid(key: &'static str, message: impl Into<String>) -> PolicyError {
    PolicyError {
        key,
        message: message.into(),
    }
}

fn at_most_a_day(key: &'static str, d: Duration) -> Result<(), PolicyError> {
    if d > Duration::from_millis(MAX_MS) {
        return Err(invalid(
            key,
            format!("{}: expected at most {MAX_MS} (one day)", d.as_millis()),
        ));
    }
    Ok(())
}

fn positive(key: &'static str, d: Duration) -> Result<(), PolicyError> {
    if d.is_zero() {
        return Err(invalid(key, format!("0: expected 1 to {MAX_MS}")));
    }
    at_most_a_day(key, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policy, String> {
        let config: PolicyConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.to_policy().map_err(|e| e.to_string())
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn empty_table_gives_the_defaults() {
        assert_eq!(parse("").unwrap(), Policy::default());
        assert_eq!(
            PolicyConfig::default().to_policy().unwrap(),
            Policy::default()
        );
    }

    #[test]
    fn full_table_parses() {
        let p = parse(
            r#"
            heartbeat_ms = 20
            request_deadline_ms = 500
            boot_timeout_ms = 100
            restart_delay_ms = 1
            restart_delay_cap_ms = 8
            healthy_after_ms = 30
            max_restarts = 1000
            window_ms = 60000
            hook = ["/usr/bin/logger", "-t", "ddvm"]
            hook_timeout_ms = 3000
            on_give_up = "hold"
            "#,
        )
        .unwrap();
        assert_eq!(p.detection.heartbeat_period, ms(20));
        assert_eq!(p.detection.request_deadline, ms(500));
        assert_eq!(p.detection.boot_timeout, ms(100));
        let r = &p.restart;
        assert_eq!(
            (r.delay_base, r.delay_cap, r.healthy_after),
            (ms(1), ms(8), ms(30))
        );
        assert_eq!((r.max_restarts, r.window), (1000, ms(60_000)));
        let hook = r.hook.as_ref().unwrap();
        assert_eq!(hook.program, PathBuf::from("/usr/bin/logger"));
        assert_eq!(hook.args, ["-t", "ddvm"]);
        assert_eq!(hook.timeout, ms(3000));
        assert_eq!(r.give_up, GiveUpAction::Hold);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = parse("restart_delay = 5").unwrap_err();
        assert!(e.contains("unknown field `restart_delay`"), "{e}");
        let e = parse("on_give_up = \"explode\"").unwrap_err();
        assert!(
            e.contains("on_give_up") && e.contains("fail-requests"),
            "{e}"
        );
        let e = parse("max_restarts = -1").unwrap_err();
        assert!(e.contains("max_restarts"), "{e}");
    }

    #[test]
    fn out_of_range_values_name_the_key_and_expectation() {
        let cases = [
            (
                "restart_delay_ms = 100\nrestart_delay_cap_ms = 50",
                "key `restart_delay_cap_ms`: 50: expected at least restart_delay_ms (100)",
            ),
            (
                "window_ms = 0",
                "key `window_ms`: 0: expected 1 to 86400000",
            ),
            (
                "max_restarts = 0",
                "key `max_restarts`: 0: expected at least 1",
            ),
            (
                "heartbeat_ms = 0",
                "key `heartbeat_ms`: 0: expected 1 to 86400000",
            ),
            (
                "restart_delay_cap_ms = 86400001",
                "key `restart_delay_cap_ms`: 86400001: expected at most 86400000 (one day)",
            ),
            ("standbys = 9", "key `standbys`: 9: expected at most 8"),
            ("hook = []", "key `hook`: []: expected [program, args...]"),
            (
                "hook = [\"\"]",
                "key `hook`: empty program: expected [program, args...]",
            ),
            (
                "hook = [\"true\"]\nhook_timeout_ms = 0",
                "key `hook_timeout_ms`: 0: expected 1 to 86400000",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(parse(text).unwrap_err(), expected, "{text}");
        }
    }

    #[test]
    fn backoff_doubles_from_the_second_attempt_up_to_the_cap() {
        let r = RestartPolicy {
            delay_base: ms(1),
            delay_cap: ms(8),
            ..Policy::default().restart
        };
        let delays: Vec<u64> = (1..=7).map(|n| r.delay(n).as_millis() as u64).collect();
        assert_eq!(delays, [0, 1, 2, 4, 8, 8, 8]);
        assert_eq!(r.delay(0), Duration::ZERO);
        assert_eq!(r.delay(40), ms(8));
        assert_eq!(r.delay(u32::MAX), ms(8));
    }

    #[test]
    fn backoff_never_overflows() {
        let r = RestartPolicy {
            delay_base: ms(MAX_MS),
            delay_cap: ms(MAX_MS),
            ..Policy::default().restart
        };
        assert_eq!(r.delay(33), ms(MAX_MS));
        assert_eq!(r.delay(u32::MAX), ms(MAX_MS));
    }

    #[test]
    fn default_schedule_is_documented() {
        let r = Policy::default().restart;
        let delays: Vec<u64> = (1..=11).map(|n| r.delay(n).as_millis() as u64).collect();
        assert_eq!(delays, [0, 10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
    }
}
