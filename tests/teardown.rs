//! Booting and tearing down 200 domains leaves no thread, fd or mapping behind.
//!
//! Tests in their own binary, run one at a time: process-wide counts must not see other tests' domains.

mod common;

use std::time::Duration;

use std::sync::Mutex;

use ddvm::domain::{Domain, DomainError};
use ddvm::vcpu::GuestExit;
use ddvm::vm::GuestError;

use common::*;

/// The tests here count process-wide resources: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn cycle(hv: &ddvm::hypervisor::Hypervisor, i: usize) {
    let mut d = Domain::boot(hv, &dd_config(&format!("cycle{i}"), ""), i as u64 + 1).unwrap();
    d.wait_ready(Duration::from_secs(10))
        .unwrap_or_else(|s| panic!("domain {i} not ready: {s:?}"));
    assert_eq!(d.stop(), GuestExit::Stopped);
}

#[test]
fn two_hundred_domains_boot_and_tear_down_without_leaking() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let hv = kvm();
    for i in 0..10 {
        cycle(&hv, i);
    }
    let (fds, threads, maps, rss) = (fd_count(), thread_count(), mapping_count(), rss_kib());
    for i in 10..210 {
        cycle(&hv, i);
    }
    let (fds2, threads2, maps2, rss2) = (fd_count(), thread_count(), mapping_count(), rss_kib());
    println!("fds {fds}->{fds2} threads {threads}->{threads2} mappings {maps}->{maps2} rss {rss}->{rss2} KiB");
    assert_eq!(fds2, fds, "file descriptors leaked");
    assert_eq!(threads2, threads, "threads leaked");
    assert!(maps2 <= maps + 4, "mappings leaked: {maps} -> {maps2}");
    // Each domain has 16 MiB of RAM: a leak of one domain's memory per cycle would be GiBs.
    assert!(
        rss2 <= rss + 8 * 1024,
        "RSS grew from {rss} KiB to {rss2} KiB"
    );
}

#[test]
fn failed_boot_leaves_nothing_behind() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let hv = kvm();
    let fds = fd_count();
    let threads = thread_count();
    let mut cfg = dd_config("bad", "");
    cfg.memory = 2 << 20;
    assert!(matches!(
        Domain::boot(&hv, &cfg, 1),
        Err(DomainError::Guest(GuestError::MemoryTooSmall { .. }))
    ));
    let mut cfg = dd_config("bad", "");
    cfg.channel_size = 12345;
    assert!(matches!(
        Domain::boot(&hv, &cfg, 1),
        Err(DomainError::ChannelSize { .. })
    ));
    let mut cfg = dd_config("bad", "");
    cfg.image = ddvm::loader::Image::from_static("garbage", b"\x7fELF garbage");
    let err = Domain::boot(&hv, &cfg, 1)
        .err()
        .expect("garbage image must fail");
    assert!(err.to_string().contains("garbage"), "{err}");
    assert_eq!(fd_count(), fds);
    assert_eq!(thread_count(), threads);
}

#[test]
fn nvme_domains_tear_down_without_leaking_device_threads_or_files() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let hv = kvm();
    let dir = scratch("teardown-nvme");
    let cfg = |i: usize| ddvm::domain::DomainConfig {
        memory: 32 << 20,
        channel_size: 8448 << 10,
        device: Some(ddvm::devices::DeviceSpec::EmulatedNvme(
            ddvm_passthrough::NvmeConfig {
                backing: dir.join(format!("disk{}.img", i % 2)),
                size: 16 << 20,
                lba_size: 512,
                volatile_write_cache: true,
                max_io_queues: 4,
                serial: "t".into(),
                model: "t".into(),
            },
        )),
        ..dd_config(&format!("nvme{i}"), "")
    };
    let cycle = |i: usize| {
        let mut d = Domain::boot(&hv, &cfg(i), 1).unwrap();
        d.wait_ready(Duration::from_secs(10))
            .unwrap_or_else(|s| panic!("nvme domain {i} not ready: {s:?}"));
        assert_eq!(d.stop(), GuestExit::Stopped);
    };
    for i in 0..3 {
        cycle(i);
    }
    let (fds, threads, maps) = (fd_count(), thread_count(), mapping_count());
    for i in 3..33 {
        cycle(i);
    }
    assert_eq!(fd_count(), fds, "file descriptors leaked");
    assert_eq!(thread_count(), threads, "device or vCPU threads leaked");
    assert!(mapping_count() <= maps + 4, "mappings leaked");
}
