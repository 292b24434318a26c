//! Client guests end to end: the workload client guest (virtio-drivers as its virtio-blk
//! driver) verifies every block it reads, through an NVMe driver domain and through the
//! direct-file baseline, alone and two at once; a hostile client gets error statuses or
//! DEVICE_NEEDS_RESET while the driver domain and the other client go on untouched.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ddvm::config::Config;
use ddvm::console::Echo;
use ddvm::topology::Topology;
use ddvm::vcpu::GuestExit;

use common::*;

fn domain(dir: &Path, size_mib: u64) -> String {
    format!(
        "[[domain]]\nname = \"nvme0\"\nmemory_mib = 32\nchannel_kib = 8448\n[domain.device]\nkind = \"emulated-nvme\"\nbacking = \"{}\"\nsize_mib = {size_mib}\nlba_size = 4096\nvolatile_write_cache = true\n",
        dir.join("nvme.img").display()
    )
}

fn client(name: &str, disk: &str, offset_mib: u64, size_mib: u64, workload: &str) -> String {
    format!(
        "[[client]]\nname = \"{name}\"\ndisk = \"{disk}\"\noffset_mib = {offset_mib}\nsize_mib = {size_mib}\nworkload = \"{workload}\"\n"
    )
}

fn start(text: &str) -> Topology {
    let config = Config::parse(Path::new("test.toml"), text).unwrap();
    Topology::start(
        &std::sync::Arc::new(kvm()),
        &config,
        Path::new("test.toml"),
        Echo::Off,
    )
    .unwrap()
}

/// Runs the topology to the end; asserts every client verified cleanly; returns the reports.
fn run_clean(text: &str) -> Vec<ddvm::client::WorkloadReport> {
    let mut topo = start(text);
    let outcomes = topo.wait_clients(Duration::from_secs(120));
    for s in &mut topo.services {
        assert!(!s.is_finished(), "disk {}: service died", s.name());
    }
    topo.stop();
    outcomes
        .into_iter()
        .map(|o| {
            let r = o
                .report
                .unwrap_or_else(|| panic!("{}: no report ({:?})", o.name, o.exit));
            assert!(r.clean(), "{}: {r:?}", o.name);
            assert_eq!(o.exit, Some(GuestExit::Exited { status: 0 }), "{}", o.name);
            assert!(r.verified > 0 && r.writes > 0, "{}: {r:?}", o.name);
            r
        })
        .collect()
}

#[test]
fn a_client_verifies_every_block_through_a_driver_domain() {
    let dir = scratch("client-dd");
    let text = domain(&dir, 16)
        + &client(
            "c0",
            "nvme0",
            0,
            16,
            "workload=randrw rwmix=50 bs=4096 qd=16 count=4000 seed=3",
        );
    let r = run_clean(&text);
    assert_eq!(r[0].ops, 4000);
}

/// The domain's vCPU thread serves the disk in the wait exits it pays anyway (device passes,
/// completions, new requests), and the domain resumes at once when that made progress.
#[test]
fn the_domain_thread_serves_the_disk_in_its_waits() {
    let dir = scratch("client-dd-waits");
    let text = domain(&dir, 16)
        + &client(
            "c0",
            "nvme0",
            0,
            16,
            "workload=randread bs=4096 qd=32 count=20000 seed=5",
        );
    let mut topo = start(&text);
    let outcomes = topo.wait_clients(Duration::from_secs(120));
    let passes = topo.services[0]
        .counters()
        .domain_passes
        .load(Ordering::Relaxed);
    topo.stop();
    let r = outcomes[0].report.clone().expect("report");
    assert!(r.clean(), "{r:?}");
    assert!(passes > 0, "no pass ran on the domain's thread");
}

/// Where the VMM has one CPU, a driver domain waits as soon as it has nothing to do and its
/// waits watch the clients' notifications: a client's request goes from its kick to the
/// domain's thread, and the block service's thread sleeps through the run instead of waking
/// for every request.
#[test]
fn on_one_cpu_the_domain_s_waits_take_the_clients_requests() {
    let dir = scratch("client-dd-one-cpu");
    let text = domain(&dir, 16)
        + &client(
            "c0",
            "nvme0",
            0,
            16,
            "workload=randread bs=4096 qd=1 count=3000 seed=7",
        );
    // Every thread the topology starts inherits this thread's CPU.
    pin_to_one_cpu();
    let mut topo = start(&text);
    let outcomes = topo.wait_clients(Duration::from_secs(120));
    let counters = topo.services[0].counters();
    let (answered, sleeps, passes) = (
        counters.answered.load(Ordering::Relaxed),
        counters.sleeps.load(Ordering::Relaxed),
        counters.domain_passes.load(Ordering::Relaxed),
    );
    topo.stop();
    let r = outcomes[0].report.clone().expect("report");
    assert!(r.clean(), "{r:?}");
    assert!(answered >= 3000, "{answered} answered");
    assert!(
        sleeps * 4 < answered,
        "the service woke {sleeps} times for {answered} requests"
    );
    assert!(
        passes >= answered,
        "{passes} passes for {answered} requests"
    );
}

#[test]
fn a_client_verifies_every_block_on_the_direct_file_baseline() {
    let dir = scratch("client-file");
    let disk = format!("file:{}", dir.join("direct.img").display());
    let text = client(
        "c0",
        &disk,
        0,
        16,
        "workload=randrw rwmix=50 bs=4096 qd=16 count=4000 seed=4",
    );
    run_clean(&text);
}

#[test]
fn two_clients_share_one_driver_domain_each_in_its_own_range() {
    let dir = scratch("client-two");
    let text = domain(&dir, 32)
        + &client(
            "c0",
            "nvme0",
            0,
            16,
            "workload=randrw bs=4096 qd=16 count=3000 id=0 seed=5",
        )
        + &client(
            "c1",
            "nvme0",
            16,
            16,
            "workload=seqwrite bs=131072 qd=4 count=200 id=1 seed=6 verify_pass=1",
        );
    let r = run_clean(&text);
    assert_eq!(r[0].id, 0);
    assert_eq!(r[1].id, 1);
}

/// Every hostile case the workload client can send (`hostile=CASE`), each by a real guest
/// next to a well-behaved client on the same driver domain.
#[test]
fn a_hostile_client_gets_errors_and_harms_nobody() {
    let cases = [
        "desc-loop",
        "addr-outside",
        "write-only-header",
        "read-only-status",
        "zero-length",
        "chain-too-long",
        "sector-out-of-range",
        "avail-jump",
    ];
    let dir = scratch("client-hostile");
    let mut text = domain(&dir, 32)
        + &client(
            "good",
            "nvme0",
            0,
            16,
            "workload=randrw bs=4096 qd=8 count=6000 id=7 seed=7",
        );
    for (i, case) in cases.iter().enumerate() {
        text += &client(
            &format!("bad{i}"),
            "nvme0",
            16,
            1,
            &format!("hostile={case}"),
        )
        .replace("offset_mib = 16", &format!("offset_mib = {}", 16 + i));
    }
    let mut topo = start(&text);
    let outcomes = topo.wait_clients(Duration::from_secs(120));
    let svc = &topo.services[0];
    assert!(!svc.is_finished(), "the block service survived");
    let resets: u64 = svc
        .ports()
        .iter()
        .map(|p| p.counters.needs_reset.load(Ordering::Relaxed))
        .sum();
    topo.stop();
    let good = &outcomes[0];
    assert!(good.ok(), "the good client is untouched: {good:?}");
    for (o, case) in outcomes[1..].iter().zip(cases) {
        let text = o.hostile.clone().unwrap_or_default();
        assert_eq!(
            o.exit,
            Some(GuestExit::Exited { status: 0 }),
            "{case}: {text}"
        );
        assert!(
            text.contains(&format!("\"case\":\"{case}\"")),
            "{case}: {text}"
        );
        let handled = text.contains("\"outcome\":\"needs-reset\"")
            || (text.contains("\"outcome\":\"status\"") && !text.contains("\"status\":0"));
        assert!(handled, "{case}: {text}");
        assert!(text.contains("\"after_reset_ok\":true"), "{case}: {text}");
    }
    assert!(
        resets >= 3,
        "loops, long chains and avail jumps need a reset ({resets})"
    );
}
