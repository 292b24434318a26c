//! `--jail DIR`: the VMM runs its topology in namespaces of its own, seeing only what the
//! topology needs, with no capabilities and no_new_privs. These tests run the real binary as
//! root (as CI does) and look at the jailed VMM from outside, through `/proc`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ddvm, ddvm_bin, scratch};

/// A topology of one NVMe driver domain (backing file beside it, created by ddvm) and one
/// client running `count` verified requests.
fn topology(dir: &Path, count: u64) -> PathBuf {
    let cfg = dir.join("jailed.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[[domain]]
name = "nvme0"
memory_mib = 32
channel_kib = 8448
[domain.device]
kind = "emulated-nvme"
backing = "jailed.img"
size_mib = 64
lba_size = 4096
volatile_write_cache = true

[[client]]
name = "client0"
disk = "nvme0"
offset_mib = 0
size_mib = 32
workload = "workload=randrw rwmix=70 bs=4096 qd=16 count={count} flush_every=64 id=0 seed=1"
"#
        ),
    )
    .unwrap();
    cfg
}

/// The jailed VMM: the only child of the `ddvm` process left outside the jail.
fn jailed_child(parent: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        let pids: Vec<u32> = children
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if let [pid] = pids[..] {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "ddvm {parent} has no single child: {children:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A field of `/proc/PID/status`.
fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// The mount points of `/proc/PID/mountinfo` and their per-mount options.
fn mounts(pid: u32) -> Vec<(String, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[4].to_string(), f[5].to_string())
        })
        .collect()
}

/// Waits at most `timeout` for `child` to end; returns its exit code and output.
fn ended_within(mut child: Child, timeout: Duration) -> (Option<i32>, String) {
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "ddvm still running after {timeout:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

fn empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

#[test]
fn a_jailed_run_sees_only_its_topology_and_holds_no_capability() {
    let dir = scratch("jail-run");
    let jail = dir.join("jail");
    std::fs::create_dir(&jail).unwrap();
    // Beside the topology, but not in it: the jail must not show it.
    std::fs::write(dir.join("secret"), "not for the VMM").unwrap();
    let cfg = topology(&dir, 10_000_000);
    let sock = dir.join("ctl").join("sock");
    let json = dir.join("summary.json");
    let mut child = Command::new(ddvm_bin())
        .args(["run", cfg.to_str().unwrap(), "--jail"])
        .arg(&jail)
        .arg("--control")
        .arg(&sock)
        .arg("--json")
        .arg(&json)
        .env_remove("DDVM_KVM")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ddvm");
    // The control socket, made inside the jail, is reachable from the host.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sock.exists() {
        if child.try_wait().unwrap().is_some() {
            let (code, text) = ended_within(child, Duration::from_secs(1));
            panic!("ddvm run ended ({code:?}) before serving its socket: {text}");
        }
        assert!(Instant::now() < deadline, "no control socket after 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let vmm = jailed_child(child.id());

    // Its own mount, PID, network, IPC and UTS namespaces; process 1 in its PID namespace.
    for ns in ["mnt", "pid", "net", "ipc", "uts"] {
        let mine = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let its = std::fs::read_link(format!("/proc/{vmm}/ns/{ns}")).unwrap();
        assert_ne!(mine, its, "the jailed VMM shares the {ns} namespace");
    }
    assert!(
        status_field(vmm, "NSpid").ends_with("\t1"),
        "{}",
        status_field(vmm, "NSpid")
    );
    // No capability in any set, and no way to gain one.
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(vmm, set), "0000000000000000", "{set}");
    }
    assert_eq!(status_field(vmm, "NoNewPrivs"), "1");
    // And its seccomp filters, installed once the jail was built (mode 2: filtered).
    assert_eq!(status_field(vmm, "Seccomp"), "2");

    // Its mounts: a read-only root, its own /proc (the parts that reach the host read-only),
    // and exactly the topology's paths.
    let backing = dir.join("jailed.img");
    let ctl_dir = dir.join("ctl");
    let wanted: Vec<String> = [
        "/dev/kvm".into(),
        backing.display().to_string(),
        ctl_dir.display().to_string(),
        json.display().to_string(),
    ]
    .into();
    let m = mounts(vmm);
    for (point, opts) in &m {
        let known = point == "/"
            || point == "/proc"
            || ["sys", "sysrq-trigger", "irq", "bus", "fs"]
                .iter()
                .any(|p| *point == format!("/proc/{p}"))
            || wanted.contains(point);
        assert!(known, "unexpected mount {point} ({opts}) in {m:?}");
        assert!(
            opts.contains("nosuid") && opts.contains("noexec"),
            "{point}: {opts}"
        );
        if point == "/" || point.starts_with("/proc/") {
            assert!(opts.starts_with("ro"), "{point}: {opts}");
        }
    }
    for w in &wanted {
        assert!(m.iter().any(|(p, _)| p == w), "{w} not mounted: {m:?}");
    }

    // What it sees: the topology's files, nothing else of the host.
    let root = PathBuf::from(format!("/proc/{vmm}/root"));
    let seen = |p: &Path| root.join(p.strip_prefix("/").unwrap()).exists();
    assert!(seen(Path::new("/dev/kvm")));
    assert!(seen(&backing));
    assert!(
        !seen(&dir.join("secret")),
        "a file outside the topology is visible"
    );
    assert!(
        !seen(&cfg),
        "the topology file itself is not needed after it was read"
    );
    for host in ["/etc/passwd", "/usr", "/root", "/dev/null", "/sys"] {
        assert!(!seen(Path::new(host)), "{host} is visible in the jail");
    }
    // The network namespace has no interface but its loopback.
    let net = std::fs::read_to_string(format!("/proc/{vmm}/net/dev")).unwrap();
    let ifaces: Vec<&str> = net
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, ["lo"], "{net}");

    // The host's operator reaches it, and SIGTERM (forwarded into the jail) stops it in order.
    let status = ddvm(&["ctl", sock.to_str().unwrap(), "status"]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    // SAFETY: kill takes no pointers; the pid is our child's.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let (code, text) = ended_within(child, Duration::from_secs(60));
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("ddvm: disk nvme0: flushed and shut down"),
        "{text}"
    );
    assert!(text.contains("stopped on request"), "{text}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(summary["stopped"], true, "{summary}");
    assert!(empty(&jail), "the jail directory is not left empty");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_jailed_run_completes_its_workload() {
    let dir = scratch("jail-workload");
    let jail = dir.join("jail");
    std::fs::create_dir(&jail).unwrap();
    let cfg = topology(&dir, 4000);
    let out = ddvm(&[
        "run",
        cfg.to_str().unwrap(),
        "--jail",
        jail.to_str().unwrap(),
    ]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("every client verified every block it read"),
        "{text}"
    );
    assert!(empty(&jail));
    assert_eq!(
        std::fs::metadata(dir.join("jailed.img")).unwrap().len(),
        64 << 20,
        "the backing file ddvm created inside the jail is the host's"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_demo_runs_jailed_with_its_kills_recovered_and_its_disk_removed() {
    let jail = scratch("jail-demo");
    let child = Command::new(ddvm_bin())
        .args([
            "demo",
            "--requests",
            "3000",
            "--frames",
            "300",
            "--kills",
            "3",
            "--jail",
        ])
        .arg(jail.path())
        .env_remove("DDVM_KVM")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ddvm");
    let pid = child.id();
    let (code, text) = ended_within(child, Duration::from_secs(120));
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("3 kill(s) of the driver domains, 3 recovered"),
        "{text}"
    );
    assert!(empty(&jail));
    let disk = std::env::temp_dir().join(format!("ddvm-demo-{pid}.img"));
    assert!(!disk.exists(), "{} left behind", disk.display());
    let _ = std::fs::remove_dir_all(&jail);
}

/// Runs `ddvm run CONFIG --jail DIR` with `extra`; returns its exit code and its stderr.
fn refused(config: &Path, jail: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let mut args = vec![
        "run",
        config.to_str().unwrap(),
        "--jail",
        jail.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = ddvm(&args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_jail_directory_is_named_with_what_was_expected() {
    let dir = scratch("jail-bad");
    let cfg = topology(&dir, 10);
    let missing = dir.join("missing");
    let file = dir.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let full = dir.join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("x"), "x").unwrap();
    for (jail, what) in [
        (missing.as_path(), "expected an existing empty directory"),
        (file.as_path(), "not a directory"),
        (full.as_path(), "not empty"),
        (Path::new("/"), "is the root directory"),
    ] {
        let (code, err) = refused(&cfg, jail, &[]);
        assert_eq!(code, Some(1), "{}: {err}", jail.display());
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(
            err.starts_with(&format!("ddvm: error: --jail {}: ", jail.display()))
                && err.contains(what),
            "{}: {err}",
            jail.display()
        );
    }
    // Nothing was made on the way.
    assert!(!dir.join("jailed.img").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_restart_hook_runs_outside_the_jail_through_the_launcher() {
    let dir = scratch("jail-hook");
    let jail = dir.join("jail");
    std::fs::create_dir(&jail).unwrap();
    let cfg = topology(&dir, 2000);
    // The hook writes where the jail cannot: the directory beside the config is not in it.
    let out = dir.join("hook-out");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text = text.replace(
        "volatile_write_cache = true\n",
        &format!(
            "volatile_write_cache = true\n[domain.recovery]\nhook = [\"/bin/sh\", \"-c\", \"echo \\\"$DDVM_DOMAIN $DDVM_REASON $DDVM_RESTARTS\\\" >> {}\"]\n",
            out.display()
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    let run = ddvm(&[
        "chaos",
        cfg.to_str().unwrap(),
        "--faults",
        "kill",
        "--every",
        "300ms",
        "--duration",
        "2s",
        "--no-baseline",
        "--jail",
        jail.to_str().unwrap(),
    ]);
    let log =
        String::from_utf8_lossy(&run.stdout).to_string() + &String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "{log}");
    let written = std::fs::read_to_string(&out).unwrap_or_default();
    // One line per restart decision: the domain, the reason, the restart count.
    let first: Vec<&str> = written
        .lines()
        .next()
        .unwrap_or_default()
        .split(' ')
        .collect();
    assert!(
        first.len() == 3 && first[0] == "nvme0" && first[2].parse::<u64>().is_ok_and(|n| n >= 1),
        "the hook's first line: {written:?}\n{log}"
    );
    assert!(empty(&jail));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_jail_user_without_access_is_told_which_path() {
    let dir = scratch("jail-user");
    let jail = dir.join("jail");
    std::fs::create_dir(&jail).unwrap();
    let cfg = topology(&dir, 10);
    // The backing file is root's, mode 0600 (and so, on most hosts, is /dev/kvm).
    let (code, err) = refused(&cfg, &jail, &["--jail-uid", "65534", "--jail-gid", "65534"]);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("expected it readable and writable in the jail by uid 65534 gid 65534 without capabilities"),
        "{err}"
    );
    assert!(empty(&jail));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_tap_is_opened_in_the_namespace_ddvm_started_in_and_the_jail_has_none() {
    const TAP: &str = "ddvmjail0";
    let dir = scratch("jail-tap");
    let jail = dir.join("jail");
    std::fs::create_dir(&jail).unwrap();
    let cfg = dir.join("tap.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[domain]]\nname = \"nic0\"\n[domain.device]\nkind = \"emulated-e1000\"\n\
             wire = {{ kind = \"tap\", name = \"{TAP}\" }}\n"
        ),
    )
    .unwrap();
    // This thread (and the ddvm it starts) in a network namespace of its own, with the TAP.
    // SAFETY: unshare takes no pointers; CLONE_NEWNET moves only the calling thread, which
    // no other thread of this test binary relies on.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        r,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    for args in [
        vec!["tuntap", "add", "dev", TAP, "mode", "tap"],
        vec!["link", "set", TAP, "up"],
    ] {
        let out = Command::new("ip")
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run `ip` (Debian: iproute2): {e}"));
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let child = Command::new(ddvm_bin())
        .args(["run", cfg.to_str().unwrap(), "--duration", "3", "--jail"])
        .arg(&jail)
        .env_remove("DDVM_KVM")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ddvm");
    let vmm = jailed_child(child.id());
    // The jailed VMM holds the TAP (a descriptor attached to the interface of this thread's
    // namespace) once its NIC domain is up.
    let deadline = Instant::now() + Duration::from_secs(20);
    let attached = || {
        std::fs::read_dir(format!("/proc/{vmm}/fdinfo"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|f| {
                std::fs::read_to_string(f.path())
                    .is_ok_and(|t| t.lines().any(|l| l == format!("iff:\t{TAP}")))
            })
    };
    while !attached() {
        assert!(Instant::now() < deadline, "the jailed VMM never held {TAP}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its own network namespace has no such interface.
    let net = std::fs::read_to_string(format!("/proc/{vmm}/net/dev")).unwrap();
    assert!(!net.contains(TAP), "{net}");
    let (code, text) = ended_within(child, Duration::from_secs(60));
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("ddvm: domain nic0 ready"), "{text}");
    assert!(empty(&jail));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ddvm chaos` jailed: its faults are recovered inside the jail and its report and plots,
/// written at the end from inside, land on the host.
#[cfg(feature = "fault-injection")]
#[test]
fn a_jailed_chaos_run_recovers_its_faults_and_writes_its_report() {
    let dir = scratch("jail-chaos");
    let jail = dir.join("jail");
    std::fs::create_dir(&jail).unwrap();
    let cfg = topology(&dir, 2000);
    let json = dir.join("chaos.json");
    let out = ddvm(&[
        "chaos",
        cfg.to_str().unwrap(),
        "--faults",
        "kill,panic",
        "--every",
        "300ms",
        "--duration",
        "2s",
        "--no-baseline",
        "--json",
        json.to_str().unwrap(),
        "--svg",
        dir.join("plot").to_str().unwrap(),
        "--jail",
        jail.to_str().unwrap(),
    ]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["client_errors"], 0, "{report}");
    assert_eq!(report["mismatches"], 0, "{report}");
    assert!(report["recoveries"].as_u64().unwrap_or(0) > 0, "{report}");
    for plot in ["plot-throughput.svg", "plot-recovery.svg"] {
        let svg = std::fs::read_to_string(dir.join(plot)).unwrap();
        assert!(svg.starts_with("<svg") || svg.contains("<svg"), "{plot}");
    }
    assert!(empty(&jail));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_jail_user_with_access_runs_the_topology_as_that_user() {
    use std::os::unix::fs::chown;
    const NOBODY: u32 = 65534;
    let dir = scratch("jail-nobody");
    let jail = dir.join("jail");
    std::fs::create_dir(&jail).unwrap();
    let cfg = topology(&dir, 10_000_000);
    // A KVM node and a backing file of the jail's user (the host's /dev/kvm is left alone).
    let kvm = dir.join("kvm");
    let node = std::ffi::CString::new(kvm.to_str().unwrap()).unwrap();
    // SAFETY: `node` is a NUL-terminated path that outlives the call.
    let r = unsafe { libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(10, 232)) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        kvm.display(),
        std::io::Error::last_os_error()
    );
    chown(&kvm, Some(NOBODY), Some(NOBODY)).unwrap();
    let backing = dir.join("jailed.img");
    std::fs::write(&backing, b"").unwrap();
    chown(&backing, Some(NOBODY), Some(NOBODY)).unwrap();
    let child = Command::new(ddvm_bin())
        .args(["run", cfg.to_str().unwrap(), "--kvm", kvm.to_str().unwrap()])
        .args(["--jail-uid", "65534", "--jail-gid", "65534", "--jail"])
        .arg(&jail)
        .env_remove("DDVM_KVM")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ddvm");
    let vmm = jailed_child(child.id());
    // Its clients run (the backing file grew to the namespace's size), as nobody.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&backing).unwrap().len() < 64 << 20 {
        assert!(
            Instant::now() < deadline,
            "the jailed VMM never sized its disk"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for (field, want) in [
        ("Uid", "65534\t65534\t65534\t65534"),
        ("Gid", "65534\t65534\t65534\t65534"),
        ("Groups", "65534"),
        ("CapEff", "0000000000000000"),
        ("CapPrm", "0000000000000000"),
        ("CapBnd", "0000000000000000"),
        ("NoNewPrivs", "1"),
    ] {
        assert_eq!(status_field(vmm, field), want, "{field}");
    }
    // A second of I/O as nobody, then a Ctrl-C's SIGINT (forwarded into the jail).
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: kill takes no pointers; the pid is our child's.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let (code, text) = ended_within(child, Duration::from_secs(60));
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("ddvm: disk nvme0: flushed and shut down"),
        "{text}"
    );
    let answered: u64 = text
        .split("disk nvme0 (driver domain): ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no disk line: {text}"));
    assert!(answered >= 1000, "{answered} requests answered: {text}");
    assert!(empty(&jail));
    let _ = std::fs::remove_dir_all(&dir);
}
