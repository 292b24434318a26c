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

/// Every answer carries the protocol version; a request written for another version is
/// refused without being acted on; `version` names the server's ddvm and protocol.
#[test]
fn answers_carry_the_protocol_version_and_other_versions_are_refused() {
    let dir = scratch("control-version");
    let sock = dir.join("ctl.sock");
    let _server = ControlServer::start(&sock, Vec::new()).unwrap();
    let v = ddvm::control::PROTOCOL_VERSION;
    let t = Duration::from_secs(5);
    for req in [
        json!({"cmd": "status"}),
        json!({"cmd": "status", "version": v}),
        json!({"cmd": "metrics"}),
        json!({"cmd": "explode"}),
    ] {
        assert_eq!(ask(&sock, &req, t).unwrap()["version"], v, "{req}");
    }
    let a = ask(&sock, &json!({"cmd": "stop", "version": v + 1}), t).unwrap();
    assert_eq!((&a["ok"], &a["version"]), (&json!(false), &json!(v)), "{a}");
    assert!(
        a["error"].as_str().unwrap().contains("protocol version"),
        "{a}"
    );
    let a = ask(&sock, &json!({"cmd": "version"}), t).unwrap();
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(a["protocol"], v, "{a}");
    assert_eq!(a["ddvm"], env!("CARGO_PKG_VERSION"), "{a}");
    let (ok, text) = ctl(&sock, &["version"]);
    assert!(ok, "{text}");
    let want = format!("ddvm {}, control protocol {v}", env!("CARGO_PKG_VERSION"));
    assert!(
        text.contains(&format!("client: {want}")) && text.contains(&format!("server: {want}")),
        "{text}"
    );
    // Each subcommand is documented in --help.
    let (ok, help) = {
        let out = ddvm(&["ctl", "--help"]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    assert!(ok, "{help}");
    for sub in [
        "status", "metrics", "events", "kill", "restart", "update", "inject", "stop", "version",
    ] {
        assert!(help.contains(&format!("  {sub}")), "{sub}: {help}");
    }
}

/// A followed stream starts with its answer, is refused past the limit of streams, and ends
/// with a last line when the server closes (the reader sees the end, not a hang).
#[test]
fn followed_streams_are_bounded_and_end_when_the_server_closes() {
    let dir = scratch("control-follow");
    let sock = dir.join("ctl.sock");
    let server = ControlServer::start(&sock, Vec::new()).unwrap();
    let open = || {
        let mut s = UnixStream::connect(&sock).unwrap();
        writeln!(s, "{}", json!({"cmd": "events", "follow": true})).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        (r, serde_json::from_str::<Value>(&line).unwrap())
    };
    let mut streams = Vec::new();
    for _ in 0..ddvm::control::MAX_FOLLOWERS {
        let (r, first) = open();
        assert_eq!(first["ok"], true, "{first}");
        assert_eq!(first["follow"], true, "{first}");
        assert_eq!(first["version"], ddvm::control::PROTOCOL_VERSION, "{first}");
        streams.push(r);
    }
    let (_, refused) = open();
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("busy"),
        "{refused}"
    );
    // Requests still have room beside the streams.
    let a = ask(&sock, &json!({"cmd": "status"}), Duration::from_secs(2)).unwrap();
    assert_eq!(a["ok"], true, "{a}");
    // A stream whose reader leaves frees its place.
    drop(streams.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (r, first) = open();
        if first["ok"] == true {
            streams.push(r);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the place was never freed: {first}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    drop(server);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    for mut r in streams {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let last: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(last["ok"], true, "{last}");
        assert!(last["end"].is_string(), "{last}");
        line.clear();
        assert_eq!(r.read_line(&mut line).unwrap(), 0, "end of file after it");
    }
}

/// `ddvm ctl metrics` of a running VMM is Prometheus text that a real parser reads whole, with
/// HELP and TYPE for each family; after a kill, the domain's recoveries and its detections for
/// the reason `operator-kill` have grown, and its device's requests count. `--json` gives the
/// same figures as JSON.
#[test]
fn metrics_parse_as_prometheus_text_and_count_a_kill() {
    use prometheus_parse::{LineInfo, Scrape, Value as P};
    let dir = scratch("control-metrics");
    let sock = dir.join("ctl.sock");
    let child = run_with_control(&with_client(&dir), &sock);
    let scrape = || {
        let (ok, text) = ctl(&sock, &["metrics"]);
        assert!(ok, "{text}");
        for line in text.lines() {
            let info = LineInfo::parse(line);
            let known = if line.starts_with('#') {
                matches!(info, LineInfo::Doc { .. } | LineInfo::Type { .. })
            } else {
                matches!(info, LineInfo::Sample { .. })
            };
            assert!(known, "a line the parser does not read: {line:?}");
        }
        let s = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        (s, text)
    };
    let value = |s: &Scrape, name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        s.samples
            .iter()
            .filter(|x| x.metric == name)
            .find(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
            .map(|x| match &x.value {
                P::Counter(v) | P::Gauge(v) | P::Untyped(v) => *v,
                other => panic!("{name}: {other:?}"),
            })
    };
    let (before, text) = scrape();
    for family in [
        "ddvm_domain_up",
        "ddvm_domain_recoveries_total",
        "ddvm_domain_restarts_total",
        "ddvm_domain_give_ups_total",
        "ddvm_domain_standby_promotions_total",
        "ddvm_domain_in_flight_requests",
        "ddvm_device_requests_total",
        "ddvm_device_bytes_total",
        "ddvm_device_errors_total",
        "ddvm_device_request_latency_seconds",
    ] {
        assert!(
            before.docs.contains_key(family),
            "no HELP for {family}: {text}"
        );
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "no TYPE for {family}"
        );
    }
    let nvme = [("domain", "nvme0")];
    assert_eq!(value(&before, "ddvm_domain_up", &nvme), Some(1.0), "{text}");
    let recoveries = value(&before, "ddvm_domain_recoveries_total", &nvme).unwrap();
    let kills = [("domain", "nvme0"), ("reason", "operator-kill")];
    let killed = value(&before, "ddvm_domain_detections_total", &kills).unwrap_or(0.0);
    let latency = before
        .samples
        .iter()
        .find(|x| x.metric == "ddvm_device_request_latency_seconds")
        .expect("a latency summary");
    assert!(
        matches!(&latency.value, P::Summary(q) if q.len() == 3),
        "{latency:?}"
    );
    let (ok, text) = ctl(&sock, &["kill", "nvme0"]);
    assert!(ok, "{text}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let (s, text) = scrape();
        if value(&s, "ddvm_domain_recoveries_total", &nvme).unwrap() > recoveries {
            break s;
        }
        assert!(Instant::now() < deadline, "no recovery counted: {text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        value(&after, "ddvm_domain_detections_total", &kills),
        Some(killed + 1.0)
    );
    let disk = [("domain", "nvme0"), ("device", "blk")];
    assert!(value(&after, "ddvm_device_requests_total", &disk).unwrap() > 0.0);
    assert!(value(&after, "ddvm_device_bytes_total", &disk).unwrap() > 0.0);
    assert_eq!(value(&after, "ddvm_device_errors_total", &disk), Some(0.0));
    let (ok, text) = ctl(&sock, &["metrics", "--json"]);
    assert!(ok, "{text}");
    let j: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(j["version"], ddvm::control::PROTOCOL_VERSION, "{j}");
    assert!(j["domains"][0]["recoveries"].as_u64().unwrap() >= 1, "{j}");
    assert!(
        j["devices"][0]["latency"]["p99_seconds"].as_f64().unwrap() > 0.0,
        "{j}"
    );
    let (ok, text) = ctl(&sock, &["stop"]);
    assert!(ok, "{text}");
    let (status, out) = ended_within(child, Duration::from_secs(30));
    assert!(status.success(), "{status}: {out}");
}

/// `ddvm ctl events --follow` delivers the events of a kill as they happen (within a second,
/// a generous bound), and ends cleanly, exit status 0, when `ctl stop` ends the run.
#[test]
fn a_followed_stream_delivers_a_kill_within_a_second_and_ends_at_the_stop() {
    let dir = scratch("control-follow-run");
    let sock = dir.join("ctl.sock");
    let run = run_with_control(&with_client(&dir), &sock);
    let mut follower = Command::new(ddvm_bin())
        .args(["ctl", sock.to_str().unwrap(), "events", "--follow"])
        .env_remove("DDVM_KVM")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = follower.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    // The log so far (the domain's boot and ready) comes first.
    let (_, first) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the backlog");
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["domain"], "nvme0", "{first}");
    while rx.recv_timeout(Duration::from_millis(300)).is_ok() {}
    let sent = Instant::now();
    let a = ask(
        &sock,
        &json!({"cmd": "kill", "domain": "nvme0"}),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(a["ok"], true, "{a}");
    let mut seen = Vec::new();
    let arrived = loop {
        let (at, line) = rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("no event of the kill; saw {seen:?}"));
        // The operator's kill, and the failure it causes, are both named so.
        let _: Value = serde_json::from_str(&line).unwrap();
        if line.contains("operator-kill") {
            break at;
        }
        seen.push(line);
    };
    let took = arrived.saturating_duration_since(sent);
    assert!(
        took < Duration::from_secs(1),
        "the kill's event took {took:?}"
    );
    let (ok, text) = ctl(&sock, &["stop"]);
    assert!(ok, "{text}");
    let (status, out) = ended_within(run, Duration::from_secs(30));
    assert!(status.success(), "{status}: {out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = follower.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the stream did not end with the run"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    reader.join().unwrap();
    assert!(status.success(), "{status}");
}
