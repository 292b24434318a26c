//! Channel → driver domain → controller benchmark: the in-VMM test client against an NVMe
//! driver domain on the emulated controller (a sparse file on the host), every byte verified.
//! Prints IOPS, latency p50/p99 and VM exits per request for 4 KiB random read and write at
//! queue depth 1 and 32, and 128 KiB sequential read and write.
//!
//! `cargo bench -p ddvm --bench channel` (requests per case: `DDVM_BENCH_REQUESTS`, default
//! 20000).

use std::path::Path;
use std::time::Duration;

use ddvm::console::Echo;
use ddvm::devices::DeviceSpec;
use ddvm::domain::{Domain, DomainConfig};
use ddvm::host_channel::HostChannel;
use ddvm::hypervisor::{Hypervisor, DEFAULT_KVM_PATH};
use ddvm::testclient::{self, Report, Workload};
use ddvm_passthrough::NvmeConfig;

const DISK: u64 = 256 << 20;

fn case(d: &Domain, ch: &mut HostChannel, name: &str, w: Workload) -> Report {
    let r = testclient::run(d, ch, &w).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        r.errors == 0 && r.mismatches == 0,
        "{name}: {} errors, {} mismatches",
        r.errors,
        r.mismatches
    );
    println!(
        "  {name:<22} {:>9.0} IOPS {:>8.1} MiB/s  p50 {:>7.1} us  p99 {:>7.1} us  {:>5.2} exits/req",
        r.iops(),
        r.bytes as f64 / r.elapsed.as_secs_f64() / (1 << 20) as f64,
        r.latency(0.5).as_secs_f64() * 1e6,
        r.latency(0.99).as_secs_f64() * 1e6,
        r.exits_per_request()
    );
    println!(
        "{{\"bench\":\"channel\",\"case\":\"{name}\",\"iops\":{:.0},\"p50_us\":{:.1},\"p99_us\":{:.1},\"exits_per_request\":{:.3}}}",
        r.iops(),
        r.latency(0.5).as_secs_f64() * 1e6,
        r.latency(0.99).as_secs_f64() * 1e6,
        r.exits_per_request()
    );
    r
}

fn main() {
    let requests: u64 = std::env::var("DDVM_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let dir = std::env::temp_dir().join(format!("ddvm-bench-channel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hv = Hypervisor::open(Path::new(DEFAULT_KVM_PATH)).expect("the benchmark needs KVM");
    let cfg = DomainConfig {
        name: "bench-nvme".into(),
        image: ddvm::builtin_driver_domain(),
        memory: 32 << 20,
        cmdline: String::new(),
        channel_size: 8448 << 10,
        echo: Echo::Off,
        device: Some(DeviceSpec::EmulatedNvme(NvmeConfig {
            backing: dir.join("disk.img"),
            size: DISK,
            lba_size: 512,
            volatile_write_cache: false,
            max_io_queues: 4,
            serial: "ddvm-bench".into(),
            model: "ddvm emulated NVMe".into(),
        })),
    };
    let d = Domain::boot(&hv, &cfg, 1).expect("boot");
    d.wait_ready(Duration::from_secs(10)).expect("ready");
    let mut ch = HostChannel::new(d.channel().unwrap(), d.channel_header().unwrap());
    ch.device_info(d.memory()).expect("device info");
    println!(
        "channel -> NVMe driver domain -> emulated controller, {} MiB sparse file, {requests} requests a case, on {}",
        DISK >> 20,
        d.platform().name()
    );
    let w = |qd: u32, sectors: u32, write_percent: u8, random: bool, n: u64| Workload {
        requests: n,
        queue_depth: qd,
        block_sectors: sectors,
        write_percent,
        random,
        first_sector: 0,
        range_sectors: DISK / 512,
        seed: 7,
        timeout: Duration::from_secs(30),
    };
    // Sequential writes first: they fill the disk so later reads are of written data.
    case(
        &d,
        &mut ch,
        "128k seq write QD8",
        w(8, 256, 100, false, (DISK >> 17).max(requests / 8)),
    );
    case(
        &d,
        &mut ch,
        "128k seq read QD8",
        w(8, 256, 0, false, requests / 8),
    );
    case(
        &d,
        &mut ch,
        "4k rand read QD1",
        w(1, 8, 0, true, requests / 4),
    );
    case(
        &d,
        &mut ch,
        "4k rand read QD32",
        w(32, 8, 0, true, requests),
    );
    case(
        &d,
        &mut ch,
        "4k rand write QD1",
        w(1, 8, 100, true, requests / 4),
    );
    case(
        &d,
        &mut ch,
        "4k rand write QD32",
        w(32, 8, 100, true, requests),
    );
    if let Some(s) = d.nvme_stats() {
        println!(
            "  controller: {} commands, {} MMIO doorbell writes, {} DMA errors",
            s.commands, s.doorbell_writes, s.dma_errors
        );
    }
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}
