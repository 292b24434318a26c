//! NVMe driver domains under ddvm: the domain's NVMe driver on the emulated controller, block
//! requests through the channel from the in-VMM test client, every byte verified.

mod common;

use std::time::Duration;

use ddvm::devices::DeviceSpec;
use ddvm::domain::{Domain, DomainConfig};
use ddvm::host_channel::HostChannel;
use ddvm::testclient::{self, Workload};
use ddvm::vcpu::GuestExit;
use ddvm_abi::channel::blk::op;
use ddvm_abi::channel::status;
use ddvm_passthrough::NvmeConfig;

use common::*;

/// The config, and the scratch directory of its backing file (removed when dropped).
fn nvme_config(name: &str, cmdline: &str, lba_size: u32) -> (DomainConfig, Scratch) {
    let dir = scratch(name);
    let config = DomainConfig {
        memory: 32 << 20,
        channel_size: 8448 << 10,
        device: Some(DeviceSpec::EmulatedNvme(NvmeConfig {
            backing: dir.join("disk.img"),
            size: 64 << 20,
            lba_size,
            volatile_write_cache: false,
            max_io_queues: 4,
            serial: "ddvm-test".into(),
            model: "ddvm emulated NVMe".into(),
        })),
        ..dd_config(name, cmdline)
    };
    (config, dir)
}

fn boot_nvme(name: &str, lba_size: u32) -> (Domain, HostChannel, Scratch) {
    let hv = kvm();
    let (config, dir) = nvme_config(name, "", lba_size);
    let d = Domain::boot(&hv, &config, 1).unwrap();
    let ch = ready_channel(&d, lba_size);
    (d, ch, dir)
}

/// Waits for `d` to be ready and opens its channel; the device must be the 64 MiB disk of
/// [`nvme_config`] with `lba_size` blocks.
fn ready_channel(d: &Domain, lba_size: u32) -> HostChannel {
    d.wait_ready(Duration::from_secs(10))
        .unwrap_or_else(|s| panic!("not ready: {s:?}\n{}", d.console().text()));
    let mut ch = HostChannel::new(d.channel().unwrap(), d.channel_header().unwrap());
    let info = ch.device_info(d.memory()).expect("device info");
    assert_eq!(info.capacity_sectors, (64 << 20) / 512);
    assert_eq!(info.block_size, lba_size);
    ch
}

/// MMIO exits of `d`'s vCPU so far (device registers and configuration space).
fn mmio_exits(d: &Domain) -> u64 {
    d.exits().mmio.load(std::sync::atomic::Ordering::Relaxed)
}

fn workload(requests: u64, qd: u32, block_sectors: u32, random: bool, blocks: u64) -> Workload {
    Workload {
        requests,
        queue_depth: qd,
        block_sectors,
        write_percent: 50,
        random,
        first_sector: 0,
        range_sectors: blocks * u64::from(block_sectors),
        seed: 42,
        timeout: Duration::from_secs(10),
    }
}

fn assert_clean(r: &testclient::Report, what: &str) {
    assert_eq!(r.errors, 0, "{what}: {:?}", r.first_error);
    assert_eq!(r.mismatches, 0, "{what}: {:?}", r.first_mismatch);
    assert!(
        r.reads > r.unverified_reads,
        "{what}: no read was verified ({r:?})"
    );
}

#[test]
fn nvme_domain_serves_verified_4k_random_io() {
    let (d, mut ch, _dir) = boot_nvme("nvme-4k", 512);
    // 256 blocks: most reads hit blocks this run wrote, so they verify.
    let r = testclient::run(&d, &mut ch, &workload(3000, 16, 8, true, 256)).unwrap();
    assert_clean(&r, "4k random");
    assert_eq!(r.reads + r.writes, 3000);
    let stats = d.nvme_stats().unwrap();
    assert!(stats.commands >= 3000, "{stats:?}");
    assert_eq!(stats.dma_errors, 0);
    // Shadow doorbells + EventIdx, with I/O doorbells as ioeventfds: almost no doorbell write
    // reaches the VMM's userspace.
    assert!(
        stats.doorbell_writes * 10 < stats.commands,
        "doorbell writes not suppressed: {stats:?}"
    );
}

#[test]
fn large_transfers_use_prp_lists_and_verify() {
    let (d, mut ch, _dir) = boot_nvme("nvme-128k", 512);
    let r = testclient::run(&d, &mut ch, &workload(400, 8, 256, false, 64)).unwrap();
    assert_clean(&r, "128k sequential");
}

#[test]
fn nvme_domain_with_4k_blocks_serves_verified_io() {
    let (d, mut ch, _dir) = boot_nvme("nvme-lba4k", 4096);
    let r = testclient::run(&d, &mut ch, &workload(1000, 8, 8, true, 128)).unwrap();
    assert_clean(&r, "4k lba");
}

#[test]
fn request_beyond_the_device_gets_an_error_status_not_a_crash() {
    let (d, mut ch, _dir) = boot_nvme("nvme-range", 512);
    let mem = d.memory();
    let capacity = (64u64 << 20) / 512;
    ch.submit(mem, op::READ, capacity - 4, 8, None).unwrap();
    ch.submit(mem, op::READ, u64::MAX - 3, 8, None).unwrap();
    ch.submit(mem, 99, 0, 0, None).unwrap(); // no such operation
    if ch.publish(mem) {
        d.kick();
    }
    let mut done = Vec::new();
    let t = std::time::Instant::now();
    while done.len() < 3 && t.elapsed() < Duration::from_secs(5) {
        ch.poll(mem, &mut done).unwrap();
        d.kick();
    }
    assert_eq!(done.len(), 3, "every request completes");
    for c in &done {
        assert_ne!(c.status, status::OK, "{c:?}");
    }
    // The domain and the channel go on serving.
    let r = testclient::run(&d, &mut ch, &workload(200, 4, 8, true, 64)).unwrap();
    assert_clean(&r, "after bad requests");
    assert!(matches!(d.state(), ddvm::vcpu::RunState::Ready(_)));
}

#[test]
fn selftest_passes_on_the_emulated_controller() {
    let hv = kvm();
    let (config, _dir) = nvme_config("nvme-selftest", "selftest", 512);
    let d = Domain::boot(&hv, &config, 1).unwrap();
    let exit = d
        .wait_stopped(Duration::from_secs(60))
        .expect("selftest ends");
    let console = d.console().text();
    assert_eq!(exit, GuestExit::Exited { status: 0 }, "{console}");
    assert!(console.contains("nvme selftest: PASS"), "{console}");
}

#[test]
fn domain_reaches_its_controller_through_ecam_without_port_exits() {
    let (d, mut ch, _dir) = boot_nvme("nvme-ecam", 512);
    let r = testclient::run(&d, &mut ch, &workload(100, 4, 8, true, 64)).unwrap();
    assert_clean(&r, "after an ECAM probe");
    // Configuration space went through the ECAM window (MMIO); the only port exits are waits.
    let e = d.exits();
    let pio = e.pio.load(std::sync::atomic::Ordering::Relaxed);
    let waits = e.wait.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(pio, waits, "port exits other than waits: {e:?}");
}

/// The VMM says where it placed BAR0 (`nvme_bar0=`), so the probe reads the slot's IDs and
/// enables the function: 7 configuration accesses (exits) fewer than finding and sizing BAR0.
#[test]
fn a_bar0_placed_by_the_vmm_saves_the_probe_seven_exits() {
    let hv = kvm();
    let mmio_to_ready = |name: &str, cmdline: &str| {
        let (config, _dir) = nvme_config(name, cmdline, 512);
        let d = Domain::boot(&hv, &config, 1).unwrap();
        ready_channel(&d, 512);
        (mmio_exits(&d), d.console().text())
    };
    let (placed, console) = mmio_to_ready("nvme-bar-hint", "");
    assert!(console.contains("nvme_bar0=0xe0000000/0x4000"), "{console}");
    assert!(console.contains("BAR0 0xe0000000"), "{console}");
    // `nvme=` from the user: the VMM adds no placement; the probe sizes BAR0 itself.
    let (probed, console) = mmio_to_ready("nvme-bar-probe", "nvme=00:01.0");
    assert!(!console.contains("nvme_bar0="), "{console}");
    assert_eq!(
        probed - placed,
        7,
        "exits to ready: {probed} probing, {placed} placed"
    );
}

/// A warm standby boots while another domain holds the device, never touches it, and serves
/// it once promoted; a standby without a device that outlives domains is refused.
#[test]
fn a_warm_standby_waits_without_its_device_until_promoted() {
    use ddvm::domain::{DeviceThread, DomainDevice};
    let hv = kvm();
    let (mut cfg, _dir) = nvme_config("nvme-standby", "", 512);
    let Some(DeviceSpec::EmulatedNvme(nvme)) = cfg.device.clone() else {
        unreachable!()
    };
    let err = Domain::boot_standby(&hv, &cfg, 2).err().expect("refused");
    assert!(err.to_string().contains("standby"), "{err}");
    let device = DomainDevice::emulated_nvme("nvme-standby", &nvme, DeviceThread::Worker).unwrap();
    cfg.device = Some(DeviceSpec::Persistent(device.clone()));

    let mut live = Domain::boot(&hv, &cfg, 1).unwrap();
    let mut ch = ready_channel(&live, 512);

    let mut standby = Domain::boot_standby(&hv, &cfg, 2).unwrap();
    assert!(
        standby.wait_standby(Duration::from_secs(10)),
        "not standing by: {:?}\n{}",
        standby.state(),
        standby.console().text()
    );
    assert!(standby.is_standby());
    // The live domain keeps its device while the standby waits: no access of the standby's
    // reached a device register or configuration space.
    let r = testclient::run(&live, &mut ch, &workload(500, 8, 8, true, 64)).unwrap();
    assert_clean(&r, "beside a standby");
    assert_eq!(mmio_exits(&standby), 0);
    assert!(matches!(standby.state(), ddvm::vcpu::RunState::Standby));

    // The hand-over: the holder is quiesced first, then the standby probes and serves.
    live.retire();
    standby.promote().unwrap();
    assert!(!standby.is_standby());
    assert!(standby.promote().is_err(), "promoted twice");
    let mut ch = ready_channel(&standby, 512);
    let r = testclient::run(&standby, &mut ch, &workload(500, 8, 8, true, 64)).unwrap();
    assert_clean(&r, "promoted standby");
    assert!(mmio_exits(&standby) > 0);

    // A standby that is never needed goes without touching the device either.
    let spare = Domain::boot_standby(&hv, &cfg, 3).unwrap();
    assert!(spare.wait_standby(Duration::from_secs(10)));
    drop(spare);
    let r = testclient::run(&standby, &mut ch, &workload(500, 8, 8, true, 64)).unwrap();
    assert_clean(&r, "after a spare standby went");
}

/// The driver asks for completion interrupts (MSI-X enabled, its I/O completion queue created
/// with IEN on vector 1) and the controller raises them through the domain's wake eventfd:
/// the domain's waits with commands in flight end with the device's interrupt.
#[test]
fn the_driver_asks_for_completion_interrupts_and_the_controller_wakes_the_domain() {
    let (d, mut ch, _dir) = boot_nvme("nvme-irq", 512);
    let console = d.console().text();
    assert!(console.contains("msix_vector=1"), "{console}");
    let before = d.nvme_stats().unwrap();
    let r = testclient::run(&d, &mut ch, &workload(500, 4, 8, true, 64)).unwrap();
    assert_clean(&r, "with completion interrupts");
    let stats = d.nvme_stats().unwrap();
    assert!(stats.interrupts > before.interrupts, "{stats:?}");
    assert!(
        stats.interrupts - before.interrupts <= stats.completions - before.completions,
        "at most one interrupt per pass that posted: {stats:?}"
    );
}
