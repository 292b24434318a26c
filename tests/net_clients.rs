//! Workload client guests on the network (`workload=net-echo`), end to end on this machine's
//! KVM: two clients on one NIC domain (their frames hairpinned by the VMM) and a client of that
//! domain with one of a second NIC domain across the in-process wire pair, every byte of every
//! frame checked when it comes back; the same while the NIC domains are killed again and again
//! and (a fault-injection build) while every fault kind that applies to a NIC domain goes in.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ddvm::client::NetEchoReport;
use ddvm::config::Config;
use ddvm::console::Echo;
use ddvm::reincarnation::{Command, RecoveryHandle};
use ddvm::topology::{ClientOutcome, Topology};
use ddvm::vcpu::GuestExit;

use common::*;

const FAST: &str = "heartbeat_ms = 20\nrequest_deadline_ms = 100\nmax_restarts = 100000\nrestart_delay_ms = 1\nrestart_delay_cap_ms = 5\nboot_timeout_ms = 400\n";

/// Senders a (to b, on the same NIC domain) and c (to d, on the other side of the wire).
const SENDERS: [&str; 2] = ["a", "c"];

/// nic0 with clients a, b, c; nic1 with client d; `count` frames per sender (or `duration_ms`
/// when `count` is 0).
/// Each test boots two NIC domains and four clients and loads both cores: one at a time, so
/// a first boot is not starved past its boot timeout by a neighbouring test.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn topology(recovery: &str, count: u64) -> String {
    let mut t = String::new();
    for (me, other) in [("nic0", "nic1"), ("nic1", "nic0")] {
        t += &format!(
            "[[domain]]\nname = \"{me}\"\n[domain.device]\nkind = \"emulated-e1000\"\nwire = {{ kind = \"pair\", with = \"{other}\" }}\n[domain.recovery]\n{recovery}\n"
        );
    }
    let amount = if count == 0 {
        "duration_ms=1000".to_string()
    } else {
        format!("count={count}")
    };
    for (name, nic, role, peer, seed) in [
        ("a", "nic0", "send", "0b", 1),
        ("b", "nic0", "echo", "0a", 1),
        ("c", "nic0", "send", "0d", 3),
        ("d", "nic1", "echo", "0c", 3),
    ] {
        let mine =
            u8::from_str_radix(&format!("{:x}", name.as_bytes()[0] - b'a' + 10), 16).expect("hex");
        let extra = if role == "send" {
            format!(" {amount} window=8 retry_ms=30")
        } else {
            " timeout_ms=30000".into()
        };
        t += &format!(
            "[[client]]\nname = \"{name}\"\nnic = \"{nic}\"\nmac = \"52:54:00:00:00:{mine:02x}\"\nworkload = \"workload=net-echo role={role} peer=52:54:00:00:00:{peer} seed={seed}{extra}\"\n"
        );
    }
    t
}

fn start(text: &str) -> Topology {
    let config = Config::parse(Path::new("test.toml"), text).unwrap();
    Topology::start(&Arc::new(kvm()), &config, Path::new("test.toml"), Echo::Off).unwrap()
}

fn handle(topo: &Topology, name: &str) -> RecoveryHandle {
    topo.recovery
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, h)| h.clone())
        .unwrap_or_else(|| panic!("no recovery handle for {name}"))
}

/// Every client exited 0 with a clean net-echo report, no corrupt frame and the link never
/// read down; each sender got all of its `count` frames back (any count when 0). Returns the
/// reports by client name.
fn check(outcomes: Vec<ClientOutcome>, count: u64) -> Vec<(String, NetEchoReport)> {
    assert_eq!(outcomes.len(), 4);
    outcomes
        .into_iter()
        .map(|o| {
            let r = o
                .net
                .clone()
                .unwrap_or_else(|| panic!("{}: no net-echo report ({:?})", o.name, o.exit));
            assert!(r.clean(), "{}: {r:?}", o.name);
            assert_eq!(r.corrupt, 0, "{}: {r:?}", o.name);
            assert_eq!(r.link_down, 0, "{}: {r:?}", o.name);
            assert!(r.link_samples > 0, "{}: {r:?}", o.name);
            assert_eq!(o.exit, Some(GuestExit::Exited { status: 0 }), "{}", o.name);
            if SENDERS.contains(&o.name.as_str()) {
                assert_eq!(r.role, "send");
                if count > 0 {
                    assert_eq!(r.frames, count, "{}: {r:?}", o.name);
                }
                assert!(r.frames > 0 && r.frames == r.count, "{}: {r:?}", o.name);
            } else {
                assert_eq!(r.role, "echo");
                assert!(r.frames > 0, "{}: {r:?}", o.name);
            }
            (o.name, r)
        })
        .collect()
}

/// Client a's frames to b are hairpinned by the VMM's switch; c's go out nic0's e1000, across
/// the wire pair, into nic1 and to d, and back the same way. Every frame comes back intact.
#[test]
fn clients_exchange_verified_frames_hairpinned_and_across_the_wire() {
    let _serial = serial();
    let mut topo = start(&topology(FAST, 600));
    let outcomes = topo.wait_clients(Duration::from_secs(120));
    topo.stop();
    let reports = check(outcomes, 600);
    for (name, r) in &reports {
        // No domain restarted: nothing was lost, so a duplicate is a retried frame come back
        // twice.
        if SENDERS.contains(&name.as_str()) {
            assert!(r.duplicates <= r.retries, "{name}: {r:?}");
        }
    }
}

/// Both NIC domains killed over and over through their recovery handles while the clients
/// exchange frames: every frame is eventually delivered (retried after a loss), none corrupt,
/// every kill recovered, and no client ever sees its link go down.
#[test]
fn frames_survive_nic_domains_killed_under_traffic() {
    let _serial = serial();
    let count = 4000;
    let mut topo = start(&topology(FAST, count));
    let nic0 = handle(&topo, "nic0");
    let nic1 = handle(&topo, "nic1");
    let kills = 6u64;
    let t0 = Instant::now();
    for i in 0..kills {
        std::thread::sleep(Duration::from_millis(250));
        let h = if i % 3 == 2 { &nic1 } else { &nic0 };
        let before = h.with(|o| o.recovered);
        h.send(Command::Kill);
        while h.with(|o| o.recovered) == before {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "kill {i} never recovered"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let outcomes = topo.wait_clients(Duration::from_secs(120));
    let recovered = nic0.with(|o| o.recovered) + nic1.with(|o| o.recovered);
    topo.stop();
    let reports = check(outcomes, count);
    assert!(
        recovered >= kills,
        "{recovered} recoveries of {kills} kills"
    );
    let c = &reports.iter().find(|(n, _)| n == "c").unwrap().1;
    println!(
        "kills {kills}, recoveries {recovered}; c: retries {} duplicates {} rtt max {} us; a: retries {}",
        c.retries,
        c.duplicates,
        c.rtt_us.max,
        reports[0].1.retries
    );
}

/// Every fault kind that applies to a NIC domain (all but failed-flush, which acts on block
/// flushes only; link-flap included), into both NIC domains in turn under traffic: each is
/// recovered, no client sees a corrupt frame, an error or its link down.
#[cfg(feature = "fault-injection")]
#[test]
fn every_nic_fault_kind_is_recovered_and_invisible_to_clients() {
    let _serial = serial();
    use ddvm::chaos::{self, ChaosPlan};
    use ddvm_recovery::fault::FaultKind;
    const { assert!(ddvm::chaos::ENABLED) };
    let kinds: Vec<FaultKind> = FaultKind::ALL
        .into_iter()
        .filter(|k| k.acts_on(ddvm_abi::channel::class::NET))
        .collect();
    let config = Config::parse(Path::new("test.toml"), &topology(FAST, 0)).unwrap();
    let plan = ChaosPlan {
        faults: kinds.clone(),
        every: Duration::from_millis(200),
        // Each kind into each domain, with room for faults held back until the last recovery.
        duration: Duration::from_millis(200) * (4 * kinds.len() as u32),
        skip_baseline: true,
        rounds: 1,
    };
    let r = chaos::run(&Arc::new(kvm()), &config, Path::new("test.toml"), &plan).unwrap();
    println!("{}", r.table());
    assert_eq!(r.client_errors, 0, "{}", r.table());
    assert_eq!(r.mismatches, 0, "{}", r.table());
    for k in &kinds {
        assert!(
            r.faults_injected.get(k.name()).copied().unwrap_or(0) > 0,
            "{} never injected\n{}",
            k.name(),
            r.table()
        );
    }
    assert!(
        r.recoveries >= kinds.len() as u64,
        "{} recoveries\n{}",
        r.recoveries,
        r.table()
    );
    assert_eq!(r.clients.len(), 4, "{}", r.table());
    for c in &r.clients {
        assert!(c.ops > 0 && c.verified > 0, "{c:?}");
    }
}
