//! `ddvm run` under a service manager: readiness and stopping told through `$NOTIFY_SOCKET`
//! (systemd's `Type=notify`), as `packaging/ddvm@.service` expects; and the man page and shell
//! completions generated from the command line.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{ddvm, ddvm_bin, scratch};

/// The next message on `socket` (at most `within`).
fn message(socket: &UnixDatagram, within: Duration) -> String {
    socket.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification in time");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn run_tells_the_service_manager_it_is_ready_and_when_it_stops() {
    let dir = scratch("service-notify");
    let cfg = dir.join("domains.toml");
    std::fs::write(&cfg, "[[domain]]\nname = \"dd0\"\n").unwrap();
    let notify = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&notify).unwrap();
    let ctl = dir.join("ctl.sock");
    let t0 = Instant::now();
    let mut child = Command::new(ddvm_bin())
        .args([
            "run",
            cfg.to_str().unwrap(),
            "--control",
            ctl.to_str().unwrap(),
        ])
        .env("NOTIFY_SOCKET", &notify)
        .env_remove("DDVM_KVM")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ready = message(&socket, Duration::from_secs(60));
    assert!(
        ready.lines().any(|l| l == "READY=1")
            && ready.lines().any(|l| l == "STATUS=1 domain(s) running"),
        "{ready:?}"
    );
    // Ready means served: the control socket answers at once.
    let status = ddvm(&["ctl", ctl.to_str().unwrap(), "status"]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let stopping = message(&socket, Duration::from_secs(30));
    assert_eq!(stopping.trim(), "STOPPING=1");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "ddvm did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.wait().unwrap().success());
    assert!(t0.elapsed() < Duration::from_secs(120));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_man_page_and_completions_come_from_the_command_line() {
    let man = ddvm(&["man"]);
    assert!(man.status.success());
    let man = String::from_utf8_lossy(&man.stdout);
    assert!(
        man.starts_with(".ie") || man.contains(".TH ddvm 1"),
        "{man}"
    );
    for word in ["\\-\\-seccomp", "demo", "chaos", "ctl"] {
        assert!(man.contains(word), "the man page lacks {word}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = ddvm(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        for word in ["demo", "chaos", "seccomp", "jail"] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
    let bad = ddvm(&["completions", "cmd.exe"]);
    assert_eq!(bad.status.code(), Some(2));
}
