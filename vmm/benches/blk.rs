//! What isolation costs: the same workload client guest against (a) an NVMe driver domain over
//! the channel and (b) the same file served directly by the VMM, in one run.
//!
//! For each case it prints the client's IOPS and latency, the ratio (a)/(b), VM exits per
//! request (client vCPU and driver-domain vCPU, from KVM's own counters) and the copy cost of
//! the VMM (bytes copied between client and backend, and the time spent copying).
//!
//! `cargo bench -p ddvm --bench blk` (`-- --quick` for a short run).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use ddvm::blk::Backend;
use ddvm::client::WorkloadReport;
use ddvm::config::Config;
use ddvm::console::Echo;
use ddvm::hypervisor::Hypervisor;
use ddvm::topology::Topology;

/// CPU time (user + system, in clock ticks) of each thread of this process, by name.
fn thread_cpu() -> std::collections::BTreeMap<String, u64> {
    let mut m = std::collections::BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return m;
    };
    for t in dir.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the ")" that ends the name: state is field 3; utime 14, stime 15.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        let name = comm.trim().split('-').next().unwrap_or("").to_string();
        *m.entry(name).or_insert(0) += ticks;
    }
    m
}

struct Run {
    report: WorkloadReport,
    client_exits: u64,
    domain_exits: u64,
    copy_bytes: u64,
    copy_ns: u64,
}

fn run(hv: &std::sync::Arc<Hypervisor>, disk: &Path, direct: bool, workload: &str) -> Run {
    let mut text = String::new();
    let target = if direct {
        format!("file:{}", disk.display())
    } else {
        text += &format!(
            "[[domain]]\nname = \"nvme0\"\nmemory_mib = 32\nchannel_kib = 8448\n[domain.device]\nkind = \"emulated-nvme\"\nbacking = \"{}\"\nsize_mib = 64\nlba_size = 4096\n",
            disk.display()
        );
        "nvme0".to_string()
    };
    text += &format!(
        "[[client]]\nname = \"bench\"\ndisk = \"{target}\"\nsize_mib = 64\nmemory_mib = 64\nworkload = \"{workload}\"\n"
    );
    let file = Path::new("bench.toml");
    let config = Config::parse(file, &text).expect("bench config");
    let mut topo = Topology::start(hv, &config, file, Echo::Off).expect("start");
    let outcome = topo.wait_clients(Duration::from_secs(600)).remove(0);
    if std::env::var_os("DDVM_BENCH_CPU").is_some() {
        // Threads of this run only (earlier runs' threads have exited).
        println!("    thread CPU ticks: {:?}", thread_cpu());
    }
    let client_exits = topo.clients[0].domain().vcpu_stat("exits").unwrap_or(0);
    let s = &mut topo.services[0];
    let copy_bytes = s.counters().copy_bytes.load(Ordering::Relaxed);
    let copy_ns = s.counters().copy_ns.load(Ordering::Relaxed);
    let domain_exits = match s.stop() {
        Ok(Backend::Channel(b)) => {
            let d = b.domain().expect("the domain is up");
            if std::env::var_os("DDVM_BENCH_CPU").is_some() {
                let e = d.exits();
                println!(
                    "    domain exits to the VMM: total {} wait {} pio {} mmio {}; nvme {:?}",
                    e.total.load(Ordering::Relaxed),
                    e.wait.load(Ordering::Relaxed),
                    e.pio.load(Ordering::Relaxed),
                    e.mmio.load(Ordering::Relaxed),
                    d.nvme_stats()
                );
                let c = topo.clients[0].domain().exits();
                println!(
                    "    client exits to the VMM: total {} wait {} mmio {}",
                    c.total.load(Ordering::Relaxed),
                    c.wait.load(Ordering::Relaxed),
                    c.mmio.load(Ordering::Relaxed)
                );
            }
            d.vcpu_stat("exits").unwrap_or(0)
        }
        _ => 0,
    };
    topo.stop();
    let report = outcome
        .report
        .unwrap_or_else(|| panic!("no report: {:?}", outcome.exit));
    assert!(report.clean(), "{report:?}");
    Run {
        report,
        client_exits,
        domain_exits,
        copy_bytes,
        copy_ns,
    }
}

fn line(label: &str, r: &Run, requests_total: u64) {
    let per = |x: u64| x as f64 / requests_total.max(1) as f64;
    println!(
        "  {label:<10} {:>9.0} IOPS {:>8.1} MiB/s  p50 {:>6} us  p99 {:>6} us  exits/request client {:.2} domain {:.2}  copy {:.1} MiB in {:.1} ms ({:.2} GiB/s)",
        r.report.iops,
        r.report.mib_s,
        r.report.lat_us.p50,
        r.report.lat_us.p99,
        per(r.client_exits),
        per(r.domain_exits),
        r.copy_bytes as f64 / (1 << 20) as f64,
        r.copy_ns as f64 / 1e6,
        r.copy_bytes as f64 / r.copy_ns.max(1) as f64 / 1.073_741_824,
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let hv = std::sync::Arc::new(
        Hypervisor::open(Path::new(ddvm::hypervisor::DEFAULT_KVM_PATH)).expect("/dev/kvm"),
    );
    let dir = std::env::temp_dir().join(format!("ddvm-bench-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let disk: PathBuf = dir.join("disk.img");
    let n = if quick { 5_000 } else { 50_000 };
    let cases = [
        (
            "4 KiB random read, QD32",
            format!("workload=randread bs=4096 qd=32 count={n} verify_pass=0"),
        ),
        (
            "128 KiB sequential write, QD8",
            format!(
                "workload=seqwrite bs=131072 qd=8 count={} verify_pass=0",
                n / 10
            ),
        ),
    ];
    println!(
        "ddvm blk bench: the same client against (a) a driver domain and (b) the file directly"
    );
    for (name, workload) in &cases {
        // Alternate so neither side always runs on a warmer page cache.
        let b = run(&hv, &disk, true, workload);
        let a = run(&hv, &disk, false, workload);
        println!("{name}:");
        // Exits per request count every request of the run, prefill and verification included.
        let total = |r: &Run| r.report.ops + r.report.verified.saturating_sub(r.report.reads);
        line("(a) domain", &a, total(&a).max(a.report.ops));
        line("(b) direct", &b, total(&b).max(b.report.ops));
        println!(
            "  ratio (a)/(b): {:.1}% of the direct IOPS (target >= 80%)",
            100.0 * a.report.iops / b.report.iops.max(1.0)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
