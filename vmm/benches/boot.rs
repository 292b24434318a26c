//! Boot benchmark: boots the built-in driver domain many times and prints the time from the
//! start of boot (memory, image load, VM creation) to the domain's ready mark, p50/p99, and the
//! VM exits each boot costs. Not a test: it prints numbers, it asserts nothing about time.
//!
//! `cargo bench -p ddvm --bench boot` (iterations: `DDVM_BENCH_ITERS`, default 200).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ddvm::console::Echo;
use ddvm::domain::{Domain, DomainConfig};
use ddvm::hypervisor::{Hypervisor, DEFAULT_KVM_PATH};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let iters: usize = std::env::var("DDVM_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let hv = Hypervisor::open(Path::new(DEFAULT_KVM_PATH)).expect("the boot benchmark needs KVM");
    let cfg = DomainConfig {
        name: "bench".into(),
        image: ddvm::builtin_driver_domain(),
        memory: 16 << 20,
        cmdline: String::new(),
        channel_size: 1 << 20,
        echo: Echo::Off,
        device: None,
    };
    let mut times = Vec::with_capacity(iters);
    let mut exits = Vec::with_capacity(iters);
    let mut kvm_exits = Vec::with_capacity(iters);
    let mut platform = "unknown";
    for i in 0..iters + 5 {
        let mut d = Domain::boot(&hv, &cfg, i as u64 + 1).expect("boot");
        let t = d
            .wait_ready(Duration::from_secs(10))
            .unwrap_or_else(|s| panic!("boot {i} not ready: {s:?}"));
        let userspace = d.exits().total.load(Ordering::Relaxed);
        let all = d.vcpu_stat("exits");
        platform = d.platform().name();
        d.stop();
        if i < 5 {
            continue; // warm-up
        }
        times.push(t.as_secs_f64() * 1e3);
        exits.push(userspace as f64);
        if let Some(e) = all {
            kvm_exits.push(e as f64);
        }
    }
    times.sort_by(f64::total_cmp);
    exits.sort_by(f64::total_cmp);
    kvm_exits.sort_by(f64::total_cmp);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    println!("boot to ready, {iters} boots on {platform} (16 MiB domain, built-in driver domain)");
    println!(
        "  time      p50 {:.3} ms  p99 {:.3} ms  min {:.3} ms  max {:.3} ms  mean {:.3} ms",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times[0],
        times[times.len() - 1],
        mean
    );
    println!(
        "  exits     p50 {} to the VMM per boot{}",
        percentile(&exits, 0.5),
        if kvm_exits.is_empty() {
            String::new()
        } else {
            format!(
                ", p50 {} in all (KVM `exits` stat)",
                percentile(&kvm_exits, 0.5)
            )
        }
    );
    println!(
        "{{\"bench\":\"boot\",\"platform\":\"{platform}\",\"iterations\":{iters},\"p50_ms\":{:.4},\"p99_ms\":{:.4},\"exits_p50\":{},\"kvm_exits_p50\":{}}}",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        percentile(&exits, 0.5),
        kvm_exits.first().map_or(-1.0, |_| percentile(&kvm_exits, 0.5))
    );
}
