//! The control socket as an attacker on the same host meets it: the socket's and its
//! directory's modes, peers of another user, `update` with files that are not images, and
//! connections that stall; and `ddvm ctl SOCKET stop`, which ends a running `ddvm run` the way
//! SIGTERM does.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ddvm::control::ControlServer;
use serde_json::{json, Value};

use common::*;

/// The unprivileged user other peers run as.
const NOBODY: u32 = 65534;

/// Sends `req` on a fresh connection and waits at most `timeout` for the answer.
fn ask(sock: &Path, req: &Value, timeout: Duration) -> Result<Value, String> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout)).unwrap();
    // A refusal may come (and the socket close) before the request is written.
    let _ = writeln!(s, "{req}");
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("no answer within {timeout:?}: {e}"))?;
    serde_json::from_str(&line).map_err(|e| format!("answer {line:?}: {e}"))
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// A socket in a directory ddvm creates: the directory is 0700 and the socket 0600.
#[test]
fn the_socket_is_0600_in_a_directory_only_its_user_can_enter() {
    let dir = scratch("control-mode");
    let sock = dir.join("run/ddvm/ctl.sock");
    let server = ControlServer::start(&sock, Vec::new()).unwrap();
    assert_eq!(mode(&sock), 0o600, "socket mode");
    assert_eq!(mode(&dir.join("run/ddvm")), 0o700, "directory ddvm made");
    assert_eq!(mode(&dir.join("run")), 0o700, "directory ddvm made");
    assert_eq!(
        ask(&sock, &json!({"cmd": "status"}), Duration::from_secs(5)).unwrap()["ok"],
        true
    );
    // Nothing is left beside the socket (it was bound elsewhere and moved into place).
    let names: Vec<_> = std::fs::read_dir(dir.join("run/ddvm"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["ctl.sock"]);
    drop(server);
    assert!(
        !sock.exists(),
        "the socket is removed when the server stops"
    );
}

/// An existing file at the socket's path is not a stale socket: it is not deleted.
#[test]
fn a_file_at_the_socket_path_is_not_replaced() {
    let dir = scratch("control-file");
    let path = dir.join("important");
    std::fs::write(&path, "data").unwrap();
    let err = ControlServer::start(&path, Vec::new())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
    // A live socket is not taken over either; a stale one is replaced.
    let sock = dir.join("ctl.sock");
    let first = ControlServer::start(&sock, Vec::new()).unwrap();
    let err = ControlServer::start(&sock, Vec::new())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("in use"), "{err}");
    drop(first);
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let _second = ControlServer::start(&stale, Vec::new()).unwrap();
    assert_eq!(mode(&stale), 0o600);
}

/// A directory where another user could swap the socket is refused: one other users may
/// write (not sticky), and one another user owns. /tmp-like sticky directories are fine.
#[test]
fn a_directory_others_control_is_refused() {
    let dir = scratch("control-dir");
    let open = dir.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = ControlServer::start(&open.join("s"), Vec::new())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("mode 0777"), "{err}");
    let theirs = dir.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    let err = ControlServer::start(&theirs.join("s"), Vec::new())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("uid 65534"), "{err}");
    let sticky = dir.join("sticky");
    std::fs::create_dir(&sticky).unwrap();
    std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let _ok = ControlServer::start(&sticky.join("s"), Vec::new()).unwrap();
    assert_eq!(mode(&sticky.join("s")), 0o600);
}

/// A peer of another user is refused even where the socket's mode would let it connect (the
/// operator loosened it): SO_PEERCRED is checked. With the socket as ddvm made it, the kernel
/// refuses the connection itself.
#[test]
fn a_peer_of_another_user_is_refused() {
    let dir = scratch("control-peer");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.join("ctl.sock");
    let _server = ControlServer::start(&sock, Vec::new()).unwrap();
    // The test binary may live under a directory nobody cannot enter: copy it out.
    let bin = dir.join("ddvm");
    std::fs::copy(ddvm_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str]| {
        let out = Command::new(&bin)
            .args(args)
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .expect("run ddvm as nobody");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let s = sock.to_str().unwrap();
    let (ok, text) = as_nobody(&["ctl", s, "status"]);
    assert!(!ok && text.contains("ermission denied"), "{text}");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (ok, text) = as_nobody(&["ctl", s, "status"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("uid 65534") && text.contains("refused"),
        "{text}"
    );
    // The owner (root here) is still served.
    assert_eq!(
        ask(&sock, &json!({"cmd": "status"}), Duration::from_secs(5)).unwrap()["ok"],
        true
    );
}

fn update(sock: &Path, image: &Path) -> Value {
    ask(
        sock,
        &json!({"cmd": "update", "domain": "nvme0", "image": image}),
        Duration::from_secs(8),
    )
    .unwrap_or_else(|e| panic!("update {}: {e}", image.display()))
}

/// `update` reads only a regular file, at most IMAGE_MAX bytes: a FIFO (which would block the
/// open for ever), a directory, a device and a file too large are refused, naming the file and
/// what was expected.
#[test]
fn update_takes_only_a_regular_file_of_bounded_size() {
    let dir = scratch("control-update");
    let sock = dir.join("ctl.sock");
    let _server = ControlServer::start(&sock, Vec::new()).unwrap();
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let a = update(&sock, &fifo);
    let e = a["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("fifo") && e.contains("expected a regular file"),
        "{a}"
    );
    let link = dir.join("link");
    std::os::unix::fs::symlink(&fifo, &link).unwrap();
    let a = update(&sock, &link);
    let e = a["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("link") && e.contains("fifo") && e.contains("expected a regular file"),
        "{a}"
    );
    let a = update(&sock, &dir);
    let e = a["error"].as_str().unwrap_or_default();
    assert!(
        e.contains(dir.to_str().unwrap()) && e.contains("directory"),
        "{a}"
    );
    let a = update(&sock, Path::new("/dev/zero"));
    let e = a["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("/dev/zero") && e.contains("expected a regular file"),
        "{a}"
    );
    let big = dir.join("big");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(ddvm::loader::IMAGE_MAX as u64 + 1)
        .unwrap();
    let a = update(&sock, &big);
    let e = a["error"].as_str().unwrap_or_default();
    assert!(e.contains("big") && e.contains("expected at most"), "{a}");
    // A regular file gets as far as the domain lookup.
    let elf = dir.join("image.elf");
    std::fs::write(&elf, ddvm_images::DRIVER_DOMAIN).unwrap();
    let a = update(&sock, &elf);
    assert!(
        a["error"].as_str().unwrap_or_default().contains("nvme0"),
        "{a}"
    );
}

/// Connections that open and send nothing, or half a line, or never read their answer, do
/// not delay another connection's request.
#[test]
fn a_stalled_connection_does_not_delay_others() {
    let dir = scratch("control-stall");
    let sock = dir.join("ctl.sock");
    let _server = ControlServer::start(&sock, Vec::new()).unwrap();
    let silent = UnixStream::connect(&sock).unwrap();
    let mut half = UnixStream::connect(&sock).unwrap();
    half.write_all(b"{\"cmd\":\"sta").unwrap();
    // A client that asks for events and never reads the answer.
    let mut deaf = UnixStream::connect(&sock).unwrap();
    writeln!(deaf, "{}", json!({"cmd": "events"})).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..3 {
        let t = Instant::now();
        let a = ask(&sock, &json!({"cmd": "status"}), Duration::from_secs(2)).unwrap();
        assert_eq!(a["ok"], true, "{a}");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    drop((silent, half, deaf));
}

/// More connections than the server serves at once: the extra ones are told it is busy (not
/// left waiting), and once the stalled ones give up, requests are served again.
#[test]
fn connections_beyond_the_cap_are_told_busy() {
    let dir = scratch("control-cap");
    let sock = dir.join("ctl.sock");
    let _server = ControlServer::start(&sock, Vec::new()).unwrap();
    let stalled: Vec<UnixStream> = (0..ddvm::control::MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    let a = ask(&sock, &json!({"cmd": "status"}), Duration::from_secs(2)).unwrap();
    assert_eq!(a["ok"], false, "{a}");
    assert!(a["error"].as_str().unwrap().contains("busy"), "{a}");
    assert!(t.elapsed() < Duration::from_secs(1));
    // The stalled ones time out (the request deadline), freeing their places.
    let deadline = Instant::now() + ddvm::control::REQUEST_DEADLINE + Duration::from_secs(3);
    loop {
        let a = ask(&sock, &json!({"cmd": "status"}), Duration::from_secs(2)).unwrap();
        if a["ok"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "never served again: {a}");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(stalled);
}

/// Starts `ddvm run CONFIG --control SOCKET` and waits for its socket.
fn run_with_control(config: &Path, sock: &Path) -> Child {
    let mut child = Command::new(ddvm_bin())
        .args(["run", config.to_str().unwrap(), "--control"])
        .arg(sock)
        .env_remove("DDVM_KVM")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ddvm");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sock.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "ddvm run ended ({status}) before serving its socket: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(Instant::now() < deadline, "no control socket after 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// Waits at most `timeout` for `child` to end; returns its status and output.
fn ended_within(mut child: Child, timeout: Duration) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            return (out.status, text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "ddvm run still running {timeout:?} after the stop: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn domain_only(dir: &Path) -> PathBuf {
    let cfg = dir.join("domain.toml");
    std::fs::write(
        &cfg,
        "[[domain]]\nname = \"dd0\"\nmemory_mib = 16\nchannel_kib = 1024\n",
    )
    .unwrap();
    cfg
}

fn with_client(dir: &Path) -> PathBuf {
    let cfg = dir.join("clients.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[domain]]\nname = \"nvme0\"\nmemory_mib = 32\nchannel_kib = 8448\n[domain.device]\nkind = \"emulated-nvme\"\nbacking = \"{}\"\nsize_mib = 16\nlba_size = 4096\nvolatile_write_cache = true\n[[client]]\nname = \"c0\"\ndisk = \"nvme0\"\noffset_mib = 0\nsize_mib = 16\nworkload = \"workload=randrw bs=4096 qd=4 duration_ms=600000 id=0 seed=1\"\n",
            dir.join("nvme.img").display()
        ),
    )
    .unwrap();
    cfg
}

fn ctl(sock: &Path, args: &[&str]) -> (bool, String) {
    let mut a = vec!["ctl", sock.to_str().unwrap()];
    a.extend_from_slice(args);
    let out = ddvm(&a);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `ddvm ctl SOCKET stop` ends `ddvm run` of a topology without clients (which runs until it
/// is stopped) and of one whose client would run for ten minutes.
#[test]
fn ctl_stop_ends_ddvm_run() {
    for (what, cfg) in [
        ("domains only", domain_only as fn(&Path) -> PathBuf),
        ("a client", with_client),
    ] {
        let dir = scratch(&format!("control-stop-{}", what.len()));
        let sock = dir.join("ctl.sock");
        let child = run_with_control(&cfg(&dir), &sock);
        let (ok, text) = ctl(&sock, &["status"]);
        assert!(ok, "{what}: {text}");
        let (ok, text) = ctl(&sock, &["stop"]);
        assert!(ok, "{what}: {text}");
        let (status, out) = ended_within(child, Duration::from_secs(30));
        assert!(status.success(), "{what}: {status}: {out}");
        assert!(out.contains("stopped on request"), "{what}: {out}");
        assert!(!sock.exists(), "{what}: socket left behind");
    }
}

/// SIGTERM ends a `ddvm run` with clients the same orderly way (before, it killed the process
/// without its summary).
#[test]
fn sigterm_ends_ddvm_run_with_clients_in_order() {
    let dir = scratch("control-sigterm");
    let sock = dir.join("ctl.sock");
    let child = run_with_control(&with_client(&dir), &sock);
    // The socket is served once every domain and client is up.
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let (status, out) = ended_within(child, Duration::from_secs(30));
    assert!(status.success(), "{status}: {out}");
    assert!(out.contains("stopped on request"), "{out}");
    assert!(!sock.exists(), "socket left behind");
}
