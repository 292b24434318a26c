//! The seccomp filters of the real binary: on by default on every thread, reported by
//! `ddvm ctl status`, and what each `--seccomp` mode does with a forbidden call from a thread of
//! each class (made on purpose through `DDVM_SECCOMP_PROBE`, a fault-injection build's hook).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{ddvm, ddvm_bin, scratch};

/// A disk domain with a warm standby and one client that runs until it is stopped.
fn topology(dir: &Path) -> PathBuf {
    let cfg = dir.join("seccomp.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[domain]]\nname = \"nvme0\"\nmemory_mib = 32\nchannel_kib = 8448\n[domain.device]\nkind = \"emulated-nvme\"\nbacking = \"{}\"\nsize_mib = 16\nlba_size = 4096\nvolatile_write_cache = true\n[domain.recovery]\nstandbys = 1\n[[client]]\nname = \"c0\"\ndisk = \"nvme0\"\noffset_mib = 0\nsize_mib = 16\nworkload = \"workload=randrw bs=4096 qd=4 duration_ms=600000 id=0 seed=1\"\n",
            dir.join("nvme.img").display()
        ),
    )
    .unwrap();
    cfg
}

/// A `ddvm` child killed if the test fails before it ends.
struct Running(Option<Child>);

impl Running {
    fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `ddvm [args] run CONFIG --control SOCK`, once its socket is up.
fn run_with_control(args: &[&str], config: &Path, sock: &Path, probe: Option<&str>) -> Running {
    run_on(None, args, config, sock, probe)
}

/// As [`run_with_control`], on the CPUs `cpus` names (`taskset -c`, util-linux) if given.
fn run_on(
    cpus: Option<&str>,
    args: &[&str],
    config: &Path,
    sock: &Path,
    probe: Option<&str>,
) -> Running {
    let mut cmd = match cpus {
        Some(list) => {
            let mut c = Command::new("taskset");
            c.args(["-c", list]).arg(ddvm_bin());
            c
        }
        None => Command::new(ddvm_bin()),
    };
    cmd.args(args)
        .args(["run", config.to_str().unwrap(), "--control"])
        .arg(sock)
        .env_remove("DDVM_KVM")
        .env_remove("DDVM_SECCOMP")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(class) = probe {
        cmd.env("DDVM_SECCOMP_PROBE", class);
    }
    let mut child = cmd.spawn().expect("run ddvm");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sock.exists() && Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Running(Some(child))
}

/// Waits at most a minute for `child`; returns its exit code and output.
fn ended(mut running: Running) -> (Option<i32>, String) {
    let mut child = running.0.take().expect("a child");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code(), text(&out))
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

fn ctl(sock: &Path, words: &[&str]) -> (bool, String) {
    let mut a = vec!["ctl", sock.to_str().unwrap()];
    a.extend_from_slice(words);
    let out = ddvm(&a);
    (out.status.success(), text(&out))
}

/// A small demo, with `DDVM_SECCOMP_PROBE=probe`. A probe the filter kills leaves the demo
/// no chance to remove its disk, so it is removed here.
fn demo(mode: &str, probe: &str) -> Output {
    let child = Command::new(ddvm_bin())
        .args([
            "--seccomp",
            mode,
            "demo",
            "--requests",
            "300",
            "--frames",
            "30",
            "--kills",
            "0",
        ])
        .env_remove("DDVM_KVM")
        .env("DDVM_SECCOMP_PROBE", probe)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ddvm demo");
    let disk = std::env::temp_dir().join(format!("ddvm-demo-{}.img", child.id()));
    let out = child.wait_with_output().expect("run ddvm demo");
    let _ = std::fs::remove_file(disk);
    out
}

/// Each thread of `pid` by name, with `read(its /proc task directory)`; threads whose files
/// cannot be read (gone meanwhile), or for which `read` gives nothing, are left out, and a
/// process that is gone has none.
fn per_thread<T>(pid: u32, read: impl Fn(&Path) -> Option<T>) -> Vec<(String, T)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let task = task.path();
            let comm = std::fs::read_to_string(task.join("comm")).ok()?;
            Some((comm.trim().to_string(), read(&task)?))
        })
        .collect()
}

/// Names of the process's threads and whether each holds a filter (`Seccomp: 2`).
fn threads(pid: u32) -> Vec<(String, bool)> {
    per_thread(pid, |task| {
        let status = std::fs::read_to_string(task.join("status")).ok()?;
        Some(
            status
                .lines()
                .any(|l| l.starts_with("Seccomp:") && l.trim_end().ends_with('2')),
        )
    })
}

#[test]
fn by_default_every_thread_holds_a_filter_and_ctl_status_says_so() {
    let dir = scratch("seccomp-default");
    let sock = dir.join("ctl.sock");
    let child = run_with_control(&[], &topology(&dir), &sock, None);
    let pid = child.id();
    // Every kind of thread this topology runs, once all have started (the standby boots after
    // the domain is ready; a loaded host takes its time).
    let expected = [
        "vcpu-nvme0",
        "vcpu-c0",
        "blk-nvme0",
        "nvme-",
        "standby-",
        "control",
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = threads(pid);
    while !expected
        .iter()
        .all(|class| seen.iter().any(|(n, _)| n.starts_with(class)))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
        seen = threads(pid);
    }
    for class in expected {
        assert!(
            seen.iter().any(|(n, _)| n.starts_with(class)),
            "no {class} thread: {seen:?}"
        );
    }
    let unfiltered: Vec<_> = seen.iter().filter(|(_, f)| !f).collect();
    assert!(
        unfiltered.is_empty(),
        "threads without a filter: {unfiltered:?}"
    );
    let (ok, out) = ctl(&sock, &["status"]);
    assert!(ok, "{out}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let s = &status["seccomp"];
    assert_eq!(s["mode"], "true", "{status}");
    assert!(s["threads"].as_u64().unwrap() >= 6, "{status}");
    assert_eq!(s["filtered"], s["threads"], "{status}");
    let (ok, out) = ctl(&sock, &["stop"]);
    assert!(ok, "{out}");
    let (code, out) = ended(child);
    assert_eq!(code, Some(0), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Each thread's name and scheduling policy (`/proc/PID/task/TID/stat`, field 41).
fn policies(pid: u32) -> Vec<(String, u32)> {
    per_thread(pid, |task| {
        let stat = std::fs::read_to_string(task.join("stat")).ok()?;
        // Fields after the name, which ends at the last ')': state is field 3.
        let (_, rest) = stat.rsplit_once(')')?;
        rest.split_whitespace().nth(38)?.parse().ok()
    })
}

/// Runs the topology on `cpus` until its domain's vCPU, its block service and its client's
/// vCPU are up and the client's requests are being answered; returns the threads' policies
/// and how ddvm ended after `ctl stop`.
fn policies_on(cpus: Option<&str>, dir: &Path) -> (Vec<(String, u32)>, Option<i32>, String) {
    let sock = dir.join("ctl.sock");
    let child = run_on(cpus, &[], &topology(dir), &sock, None);
    let pid = child.id();
    let expected = ["vcpu-nvme0", "vcpu-c0", "blk-nvme0"];
    let answered = || {
        let (_, out) = ctl(&sock, &["metrics"]);
        out.lines()
            .filter(|l| l.starts_with("ddvm_device_requests_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = policies(pid);
    while !(expected
        .iter()
        .all(|t| seen.iter().any(|(n, _)| n.starts_with(t)))
        && answered() > 100.0)
        && Instant::now() < deadline
        && !seen.is_empty()
    {
        std::thread::sleep(Duration::from_millis(100));
        seen = policies(pid);
    }
    // A ddvm that died has no socket: its exit says why.
    let (_, stop) = ctl(&sock, &["stop"]);
    let (code, out) = ended(child);
    (seen, code, format!("{out}\nctl stop: {stop}"))
}

const SCHED_OTHER: u32 = 0;
const SCHED_BATCH: u32 = 3;

#[test]
fn on_one_cpu_the_block_service_and_the_domain_s_vcpu_are_batch_scheduled_under_their_filters() {
    let dir = scratch("one-cpu");
    let (seen, code, out) = policies_on(Some("0"), &dir);
    // ddvm ran to its stop: the filters let the threads change their own policy.
    assert_eq!(code, Some(0), "{out}");
    let policy = |name: &str| {
        seen.iter()
            .find(|(n, _)| n.starts_with(name))
            .map(|(_, p)| *p)
    };
    assert_eq!(policy("blk-nvme0"), Some(SCHED_BATCH), "{seen:?}");
    assert_eq!(policy("vcpu-nvme0"), Some(SCHED_BATCH), "{seen:?}");
    // The client's vCPU keeps the default: it is the one that fills the queue.
    assert_eq!(policy("vcpu-c0"), Some(SCHED_OTHER), "{seen:?}");
    if std::thread::available_parallelism().is_ok_and(|n| n.get() > 1) {
        let (seen, code, out) = policies_on(None, &dir);
        assert_eq!(code, Some(0), "{out}");
        assert!(
            seen.iter().all(|(_, p)| *p == SCHED_OTHER),
            "with CPUs to spare nothing is batch scheduled: {seen:?}"
        );
    }
}

#[test]
fn seccomp_false_installs_no_filter() {
    let dir = scratch("seccomp-false");
    let sock = dir.join("ctl.sock");
    let child = run_with_control(&["--seccomp", "false"], &topology(&dir), &sock, None);
    let (ok, out) = ctl(&sock, &["status"]);
    assert!(ok, "{out}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["seccomp"]["mode"], "false", "{status}");
    assert_eq!(status["seccomp"]["filtered"], 0, "{status}");
    assert!(threads(child.id()).iter().all(|(_, f)| !f));
    let _ = ctl(&sock, &["stop"]);
    let (code, out) = ended(child);
    assert_eq!(code, Some(0), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The line the SIGSYS handler writes for a forbidden `getppid` (110) of a thread of `class`.
fn refusal(class: &str) -> String {
    format!("ddvm: seccomp: a {class} thread made system call 110, which its filter forbids")
}

#[test]
fn a_forbidden_call_from_a_thread_of_each_class_ends_ddvm_with_status_159() {
    // Classes the demo runs (an NVMe domain, two NIC domains, standbys, clients).
    for (key, name) in [
        ("main", "main"),
        ("vcpu", "vcpu"),
        ("block-service", "block service"),
        ("network-service", "network service"),
        ("device-worker", "device worker"),
        ("standby-booter", "standby booter"),
    ] {
        let out = demo("true", key);
        let text = text(&out);
        assert_eq!(out.status.code(), Some(159), "{key}: {text}");
        assert!(text.contains(&refusal(name)), "{key}: {text}");
    }
    // The control socket's threads.
    let dir = scratch("seccomp-control");
    let sock = dir.join("ctl.sock");
    let cfg = topology(&dir);
    let child = run_with_control(&[], &cfg, &sock, Some("control"));
    let (code, text) = ended(child);
    assert_eq!(code, Some(159), "control: {text}");
    assert!(text.contains(&refusal("control")), "{text}");
    let _ = std::fs::remove_file(&sock);
    let child = run_with_control(&[], &cfg, &sock, Some("control-conn"));
    // The first connection's thread makes the call.
    let _ = ctl(&sock, &["status"]);
    let (code, text) = ended(child);
    assert_eq!(code, Some(159), "control-conn: {text}");
    assert!(text.contains(&refusal("control connection")), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn log_mode_lets_a_forbidden_call_through() {
    for key in ["vcpu", "block-service"] {
        let out = demo("log", key);
        let text = text(&out);
        assert_eq!(out.status.code(), Some(0), "{key}: {text}");
        let line = text
            .lines()
            .find(|l| l.starts_with("ddvm: seccomp probe: "))
            .unwrap_or_else(|| panic!("{key}: no probe line: {text}"));
        // getppid returned ddvm's parent: the call went through.
        let pid: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert_eq!(pid, i64::from(std::process::id()), "{line}");
        assert!(!text.contains("which its filter forbids"), "{text}");
    }
}
