//! Orderly stop loses nothing: a client writes through a driver domain on an emulated
//! controller with a volatile write cache and never flushes; however `ddvm run` ends — its
//! `--duration`, SIGTERM, its clients finishing — and whatever state the domain is in at the
//! stop (serving, hung, just crashed), every write the client had acknowledged is found in
//! the backing file afterwards, read directly. (Built with the `fault-injection` feature.)

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ddvm::config::Config;
use ddvm::console::Echo;
use ddvm::reincarnation::Command as Ctl;
use ddvm::stop::StopHow;
use ddvm::topology::Topology;
use ddvm_recovery::fault::FaultKind;

use common::*;

/// Blocks the writer writes, once each, and never flushes.
const WRITES: u64 = 600;
/// The writer's client id (stamped into its blocks).
const WRITER_ID: u32 = 7;
const BS: usize = 4096;

/// A disk with a volatile write cache; `writer` writes [`WRITES`] blocks at the start of it
/// without a single FLUSH and ends; `keeper`, if given, keeps the run going on the disk's
/// second half (it reads blocks nobody wrote) until the run is stopped.
fn config_text(dir: &Path, recovery: &str, keeper: bool) -> String {
    let mut text = format!(
        "[[domain]]\nname = \"nvme0\"\nmemory_mib = 32\nchannel_kib = 8448\n[domain.device]\n\
         kind = \"emulated-nvme\"\nbacking = \"{}\"\nsize_mib = 32\nlba_size = 4096\n\
         volatile_write_cache = true\n[domain.recovery]\n{recovery}\n\
         [[client]]\nname = \"writer\"\ndisk = \"nvme0\"\noffset_mib = 0\nsize_mib = 16\n\
         workload = \"workload=seqwrite bs={BS} qd=8 count={WRITES} flush=0 verify_pass=0 \
         id={WRITER_ID} seed=1\"\n",
        dir.join("nvme.img").display()
    );
    if keeper {
        text += "[[client]]\nname = \"keeper\"\ndisk = \"nvme0\"\noffset_mib = 16\nsize_mib = 16\n\
                 workload = \"workload=randread prefill=0 bs=4096 qd=1 duration_ms=600000 id=8 seed=2\"\n";
    }
    text
}

/// The workload client's block format (guest-kernel/workload/src/pattern.rs), rebuilt here
/// from a block's header so that every byte of a block read from the file is checked.
mod pattern {
    const MAGIC: u64 = u64::from_le_bytes(*b"DDVMBLK1");
    const HEADER: usize = 48;
    const CHECKSUM_AT: usize = 40;

    fn word(buf: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(buf[at..at + 8].try_into().unwrap())
    }

    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fold(h: u64, w: u64) -> u64 {
        (h ^ w).wrapping_mul(0x100_0000_01b3).rotate_left(29)
    }

    /// The block a writer with this header writes.
    fn expected(buf: &[u8]) -> Vec<u8> {
        let (run, idgen, block) = (word(buf, 8), word(buf, 16), word(buf, 24));
        let (id, gen) = (idgen as u32, (idgen >> 32) as u32);
        let mut out = vec![0u8; buf.len()];
        let put =
            |o: &mut Vec<u8>, at: usize, v: u64| o[at..at + 8].copy_from_slice(&v.to_le_bytes());
        put(&mut out, 0, MAGIC);
        put(&mut out, 8, run);
        put(&mut out, 16, u64::from(id) | (u64::from(gen) << 32));
        put(&mut out, 24, block);
        put(&mut out, 32, buf.len() as u64);
        let mut h = 0xcbf2_9ce4_8422_2325;
        for at in (0..CHECKSUM_AT).step_by(8) {
            h = fold(h, word(&out, at));
        }
        let a = mix(run ^ ((u64::from(id) << 32) | u64::from(gen)));
        let mut x = mix(a ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
        for at in (HEADER..buf.len()).step_by(8) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let w = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
            h = fold(h, w);
            put(&mut out, at, w);
        }
        put(&mut out, CHECKSUM_AT, h);
        out
    }

    /// Why `buf` is not block `block` of client `id` (any generation), if it is not.
    pub fn check(buf: &[u8], id: u32, block: u64) -> Result<(), String> {
        if word(buf, 0) != MAGIC {
            return Err("unwritten (no header)".into());
        }
        let (got_id, got_block) = (word(buf, 16) as u32, word(buf, 24));
        if (got_id, got_block) != (id, block) {
            return Err(format!("misplaced: client {got_id} block {got_block}"));
        }
        if buf != expected(buf).as_slice() {
            return Err("corrupt: payload or checksum wrong".into());
        }
        Ok(())
    }
}

/// Every block the writer wrote, read from the backing file directly: the list of the wrong
/// ones (empty when every acknowledged write is there).
fn missing_writes(img: &Path) -> Vec<String> {
    let file = std::fs::read(img).expect("read the backing file");
    (0..WRITES)
        .filter_map(|b| {
            let at = b as usize * BS;
            let block = file.get(at..at + BS).unwrap_or(&[]);
            if block.len() < BS {
                return Some(format!("block {b}: past the end of the file"));
            }
            pattern::check(block, WRITER_ID, b)
                .err()
                .map(|e| format!("block {b}: {e}"))
        })
        .collect()
}

fn assert_all_there(img: &Path, context: &str) {
    let missing = missing_writes(img);
    assert!(
        missing.is_empty(),
        "{} of {WRITES} acknowledged writes are not in the file, first: {:?}\n{context}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

const RECOVERY: &str = "heartbeat_ms = 20\nrequest_deadline_ms = 1000\nstandbys = 0\n";

fn write_config(dir: &Path, keeper: bool) -> PathBuf {
    let path = dir.join("stop.toml");
    std::fs::write(&path, config_text(dir, RECOVERY, keeper)).unwrap();
    path
}

/// `ddvm run --duration`: the writer finishes, the keeper is still reading when the time is
/// up; the stop flushes the writer's writes.
#[test]
fn a_run_ended_by_its_duration_keeps_every_acknowledged_write() {
    let dir = scratch("stop-duration");
    let cfg = write_config(&dir, true);
    let out = ddvm(&["run", cfg.to_str().unwrap(), "--duration", "6"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    let writer = stdout
        .lines()
        .find(|l| l.starts_with("writer "))
        .unwrap_or_else(|| panic!("no writer line\n{context}"));
    assert!(
        writer.split_whitespace().nth(1) == Some(&WRITES.to_string()),
        "the writer did not finish its {WRITES} writes: {writer}\n{context}"
    );
    assert_all_there(&dir.join("nvme.img"), &context);
    assert!(
        stdout.contains("disk nvme0: flushed and shut down in"),
        "{context}"
    );
}

/// SIGTERM: once the writer has reported, the run is stopped by a signal; it ends in order
/// (an exit status, not death by the signal) with every write in the file.
#[test]
fn a_run_ended_by_sigterm_keeps_every_acknowledged_write() {
    let dir = scratch("stop-sigterm");
    let cfg = write_config(&dir, true);
    let mut child = Command::new(ddvm_bin())
        .args(["run", cfg.to_str().unwrap()])
        .env_remove("DDVM_KVM")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ddvm");
    let stdout = child.stdout.take().unwrap();
    let out_reader =
        std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let t0 = Instant::now();
    loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap_or(0) == 0 {
            let _ = child.kill();
            panic!("ddvm ended before the writer reported:\n{seen}");
        }
        seen += &line;
        if line.contains("[writer] ddvm-workload: {") {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the writer did not report within 60 s:\n{seen}");
        }
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let rest = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("ddvm did not end within 60 s of SIGTERM:\n{seen}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_reader.join().unwrap();
    let context = format!(
        "stdout:\n{stdout}\nstderr:\n{seen}{}",
        rest.join().unwrap_or_default()
    );
    assert!(
        status.code().is_some(),
        "ddvm died by the signal ({status}), it did not stop in order\n{context}"
    );
    assert_all_there(&dir.join("nvme.img"), &context);
    assert!(
        stdout.contains("disk nvme0: flushed and shut down in"),
        "{context}"
    );
}

fn hv() -> Arc<ddvm::hypervisor::Hypervisor> {
    Arc::new(kvm())
}

/// The clients finishing end the run: the topology's stop flushes and shuts the controller
/// down through the domain.
#[test]
fn a_topology_whose_clients_finish_keeps_every_acknowledged_write() {
    let dir = scratch("stop-finish");
    let text = config_text(&dir, RECOVERY, false);
    let cfg = Config::parse(Path::new("test.toml"), &text).unwrap();
    let mut topo = Topology::start(&hv(), &cfg, Path::new("test.toml"), Echo::Off).unwrap();
    let outcomes = topo.wait_clients(Duration::from_secs(60));
    let reports = topo.stop();
    let r = outcomes[0].report.clone().expect("the writer's report");
    assert_eq!((r.writes, r.flushes, r.errors), (WRITES, 0, 0), "{r:?}");
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].how, StopHow::Domain, "{}", reports[0]);
    assert!(reports[0].clean(), "{}", reports[0]);
    assert_all_there(&dir.join("nvme.img"), &reports[0].to_string());
}

/// The domain is hung (its heartbeat still; detection is slow here, so the supervisor has
/// not restarted it) or has just crashed when the stop comes. A hung domain cannot flush:
/// the VMM stops it and shuts the controller down itself before the reset. A crashed one is
/// restarted, the write log replayed, and the stop goes on through the fresh domain. Either
/// way every acknowledged write is in the file.
#[test]
fn a_stop_that_finds_the_domain_hung_or_crashed_keeps_every_acknowledged_write() {
    for (kind, wait) in [
        (FaultKind::Hang, Duration::from_millis(200)),
        (FaultKind::Panic, Duration::ZERO),
    ] {
        let dir = scratch(&format!("stop-{}", kind.name()));
        let recovery = "heartbeat_ms = 1000\nrequest_deadline_ms = 5000\nstandbys = 0\n\
                        restart_delay_ms = 1\nrestart_delay_cap_ms = 5\n";
        let text = config_text(&dir, recovery, false);
        let cfg = Config::parse(Path::new("test.toml"), &text).unwrap();
        let mut topo = Topology::start(&hv(), &cfg, Path::new("test.toml"), Echo::Off).unwrap();
        let outcomes = topo.wait_clients(Duration::from_secs(60));
        let r = outcomes[0].report.clone().expect("the writer's report");
        assert_eq!((r.writes, r.flushes, r.errors), (WRITES, 0, 0), "{r:?}");
        topo.recovery[0].1.send(Ctl::Inject { kind, arg: 0 });
        std::thread::sleep(wait);
        let t0 = Instant::now();
        let reports = topo.stop();
        let took = t0.elapsed();
        assert_eq!(reports.len(), 1, "{reports:?}");
        let report = &reports[0];
        assert!(report.clean(), "{kind:?}: {report}");
        if kind == FaultKind::Hang {
            // The VMM shuts the controller down itself, unless the drain was still waiting
            // (for the VMM's own flush, in flight when the domain hung) when detection found
            // the hang: then the domain was restarted, its write log replayed, and the stop
            // went through the fresh one.
            let restarted = topo.recovery[0].1.with(|o| !o.detections.is_empty());
            assert!(
                matches!(report.how, StopHow::Device { .. })
                    || (restarted && report.how == StopHow::Domain),
                "{kind:?}: {report}"
            );
        }
        assert!(
            took < Duration::from_secs(20),
            "{kind:?}: took {took:?}: {report}"
        );
        assert_all_there(&dir.join("nvme.img"), &format!("{kind:?}: {report}"));
    }
}

/// SIGINT during `ddvm chaos`: the run stops in order, the report covers what ran (marked
/// stopped, with ddvm's version, the platform, the host and the start time), the clients it
/// stopped before they reported are not counted as errors, and the exit status is 0.
#[test]
fn ctrl_c_during_chaos_ends_it_with_a_report_of_what_ran() {
    let dir = scratch("stop-chaos");
    let json = dir.join("report.json");
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/net.toml");
    let mut child = Command::new(ddvm_bin())
        .args([
            "chaos",
            cfg.to_str().unwrap(),
            "--duration",
            "120s",
            "--every",
            "300ms",
            "--no-baseline",
            "--json",
            json.to_str().unwrap(),
        ])
        .env_remove("DDVM_KVM")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ddvm");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    // A progress line with a recovery says the run is under way.
    let t0 = Instant::now();
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        seen += &line;
        let recovered = line
            .strip_suffix(" recovered\n")
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<u64>().ok());
        if line.starts_with("ddvm chaos: round ") && recovered.is_some_and(|n| n >= 1) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no recovery:\n{seen}"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = seen + &rest;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A progress line instead of a warning per fault.
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("recovering"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ddvm chaos: stopped on request")
            && stdout.contains("stopped on request before its end"),
        "{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["stopped"], true, "{report}");
    assert_eq!(report["client_errors"], 0, "{report}");
    assert!(report["recoveries"].as_u64().unwrap() >= 1, "{report}");
    assert_eq!(report["run"]["ddvm_version"], env!("CARGO_PKG_VERSION"));
    assert!(
        ["pvm", "vmx", "svm"].contains(&report["run"]["platform"].as_str().unwrap_or("")),
        "{report}"
    );
    assert!(
        report["run"]["started"]
            .as_str()
            .is_some_and(|t| t.len() == 20 && t.ends_with('Z')),
        "{report}"
    );
}

/// Chaos targets can be set, and `--strict` makes a missed one the exit status (5); without
/// it a missed target is reported and the exit status says only what the clients saw.
#[test]
fn chaos_targets_are_settable_and_strict_makes_a_miss_the_exit_status() {
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/net.toml");
    let cfg = cfg.to_str().unwrap();
    let args = [
        "chaos",
        cfg,
        "--duration",
        "2s",
        "--every",
        "500ms",
        "--no-baseline",
        "--target-recovery-p99",
        "1us",
    ];
    let run = |strict: bool| {
        let mut a = args.to_vec();
        if strict {
            a.push("--strict");
        }
        let out = Command::new(ddvm_bin())
            .args(&a)
            .env_remove("DDVM_KVM")
            .output()
            .expect("run ddvm");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, text) = run(true);
    assert_eq!(code, Some(5), "{text}");
    assert!(
        text.contains("FAIL  recovery_p99_ms") && text.contains("(target <= 0.00 ms)"),
        "{text}"
    );
    assert!(
        text.contains("--strict: target(s) missed: recovery_p99_ms"),
        "{text}"
    );
    let (code, text) = run(false);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("FAIL  recovery_p99_ms"), "{text}");
}
