//! Reincarnation end to end: real driver domains fail in every way a chaos run injects while
//! real client guests verify every block; the clients never see an error or lose a write.
//! (Built with the `fault-injection` feature.)

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ddvm::blk::Backend;
use ddvm::chaos::{self, ChaosPlan};
use ddvm::config::Config;
use ddvm::console::Echo;
use ddvm::reincarnation::Command;
use ddvm::topology::Topology;
use ddvm_recovery::fault::FaultKind;

use common::*;

fn config(dir: &Path, recovery: &str, workload: &str, clients: usize) -> Config {
    let mut text = format!(
        "[[domain]]\nname = \"nvme0\"\nmemory_mib = 32\nchannel_kib = 8448\n[domain.device]\nkind = \"emulated-nvme\"\nbacking = \"{}\"\nsize_mib = 32\nlba_size = 4096\nvolatile_write_cache = true\n[domain.recovery]\n{recovery}\n",
        dir.join("nvme.img").display()
    );
    for i in 0..clients {
        text += &format!(
            "[[client]]\nname = \"c{i}\"\ndisk = \"nvme0\"\noffset_mib = {}\nsize_mib = 16\nworkload = \"{workload} id={i} seed={}\"\n",
            16 * i,
            i + 1
        );
    }
    Config::parse(Path::new("test.toml"), &text).unwrap()
}

const FAST: &str = "heartbeat_ms = 20\nrequest_deadline_ms = 100\nmax_restarts = 100000\nrestart_delay_ms = 1\nrestart_delay_cap_ms = 5\nboot_timeout_ms = 400\n";

fn hv() -> Arc<ddvm::hypervisor::Hypervisor> {
    Arc::new(kvm())
}

/// Tests here measure the process (threads, fds, memory) and load both cores: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every fault kind, in turn, every 250 ms: each is detected under its own reason and
/// recovered, and neither client sees an error or a wrong block.
#[test]
fn every_fault_kind_is_detected_recovered_and_invisible_to_clients() {
    every_fault_kind("recovery-all", "flush_every=32");
}

/// The same with clients that never flush: everything they wrote since the run began is
/// owed through every reset of the volatile cache, and read back at the end.
#[test]
fn every_fault_kind_with_clients_that_never_flush() {
    every_fault_kind("recovery-all-no-flush", "flush_every=0 verify_pass=1");
}

fn every_fault_kind(name: &str, flushes: &str) {
    let _serial = serial();
    let dir = scratch(name);
    let cfg = config(
        &dir,
        FAST,
        &format!("workload=randrw rwmix=60 bs=4096 qd=16 {flushes}"),
        2,
    );
    // Every kind that acts on a block domain.
    let kinds: Vec<FaultKind> = FaultKind::ALL
        .into_iter()
        .filter(|k| k.acts_on(ddvm_abi::channel::class::BLK))
        .collect();
    let plan = ChaosPlan {
        faults: kinds.clone(),
        every: Duration::from_millis(250),
        // A fault goes in once the last one is recovered from, and a loaded host stretches
        // recoveries (a failed restart's boots time out): room for every kind at twice the
        // period.
        duration: Duration::from_millis(500 * (kinds.len() as u64 + 2)),
        skip_baseline: true,
        rounds: 1,
    };
    let r = chaos::run(
        &hv(),
        &cfg,
        Path::new("test.toml"),
        &plan,
        &ddvm::stop::Stop::new(),
    )
    .unwrap();
    assert_eq!(r.client_errors, 0, "{}", r.table());
    assert_eq!(r.mismatches, 0, "{}", r.table());
    for reason in [
        "operator-kill",
        "panic",
        "heartbeat",
        "exception",
        "shutdown",
        "protocol-index-past-producer",
        "protocol-unknown-tag",
        "protocol-length",
        "protocol-stale-epoch",
        "dma-refused",
        "deadline",
        "boot-timeout",
    ] {
        assert!(
            r.detections.contains_key(reason),
            "{reason} not detected:\n{}",
            r.table()
        );
    }
    assert!(r.recoveries >= kinds.len() as u64 - 1, "{}", r.table());
    for c in &r.clients {
        assert!(c.verified > 0 && c.ops > 0, "{c:?}");
    }
}

/// A run split into rounds alternates fault-free and chaos segments: both sides are measured,
/// the faults of every chaos segment land on one timeline no longer than the run, and each
/// client's counts add up over its segments.
#[test]
fn chaos_rounds_alternate_baseline_and_chaos_segments_on_one_timeline() {
    let _serial = serial();
    let dir = scratch("recovery-rounds");
    let cfg = config(&dir, FAST, "workload=randrw rwmix=50 bs=4096 qd=8", 1);
    let plan = ChaosPlan {
        faults: vec![FaultKind::Kill],
        every: Duration::from_millis(200),
        duration: Duration::from_millis(1000),
        skip_baseline: false,
        rounds: 2,
    };
    let r = chaos::run(
        &hv(),
        &cfg,
        Path::new("test.toml"),
        &plan,
        &ddvm::stop::Stop::new(),
    )
    .unwrap();
    assert_eq!(r.client_errors, 0, "{}", r.table());
    assert_eq!(r.mismatches, 0, "{}", r.table());
    assert!(r.baseline_iops > 0.0 && r.chaos_iops > 0.0, "{}", r.table());
    // Two segments of 500 ms, a kill at 200 and 400 ms in each.
    let kills = r.faults_injected.get("kill").copied().unwrap_or(0);
    assert!(kills >= 4, "{kills} kills\n{}", r.table());
    let marks = r.timeline.marks();
    assert_eq!(marks.len() as u64, kills);
    assert!(
        marks.iter().all(|m| m.at <= plan.duration),
        "marks past the run: {marks:?}"
    );
    assert!(
        marks.iter().any(|m| m.at > plan.duration / 2),
        "the second segment's faults follow the first's: {marks:?}"
    );
    assert!(r.recoveries >= kills - 1, "{}", r.table());
    // Every recovery followed a kill, and is counted under it.
    assert_eq!(
        r.recovery_by_fault.get("kill").map(|s| s.count),
        Some(r.recoveries),
        "{}",
        r.table()
    );
    assert_eq!(r.clients.len(), 1);
    assert_eq!(r.requests, r.clients[0].ops);
}

/// Writes acknowledged but never flushed live only in the device's volatile cache; every
/// restart resets the device, which drops them. The VMM's write log replays them, so the
/// client's final verify pass reads back every acknowledged write.
#[test]
fn writes_a_reset_drops_from_the_volatile_cache_are_replayed() {
    let _serial = serial();
    let dir = scratch("recovery-vwc");
    let cfg = config(
        &dir,
        FAST,
        "workload=randwrite bs=4096 qd=8 duration_ms=1500 flush_every=0 verify_pass=1",
        1,
    );
    let mut topo = Topology::start(&hv(), &cfg, Path::new("test.toml"), Echo::Off).unwrap();
    let handle = topo.recovery[0].1.clone();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(150));
        handle.send(Command::Inject {
            kind: FaultKind::Kill,
            arg: 0,
        });
    }
    let outcomes = topo.wait_clients(Duration::from_secs(60));
    let backend = topo.services[0].stop().unwrap();
    let Backend::Channel(b) = backend else {
        panic!("a channel backend")
    };
    let dropped = b.device_stats().dropped_cached_writes;
    topo.stop();
    let r = outcomes[0].report.clone().expect("report");
    assert!(r.clean(), "{r:?}");
    assert!(r.verified > 0, "{r:?}");
    assert!(dropped > 0, "the resets dropped cached writes ({dropped})");
    assert!(handle.with(|o| o.recovered) >= 6);
}

/// Restarts that fail before ready — the fresh or promoted domain dies during its device's
/// bring-up, or hangs there until the boot timeout — are failures of the epoch that was
/// booting: each is counted, backs off and is followed by another attempt, and the domain that
/// finally comes up replays the write log. The clients write without flushing to a volatile
/// cache each reset drops, and read back every block they wrote: none is lost.
#[test]
fn restarts_that_fail_before_ready_replay_on_the_domain_that_comes_up() {
    let _serial = serial();
    for standbys in [0usize, 2] {
        let dir = scratch(&format!("recovery-failed-restart-{standbys}"));
        let cfg = config(
            &dir,
            &format!("{FAST}standbys = {standbys}\n"),
            "workload=randwrite bs=4096 qd=8 duration_ms=2500 flush_every=0 verify_pass=1",
            2,
        );
        let mut topo = Topology::start(&hv(), &cfg, Path::new("test.toml"), Echo::Off).unwrap();
        let handle = topo.recovery[0].1.clone();
        // One dies then one hangs (the default); then three die in a row.
        for arg in [0, 0x203, 0] {
            std::thread::sleep(Duration::from_millis(250));
            recover_from(
                &handle,
                Command::Inject {
                    kind: FaultKind::FailedRestart,
                    arg,
                },
            );
        }
        let outcomes = topo.wait_clients(Duration::from_secs(60));
        let backend = topo.services[0].stop().unwrap();
        let Backend::Channel(b) = backend else {
            panic!("a channel backend")
        };
        let dropped = b.device_stats().dropped_cached_writes;
        drop(b);
        topo.stop();
        for o in &outcomes {
            let r = o.report.clone().expect("report");
            assert!(r.clean(), "standbys={standbys}: {r:?}");
            assert!(r.verified > 0, "standbys={standbys}: {r:?}");
        }
        assert!(dropped > 0, "the resets dropped cached writes ({dropped})");
        let status = handle.with(|o| o.status.clone()).unwrap();
        // The kill, then 2, 3 and 2 failed boots: 10 failures, each a restart decision (and
        // one more for each request a starved host let pass its deadline meanwhile).
        let late = status.detections.get("deadline").copied().unwrap_or(0);
        assert_eq!(
            status.restarts,
            10 + late,
            "standbys={standbys}: {status:?}"
        );
        assert_eq!(status.duplicates, 0, "standbys={standbys}: {status:?}");
        assert!(!status.broken, "{status:?}");
        assert_eq!(status.detections.get("panic"), Some(&5), "{status:?}");
        assert_eq!(
            status.detections.get("boot-timeout"),
            Some(&2),
            "{status:?}"
        );
        assert_eq!(status.state, "running", "{status:?}");
    }
}

/// Restarts that keep failing before ready exhaust the policy like any other failures: each
/// is counted in the window and backs off, the hook runs for each decision and for the
/// give-up, and then the disk gives up (requests fail with an error status; no block read is
/// wrong), instead of retrying in a loop that the supervisor ignores.
#[test]
fn restarts_that_keep_failing_before_ready_give_up_and_run_the_hook() {
    let _serial = serial();
    let dir = scratch("recovery-failed-restart-giveup");
    let calls = dir.join("hook.log");
    let hook = dir.join("hook.sh");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\necho \"$@\" >> {}\n", calls.display()),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cfg = config(
        &dir,
        &format!(
            "max_restarts = 3\nwindow_ms = 60000\nrestart_delay_ms = 2\nrestart_delay_cap_ms = 100\n\
             heartbeat_ms = 20\nstandbys = 1\nhook = [\"{}\"]\n",
            hook.display()
        ),
        "workload=randrw bs=4096 qd=4 duration_ms=1500 timeout_ms=2000",
        1,
    );
    let mut topo = Topology::start(&hv(), &cfg, Path::new("test.toml"), Echo::Off).unwrap();
    let handle = topo.recovery[0].1.clone();
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    // A kill, then every boot dies during its bring-up.
    handle.send(Command::Inject {
        kind: FaultKind::FailedRestart,
        arg: 0x200 | 20,
    });
    wait_until(&handle, "give-up", |o| {
        o.status.as_ref().is_some_and(|s| s.broken)
    });
    let took = t0.elapsed();
    let outcomes = topo.wait_clients(Duration::from_secs(60));
    let status = handle.with(|o| o.status.clone()).unwrap();
    topo.stop();
    // The kill and two failed boots restarted; the third failed boot gave up.
    assert_eq!(status.restarts, 3, "{status:?}");
    assert_eq!(status.duplicates, 0, "{status:?}");
    assert_eq!(status.state, "gave-up", "{status:?}");
    assert_eq!(status.detections.get("panic"), Some(&3), "{status:?}");
    // Backoff: the restarts after failed boots waited 2 and 4 ms.
    assert!(took >= Duration::from_millis(6), "{took:?}");
    let r = outcomes[0].report.clone().expect("report");
    assert!(r.errors > 0, "errors reach the client: {r:?}");
    assert_eq!(r.mismatches, 0, "{r:?}");
    // The hook: one run per restart decision and one for the give-up, the count rising.
    let t0 = Instant::now();
    let lines = loop {
        let text = std::fs::read_to_string(&calls).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= 4 || t0.elapsed() > Duration::from_secs(10) {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(lines[0].starts_with("nvme0 operator-kill"), "{lines:?}");
    assert!(
        lines[1..].iter().all(|l| l.starts_with("nvme0 panic")),
        "{lines:?}"
    );
}

/// An operator update to an image that crashes at its first instruction: each boot of it
/// fails before ready, backs off and counts, and the policy gives up (holding the requests);
/// an update back to a good image then recovers the disk, replays the write log, and the
/// clients, which never flush, finish without an error and read back every block.
#[test]
fn an_update_to_a_crashing_image_gives_up_and_an_update_back_recovers() {
    let _serial = serial();
    let dir = scratch("recovery-bad-update");
    let bad = ddvm::loader::Image::from_file(&crashing_image(&dir)).unwrap();
    let cfg = config(
        &dir,
        "max_restarts = 3\nwindow_ms = 60000\nrestart_delay_ms = 1\nheartbeat_ms = 20\n\
         on_give_up = \"hold\"\nstandbys = 1\n",
        "workload=randwrite bs=4096 qd=8 duration_ms=1500 flush_every=0 verify_pass=1",
        1,
    );
    let mut topo = Topology::start(&hv(), &cfg, Path::new("test.toml"), Echo::Off).unwrap();
    let handle = topo.recovery[0].1.clone();
    std::thread::sleep(Duration::from_millis(300));
    handle.send(Command::Update(bad));
    wait_until(&handle, "give-up", |o| {
        o.status.as_ref().is_some_and(|s| s.state == "gave-up")
    });
    let status = handle.with(|o| o.status.clone()).unwrap();
    // The update starts a fresh window: three restarts after failed boots, and the fourth
    // failed boot gives up.
    assert_eq!(status.restarts, 3, "{status:?}");
    assert_eq!(status.duplicates, 0, "{status:?}");
    assert!(!status.broken, "requests are held: {status:?}");
    std::thread::sleep(Duration::from_millis(200));
    handle.send(Command::Update(ddvm::builtin_driver_domain()));
    wait_until(&handle, "running again", |o| {
        o.status.as_ref().is_some_and(|s| s.state == "running")
    });
    let outcomes = topo.wait_clients(Duration::from_secs(60));
    let status = handle.with(|o| o.status.clone()).unwrap();
    topo.stop();
    let r = outcomes[0].report.clone().expect("report");
    assert!(r.clean(), "{r:?}\n{status:?}");
    assert!(r.verified > 0, "{r:?}");
    assert_eq!(status.operator_restarts, 2, "{status:?}");
    assert_eq!(status.detections.get("shutdown"), Some(&4), "{status:?}");
}

/// A write replayed after a restart that the next domain completes with an error (it never
/// reached the device) is not dropped: the domain has failed, the write stays in the log, and
/// the domain after it replays it again. The clients, which never flush, read back every
/// block they wrote.
#[test]
fn a_replayed_write_that_fails_is_replayed_again() {
    let _serial = serial();
    for standbys in [0usize, 2] {
        let dir = scratch(&format!("recovery-failed-replay-{standbys}"));
        let cfg = config(
            &dir,
            &format!("{FAST}standbys = {standbys}\n"),
            // Each block written once (3,800 of the client's 4,096): a write whose replay is
            // lost is never written again, and the final pass reads it back.
            "workload=seqwrite bs=4096 qd=4 count=3800 flush_every=0 verify_pass=1",
            1,
        );
        let mut topo = Topology::start(&hv(), &cfg, Path::new("test.toml"), Echo::Off).unwrap();
        let handle = topo.recovery[0].1.clone();
        // The fault arms the next domain to fail the first write it is replayed; with none
        // to replay (the last flush made every write durable and the client has none in
        // flight: on one CPU the client may not have run since) it is a plain kill. Inject
        // until four replays have failed.
        let failed = || {
            handle.with(|o| {
                o.status
                    .as_ref()
                    .and_then(|s| s.detections.get("replay-failed").copied())
                    .unwrap_or(0)
            })
        };
        let mut injected = 0;
        while failed() < 4 {
            assert!(injected < 40, "{injected} injected\n{}", describe(&handle));
            std::thread::sleep(Duration::from_millis(40));
            recover_from(
                &handle,
                Command::Inject {
                    kind: FaultKind::FailedReplay,
                    arg: 0,
                },
            );
            injected += 1;
        }
        let outcomes = topo.wait_clients(Duration::from_secs(60));
        let status = handle.with(|o| o.status.clone()).unwrap();
        topo.stop();
        let r = outcomes[0].report.clone().expect("report");
        assert!(r.clean(), "standbys={standbys}: {r:?}");
        assert!(r.verified > 0, "{r:?}");
        let failed = status.detections.get("replay-failed").copied().unwrap_or(0);
        assert!(
            (4..=injected).contains(&failed),
            "standbys={standbys}, {injected} injected: {status:?}"
        );
        assert_eq!(status.duplicates, 0, "{status:?}");
    }
}

/// A flush that fails (the domain completes it with an error; the device never saw it) may
/// leave acknowledged writes only in a cache: the domain is failed, the next one replays the
/// write log and the flush is posted again. The client's flushes all succeed, and it reads
/// back every block it wrote.
#[test]
fn a_failed_flush_fails_the_domain_and_the_flush_is_retried_after_the_replay() {
    let _serial = serial();
    let dir = scratch("recovery-failed-flush");
    let cfg = config(
        &dir,
        FAST,
        "workload=randwrite bs=4096 qd=8 duration_ms=2000 flush_every=16 verify_pass=1",
        1,
    );
    let mut topo = Topology::start(&hv(), &cfg, Path::new("test.toml"), Echo::Off).unwrap();
    let handle = topo.recovery[0].1.clone();
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(200));
        recover_from(
            &handle,
            Command::Inject {
                kind: FaultKind::FailedFlush,
                arg: 0,
            },
        );
    }
    let outcomes = topo.wait_clients(Duration::from_secs(60));
    let status = handle.with(|o| o.status.clone()).unwrap();
    topo.stop();
    let r = outcomes[0].report.clone().expect("report");
    assert!(r.clean(), "{r:?}\n{status:?}");
    assert!(r.verified > 0 && r.flushes > 0, "{r:?}");
    // Each injected fault fails a flush, and the domain with it; on a starved host a request
    // may pass its deadline first, and that domain dies before its armed flush fails.
    let failed = status.detections.get("flush-failed").copied().unwrap_or(0);
    let late = status.detections.get("deadline").copied().unwrap_or(0);
    assert!(failed >= 1 && failed + late == 4, "{status:?}");
    assert_eq!(status.duplicates, 0, "{status:?}");
}

/// Sends `command` and waits until the disk has recovered from what it caused.
fn recover_from(handle: &ddvm::reincarnation::RecoveryHandle, command: Command) {
    let before = handle.with(|o| o.recovered);
    handle.send(command);
    wait_until(handle, "a recovery", |o| o.recovered > before);
}

/// Waits until `f` holds for what the disk's service publishes.
fn wait_until(
    handle: &ddvm::reincarnation::RecoveryHandle,
    what: &str,
    f: impl Fn(&ddvm::reincarnation::Observed) -> bool,
) {
    let t0 = Instant::now();
    while !handle.with(&f) {
        if t0.elapsed() >= Duration::from_secs(10) {
            panic!("never: {what}\n{}", describe(handle));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// What the disk's service publishes, and its last events: what a failed wait prints.
fn describe(handle: &ddvm::reincarnation::RecoveryHandle) -> String {
    let observed = handle.with(|o| {
        format!(
            "recovered {} promoted {} in flight {} queued {} standbys {:?} status {:#?}",
            o.recovered, o.promoted, o.in_flight, o.queued, o.standbys, o.status
        )
    });
    let events = handle.events.lock().unwrap();
    let first = events.next_seq().saturating_sub(20);
    let last: Vec<_> = events.since(first).collect();
    format!(
        "{observed}\nlast events: {}",
        serde_json::to_string_pretty(&last).unwrap_or_default()
    )
}

/// Each restart promotes the oldest warm standby (its epoch becomes the live one) and the pool
/// fills again behind it; with `standbys = 0` every restart boots a fresh domain.
#[test]
fn restarts_promote_a_warm_standby_and_refill_the_pool() {
    let _serial = serial();
    for standbys in [2usize, 0] {
        let dir = scratch(&format!("recovery-standby-{standbys}"));
        let cfg = config(
            &dir,
            &format!("{FAST}standbys = {standbys}\n"),
            "workload=randrw bs=4096 qd=8 duration_ms=1000",
            1,
        );
        let mut topo = Topology::start(&hv(), &cfg, Path::new("test.toml"), Echo::Off).unwrap();
        let handle = topo.recovery[0].1.clone();
        for round in 1..=3 {
            wait_until(&handle, "a full pool", |o| o.standbys.len() == standbys);
            let pool = handle.with(|o| o.standbys.clone());
            recover_from(&handle, Command::Kill);
            let (epoch, promoted) =
                handle.with(|o| (o.status.as_ref().and_then(|s| s.epoch), o.promoted));
            if standbys > 0 {
                assert_eq!(
                    epoch,
                    pool.first().copied(),
                    "round {round}: the oldest took over"
                );
                assert_eq!(promoted, round, "round {round}");
                wait_until(&handle, "the pool refilled", |o| {
                    o.standbys.len() == standbys && o.standbys.last() > pool.last()
                });
            } else {
                assert_eq!(promoted, 0, "round {round}");
                assert!(handle.with(|o| o.standbys.is_empty()));
            }
        }
        let outcomes = topo.wait_clients(Duration::from_secs(60));
        topo.stop();
        let r = outcomes[0].report.clone().expect("report");
        assert!(r.clean(), "standbys={standbys}: {r:?}");
    }
}

/// Too many failures in the window: the supervisor gives up, pending and new requests fail
/// with VIRTIO_BLK_S_IOERR (errors pushed up), and the device is marked broken.
#[test]
fn giving_up_fails_requests_with_an_error_status() {
    let _serial = serial();
    let dir = scratch("recovery-giveup");
    let cfg = config(
        &dir,
        "max_restarts = 2\nwindow_ms = 60000\nrestart_delay_ms = 0\nheartbeat_ms = 20\n",
        "workload=randrw bs=4096 qd=4 duration_ms=2000 timeout_ms=2000",
        1,
    );
    let mut topo = Topology::start(&hv(), &cfg, Path::new("test.toml"), Echo::Off).unwrap();
    let handle = topo.recovery[0].1.clone();
    let t0 = Instant::now();
    while !handle.with(|o| o.status.as_ref().is_some_and(|s| s.broken)) {
        assert!(t0.elapsed() < Duration::from_secs(10), "never gave up");
        handle.send(Command::Inject {
            kind: FaultKind::Panic,
            arg: 0,
        });
        std::thread::sleep(Duration::from_millis(50));
    }
    let outcomes = topo.wait_clients(Duration::from_secs(60));
    topo.stop();
    let r = outcomes[0].report.clone().expect("report");
    assert!(r.errors > 0, "errors reach the client: {r:?}");
    assert_eq!(r.mismatches, 0, "{r:?}");
    let events = handle.events.lock().unwrap();
    let json = serde_json::to_string(&events.since(0).collect::<Vec<_>>()).unwrap();
    assert!(
        json.contains("gave-up") || json.contains("gave_up"),
        "{json}"
    );
}

/// A broken invariant of the VMM's own bookkeeping (here: the tags of the requests in flight
/// forgotten, so a completion finds no shadow entry) stops the disk loudly: a give-up with
/// reason `vmm-invariant` however generous the policy, requests failing with an error status
/// (not hanging, not retried on a fresh domain), and no wrong block.
#[test]
fn a_broken_vmm_invariant_gives_the_disk_up_loudly() {
    let _serial = serial();
    let dir = scratch("recovery-invariant");
    let cfg = config(
        &dir,
        FAST,
        "workload=randrw bs=4096 qd=8 duration_ms=3000 timeout_ms=2000",
        1,
    );
    let mut topo = Topology::start(&hv(), &cfg, Path::new("test.toml"), Echo::Off).unwrap();
    let handle = topo.recovery[0].1.clone();
    // Once the client has requests in flight.
    wait_until(&handle, "requests in flight", |o| o.in_flight > 0);
    handle.send(Command::Inject {
        kind: FaultKind::VmmInvariant,
        arg: 0,
    });
    wait_until(&handle, "a give-up", |o| {
        o.status.as_ref().is_some_and(|s| s.broken)
    });
    let outcomes = topo.wait_clients(Duration::from_secs(60));
    topo.stop();
    let r = outcomes[0].report.clone().expect("report");
    assert!(r.errors > 0, "errors reach the client: {r:?}");
    assert_eq!(r.mismatches, 0, "{r:?}");
    let events = handle.events.lock().unwrap();
    let all: Vec<_> = events.since(0).collect();
    let json = serde_json::to_string(&all).unwrap();
    assert!(json.contains("vmm-invariant"), "{json}");
    assert!(json.contains("has no shadow entry"), "{json}");
    // Given up at once: no restart was attempted for it.
    assert_eq!(handle.with(|o| o.recovered), 0, "{json}");
}

/// An operator restart and a live update to a (new) image: the clients see neither.
#[test]
fn operator_restart_and_live_update_cause_no_client_errors() {
    let _serial = serial();
    let dir = scratch("recovery-update");
    let cfg = config(
        &dir,
        FAST,
        "workload=randrw bs=4096 qd=8 duration_ms=1200",
        1,
    );
    let mut topo = Topology::start(&hv(), &cfg, Path::new("test.toml"), Echo::Off).unwrap();
    let handle = topo.recovery[0].1.clone();
    std::thread::sleep(Duration::from_millis(300));
    handle.send(Command::Restart);
    std::thread::sleep(Duration::from_millis(300));
    handle.send(Command::Update(ddvm::builtin_driver_domain()));
    let outcomes = topo.wait_clients(Duration::from_secs(60));
    topo.stop();
    let r = outcomes[0].report.clone().expect("report");
    assert!(r.clean(), "{r:?}");
    let status = handle.with(|o| o.status.clone()).unwrap();
    assert!(status.epoch >= Some(3), "two restarts: {status:?}");
    let events = handle.events.lock().unwrap();
    let json = serde_json::to_string(&events.since(0).collect::<Vec<_>>()).unwrap();
    assert!(json.contains("update"), "{json}");
}

/// A thousand restarts under load: file descriptors, threads and memory stay flat.
#[test]
fn a_thousand_restarts_leak_nothing() {
    let _serial = serial();
    let dir = scratch("recovery-soak");
    let cfg = config(
        &dir,
        FAST,
        "workload=randrw bs=4096 qd=4 duration_ms=600000",
        1,
    );
    let mut topo = Topology::start(&hv(), &cfg, Path::new("test.toml"), Echo::Off).unwrap();
    let handle = topo.recovery[0].1.clone();
    let restart = |n: usize| {
        for _ in 0..n {
            recover_from(&handle, Command::Kill);
            // Every restart goes through a standby; the pool is full again before the next
            // kill (and no boot is under way when the process is measured).
            wait_until(&handle, "a full pool", |o| {
                o.standbys.len() == ddvm_recovery::policy::DEFAULT_STANDBYS as usize
            });
        }
    };
    // Warm up until the bounded buffers are in use (the write log and its replay copy hold up
    // to 4 MiB each; measured: RSS steps up over the first ~200 restarts, then moves within a
    // few MiB), so the 1,000 that follow measure leaks, not filling.
    restart(200);
    let (fds, threads, rss) = (fd_count(), thread_count(), rss_kib());
    restart(1000);
    let (fds2, threads2, rss2) = (fd_count(), thread_count(), rss_kib());
    println!(
        "1000 restarts: fds {fds}->{fds2}, threads {threads}->{threads2}, rss {rss}->{rss2} KiB"
    );
    for c in &mut topo.clients {
        c.guest_mut().stop();
    }
    topo.stop();
    assert!(fds2 <= fds + 2, "fds {fds} -> {fds2}");
    assert!(threads2 <= threads + 1, "threads {threads} -> {threads2}");
    assert!(rss2 < rss + 16 * 1024, "rss {rss} -> {rss2} KiB");
    assert_eq!(
        handle.with(|o| o.promoted),
        1200,
        "every restart promoted a standby"
    );
}

/// `ddvm ctl` over the control socket: status, kill (recovered, no client error), inject,
/// events; bad requests get errors.
#[test]
fn the_control_socket_reports_status_and_takes_commands() {
    let _serial = serial();
    let dir = scratch("recovery-ctl");
    let cfg = config(
        &dir,
        FAST,
        "workload=randrw bs=4096 qd=8 duration_ms=1500",
        1,
    );
    let mut topo = Topology::start(&hv(), &cfg, Path::new("test.toml"), Echo::Off).unwrap();
    let sock = dir.join("ctl.sock");
    let server = ddvm::control::ControlServer::start(&sock, topo.recovery.clone()).unwrap();
    let ctl = |args: &[&str]| {
        let mut a = vec!["ctl", sock.to_str().unwrap()];
        a.extend_from_slice(args);
        let out = ddvm(&a);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        (out.status.success(), text)
    };
    let (ok, status) = ctl(&["status"]);
    assert!(
        ok && status.contains("\"nvme0\"") && status.contains("\"running\""),
        "{status}"
    );
    let (ok, text) = ctl(&["kill", "nvme0"]);
    assert!(ok, "{text}");
    std::thread::sleep(Duration::from_millis(200));
    let (ok, text) = ctl(&["inject", "nvme0", "panic"]);
    assert!(ok, "{text}");
    std::thread::sleep(Duration::from_millis(200));
    let (ok, status) = ctl(&["status"]);
    assert!(ok && status.contains("\"restarts\": 2"), "{status}");
    let (ok, events) = ctl(&["events"]);
    assert!(
        ok && events.contains("operator-kill") && events.contains("panic"),
        "{events}"
    );
    let (ok, text) = ctl(&["kill", "nope"]);
    assert!(!ok && text.contains("nope"), "{text}");
    let (ok, _) = ctl(&["inject", "nvme0", "explode"]);
    assert!(!ok);
    let outcomes = topo.wait_clients(Duration::from_secs(60));
    drop(server);
    topo.stop();
    let r = outcomes[0].report.clone().expect("report");
    assert!(r.clean(), "{r:?}");
}

/// The tid of this process's thread named `name`.
fn thread_named(name: &str) -> Option<i32> {
    std::fs::read_dir("/proc/self/task").ok()?.find_map(|e| {
        let e = e.ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim_end() == name).then(|| e.file_name().to_str()?.parse().ok())?
    })
}

/// A domain the host starves (its vCPU thread in `SCHED_IDLE` while spinning threads keep
/// every core busy) serves far slower than the 100 ms deadline on the wall clock. Detection
/// leaves out the time it waited for a CPU, so it is not failed, and its client sees no error.
#[test]
fn a_domain_the_host_starves_is_not_failed() {
    let _serial = serial();
    let dir = scratch("recovery-starved");
    let cfg = config(
        &dir,
        &format!("{FAST}standbys = 0\n"),
        "workload=randrw bs=4096 qd=4 duration_ms=3000",
        1,
    );
    let mut topo = Topology::start(&hv(), &cfg, Path::new("test.toml"), Echo::Off).unwrap();
    let handle = topo.recovery[0].1.clone();
    std::thread::sleep(Duration::from_millis(300));
    let tid = thread_named("vcpu-nvme0").expect("the domain's vCPU thread");
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param; the call only changes the thread's policy.
    let r = unsafe { libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cpus = std::thread::available_parallelism().unwrap().get();
    let spinners: Vec<_> = (0..2 * cpus)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in spinners {
        s.join().unwrap();
    }
    // Back to the default policy: on a host busy with other work a domain in SCHED_IDLE
    // would hardly run at all.
    // SAFETY: as above.
    let r = unsafe { libc::sched_setscheduler(tid, libc::SCHED_OTHER, &param) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let outcomes = topo.wait_clients(Duration::from_secs(60));
    let (detections, stalls, discounted) =
        handle.with(|o| (o.detections.clone(), o.stalls, o.discounted));
    topo.stop();
    let r = outcomes[0].report.clone().expect("report");
    assert!(detections.is_empty(), "{detections:?}, {stalls:?}");
    assert!(r.clean() && r.ops > 0, "{r:?}");
    assert!(
        stalls.domain >= Duration::from_millis(200),
        "the domain waited for a CPU: {stalls:?}"
    );
    assert!(discounted >= Duration::from_millis(200), "{discounted:?}");
}
