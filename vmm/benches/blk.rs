//! What isolation costs: the same workload client guest against (a) an NVMe driver domain over
//! the channel and (b) the same file served directly by the VMM, in one run.
//!
//! For each case it prints the client's IOPS and latency, the ratio (a)/(b), VM exits per
//! request (client vCPU and driver-domain vCPU, from KVM's own counters, over every request of
//! the run as the block service counted them, the prefill included) and the copy cost of
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

struct Run {
    report: WorkloadReport,
    /// Every request the client made (prefill, checks and the timed phase): what the exits
    /// are counted over.
    requests: u64,
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
    let client_exits = topo.clients[0].domain().vcpu_stat("exits").unwrap_or(0);
    let s = &mut topo.services[0];
    let copy_bytes = s.counters().copy_bytes.load(Ordering::Relaxed);
    let copy_ns = s.counters().copy_ns.load(Ordering::Relaxed);
    let requests = s.counters().answered.load(Ordering::Relaxed);
    let domain_exits = match s.stop() {
        Ok(Backend::Channel(b)) => {
            let d = b.domain().expect("the domain is up");
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
        requests,
        client_exits,
        domain_exits,
        copy_bytes,
        copy_ns,
    }
}

fn line(label: &str, r: &Run) {
    let per = |x: u64| x as f64 / r.requests.max(1) as f64;
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
    for (i, (name, workload)) in cases.iter().enumerate() {
        // Alternate the order so neither side always runs on a warmer page cache.
        let (a, b) = if i % 2 == 0 {
            let b = run(&hv, &disk, true, workload);
            (run(&hv, &disk, false, workload), b)
        } else {
            let a = run(&hv, &disk, false, workload);
            (a, run(&hv, &disk, true, workload))
        };
        println!("{name}:");
        // Exits over every request of the run (the prefill included), as the service counted.
        line("(a) domain", &a);
        line("(b) direct", &b);
        println!(
            "  ratio (a)/(b): {:.1}% of the direct IOPS (target >= 80%)",
            100.0 * a.report.iops / b.report.iops.max(1.0)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
