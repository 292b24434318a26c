//! The control socket: one JSON request per line on a Unix socket, one JSON answer per line.
//!
//! # Protocol (version [`PROTOCOL_VERSION`])
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"metrics","format":"json"|"prometheus"}`,
//! `{"cmd":"events","since":N}`, `{"cmd":"events","since":N,"follow":true}`,
//! `{"cmd":"kill","domain":D}`, `{"cmd":"restart","domain":D}`,
//! `{"cmd":"update","domain":D,"image":PATH}`, `{"cmd":"stop"}` (ends `ddvm run` as SIGTERM
//! does), `{"cmd":"version"}`, `{"cmd":"inject","domain":D,"fault":KIND}` (a build with fault
//! injection only). Answers are `{"version":1,"ok":true,...}` or
//! `{"version":1,"ok":false,"error":"..."}`. Malformed requests get an error answer; nothing a
//! client sends stops the server.
//!
//! Versions: every answer carries `"version"`, the protocol version of the server. A request
//! may carry `"version"` too: the version it was written for; a server answers a request of a
//! version it does not speak with an error (naming the versions it speaks) and does nothing.
//! A request without one is taken as the server's version. Within a version, fields are only
//! ever added to answers, never removed or changed in meaning; a client ignores fields it
//! does not know.
//!
//! `metrics` answers `{"domains":[...],"devices":[...]}` ([`crate::metrics::Snapshot`]), or with
//! `"format":"prometheus"`, `{"format":"prometheus","text":"..."}`: the Prometheus text
//! exposition (names in [`crate::metrics`]).
//!
//! `events` with `"follow":true` keeps the connection: the answer line
//! `{"version":1,"ok":true,"follow":true}` comes first, then every event since `since` and
//! every new one as it happens, one JSON object per line (as in an `events` answer's list);
//! events the log dropped before they could be sent are one line
//! `{"event":"lost","domain":D,"count":N}`. The stream ends with a line carrying `"end"` (the
//! VMM is stopping, or the server closing), or, for a reader more than [`FOLLOW_BACKLOG`] lines
//! behind, `{"version":1,"ok":false,"error":"lagged: ..."}`, after which it is dropped. At most
//! [`MAX_FOLLOWERS`] streams at once, within the connection limit.
//!
//! Who may talk to it: the socket is made with mode 0600 (bound in a private directory, then
//! moved into place, so it is never reachable with a looser mode); a directory ddvm creates
//! for it is 0700, and an existing one that other users may write without the sticky bit is
//! refused (they could swap the socket). Every peer's credentials are checked with
//! SO_PEERCRED: only the VMM's own user and root are served; others get an error answer and
//! are logged.
//!
//! Robustness: the `control` thread runs an [`EventManager`] (epoll) with two subscribers: the
//! [`Acceptor`] (the listening socket: peer checks, the connection limit) and the
//! [`Streamer`] (the followed event streams, the engines' event eventfds, the VMM's stop and
//! the server's shutdown); it never sleeps on a timer. Each request connection is served on a
//! thread of its own, at most [`MAX_CONNECTIONS`] connections at once (more are answered
//! "busy" at once); a connection has [`REQUEST_DEADLINE`] to send its request line (at most
//! 64 KiB) and [`ANSWER_DEADLINE`] to take the answer, so one that stalls holds only its own
//! thread, and only that long. A followed stream is handed to the control thread, which writes
//! without blocking and drops a reader that falls behind.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use serde::Deserialize;
use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::loader::Image;
use crate::metrics::{DeviceIo, DomainFigures, IoSource, Latency, Snapshot};
use crate::reincarnation::{Command, RecoveryHandle};
use crate::stop::Stop;
use crate::sync::lock;
use crate::sys;

/// The protocol version this server speaks (and the only one).
pub const PROTOCOL_VERSION: u64 = 1;
/// Connections served at once, streams included; more are answered "busy" and closed.
pub const MAX_CONNECTIONS: usize = 8;
/// Followed event streams at once (within [`MAX_CONNECTIONS`], so that requests always have
/// room).
pub const MAX_FOLLOWERS: usize = 4;
/// Lines a followed stream may have unsent before its reader is told it lags and is dropped.
pub const FOLLOW_BACKLOG: usize = 1024;
/// Time a connection has, from its accept, to send its whole request line.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Time a connection has to take its whole answer.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(5);
/// Longest request line accepted.
const MAX_LINE: usize = 64 << 10;

#[derive(Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
enum Request {
    Status,
    Metrics {
        #[serde(default)]
        format: MetricsFormat,
    },
    Events {
        #[serde(default)]
        since: u64,
        #[serde(default)]
        follow: bool,
    },
    Kill {
        domain: String,
    },
    Restart {
        domain: String,
    },
    Update {
        domain: String,
        image: PathBuf,
    },
    // Parsed in every build, so that one without fault injection can say it has none.
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    Inject {
        domain: String,
        fault: String,
        #[serde(default)]
        arg: u32,
    },
    Stop,
    Version,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum MetricsFormat {
    #[default]
    Json,
    Prometheus,
}

/// What the server reads and acts on.
struct Context<'a> {
    handles: &'a [(String, RecoveryHandle)],
    devices: &'a [IoSource],
    stop: Option<&'a Stop>,
}

/// What the connection threads and the control thread share.
struct Shared {
    handles: Vec<(String, RecoveryHandle)>,
    devices: Vec<IoSource>,
    stop: Option<Stop>,
    /// Connections being served, streams included (only the accept side adds to it).
    active: AtomicUsize,
    /// Followed streams, counted from the request's reading to the stream's end.
    followers: AtomicUsize,
    /// A clone of each served connection, so that stopping the server can cut them short.
    conns: Mutex<HashMap<u64, UnixStream>>,
    /// Connection threads, joined when they end (and all of them when the server stops).
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Written by each connection thread as it ends (the server's stop waits on it).
    conn_ended: EventFd,
    /// Streams a connection thread hands to the control thread, with the `since` asked for.
    handoff: Mutex<Vec<(UnixStream, u64)>>,
    /// Written with each hand-off.
    handoff_wake: EventFd,
}

/// A running control socket server.
pub struct ControlServer {
    path: PathBuf,
    /// Device and inode of the socket file made, so that only it is removed at the end.
    identity: (u64, u64),
    /// Written to end the control thread.
    shutdown: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

/// What the control thread's event manager holds.
type Subscriber = Box<dyn MutEventSubscriber + Send>;

impl ControlServer {
    /// Listens on `path` (replacing a stale socket) for the domains in `handles`; `stop` is
    /// refused and there are no device counters.
    pub fn start(
        path: &Path,
        handles: Vec<(String, RecoveryHandle)>,
    ) -> std::io::Result<ControlServer> {
        Self::start_with(path, handles, Vec::new(), None)
    }

    /// [`ControlServer::start`] with the devices' I/O (`status`, `metrics`), and
    /// `{"cmd":"stop"}` requesting `stop` (whose requests also end the followed streams).
    pub fn start_with(
        path: &Path,
        handles: Vec<(String, RecoveryHandle)>,
        devices: Vec<IoSource>,
        stop: Option<Stop>,
    ) -> std::io::Result<ControlServer> {
        let listener = bind_private(path)?;
        let remove = |e: std::io::Error| {
            let _ = std::fs::remove_file(path);
            e
        };
        let meta = std::fs::symlink_metadata(path).map_err(remove)?;
        listener.set_nonblocking(true).map_err(remove)?;
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK);
        let shared = Arc::new(Shared {
            handles,
            devices,
            stop,
            active: AtomicUsize::new(0),
            followers: AtomicUsize::new(0),
            conns: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            conn_ended: eventfd().map_err(remove)?,
            handoff: Mutex::new(Vec::new()),
            handoff_wake: eventfd().map_err(remove)?,
        });
        let shutdown = Arc::new(eventfd().map_err(remove)?);
        let done = Arc::new(AtomicBool::new(false));
        let mut em: EventManager<Subscriber> = EventManager::new()
            .map_err(|e| remove(std::io::Error::other(format!("control socket: {e}"))))?;
        em.add_subscriber(Box::new(Acceptor {
            listener,
            shared: shared.clone(),
            next_id: 0,
        }));
        em.add_subscriber(Box::new(Streamer {
            shared: shared.clone(),
            shutdown: shutdown.clone(),
            stop_seen: false,
            followers: HashMap::new(),
            lag_timer: TimerFd::new().map_err(|e| remove(e.into()))?,
            done: done.clone(),
        }));
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::ThreadClass::Control);
                while !done.load(Ordering::Acquire) {
                    if let Err(e) = em.run() {
                        crate::limited!(
                            error,
                            "control socket: its event loop failed ({e}); no longer served"
                        );
                        return;
                    }
                }
            })
            .map_err(remove)?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            identity: (meta.dev(), meta.ino()),
            shutdown,
            thread: Some(thread),
            shared,
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = self.shutdown.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Connections in progress end now, not at their deadlines: those still reading see
        // the end of their input; an answer being written (say, to the `stop` that ended the
        // run) gets a moment to go out before its connection is cut.
        for c in lock(&self.shared.conns).values() {
            let _ = c.shutdown(std::net::Shutdown::Read);
        }
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        let grace = Instant::now() + Duration::from_millis(500);
        while threads.iter().any(|t| !t.is_finished()) {
            let left = grace.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // Each connection thread writes `conn_ended` as it ends.
            // SAFETY: the eventfd belongs to `self.shared`, held (so open) for this call.
            let fd = unsafe { BorrowedFd::borrow_raw(self.shared.conn_ended.as_raw_fd()) };
            let _ = sys::poll_readable(&[fd], Some(left));
            let _ = self.shared.conn_ended.read();
        }
        for c in lock(&self.shared.conns).values() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        for t in threads {
            let _ = t.join();
        }
        // Streams handed over after the control thread's end get their last line here.
        for (s, _) in std::mem::take(&mut *lock(&self.shared.handoff)) {
            answer_now(
                s,
                json!({"ok": true, "end": "the control socket is closing"}),
            );
        }
        // Remove the socket only if it is still the one made here.
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.identity)
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(ErrorKind::InvalidInput, msg)
}

/// Binds a listening socket at `path` that is never reachable with a mode looser than 0600:
/// it is bound in a fresh 0700 directory beside `path`, given mode 0600 there, and renamed
/// into place. A missing parent directory is created 0700; an existing one must not be
/// writable by other users (unless sticky, as /tmp). An existing file at `path` is replaced
/// only if it is a socket nobody serves.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    let Some(name) = path.file_name() else {
        return Err(invalid(format!(
            "{}: expected a path ending in a file name",
            path.display()
        )));
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&parent)?;
    }
    let dir = std::fs::metadata(&parent)?;
    if !dir.is_dir() {
        return Err(invalid(format!(
            "{} is not a directory (expected the socket's directory)",
            parent.display()
        )));
    }
    let me = sys::euid();
    if dir.uid() != me && dir.uid() != 0 {
        return Err(std::io::Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "directory {} belongs to uid {}: its owner could replace the socket; expected a directory of this user (uid {me}) or root",
                parent.display(),
                dir.uid()
            ),
        ));
    }
    let mode = dir.permissions().mode();
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(std::io::Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "directory {} has mode {:04o}: other users may replace a socket in it; expected a directory only its owner can write (or a sticky one, as /tmp)",
                parent.display(),
                mode & 0o7777
            ),
        ));
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {} // stale: replaced below
            Ok(_) => {
                return Err(std::io::Error::new(
                    ErrorKind::AddrInUse,
                    format!("socket {} is in use by a running server", path.display()),
                ))
            }
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!(
                        "socket {} exists and cannot be probed ({e}); remove it if it is stale",
                        path.display()
                    ),
                ))
            }
        },
        Ok(_) => {
            return Err(std::io::Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; expected a free path (or a stale socket)",
                    path.display()
                ),
            ))
        }
    }
    let private = private_dir(&parent)?;
    let tmp = private.join("s");
    let made = (|| {
        let listener = UnixListener::bind(&tmp).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("binding {} (then moved into place): {e}", tmp.display()),
            )
        })?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, parent.join(name))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    made
}

/// A fresh directory in `parent` only this user can enter.
fn private_dir(parent: &Path) -> std::io::Result<PathBuf> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = parent.join(format!(".ddvm-{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&p) {
            Err(e) if e.kind() == ErrorKind::AlreadyExists && n < 1000 => continue,
            r => return r.map(|()| p),
        }
    }
}

/// The listening socket, on the control thread's event manager: takes each connection, checks
/// its peer and the limit, and starts a thread to serve it.
struct Acceptor {
    listener: UnixListener,
    shared: Arc<Shared>,
    next_id: u64,
}

impl MutEventSubscriber for Acceptor {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            crate::limited!(error, "control socket: cannot watch the listener: {e}");
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    self.next_id += 1;
                    admit(stream, self.next_id, &self.shared);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors, say: the listener stays readable, so back off a
                    // little rather than spin on it (only ever on this error).
                    crate::limited!(warn, "control socket: accept: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    break;
                }
            }
        }
        lock(&self.shared.threads).retain(|t| !t.is_finished());
    }
}

/// One followed event stream.
struct Follower {
    stream: UnixStream,
    /// Per domain (in the handles' order), the sequence number of the next event to send.
    next: Vec<u64>,
    /// Lines not yet written, the first one from `at`.
    out: VecDeque<Vec<u8>>,
    at: usize,
    /// Whether the stream is watched for room to write.
    writable: bool,
    /// Once it lags: when it is dropped even if it never takes the line that tells it.
    lagging: Option<Instant>,
}

/// How a follower fares after more was queued or written.
enum Fare {
    Keeps,
    /// It lags (why): its queue was replaced by the line that tells it, and it is dropped once
    /// that is written, or at its deadline.
    Lags(String),
    /// Dropped (it lags, or its peer went away): the reason for the log, if worth one.
    Dropped(Option<String>),
}

impl Follower {
    fn queue(&mut self, line: &Value) {
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        self.out.push_back(bytes);
    }

    /// Queues the events of domain `i` it has not had yet.
    fn catch_up(&mut self, i: usize, name: &str, handle: &RecoveryHandle) {
        if self.lagging.is_some() {
            return;
        }
        let log = lock(&handle.events);
        let first = log.first_seq();
        if self.next[i] < first {
            let line = json!({"event": "lost", "domain": name, "count": first - self.next[i]});
            self.queue(&line);
            self.next[i] = first;
        }
        let mut lines = Vec::new();
        for e in log.since(self.next[i]) {
            self.next[i] = e.seq + 1;
            if let Ok(mut bytes) = serde_json::to_vec(e) {
                bytes.push(b'\n');
                lines.push(bytes);
            }
        }
        drop(log);
        self.out.extend(lines);
    }

    /// Writes what it can without blocking; a reader [`FOLLOW_BACKLOG`] lines behind is told
    /// and dropped.
    fn flush(&mut self) -> Fare {
        while let Some(front) = self.out.front() {
            match self.stream.write(&front[self.at..]) {
                Ok(0) => return Fare::Dropped(None),
                Ok(n) => {
                    self.at += n;
                    if self.at == front.len() {
                        self.out.pop_front();
                        self.at = 0;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Fare::Dropped(None),
            }
        }
        if self.lagging.is_some() {
            // Told once the line is out.
            return if self.out.is_empty() {
                Fare::Dropped(None)
            } else {
                Fare::Keeps
            };
        }
        if self.out.len() > FOLLOW_BACKLOG {
            let why = format!(
                "lagged: more than {FOLLOW_BACKLOG} events unread; dropped (follow again with since = the last seq seen + 1)"
            );
            // The line partly written is finished, then the one that tells it.
            let partial = (self.at > 0).then(|| self.out.pop_front()).flatten();
            self.out.clear();
            self.out.extend(partial);
            self.out
                .push_back(answer_line(json!({"ok": false, "error": why})));
            self.lagging = Some(Instant::now() + ANSWER_DEADLINE);
            return match self.flush() {
                Fare::Keeps => Fare::Lags(why),
                other => other,
            };
        }
        Fare::Keeps
    }

    /// Writes a last line (best effort, without blocking) and ends the stream.
    fn end(mut self, why: &str) {
        let mut last = if self.at > 0 { vec![b'\n'] } else { Vec::new() };
        self.out.clear();
        last.extend(answer_line(json!({"ok": true, "end": why})));
        let _ = self.stream.write(&last);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// `value` with the protocol version, as one line.
fn answer_line(value: Value) -> Vec<u8> {
    let mut bytes = versioned(value).to_string().into_bytes();
    bytes.push(b'\n');
    bytes
}

/// Event tokens of the [`Streamer`].
const SHUTDOWN: u32 = 0;
const STOP: u32 = 1;
const HANDOFF: u32 = 2;
const FOLLOWER: u32 = 3;
const LAG_TIMER: u32 = 4;
/// Domain `i`'s events: `EVENTS + i`.
const EVENTS: u32 = 16;

/// The followed event streams and what feeds them, on the control thread's event manager:
/// each engine's events eventfd (new events are sent at once), the hand-off of new streams from
/// the connection threads, the VMM's stop and the server's shutdown (both end every stream with
/// a last line).
struct Streamer {
    shared: Arc<Shared>,
    shutdown: Arc<EventFd>,
    stop_seen: bool,
    followers: HashMap<RawFd, Follower>,
    /// Falls due at the first lagging follower's deadline.
    lag_timer: TimerFd,
    done: Arc<AtomicBool>,
}

impl Streamer {
    fn watch(&self, ops: &mut EventOps, fd: RawFd, token: u32) {
        if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
            crate::limited!(error, "control socket: cannot watch descriptor {fd}: {e}");
        }
    }

    /// Writes what follower `fd` has queued, and drops it if it must be.
    fn settle(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(f) = self.followers.get_mut(&fd) else {
            return;
        };
        match f.flush() {
            Fare::Keeps => {
                let want = !f.out.is_empty();
                if want != f.writable {
                    let set = if want {
                        EventSet::IN | EventSet::OUT
                    } else {
                        EventSet::IN
                    };
                    let _ = ops.modify(Events::with_data_raw(fd, FOLLOWER, set));
                    f.writable = want;
                }
            }
            Fare::Lags(why) => {
                crate::limited!(info, "control socket: an event stream {why}");
                let set = EventSet::IN | EventSet::OUT;
                let _ = ops.modify(Events::with_data_raw(fd, FOLLOWER, set));
                f.writable = true;
                self.arm_lag_timer();
            }
            Fare::Dropped(why) => {
                if let Some(why) = why {
                    crate::limited!(info, "control socket: an event stream {why}");
                }
                self.drop_follower(fd, ops, None);
            }
        }
    }

    /// Sets the timer to the first lagging follower's deadline (or disarms it).
    fn arm_lag_timer(&mut self) {
        let first = self.followers.values().filter_map(|f| f.lagging).min();
        let r = match first {
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                // A zero duration would disarm it.
                self.lag_timer
                    .reset(left.max(Duration::from_millis(1)), None)
            }
            None => self.lag_timer.clear(),
        };
        if let Err(e) = r {
            crate::limited!(warn, "control socket: the lag timer: {e}");
        }
    }

    /// Drops the lagging followers past their deadline.
    fn lag_deadline(&mut self, ops: &mut EventOps) {
        let _ = self.lag_timer.wait();
        let now = Instant::now();
        let due: Vec<RawFd> = self
            .followers
            .iter()
            .filter(|(_, f)| f.lagging.is_some_and(|at| at <= now))
            .map(|(fd, _)| *fd)
            .collect();
        for fd in due {
            self.drop_follower(fd, ops, None);
        }
        self.arm_lag_timer();
    }

    /// Stops watching follower `fd` and ends it (with a last line `end`, if given).
    fn drop_follower(&mut self, fd: RawFd, ops: &mut EventOps, end: Option<&str>) {
        if let Some(f) = self.followers.remove(&fd) {
            let _ = ops.remove(Events::empty_raw(fd));
            match end {
                Some(why) => f.end(why),
                None => drop(f),
            }
            self.shared.followers.fetch_sub(1, Ordering::AcqRel);
            self.shared.active.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn end_all(&mut self, ops: &mut EventOps, why: &str) {
        let fds: Vec<RawFd> = self.followers.keys().copied().collect();
        for fd in fds {
            self.drop_follower(fd, ops, Some(why));
        }
    }

    /// Takes the streams handed over by connection threads.
    fn take_handoffs(&mut self, ops: &mut EventOps) {
        let _ = self.shared.handoff_wake.read();
        let new = std::mem::take(&mut *lock(&self.shared.handoff));
        for (stream, since) in new {
            let mut f = Follower {
                stream,
                next: vec![since; self.shared.handles.len()],
                out: VecDeque::new(),
                at: 0,
                writable: false,
                lagging: None,
            };
            if self.stop_seen {
                f.end("stopping");
                self.shared.followers.fetch_sub(1, Ordering::AcqRel);
                self.shared.active.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            let _ = f.stream.set_nonblocking(true);
            f.out
                .push_back(answer_line(json!({"ok": true, "follow": true})));
            for (i, (name, h)) in self.shared.handles.iter().enumerate() {
                f.catch_up(i, name, h);
            }
            let fd = f.stream.as_raw_fd();
            if let Err(e) = ops.add(Events::with_data_raw(fd, FOLLOWER, EventSet::IN)) {
                crate::limited!(warn, "control socket: cannot watch an event stream: {e}");
                f.end("the server cannot watch this stream");
                self.shared.followers.fetch_sub(1, Ordering::AcqRel);
                self.shared.active.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            self.followers.insert(fd, f);
            self.settle(fd, ops);
        }
    }
}

impl MutEventSubscriber for Streamer {
    fn init(&mut self, ops: &mut EventOps) {
        self.watch(ops, self.shutdown.as_raw_fd(), SHUTDOWN);
        if let Some(fd) = self.shared.stop.as_ref().and_then(Stop::wake_fd) {
            self.watch(ops, fd.as_raw_fd(), STOP);
        }
        self.watch(ops, self.shared.handoff_wake.as_raw_fd(), HANDOFF);
        self.watch(ops, self.lag_timer.as_raw_fd(), LAG_TIMER);
        for (i, (_, h)) in self.shared.handles.iter().enumerate() {
            let token = EVENTS + u32::try_from(i).unwrap_or(u32::MAX - EVENTS);
            self.watch(ops, h.events_fd().as_raw_fd(), token);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            SHUTDOWN => {
                self.end_all(ops, "the control socket is closing");
                self.done.store(true, Ordering::Release);
            }
            STOP => {
                // It stays readable: watched no longer once seen.
                let _ = ops.remove(Events::empty_raw(events.fd()));
                self.stop_seen = true;
                self.end_all(ops, "stopping");
            }
            HANDOFF => self.take_handoffs(ops),
            LAG_TIMER => self.lag_deadline(ops),
            FOLLOWER => {
                let fd = events.fd();
                let set = events.event_set();
                if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                    // A follower sends nothing more: anything it does is read and ignored;
                    // its end of file (or an error) ends the stream.
                    let Some(f) = self.followers.get_mut(&fd) else {
                        return;
                    };
                    let mut scratch = [0u8; 512];
                    let gone = loop {
                        match f.stream.read(&mut scratch) {
                            Ok(0) => break true,
                            Ok(_) => {}
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                            Err(_) => break true,
                        }
                    };
                    if gone {
                        self.drop_follower(fd, ops, None);
                        return;
                    }
                }
                if set.contains(EventSet::OUT) {
                    self.settle(fd, ops);
                }
            }
            token => {
                let Some(i) = token
                    .checked_sub(EVENTS)
                    .and_then(|i| usize::try_from(i).ok())
                    .filter(|&i| i < self.shared.handles.len())
                else {
                    return;
                };
                let shared = self.shared.clone();
                let (name, h) = &shared.handles[i];
                let _ = h.events_fd().read();
                let fds: Vec<RawFd> = self.followers.keys().copied().collect();
                for fd in fds {
                    if let Some(f) = self.followers.get_mut(&fd) {
                        f.catch_up(i, name, h);
                    }
                    self.settle(fd, ops);
                }
            }
        }
    }
}

/// Writes a one-line answer without waiting (for connections not served).
fn answer_now(mut stream: UnixStream, answer: Value) {
    let _ = stream.set_nonblocking(true);
    let _ = stream.write_all(&answer_line(answer));
}

fn admit(stream: UnixStream, id: u64, shared: &Arc<Shared>) {
    let cred = match sys::peer_cred(stream.as_fd()) {
        Ok(c) => c,
        Err(e) => {
            crate::limited!(
                warn,
                "control socket: peer credentials unreadable ({e}); closed"
            );
            return;
        }
    };
    let me = sys::euid();
    if cred.uid != me && cred.uid != 0 {
        crate::limited!(
            warn,
            "control socket: refused a peer of uid {} (pid {}): only uid {me} and root are served",
            cred.uid,
            cred.pid
        );
        answer_now(
            stream,
            json!({"ok": false, "error": format!("refused: peer uid {} is neither the VMM's user (uid {me}) nor root", cred.uid)}),
        );
        return;
    }
    if shared.active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
        crate::limited!(
            debug,
            "control socket: {MAX_CONNECTIONS} connections in progress; one more told busy"
        );
        answer_now(
            stream,
            json!({"ok": false, "error": format!("busy: {MAX_CONNECTIONS} connections in progress; try again")}),
        );
        return;
    }
    let Ok(clone) = stream.try_clone() else {
        answer_now(stream, json!({"ok": false, "error": "out of descriptors"}));
        return;
    };
    lock(&shared.conns).insert(id, clone);
    shared.active.fetch_add(1, Ordering::AcqRel);
    let sh = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("control-conn".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadClass::ControlConn);
            let follow = serve(stream, cred, &sh);
            lock(&sh.conns).remove(&id);
            match follow {
                // The control thread serves it from now on, and counts it out at its end.
                Some(handed) => {
                    lock(&sh.handoff).push(handed);
                    let _ = sh.handoff_wake.write(1);
                }
                None => {
                    sh.active.fetch_sub(1, Ordering::AcqRel);
                }
            }
            let _ = sh.conn_ended.write(1);
        });
    match spawned {
        Ok(t) => lock(&shared.threads).push(t),
        Err(e) => {
            shared.active.fetch_sub(1, Ordering::AcqRel);
            if let Some(s) = lock(&shared.conns).remove(&id) {
                answer_now(
                    s,
                    json!({"ok": false, "error": format!("no thread to serve it: {e}")}),
                );
            }
        }
    }
}

/// Reads one request line by `deadline`: `Ok(None)` if the peer closed without sending one.
fn read_request(stream: &mut UnixStream, deadline: Instant) -> Result<Option<String>, String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            buf.truncate(end);
            break;
        }
        if buf.len() > MAX_LINE {
            return Err(format!("request longer than {MAX_LINE} bytes"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no complete request line within {REQUEST_DEADLINE:?}"
            ));
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => break, // the last line need not end in a newline
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(format!("reading the request: {e}")),
        }
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// Writes `answer` by `deadline`, or gives up.
fn write_answer(stream: &mut UnixStream, answer: &Value, deadline: Instant) {
    let mut bytes = answer.to_string().into_bytes();
    bytes.push(b'\n');
    let mut at = 0;
    while at < bytes.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            crate::limited!(
                debug,
                "control socket: a peer took no answer within {ANSWER_DEADLINE:?}; closed"
            );
            return;
        }
        let _ = stream.set_write_timeout(Some(left));
        match stream.write(&bytes[at..]) {
            Ok(0) => return,
            Ok(n) => at += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// Serves one connection: its answer, or, for a followed stream, the stream and the `since`
/// asked for, to be handed to the control thread.
fn serve(
    mut stream: UnixStream,
    cred: sys::PeerCred,
    shared: &Shared,
) -> Option<(UnixStream, u64)> {
    let _ = stream.set_nonblocking(false);
    let answer = match read_request(&mut stream, Instant::now() + REQUEST_DEADLINE) {
        Ok(None) => return None,
        Ok(Some(line)) => {
            let line = line.trim();
            if !["\"status\"", "\"events\"", "\"metrics\"", "\"version\""]
                .iter()
                .any(|c| line.contains(c))
            {
                crate::limited!(
                    info,
                    "control socket: request {line:.200} from uid {} pid {}",
                    cred.uid,
                    cred.pid
                );
            }
            let ctx = Context {
                handles: &shared.handles,
                devices: &shared.devices,
                stop: shared.stop.as_ref(),
            };
            match respond(line, &ctx) {
                Reply::Answer(a) => a,
                Reply::Follow { since } => {
                    let n = shared.followers.fetch_add(1, Ordering::AcqRel);
                    if n < MAX_FOLLOWERS {
                        return Some((stream, since));
                    }
                    shared.followers.fetch_sub(1, Ordering::AcqRel);
                    versioned(
                        json!({"ok": false, "error": format!("busy: {MAX_FOLLOWERS} event streams followed already; try again")}),
                    )
                }
            }
        }
        Err(e) => versioned(json!({"ok": false, "error": e})),
    };
    write_answer(&mut stream, &answer, Instant::now() + ANSWER_DEADLINE);
    None
}

/// The process's seccomp mode and how many of its threads hold a filter.
fn seccomp_status() -> Value {
    let mode = crate::seccomp::mode().unwrap_or(crate::seccomp::Mode::False);
    match crate::seccomp::filtered_threads() {
        Ok((threads, filtered)) => json!({"mode": mode, "threads": threads, "filtered": filtered}),
        Err(e) => json!({"mode": mode, "error": format!("/proc/self/task: {e}")}),
    }
}

/// An answer with the protocol version.
fn versioned(mut answer: Value) -> Value {
    if let Some(o) = answer.as_object_mut() {
        o.insert("version".into(), PROTOCOL_VERSION.into());
    }
    answer
}

/// What a request gets.
enum Reply {
    /// One answer line.
    Answer(Value),
    /// A followed event stream from `since`.
    Follow { since: u64 },
}

/// A domain's recovery figures now.
fn figures(name: &str, h: &RecoveryHandle) -> DomainFigures {
    h.with(|o| {
        let st = o.status.as_ref();
        let mut times = ddvm_recovery::events::Samples::default();
        for r in &o.recoveries {
            times.push(r.recovered.saturating_duration_since(r.detected));
        }
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
        DomainFigures {
            domain: name.to_string(),
            state: st.map_or("starting", |s| s.state).to_string(),
            epoch: st.and_then(|s| s.epoch),
            broken: st.is_some_and(|s| s.broken),
            recoveries: o.recovered,
            restarts: st.map_or(0, |s| s.restarts),
            operator_restarts: st.map_or(0, |s| s.operator_restarts),
            give_ups: st.map_or(0, |s| s.give_ups),
            detections: st
                .map(|s| {
                    s.detections
                        .iter()
                        .map(|(r, n)| (r.to_string(), *n))
                        .collect()
                })
                .unwrap_or_default(),
            duplicate_detections: st.map_or(0, |s| s.duplicates),
            replayed_requests: st.map_or(0, |s| s.replayed_requests),
            hook_failures: st.map_or(0, |s| s.hook_failures),
            standby_promotions: o.promoted,
            standbys: o.standbys.len() as u64,
            in_flight: o.in_flight as u64,
            queued: o.queued as u64,
            recovery: Latency {
                count: o.recovered,
                sum_seconds: o.recovery_total.as_secs_f64(),
                p50_seconds: secs(times.percentile(50.0)),
                p90_seconds: secs(times.percentile(90.0)),
                p99_seconds: secs(times.percentile(99.0)),
            },
        }
    })
}

fn snapshot(ctx: &Context<'_>) -> Snapshot {
    Snapshot {
        domains: ctx.handles.iter().map(|(n, h)| figures(n, h)).collect(),
        devices: ctx.devices.iter().map(|d| d()).collect(),
    }
}

/// Answers one request line; `stop` is what `{"cmd":"stop"}` sets (none: it is refused). A
/// followed `events` is answered with an error here: only the server streams.
pub fn handle(line: &str, handles: &[(String, RecoveryHandle)], stop: Option<&Stop>) -> Value {
    let ctx = Context {
        handles,
        devices: &[],
        stop,
    };
    match respond(line, &ctx) {
        Reply::Answer(a) => a,
        Reply::Follow { .. } => {
            versioned(json!({"ok": false, "error": "a followed stream needs the control socket"}))
        }
    }
}

fn respond(line: &str, ctx: &Context<'_>) -> Reply {
    let bad = |e: String| {
        Reply::Answer(versioned(
            json!({"ok": false, "error": format!("bad request: {e}; expected e.g. {{\"cmd\":\"status\"}}")}),
        ))
    };
    let mut value: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return bad(e.to_string()),
    };
    if let Some(v) = value.as_object_mut().and_then(|o| o.remove("version")) {
        if v.as_u64() != Some(PROTOCOL_VERSION) {
            return Reply::Answer(versioned(json!({
                "ok": false,
                "error": format!("protocol version {v} is not spoken here; this server speaks version {PROTOCOL_VERSION}"),
            })));
        }
    }
    let req: Request = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => return bad(e.to_string()),
    };
    if let Request::Events {
        since,
        follow: true,
    } = req
    {
        return Reply::Follow { since };
    }
    Reply::Answer(versioned(answer(req, ctx)))
}

fn answer(req: Request, ctx: &Context<'_>) -> Value {
    let handles = ctx.handles;
    let find = |d: &str| {
        handles
            .iter()
            .find(|(n, _)| n == d)
            .map(|(_, h)| h)
            .ok_or_else(|| json!({"ok": false, "error": format!("no domain named {d:?}")}))
    };
    let send = |d: &str, c: Command| match find(d) {
        Ok(h) => {
            h.send(c);
            json!({"ok": true})
        }
        Err(e) => e,
    };
    match req {
        Request::Status => {
            let domains: Vec<Value> = handles
                .iter()
                .map(|(name, h)| {
                    let f = figures(name, h);
                    h.with(|o| {
                        json!({
                            "domain": name,
                            "state": f.state,
                            "epoch": f.epoch,
                            "status": o.status,
                            "in_flight": o.in_flight,
                            "queued": o.queued,
                            "recoveries": o.recovered,
                            "recovery": f.recovery,
                            "standbys": o.standbys.len(),
                            "standby_epochs": o.standbys,
                            "standby_promotions": o.promoted,
                        })
                    })
                })
                .collect();
            let devices: Vec<DeviceIo> = ctx.devices.iter().map(|d| d()).collect();
            json!({"ok": true, "domains": domains, "devices": devices, "seccomp": seccomp_status()})
        }
        Request::Metrics { format } => {
            let snap = snapshot(ctx);
            match format {
                MetricsFormat::Json => {
                    json!({"ok": true, "domains": snap.domains, "devices": snap.devices})
                }
                MetricsFormat::Prometheus => {
                    json!({"ok": true, "format": "prometheus", "text": snap.prometheus()})
                }
            }
        }
        Request::Events { since, .. } => {
            let events: Vec<Value> = handles
                .iter()
                .flat_map(|(_, h)| {
                    let log = lock(&h.events);
                    log.since(since)
                        .filter_map(|e| serde_json::to_value(e).ok())
                        .collect::<Vec<_>>()
                })
                .collect();
            json!({"ok": true, "events": events})
        }
        Request::Version => json!({
            "ok": true,
            "ddvm": env!("CARGO_PKG_VERSION"),
            "protocol": PROTOCOL_VERSION,
        }),
        Request::Stop => match ctx.stop {
            Some(s) => {
                s.request();
                json!({"ok": true, "stopping": true})
            }
            None => json!({"ok": false, "error": "this control socket cannot stop its VMM"}),
        },
        Request::Kill { domain } => send(&domain, Command::Kill),
        Request::Restart { domain } => send(&domain, Command::Restart),
        Request::Update { domain, image } => match Image::from_file(&image) {
            Ok(img) => match img.check(ddvm_abi::layout::IMAGE_BASE, u64::MAX) {
                Ok(_) => send(&domain, Command::Update(img)),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            },
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        },
        #[cfg(not(feature = "fault-injection"))]
        Request::Inject { .. } => {
            json!({"ok": false, "error": crate::chaos::ChaosError::Disabled.to_string()})
        }
        #[cfg(feature = "fault-injection")]
        Request::Inject { domain, fault, arg } => {
            match fault.parse::<ddvm_recovery::fault::FaultKind>() {
                Ok(kind) => send(&domain, Command::Inject { kind, arg }),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            }
        }
    }
}

/// Connects to the socket at `path`, checking that its server is this user's or root's (with
/// SO_PEERCRED), so that a socket another user put in its place is not believed; and sends
/// `req`.
fn connect_and_send(path: &Path, req: &Value) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(path)?;
    let server = sys::peer_cred(s.as_fd())?;
    let me = sys::euid();
    if server.uid != me && server.uid != 0 {
        return Err(std::io::Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "served by uid {} (pid {}), neither this user (uid {me}) nor root: not talking to it",
                server.uid, server.pid
            ),
        ));
    }
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    // A server that refuses at once (busy, or not serving this user) answers and closes
    // without reading: the write then fails, and the answer is still there to read.
    if let Err(e) = writeln!(s, "{req}") {
        if !matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) {
            return Err(e);
        }
    }
    Ok(s)
}

fn parse_line(line: &str) -> std::io::Result<Value> {
    serde_json::from_str(line).map_err(|e| {
        std::io::Error::new(
            ErrorKind::InvalidData,
            format!("answer {:.200}: {e}", line.trim()),
        )
    })
}

/// Sends one request to the socket at `path` and returns the answer line. The server must be
/// this user's or root's (checked with SO_PEERCRED), so that a socket another user put in
/// its place is not believed.
pub fn request(path: &Path, req: &Value) -> std::io::Result<Value> {
    use std::io::BufRead;
    let s = connect_and_send(path, req)?;
    let mut line = String::new();
    std::io::BufReader::new(s.take(MAX_LINE as u64 * 1024)).read_line(&mut line)?;
    parse_line(&line)
}

/// Follows the event stream: sends `{"cmd":"events","since":since,"follow":true}` and calls
/// `each` with every event line until the stream ends, or until `each` returns false. Returns
/// the first answer if it refused, else the stream's last line (`"end"`, or a lag error), or
/// `None` if the server closed without one (or `each` stopped it).
pub fn follow(
    path: &Path,
    since: u64,
    mut each: impl FnMut(&Value) -> bool,
) -> std::io::Result<Option<Value>> {
    use std::io::BufRead;
    let req = json!({"cmd": "events", "since": since, "follow": true, "version": PROTOCOL_VERSION});
    let s = connect_and_send(path, &req)?;
    // Events come when they happen: no deadline for the next one.
    s.set_read_timeout(None)?;
    let mut lines = std::io::BufReader::new(s).lines();
    let Some(first) = lines.next().transpose()? else {
        return Ok(None);
    };
    let first = parse_line(&first)?;
    if first["ok"] != true {
        return Ok(Some(first));
    }
    for line in lines {
        let v = parse_line(&line?)?;
        if v.get("end").is_some() || v.get("ok") == Some(&Value::Bool(false)) {
            return Ok(Some(v));
        }
        if !each(&v) {
            return Ok(None);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_requests_get_errors_not_crashes() {
        for bad in [
            "",
            "{",
            "{\"cmd\":\"explode\"}",
            "{\"cmd\":\"kill\"}",
            "[1,2]",
        ] {
            let a = handle(bad, &[], None);
            assert_eq!(a["ok"], false, "{bad}: {a}");
            assert!(a["error"].is_string());
        }
        let a = handle("{\"cmd\":\"kill\",\"domain\":\"nope\"}", &[], None);
        assert!(a["error"].as_str().unwrap().contains("nope"));
        assert_eq!(handle("{\"cmd\":\"status\"}", &[], None)["ok"], true);
    }

    #[test]
    fn a_peer_that_stalls_holds_its_thread_only_until_the_deadline() {
        // Sends nothing.
        let (mut a, _b) = UnixStream::pair().unwrap();
        let t = Instant::now();
        let r = read_request(&mut a, t + Duration::from_millis(200));
        assert!(r.unwrap_err().contains("no complete request line"));
        assert!(t.elapsed() < Duration::from_secs(2));
        // Sends a byte at a time and never a newline: the deadline is for the whole line.
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let drip = std::thread::spawn(move || {
            for _ in 0..100 {
                if b.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let t = Instant::now();
        assert!(read_request(&mut a, t + Duration::from_millis(300)).is_err());
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        drop(a);
        drip.join().unwrap();
        // Sends more than a line may hold.
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let flood = std::thread::spawn(move || {
            let _ = b.write_all(&vec![b'x'; MAX_LINE * 4]);
        });
        let r = read_request(&mut a, Instant::now() + Duration::from_secs(5));
        assert!(r.unwrap_err().contains("longer than"));
        drop(a);
        flood.join().unwrap();
        // Never reads a large answer.
        let (mut a, _b) = UnixStream::pair().unwrap();
        let t = Instant::now();
        let big = json!({"ok": true, "x": "y".repeat(8 << 20)});
        write_answer(&mut a, &big, t + Duration::from_millis(200));
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    /// A reader that takes nothing is written to without blocking until its socket is full;
    /// once more than [`FOLLOW_BACKLOG`] lines wait for it, it is told it lags and dropped.
    #[test]
    fn a_follower_that_falls_behind_is_told_and_dropped() {
        use ddvm_recovery::events::EventKind;
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut f = Follower {
            stream: a,
            next: vec![0],
            out: VecDeque::new(),
            at: 0,
            writable: false,
            lagging: None,
        };
        let line = json!({"event": "x".repeat(1000)});
        let t = Instant::now();
        let mut queued = 0;
        let why = loop {
            f.queue(&line);
            queued += 1;
            match f.flush() {
                Fare::Keeps => assert!(queued < 100_000, "never told"),
                Fare::Lags(why) => break why,
                Fare::Dropped(_) => panic!("dropped before it was told"),
            }
        };
        assert!(t.elapsed() < Duration::from_secs(5), "a write blocked");
        assert!(why.contains("lagged"), "{why}");
        assert!(f.lagging.is_some());
        // Nothing more is queued for it; once it reads, the line that tells it goes out and
        // it is dropped.
        let h = RecoveryHandle::new(Instant::now()).unwrap();
        lock(&h.events).record("dd0", Instant::now(), EventKind::Stopped);
        f.catch_up(0, "dd0", &h);
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let mut b = b;
            b.read_to_string(&mut text).unwrap();
            text
        });
        let dropped = loop {
            match f.flush() {
                Fare::Dropped(why) => break why,
                _ => std::thread::yield_now(),
            }
        };
        assert!(dropped.is_none(), "{dropped:?}");
        drop(f);
        let text = reader.join().unwrap();
        assert!(
            text.lines()
                .all(|l| serde_json::from_str::<Value>(l).is_ok()),
            "whole lines"
        );
        let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["ok"], false, "{last}");
        assert!(last["error"].as_str().unwrap().contains("lagged"), "{last}");
        let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["ok"], false, "{last}");
        assert!(last["error"].as_str().unwrap().contains("lagged"));
    }

    #[test]
    fn versions_are_checked_before_the_request_is_acted_on() {
        let stop = Stop::new();
        let a = handle(r#"{"cmd":"stop","version":99}"#, &[], Some(&stop));
        assert_eq!(a["ok"], false, "{a}");
        assert!(
            !stop.requested(),
            "a request of another version did something"
        );
        let a = handle(r#"{"cmd":"stop","version":1}"#, &[], Some(&stop));
        assert_eq!((&a["ok"], &a["version"]), (&json!(true), &json!(1)), "{a}");
        assert!(stop.requested());
        let a = handle(r#"{"cmd":"events","follow":true}"#, &[], None);
        assert_eq!(a["ok"], false, "only the server streams: {a}");
    }

    #[test]
    fn stop_sets_the_stop_handle_when_there_is_one() {
        let a = handle("{\"cmd\":\"stop\"}", &[], None);
        assert_eq!(a["ok"], false, "{a}");
        let stop = Stop::new();
        let a = handle("{\"cmd\":\"stop\"}", &[], Some(&stop));
        assert_eq!(a["ok"], true, "{a}");
        assert!(stop.requested());
    }

    /// A build without fault injection has no code to inject: it refuses every fault, even
    /// for a domain it does not have, and says how to get one that can.
    #[test]
    #[cfg(not(feature = "fault-injection"))]
    fn a_build_without_fault_injection_refuses_to_inject() {
        for req in [
            r#"{"cmd":"inject","domain":"nvme0","fault":"panic"}"#,
            r#"{"cmd":"inject","domain":"nope","fault":"kill","arg":3}"#,
        ] {
            let a = handle(req, &[], None);
            assert_eq!(a["ok"], false, "{req}: {a}");
            let err = a["error"].as_str().unwrap();
            assert!(
                err.contains("built without fault injection")
                    && err.contains("--features fault-injection"),
                "{err}"
            );
        }
    }

    /// A build with it checks the fault's name, then the domain's.
    #[test]
    #[cfg(feature = "fault-injection")]
    fn a_build_with_fault_injection_names_a_bad_fault_or_domain() {
        let a = handle(
            r#"{"cmd":"inject","domain":"nvme0","fault":"explode"}"#,
            &[],
            None,
        );
        assert_eq!(a["ok"], false, "{a}");
        assert!(a["error"].as_str().unwrap().contains("\"explode\""), "{a}");
        let a = handle(
            r#"{"cmd":"inject","domain":"nope","fault":"panic"}"#,
            &[],
            None,
        );
        assert_eq!(a["ok"], false, "{a}");
        assert!(a["error"].as_str().unwrap().contains("nope"), "{a}");
    }
}
