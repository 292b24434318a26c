//! The policy's hook command: run on every restart decision and give-up with the domain, the
//! reason name and the restart count, never through a shell, never blocking the caller.
//!
//! [`HookRunner::spawn`] starts the process and returns; [`HookRunner::poll`] (call it from the
//! event loop, at the latest by [`HookRunner::next_deadline`]) reaps finished hooks and kills those
//! past their timeout. Every outcome, including a failure to start, comes back as a
//! [`HookReport`]: a failing hook is reported, never fatal.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A hook command from the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hook {
    /// Program (looked up in `PATH` when it has no `/`).
    pub program: PathBuf,
    /// Arguments placed before the three ddvm appends.
    pub args: Vec<String>,
    /// A hook running longer is killed (SIGKILL to the process itself, not its children).
    pub timeout: Duration,
}

/// One run of a hook: `program args... DOMAIN REASON RESTARTS`, with the same three values in
/// the environment as `DDVM_DOMAIN`, `DDVM_REASON`, `DDVM_RESTARTS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookCall {
    /// The command.
    pub hook: Hook,
    /// Domain name.
    pub domain: String,
    /// [`FailureReason::name`](crate::reason::FailureReason::name).
    pub reason: &'static str,
    /// Restarts of the domain so far, this one included.
    pub restarts: u64,
}

/// How a hook run ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum HookStatus {
    /// It exited with this code (0: success).
    Exited {
        /// Exit code.
        code: i32,
    },
    /// A signal ended it (not our timeout kill).
    Signaled {
        /// Signal number.
        signal: i32,
    },
    /// It ran past its timeout and was killed.
    TimedOut,
    /// It could not be started.
    SpawnFailed {
        /// The OS error.
        error: String,
    },
    /// Not started: too many hooks were still running.
    Skipped {
        /// Hooks running at the time.
        running: usize,
    },
}

impl HookStatus {
    /// Whether the hook ran and exited 0.
    pub fn is_success(&self) -> bool {
        *self == HookStatus::Exited { code: 0 }
    }

    /// The status of a process that ended with `status`.
    pub fn from_exit(status: ExitStatus) -> HookStatus {
        match (status.code(), status.signal()) {
            (Some(code), _) => HookStatus::Exited { code },
            (None, Some(signal)) => HookStatus::Signaled { signal },
            (None, None) => HookStatus::Exited { code: -1 },
        }
    }
}

/// The outcome of one hook run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookReport {
    /// Domain it ran for.
    pub domain: String,
    /// Reason name it was given.
    pub reason: &'static str,
    /// Restart count it was given.
    pub restarts: u64,
    /// How it ended.
    pub status: HookStatus,
    /// From spawn to the poll that saw it end (zero when it never started).
    pub took: Duration,
}

/// A hook run: a child of this process, or a request to the launcher.
enum Job {
    Child { child: Child, killed: bool },
    Launched { id: u64 },
}

struct Running {
    job: Job,
    call: HookCall,
    started: Instant,
}

/// Something that runs hooks on this process's behalf: for a process whose threads may not
/// start programs (ddvm's hook launcher, a helper process started before its seccomp filters).
pub trait Launch: Send + Sync + std::fmt::Debug {
    /// Asks for a run of `hook` with the three values; returns an id for [`Launch::take`], or
    /// why it was not asked for.
    fn run(&self, hook: &Hook, domain: &str, reason: &str, restarts: u64) -> Result<u64, String>;
    /// How run `id` ended, once it has (the launcher enforces the hook's timeout).
    fn take(&self, id: u64) -> Option<HookStatus>;
}

static LAUNCHER: std::sync::OnceLock<Box<dyn Launch>> = std::sync::OnceLock::new();

/// Runs every later hook through `launcher` instead of starting it from this process. Only the
/// first call counts.
pub fn use_launcher(launcher: Box<dyn Launch>) {
    let _ = LAUNCHER.set(launcher);
}

/// Runs hooks in the background, at most `max_running` at a time.
#[derive(Debug)]
pub struct HookRunner {
    running: Vec<Running>,
    done: Vec<HookReport>,
    max_running: usize,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Running");
        match &self.job {
            Job::Child { child, killed } => d.field("pid", &child.id()).field("killed", killed),
            Job::Launched { id } => d.field("launched", id),
        };
        d.field("domain", &self.call.domain).finish()
    }
}

impl Default for HookRunner {
    fn default() -> Self {
        Self::new(Self::DEFAULT_MAX_RUNNING)
    }
}

impl HookRunner {
    /// Hooks allowed to run at once by default; more are skipped (and reported).
    pub const DEFAULT_MAX_RUNNING: usize = 4;

    /// A runner allowing `max_running` hooks at once.
    pub fn new(max_running: usize) -> Self {
        HookRunner {
            running: Vec::new(),
            done: Vec::new(),
            max_running,
        }
    }

    /// Starts `call` and returns at once; its report comes from a later [`poll`](Self::poll).
    pub fn spawn(&mut self, call: HookCall, now: Instant) {
        if self.running.len() >= self.max_running {
            let status = HookStatus::Skipped {
                running: self.running.len(),
            };
            self.done.push(report(&call, status, Duration::ZERO));
            return;
        }
        if let Some(launcher) = LAUNCHER.get() {
            match launcher.run(&call.hook, &call.domain, call.reason, call.restarts) {
                Ok(id) => self.running.push(Running {
                    job: Job::Launched { id },
                    call,
                    started: now,
                }),
                Err(error) => {
                    let status = HookStatus::SpawnFailed { error };
                    self.done.push(report(&call, status, Duration::ZERO));
                }
            }
            return;
        }
        let spawned = Command::new(&call.hook.program)
            .args(&call.hook.args)
            .arg(&call.domain)
            .arg(call.reason)
            .arg(call.restarts.to_string())
            .env("DDVM_DOMAIN", &call.domain)
            .env("DDVM_REASON", call.reason)
            .env("DDVM_RESTARTS", call.restarts.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match spawned {
            Ok(child) => self.running.push(Running {
                job: Job::Child {
                    child,
                    killed: false,
                },
                call,
                started: now,
            }),
            Err(e) => {
                let status = HookStatus::SpawnFailed {
                    error: e.to_string(),
                };
                self.done.push(report(&call, status, Duration::ZERO));
            }
        }
    }

    /// Reaps finished hooks, kills those past their timeout, and returns every outcome
    /// since the last poll. Never blocks.
    pub fn poll(&mut self, now: Instant) -> Vec<HookReport> {
        let mut i = 0;
        while i < self.running.len() {
            match self.check(i, now) {
                Some(status) => {
                    let r = self.running.swap_remove(i);
                    let took = now.saturating_duration_since(r.started);
                    self.done.push(report(&r.call, status, took));
                }
                None => i += 1,
            }
        }
        std::mem::take(&mut self.done)
    }

    /// The outcome of running hook `i` if it is over, killing it first if it ran too long.
    fn check(&mut self, i: usize, now: Instant) -> Option<HookStatus> {
        let r = &mut self.running[i];
        let overdue = now.saturating_duration_since(r.started) > r.call.hook.timeout;
        let (child, killed) = match &mut r.job {
            Job::Child { child, killed } => (child, killed),
            // The launcher enforces the timeout and reports the end.
            Job::Launched { id } => return LAUNCHER.get().and_then(|l| l.take(*id)),
        };
        if overdue && !*killed {
            // An error here means it already exited; try_wait tells.
            let _ = child.kill();
            *killed = true;
        }
        match child.try_wait() {
            Ok(Some(_)) if *killed => Some(HookStatus::TimedOut),
            Ok(Some(status)) => Some(HookStatus::from_exit(status)),
            Ok(None) => None,
            // Not ours to wait for any more (should not happen): report and forget it.
            Err(e) => Some(HookStatus::SpawnFailed {
                error: format!("waiting for the hook failed: {e}"),
            }),
        }
    }

    /// Hooks still running.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// When the next poll is due: the earliest timeout of a running hook, or now when reports
    /// are waiting. `None` when nothing is pending.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        if !self.done.is_empty() {
            return Some(now);
        }
        self.running
            .iter()
            .map(|r| {
                r.started
                    .checked_add(r.call.hook.timeout)
                    .unwrap_or(r.started)
            })
            .min()
    }
}

impl Drop for HookRunner {
    /// Kills hooks still running; reaps those already gone without waiting for the rest.
    fn drop(&mut self) {
        for r in &mut self.running {
            // Launched hooks are the launcher's to end.
            if let Job::Child { child, .. } = &mut r.job {
                let _ = child.kill();
                let _ = child.try_wait();
            }
        }
    }
}

fn report(call: &HookCall, status: HookStatus, took: Duration) -> HookReport {
    HookReport {
        domain: call.domain.clone(),
        reason: call.reason,
        restarts: call.restarts,
        status,
        took,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(program: &str, args: &[&str], timeout: Duration) -> HookCall {
        HookCall {
            hook: Hook {
                program: program.into(),
                args: args.iter().map(|s| s.to_string()).collect(),
                timeout,
            },
            domain: "nvme0".into(),
            reason: "panic",
            restarts: 3,
        }
    }

    /// Polls with the real clock until every hook has reported (at most ten seconds).
    fn wait_all(runner: &mut HookRunner) -> Vec<HookReport> {
        let mut reports = Vec::new();
        for _ in 0..2000 {
            reports.extend(runner.poll(Instant::now()));
            if runner.running() == 0 {
                return reports;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("hooks still running: {runner:?}");
    }

    #[test]
    fn hook_receives_domain_reason_and_count_as_arguments_and_env() {
        let dir = std::env::temp_dir().join(format!("ddvm-hook-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("args");
        let script = format!(
            r#"echo "$0 $@|$DDVM_DOMAIN $DDVM_REASON $DDVM_RESTARTS" > '{}'"#,
            out.display()
        );
        let mut runner = HookRunner::default();
        runner.spawn(
            call(
                "/bin/sh",
                &["-c", &script, "hook", "--first"],
                Duration::from_secs(10),
            ),
            Instant::now(),
        );
        let reports = wait_all(&mut runner);
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].status, HookStatus::Exited { code: 0 });
        assert!(reports[0].status.is_success());
        let written = std::fs::read_to_string(&out).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(written.trim(), "hook --first nvme0 panic 3|nvme0 panic 3");
    }

    #[test]
    fn failing_hook_is_reported_with_its_code() {
        let mut runner = HookRunner::default();
        runner.spawn(call("false", &[], Duration::from_secs(10)), Instant::now());
        let reports = wait_all(&mut runner);
        assert_eq!(reports[0].status, HookStatus::Exited { code: 1 });
        assert_eq!(
            (reports[0].domain.as_str(), reports[0].reason),
            ("nvme0", "panic")
        );
    }

    #[test]
    fn missing_program_is_reported_not_fatal() {
        let mut runner = HookRunner::default();
        runner.spawn(
            call("/nonexistent/ddvm-hook", &[], Duration::from_secs(1)),
            Instant::now(),
        );
        assert_eq!(runner.running(), 0);
        let reports = runner.poll(Instant::now());
        assert!(matches!(reports[0].status, HookStatus::SpawnFailed { .. }));
        assert!(runner.poll(Instant::now()).is_empty());
    }

    #[test]
    fn hung_hook_is_killed_after_its_timeout() {
        let timeout = Duration::from_millis(200);
        let t0 = Instant::now();
        let mut runner = HookRunner::default();
        runner.spawn(call("/bin/sh", &["-c", "exec sleep 30"], timeout), t0);
        assert_eq!(runner.next_deadline(t0), Some(t0 + timeout));
        // Exactly at the timeout it is still allowed to run.
        assert!(runner.poll(t0 + timeout).is_empty());
        assert_eq!(runner.running(), 1);
        let mut reports = runner.poll(t0 + timeout + Duration::from_millis(1));
        if reports.is_empty() {
            reports = wait_all(&mut runner);
        }
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].status, HookStatus::TimedOut);
        assert_eq!(runner.running(), 0);
    }

    #[test]
    fn hooks_beyond_the_limit_are_skipped() {
        let t0 = Instant::now();
        let mut runner = HookRunner::new(1);
        let slow = call(
            "/bin/sh",
            &["-c", "exec sleep 30"],
            Duration::from_millis(1),
        );
        runner.spawn(slow.clone(), t0);
        runner.spawn(slow, t0);
        let reports = runner.poll(t0);
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].status, HookStatus::Skipped { running: 1 });
        // Dropping the runner kills the one still running.
    }

    #[test]
    fn status_serializes_with_a_tag() {
        let json = serde_json::to_value(HookStatus::Exited { code: 2 }).unwrap();
        assert_eq!(json, serde_json::json!({"status": "exited", "code": 2}));
    }
}
