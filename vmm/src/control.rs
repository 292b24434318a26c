//! The control socket: one JSON request per line on a Unix socket, one JSON answer per line.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"events","since":N}`, `{"cmd":"kill","domain":D}`,
//! `{"cmd":"restart","domain":D}`, `{"cmd":"update","domain":D,"image":PATH}`,
//! `{"cmd":"stop"}` (ends `ddvm run` as SIGTERM does),
//! `{"cmd":"inject","domain":D,"fault":KIND}` (a build with fault injection only). Answers are
//! `{"ok":true,...}` or `{"ok":false,"error":"..."}`. Malformed requests get an error answer;
//! nothing a client sends stops the server.
//!
//! Who may talk to it: the socket is made with mode 0600 (bound in a private directory, then
//! moved into place, so it is never reachable with a looser mode); a directory ddvm creates
//! for it is 0700, and an existing one that other users may write without the sticky bit is
//! refused (they could swap the socket). Every peer's credentials are checked with
//! SO_PEERCRED: only the VMM's own user and root are served; others get an error answer and
//! are logged.
//!
//! Robustness: each connection is served on its own thread, at most [`MAX_CONNECTIONS`] at
//! once (more are answered "busy" at once); a connection has [`REQUEST_DEADLINE`] to send its
//! request line (at most 64 KiB) and [`ANSWER_DEADLINE`] to take the answer, so one that
//! stalls holds only its own thread, and only that long.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::loader::Image;
use crate::reincarnation::{Command, RecoveryHandle};
use crate::stop::Stop;
use crate::sync::lock;
use crate::sys;

/// Connections served at once; more are answered "busy" and closed.
pub const MAX_CONNECTIONS: usize = 8;
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
    Events {
        #[serde(default)]
        since: u64,
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
}

/// What the connection threads share.
struct Shared {
    handles: Vec<(String, RecoveryHandle)>,
    stop: Option<Stop>,
    /// Connections being served (only the accept thread adds to it).
    active: AtomicUsize,
    /// A clone of each served connection, so that stopping the server can cut them short.
    conns: Mutex<HashMap<u64, UnixStream>>,
    /// Connection threads, joined when they end (and all of them when the server stops).
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// A running control socket server.
pub struct ControlServer {
    path: PathBuf,
    /// Device and inode of the socket file made, so that only it is removed at the end.
    identity: (u64, u64),
    /// Dropping it wakes the accept thread (its peer sees end of file).
    wake: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl ControlServer {
    /// Listens on `path` (replacing a stale socket) for the domains in `handles`; `stop` is
    /// refused.
    pub fn start(
        path: &Path,
        handles: Vec<(String, RecoveryHandle)>,
    ) -> std::io::Result<ControlServer> {
        Self::start_with(path, handles, None)
    }

    /// [`ControlServer::start`], and `{"cmd":"stop"}` requests `stop`.
    pub fn start_with(
        path: &Path,
        handles: Vec<(String, RecoveryHandle)>,
        stop: Option<Stop>,
    ) -> std::io::Result<ControlServer> {
        let listener = bind_private(path)?;
        let meta = std::fs::symlink_metadata(path)?;
        listener.set_nonblocking(true)?;
        let (wake, woken) = UnixStream::pair()?;
        let shared = Arc::new(Shared {
            handles,
            stop,
            active: AtomicUsize::new(0),
            conns: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::ThreadClass::Control);
                accept_loop(&listener, &woken, &sh)
            });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        };
        Ok(ControlServer {
            path: path.to_path_buf(),
            identity: (meta.dev(), meta.ino()),
            wake: Some(wake),
            thread: Some(thread),
            shared,
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        drop(self.wake.take());
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
        while Instant::now() < grace && threads.iter().any(|t| !t.is_finished()) {
            std::thread::sleep(Duration::from_millis(5));
        }
        for c in lock(&self.shared.conns).values() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        for t in threads {
            let _ = t.join();
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

fn accept_loop(listener: &UnixListener, woken: &UnixStream, shared: &Arc<Shared>) {
    let mut next_id = 0u64;
    loop {
        let ready = match sys::poll_readable(&[listener.as_fd(), woken.as_fd()], None) {
            Ok(r) => r,
            Err(e) => {
                crate::limited!(warn, "control socket: poll: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if ready[1] {
            return;
        }
        if !ready[0] {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                next_id += 1;
                admit(stream, next_id, shared);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of descriptors, say: wait a little rather than spin on it.
                crate::limited!(warn, "control socket: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        lock(&shared.threads).retain(|t| !t.is_finished());
    }
}

/// Writes a one-line answer without waiting (for connections not served).
fn answer_now(mut stream: UnixStream, answer: &Value) {
    let _ = stream.set_nonblocking(true);
    let _ = writeln!(stream, "{answer}");
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
            &json!({"ok": false, "error": format!("refused: peer uid {} is neither the VMM's user (uid {me}) nor root", cred.uid)}),
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
            &json!({"ok": false, "error": format!("busy: {MAX_CONNECTIONS} connections in progress; try again")}),
        );
        return;
    }
    let Ok(clone) = stream.try_clone() else {
        answer_now(stream, &json!({"ok": false, "error": "out of descriptors"}));
        return;
    };
    lock(&shared.conns).insert(id, clone);
    shared.active.fetch_add(1, Ordering::AcqRel);
    let sh = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("control-conn".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadClass::ControlConn);
            serve(stream, cred, &sh);
            lock(&sh.conns).remove(&id);
            sh.active.fetch_sub(1, Ordering::AcqRel);
        });
    match spawned {
        Ok(t) => lock(&shared.threads).push(t),
        Err(e) => {
            shared.active.fetch_sub(1, Ordering::AcqRel);
            if let Some(s) = lock(&shared.conns).remove(&id) {
                answer_now(
                    s,
                    &json!({"ok": false, "error": format!("no thread to serve it: {e}")}),
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

fn serve(mut stream: UnixStream, cred: sys::PeerCred, shared: &Shared) {
    let _ = stream.set_nonblocking(false);
    let answer = match read_request(&mut stream, Instant::now() + REQUEST_DEADLINE) {
        Ok(None) => return,
        Ok(Some(line)) => {
            let line = line.trim();
            if !line.contains("\"status\"") && !line.contains("\"events\"") {
                crate::limited!(
                    info,
                    "control socket: request {line:.200} from uid {} pid {}",
                    cred.uid,
                    cred.pid
                );
            }
            handle(line, &shared.handles, shared.stop.as_ref())
        }
        Err(e) => json!({"ok": false, "error": e}),
    };
    write_answer(&mut stream, &answer, Instant::now() + ANSWER_DEADLINE);
}

/// The process's seccomp mode and how many of its threads hold a filter.
fn seccomp_status() -> Value {
    let mode = crate::seccomp::mode().unwrap_or(crate::seccomp::Mode::False);
    match crate::seccomp::filtered_threads() {
        Ok((threads, filtered)) => json!({"mode": mode, "threads": threads, "filtered": filtered}),
        Err(e) => json!({"mode": mode, "error": format!("/proc/self/task: {e}")}),
    }
}

/// Answers one request line; `stop` is what `{"cmd":"stop"}` sets (none: it is refused).
pub fn handle(line: &str, handles: &[(String, RecoveryHandle)], stop: Option<&Stop>) -> Value {
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => {
            return json!({"ok": false, "error": format!("bad request: {e}; expected e.g. {{\"cmd\":\"status\"}}")})
        }
    };
    let find = |d: &str| {
        handles
            .iter()
            .find(|(n, _)| n == d)
            .map(|(_, h)| h)
            .ok_or_else(|| json!({"ok": false, "error": format!("no disk domain named {d:?}")}))
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
                    h.with(|o| {
                        json!({
                            "domain": name,
                            "status": o.status,
                            "in_flight": o.in_flight,
                            "queued": o.queued,
                            "recoveries": o.recovered,
                            "standby_epochs": o.standbys,
                            "standby_promotions": o.promoted,
                        })
                    })
                })
                .collect();
            json!({"ok": true, "domains": domains, "seccomp": seccomp_status()})
        }
        Request::Events { since } => {
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
        Request::Stop => match stop {
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

/// Sends one request to the socket at `path` and returns the answer line. The server must be
/// this user's or root's (checked with SO_PEERCRED), so that a socket another user put in
/// its place is not believed.
pub fn request(path: &Path, req: &Value) -> std::io::Result<Value> {
    use std::io::BufRead;
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
    let mut line = String::new();
    std::io::BufReader::new(s.take(MAX_LINE as u64 * 1024)).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| {
        std::io::Error::new(
            ErrorKind::InvalidData,
            format!("answer {:.200}: {e}", line.trim()),
        )
    })
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
