//! The hook launcher: the one process of ddvm's that may start programs.
//!
//! The VMM's threads run under seccomp filters that forbid `execve` and new processes, so the
//! restart hooks run from a helper process started before any filter: the launcher. It is told
//! the configured hooks once, at its start, and afterwards runs only those, by index, with the
//! domain, reason and restart count it is sent (checked: a name of at most 64 letters, digits,
//! `-`, `_` or `.`; a reason of at most 64 lowercase letters, digits or `-`). A VMM that were
//! taken over could thus make it run a configured hook with odd arguments, but never another
//! program. It enforces each hook's timeout itself, reports every outcome back, and when the
//! VMM goes away (its end of the socket closes) it waits for the hooks still running, killing
//! those past their timeout, and exits.
//!
//! The protocol is one JSON message per `SOCK_SEQPACKET` packet: first a [`Setup`], then
//! [`Request::Run`]s from the VMM, [`Reply::Done`]s back.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use ddvm_recovery::hook::{Hook, HookStatus, Launch};

/// Largest message either side sends or accepts.
const MAX_MESSAGE: usize = 64 * 1024;
/// Hooks the launcher runs at once at most; more are reported skipped.
const MAX_RUNNING: usize = 16;

/// The hooks the launcher may run, sent once at its start.
#[derive(Debug, Serialize, Deserialize)]
pub struct Setup {
    /// Program, arguments and timeout of each hook, in the order requests name them.
    pub hooks: Vec<HookSpec>,
}

/// One configured hook.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HookSpec {
    /// Program.
    pub program: String,
    /// Arguments before ddvm's three.
    pub args: Vec<String>,
    /// Timeout (ms).
    pub timeout_ms: u64,
}

impl HookSpec {
    fn of(h: &Hook) -> Result<HookSpec, String> {
        Ok(HookSpec {
            program: h
                .program
                .to_str()
                .ok_or_else(|| format!("hook {}: not UTF-8", h.program.display()))?
                .to_string(),
            args: h.args.clone(),
            timeout_ms: u64::try_from(h.timeout.as_millis()).unwrap_or(u64::MAX),
        })
    }
}

/// From the VMM to the launcher.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
pub enum Request {
    /// Run hook number `hook` with these three values.
    Run {
        /// Request id, echoed in the reply.
        id: u64,
        /// Index into [`Setup::hooks`].
        hook: usize,
        /// Domain name.
        domain: String,
        /// Reason name.
        reason: String,
        /// Restart count.
        restarts: u64,
    },
}

/// From the launcher to the VMM.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    /// How the run of request `id` ended.
    Done {
        /// The request's id.
        id: u64,
        /// Its outcome.
        status: HookStatus,
    },
}

fn seqpacket_pair() -> std::io::Result<(UnixStream, UnixStream)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair writes two new descriptors into the array we own.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and ours alone; each is owned once. A seqpacket socket
    // reads and writes whole packets through the stream API.
    unsafe {
        Ok((
            UnixStream::from(OwnedFd::from_raw_fd(fds[0])),
            UnixStream::from(OwnedFd::from_raw_fd(fds[1])),
        ))
    }
}

/// The VMM's handle on its launcher.
#[derive(Debug)]
pub struct Launcher {
    inner: Mutex<Inner>,
    hooks: Vec<Hook>,
}

#[derive(Debug)]
struct Inner {
    socket: UnixStream,
    child: Option<Child>,
    next_id: u64,
    done: HashMap<u64, HookStatus>,
    gone: Option<String>,
}

impl Launcher {
    /// Starts `command` (which must call [`serve`] on its standard input) as the launcher of
    /// `hooks`.
    pub fn start(mut command: Command, hooks: Vec<Hook>) -> std::io::Result<Launcher> {
        let (ours, theirs) = seqpacket_pair()?;
        let child = command
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .spawn()?;
        Launcher::over(ours, Some(child), hooks)
    }

    /// The VMM's end of a launcher's socket: sends it the hooks (the [`Setup`]).
    fn over(
        mut socket: UnixStream,
        child: Option<Child>,
        hooks: Vec<Hook>,
    ) -> std::io::Result<Launcher> {
        let setup = Setup {
            hooks: hooks
                .iter()
                .map(HookSpec::of)
                .collect::<Result<_, _>>()
                .map_err(std::io::Error::other)?,
        };
        socket.write_all(&serde_json::to_vec(&setup).map_err(std::io::Error::other)?)?;
        socket.set_nonblocking(true)?;
        Ok(Launcher {
            inner: Mutex::new(Inner {
                socket,
                child,
                next_id: 0,
                done: HashMap::new(),
                gone: None,
            }),
            hooks,
        })
    }

    /// A launcher served by a thread of this process (for tests).
    pub fn in_thread(hooks: Vec<Hook>) -> std::io::Result<(Launcher, std::thread::JoinHandle<()>)> {
        let (ours, theirs) = seqpacket_pair()?;
        let launcher = Launcher::over(ours, None, hooks)?;
        let thread = std::thread::spawn(move || {
            let _ = serve(theirs);
        });
        Ok((launcher, thread))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Launch for Launcher {
    /// Asks for a run of `hook`; returns the request id, or why it was not sent.
    fn run(&self, hook: &Hook, domain: &str, reason: &str, restarts: u64) -> Result<u64, String> {
        let index = self
            .hooks
            .iter()
            .position(|h| h == hook)
            .ok_or_else(|| "the hook was not given to the launcher at its start".to_string())?;
        let mut inner = self.lock();
        if let Some(why) = &inner.gone {
            return Err(why.clone());
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let request = Request::Run {
            id,
            hook: index,
            domain: domain.to_string(),
            reason: reason.to_string(),
            restarts,
        };
        let bytes = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
        match inner.socket.write(&bytes) {
            Ok(n) if n == bytes.len() => Ok(id),
            Ok(_) => Err("the hook launcher took part of a request".into()),
            Err(e) => {
                let why = format!("the hook launcher is gone: {e}");
                inner.gone = Some(why.clone());
                Err(why)
            }
        }
    }

    /// The outcome of request `id`, if it came back.
    fn take(&self, id: u64) -> Option<HookStatus> {
        let mut inner = self.lock();
        inner.drain();
        if let Some(status) = inner.done.remove(&id) {
            return Some(status);
        }
        inner
            .gone
            .as_ref()
            .map(|why| HookStatus::SpawnFailed { error: why.clone() })
    }
}

impl Inner {
    /// Reads every reply waiting.
    fn drain(&mut self) {
        let mut buf = vec![0u8; MAX_MESSAGE];
        while self.gone.is_none() {
            match self.socket.read(&mut buf) {
                Ok(0) => self.gone = Some("the hook launcher is gone".into()),
                Ok(n) => match serde_json::from_slice::<Reply>(&buf[..n]) {
                    Ok(Reply::Done { id, status }) => {
                        self.done.insert(id, status);
                    }
                    Err(e) => {
                        tracing::warn!("the hook launcher sent a bad reply: {e}");
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => self.gone = Some(format!("the hook launcher is gone: {e}")),
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing our end tells the launcher to finish; it reaps its hooks and exits.
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

/// Whether `s` is a domain name the launcher passes on.
fn valid_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Whether `s` is a reason name the launcher passes on.
fn valid_reason(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

struct Running {
    id: u64,
    child: Child,
    pidfd: Option<OwnedFd>,
    deadline: Instant,
    killed: bool,
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the descriptor is new and ours alone.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The launcher's loop on `socket`: reads the [`Setup`], then runs requested hooks until the
/// VMM closes its end and every hook has ended.
pub fn serve(mut socket: UnixStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let n = socket.read(&mut buf)?;
    let setup: Setup = serde_json::from_slice(&buf[..n])
        .map_err(|e| std::io::Error::other(format!("the launcher's setup: {e}")))?;
    let mut running: Vec<Running> = Vec::new();
    let mut open = true;
    while open || !running.is_empty() {
        let now = Instant::now();
        let timeout = running
            .iter()
            .filter(|r| !r.killed)
            .map(|r| r.deadline.saturating_duration_since(now))
            .min();
        let mut fds: Vec<libc::pollfd> = Vec::new();
        if open {
            fds.push(libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        for r in &running {
            if let Some(p) = &r.pidfd {
                fds.push(libc::pollfd {
                    fd: p.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
        }
        // Without pidfds (an old kernel) a child's end is noticed every 50 ms.
        let no_pidfd = running.iter().any(|r| r.pidfd.is_none());
        let ms = match timeout {
            Some(t) if no_pidfd => t.min(Duration::from_millis(50)).as_millis() as i32,
            Some(t) => t.as_millis().min(i32::MAX as u128) as i32 + 1,
            None if no_pidfd => 50,
            None => -1,
        };
        // SAFETY: `fds` is a valid array of pollfd for its length.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        if open && fds[0].revents != 0 {
            match socket.read(&mut buf) {
                Ok(0) => open = false,
                Ok(n) => {
                    let reply = start(&setup, &buf[..n], &mut running);
                    if let Some(reply) = reply {
                        send(&mut socket, &reply, &mut open);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => open = false,
            }
        }
        let now = Instant::now();
        let mut i = 0;
        while i < running.len() {
            let r = &mut running[i];
            if !r.killed && now >= r.deadline {
                let _ = r.child.kill();
                r.killed = true;
            }
            let status = match r.child.try_wait() {
                Ok(Some(_)) if r.killed => Some(HookStatus::TimedOut),
                Ok(Some(s)) => Some(HookStatus::from_exit(s)),
                Ok(None) => None,
                Err(e) => Some(HookStatus::SpawnFailed {
                    error: format!("waiting for the hook failed: {e}"),
                }),
            };
            match status {
                Some(status) => {
                    let r = running.swap_remove(i);
                    if open {
                        send(&mut socket, &Reply::Done { id: r.id, status }, &mut open);
                    }
                }
                None => i += 1,
            }
        }
    }
    Ok(())
}

fn send(socket: &mut UnixStream, reply: &Reply, open: &mut bool) {
    let Ok(bytes) = serde_json::to_vec(reply) else {
        return;
    };
    if socket.write_all(&bytes).is_err() {
        *open = false;
    }
}

/// Starts the hook a request names; returns the reply at once when it does not start.
fn start(setup: &Setup, message: &[u8], running: &mut Vec<Running>) -> Option<Reply> {
    let Request::Run {
        id,
        hook,
        domain,
        reason,
        restarts,
    } = match serde_json::from_slice::<Request>(message) {
        Ok(r) => r,
        // Not a request: nothing to answer to.
        Err(_) => return None,
    };
    let refuse = |error: String| {
        Some(Reply::Done {
            id,
            status: HookStatus::SpawnFailed { error },
        })
    };
    let Some(spec) = setup.hooks.get(hook) else {
        return refuse(format!("refused: no hook number {hook}"));
    };
    if !valid_domain(&domain) {
        return refuse(format!("refused: domain name {domain:?}"));
    }
    if !valid_reason(&reason) {
        return refuse(format!("refused: reason {reason:?}"));
    }
    if running.len() >= MAX_RUNNING {
        return Some(Reply::Done {
            id,
            status: HookStatus::Skipped {
                running: running.len(),
            },
        });
    }
    let spawned = Command::new(&spec.program)
        .args(&spec.args)
        .arg(&domain)
        .arg(&reason)
        .arg(restarts.to_string())
        .env("DDVM_DOMAIN", &domain)
        .env("DDVM_REASON", &reason)
        .env("DDVM_RESTARTS", restarts.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match spawned {
        Ok(child) => {
            let pidfd = pidfd_open(child.id());
            running.push(Running {
                id,
                child,
                pidfd,
                deadline: Instant::now() + Duration::from_millis(spec.timeout_ms),
                killed: false,
            });
            None
        }
        Err(e) => refuse(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddvm_recovery::hook::Launch;

    fn hook(program: &str, args: &[&str], timeout: Duration) -> Hook {
        Hook {
            program: program.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            timeout,
        }
    }

    fn wait(launcher: &Launcher, id: u64) -> HookStatus {
        for _ in 0..2000 {
            if let Some(s) = launcher.take(id) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("no reply for request {id}");
    }

    #[test]
    fn runs_configured_hooks_and_reports_their_end() {
        let ok = hook("/bin/sh", &["-c", "exit 0"], Duration::from_secs(10));
        let fails = hook("/bin/sh", &["-c", "exit 7"], Duration::from_secs(10));
        let (launcher, thread) = Launcher::in_thread(vec![ok.clone(), fails.clone()]).unwrap();
        let a = launcher.run(&ok, "nvme0", "panic", 1).unwrap();
        let b = launcher.run(&fails, "nvme0", "panic", 2).unwrap();
        assert_eq!(wait(&launcher, a), HookStatus::Exited { code: 0 });
        assert_eq!(wait(&launcher, b), HookStatus::Exited { code: 7 });
        drop(launcher);
        thread.join().unwrap();
    }

    #[test]
    fn a_hook_not_given_at_the_start_is_never_run() {
        let ok = hook("/bin/sh", &["-c", "exit 0"], Duration::from_secs(10));
        let (launcher, _thread) = Launcher::in_thread(vec![ok]).unwrap();
        let other = hook(
            "/bin/touch",
            &["/tmp/ddvm-should-not-exist"],
            Duration::from_secs(1),
        );
        assert!(launcher.run(&other, "nvme0", "panic", 1).is_err());
    }

    #[test]
    fn hostile_requests_are_refused() {
        let ok = hook("/bin/sh", &["-c", "exit 0"], Duration::from_secs(10));
        let setup = Setup {
            hooks: vec![HookSpec::of(&ok).unwrap()],
        };
        let mut running = Vec::new();
        let cases = [
            (5, "nvme0", "panic", "no hook number 5"),
            (0, "../../etc", "panic", "domain name"),
            (0, "nvme0", "panic; rm -rf /", "reason"),
            (0, "", "panic", "domain name"),
        ];
        for (hook, domain, reason, expect) in cases {
            let msg = serde_json::to_vec(&Request::Run {
                id: 9,
                hook,
                domain: domain.into(),
                reason: reason.into(),
                restarts: 1,
            })
            .unwrap();
            match start(&setup, &msg, &mut running) {
                Some(Reply::Done {
                    id: 9,
                    status: HookStatus::SpawnFailed { error },
                }) => assert!(error.contains(expect), "{error}"),
                other => panic!("{domain}/{reason}: {other:?}"),
            }
        }
        assert!(running.is_empty());
        assert!(start(&setup, b"garbage", &mut running).is_none());
    }

    #[test]
    fn the_launcher_kills_a_hook_past_its_timeout() {
        let slow = hook(
            "/bin/sh",
            &["-c", "exec sleep 30"],
            Duration::from_millis(100),
        );
        let (launcher, _thread) = Launcher::in_thread(vec![slow.clone()]).unwrap();
        let t0 = Instant::now();
        let id = launcher.run(&slow, "nic0", "hang", 1).unwrap();
        assert_eq!(wait(&launcher, id), HookStatus::TimedOut);
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
}
