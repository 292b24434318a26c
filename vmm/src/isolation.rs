//! `ddvm isolation ADDRESS`: proves, on a real device passed through VFIO, what ddvm's
//! recovery relies on (a build with fault injection: it aims the domain's DMA on purpose).
//!
//! 1. **DMA isolation.** A canary page of the VMM, locked, whose physical address lies
//!    outside the domain's IOVA range (0 to the domain's memory size); the domain's
//!    `dma-outside` fault aims its next read's DMA at that address. The canary must stay
//!    intact and the IOMMU must report the fault. With `--control` the canary's page is
//!    mapped at that IOVA on purpose, and must then be overwritten: a check that could not
//!    tell the two cases apart would prove nothing (QEMU's NVMe, for one, completes a command
//!    whose DMA the IOMMU blocked with a success status).
//! 2. **Stale epochs.** The domain is retired (vCPU stopped, device quiesced) and kept: its
//!    memory must not change while its successor does verified I/O on the same device.
//! 3. **A failed reset.** Two resets fail on purpose: the quiesce leaves the device unclean
//!    (bus mastering off, nothing mapped), the next domain is refused the device (its
//!    attach retries the reset, which fails again), and the one after gets it clean.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ddvm_abi::channel::blk::op;
use ddvm_abi::channel::fault;
use vm_memory::{Bytes, GuestAddress, MmapRegion, VolatileMemory};

use crate::console::Echo;
use crate::devices::vfio::VfioSpec;
use crate::devices::DeviceSpec;
use crate::domain::{Domain, DomainConfig, DomainDevice};
use crate::host_channel::HostChannel;
use crate::hypervisor::Hypervisor;
use crate::testclient::{self, Workload};
use ddvm_passthrough::vfio::ResetMethod;

const PAGE: u64 = 4096;
const MEMORY: u64 = 32 << 20;
const CHANNEL: u64 = 1 << 20;
const READY: Duration = Duration::from_secs(60);
const PATTERN: u8 = 0xa5;

/// What [`run`] found; `passed` says whether every check held.
#[derive(Debug, Default)]
pub struct IsolationReport {
    /// One line per check, for the operator.
    pub lines: Vec<String>,
    /// Whether every check held.
    pub passed: bool,
}

fn fail(lines: &mut Vec<String>, what: String) -> anyhow::Result<IsolationReport> {
    lines.push(format!("isolation: FAIL: {what}"));
    Ok(IsolationReport {
        lines: std::mem::take(lines),
        passed: false,
    })
}

/// A locked page of the VMM's memory filled with a pattern, and its physical address.
struct Canary {
    page: Arc<MmapRegion<()>>,
    physical: u64,
}

impl Canary {
    /// A canary whose physical address is at least `above` (pages below are kept aside while
    /// looking, so the kernel hands out others).
    fn above(above: u64) -> anyhow::Result<Canary> {
        let pagemap = File::open("/proc/self/pagemap")?;
        let mut aside = Vec::new();
        for _ in 0..4096 {
            let page = Arc::new(
                MmapRegion::<()>::build(
                    None,
                    PAGE as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_LOCKED | libc::MAP_POPULATE,
                )
                .map_err(|e| anyhow::anyhow!("canary page: {e}"))?,
            );
            page.as_volatile_slice()
                .write_slice(&[PATTERN; PAGE as usize], 0)?;
            let mut entry = [0u8; 8];
            pagemap.read_exact_at(&mut entry, page.as_ptr() as u64 / PAGE * 8)?;
            let entry = u64::from_le_bytes(entry);
            let pfn = entry & ((1 << 55) - 1);
            anyhow::ensure!(
                entry >> 63 == 1 && pfn != 0,
                "/proc/self/pagemap gives no physical address (run as root)"
            );
            let physical = pfn * PAGE;
            // The domain's fault argument counts pages above its memory in 32 bits.
            if physical >= above && (physical - above) / PAGE < u64::from(u32::MAX) {
                return Ok(Canary { page, physical });
            }
            aside.push(page);
        }
        anyhow::bail!("no page above {above:#x} in 4096 tries")
    }

    fn intact(&self) -> bool {
        let mut buf = [0u8; PAGE as usize];
        self.page
            .as_volatile_slice()
            .read_slice(&mut buf, 0)
            .is_ok()
            && buf.iter().all(|&b| b == PATTERN)
    }
}

fn boot(hv: &Hypervisor, device: &Arc<DomainDevice>, epoch: u64) -> anyhow::Result<Domain> {
    let cfg = DomainConfig {
        name: "isolation".into(),
        image: crate::builtin_driver_domain(),
        memory: MEMORY,
        cmdline: String::new(),
        channel_size: CHANNEL,
        echo: Echo::Off,
        device: Some(DeviceSpec::Persistent(device.clone())),
    };
    let d = Domain::boot(hv, &cfg, epoch)?;
    d.wait_ready(READY)
        .map_err(|s| anyhow::anyhow!("domain epoch {epoch} not ready: {s:?}"))?;
    Ok(d)
}

fn channel(d: &Domain) -> anyhow::Result<HostChannel> {
    let (Some(gpa), Some(header)) = (d.channel(), d.channel_header()) else {
        anyhow::bail!("the domain has no channel");
    };
    Ok(HostChannel::new(gpa, header))
}

/// One request; its completion status (None: none within 5 s).
fn one(
    d: &Domain,
    ch: &mut HostChannel,
    operation: u16,
    sector: u64,
    data: &mut [u8],
) -> anyhow::Result<Option<u16>> {
    let mem = d.memory();
    let sectors = (data.len() / 512) as u32;
    ch.submit(mem, operation, sector, sectors, Some(data))
        .map_err(|e| anyhow::anyhow!("submit: {e:?}"))?;
    if ch.publish(mem) {
        d.kick();
    }
    d.kick();
    let t0 = Instant::now();
    let mut done = Vec::new();
    while t0.elapsed() < Duration::from_secs(5) {
        ch.poll(mem, &mut done)?;
        if let Some(c) = done.pop() {
            let read_into = (operation == op::READ).then_some(&mut *data);
            ch.finish(mem, &c, read_into);
            return Ok(Some(c.status));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(None)
}

fn checksum(d: &Domain) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < MEMORY {
        if d.memory().read_slice(&mut buf, GuestAddress(at)).is_err() {
            return 0;
        }
        for w in buf.chunks_exact(8) {
            h = (h ^ u64::from_le_bytes(w.try_into().unwrap_or_default()))
                .wrapping_mul(0x100_0000_01b3);
        }
        at += buf.len() as u64;
    }
    h
}

/// Runs the three checks on the device at `address` (bound to vfio-pci); `control` adds the
/// negative control of the first.
pub fn run(kvm: &Path, address: &str, control: bool) -> anyhow::Result<IsolationReport> {
    anyhow::ensure!(
        crate::chaos::ENABLED,
        "`ddvm isolation` aims a driver domain's DMA on purpose: it needs a build with --features fault-injection"
    );
    let hv = Hypervisor::open(kvm)?;
    let spec = VfioSpec {
        address: address.to_string(),
        reset: ResetMethod::Controller,
    };
    let device = DomainDevice::vfio("isolation", &spec)?;
    let handle = device
        .vfio_handle()
        .ok_or_else(|| anyhow::anyhow!("not a VFIO device"))?
        .clone();
    let mut lines = Vec::new();

    // 1. DMA isolation.
    let mut d = boot(&hv, &device, 1)?;
    let mut ch = channel(&d)?;
    let info = ch.device_info(d.memory())?;
    let bs = info.block_size.max(512) as usize;
    let canary = Canary::above(MEMORY)?;
    let _mapping = if control {
        Some(
            handle
                .map_page(canary.physical, canary.page.clone())
                .map_err(anyhow::Error::msg)?,
        )
    } else {
        None
    };
    let mut block = vec![0x5au8; bs];
    let status = one(&d, &mut ch, op::WRITE, 0, &mut block)?;
    anyhow::ensure!(status == Some(0), "the first write failed: {status:?}");
    let faults0 = device.dma_refused();
    let arg = ((canary.physical - MEMORY) / PAGE) as u32;
    anyhow::ensure!(
        d.request_fault_with(fault::DMA_OUTSIDE, arg),
        "the domain has no channel to take the fault"
    );
    // The domain arms the fault when it next looks at its channel header.
    std::thread::sleep(Duration::from_millis(100));
    let status = one(&d, &mut ch, op::READ, 0, &mut block)?;
    std::thread::sleep(Duration::from_millis(200));
    let faults = device.dma_refused() - faults0;
    let intact = canary.intact();
    lines.push(format!(
        "isolation: canary page at physical {:#x}, outside the domain's IOVA range 0..{MEMORY:#x}{}; the domain's read DMA'd at it (status {})",
        canary.physical,
        if control { ", mapped there on purpose (control)" } else { "" },
        status.map_or("none within 5 s".into(), |s| s.to_string())
    ));
    lines.push(format!(
        "isolation: canary {}; IOMMU faults reported for {}: {faults}",
        if intact { "intact" } else { "OVERWRITTEN" },
        handle.address()
    ));
    if control {
        drop(d);
        return if intact {
            fail(&mut lines, "control: the canary mapped on purpose was not reached, so the check cannot tell isolation from a DMA that never happened".into())
        } else {
            lines.push("isolation: control: the DMA reached the canary once it was mapped: the check tells the cases apart".into());
            Ok(IsolationReport {
                lines,
                passed: true,
            })
        };
    }
    if !intact {
        return fail(
            &mut lines,
            "the DMA reached a page outside the domain".into(),
        );
    }
    if faults == 0 {
        return fail(
            &mut lines,
            "the IOMMU reported no fault for the blocked DMA".into(),
        );
    }

    // 2. Stale epochs: the retired domain's memory while its successor does I/O.
    d.retire();
    let c = handle.counters();
    lines.push(format!(
        "isolation: quiesce: {} of the retired domain's {MEMORY} bytes unmapped, bus master read back on after {} quiesces",
        c.last_unmapped_bytes, c.bus_master_after_quiesce
    ));
    if c.last_unmapped_bytes != MEMORY || c.bus_master_after_quiesce != 0 {
        return fail(
            &mut lines,
            "the quiesce left the retired domain's memory mapped or bus mastering on".into(),
        );
    }
    let before = checksum(&d);
    let d2 = boot(&hv, &device, 2)?;
    let mut ch2 = channel(&d2)?;
    let w = Workload {
        requests: 2000,
        queue_depth: 16,
        block_sectors: (4096 / 512).max(info.block_size / 512),
        write_percent: 50,
        random: true,
        first_sector: 0,
        range_sectors: info.capacity_sectors.min(1 << 15),
        seed: 0x150,
        timeout: Duration::from_secs(10),
    };
    let r = testclient::run(&d2, &mut ch2, &w)?;
    let after = checksum(&d);
    lines.push(format!(
        "isolation: stale epoch: the retired domain's memory {} while its successor did {} verified requests ({} errors, {} mismatches)",
        if before == after { "unchanged" } else { "CHANGED" },
        r.reads + r.writes,
        r.errors,
        r.mismatches
    ));
    if before != after || r.errors != 0 || r.mismatches != 0 {
        return fail(
            &mut lines,
            "the successor's I/O was not clean, or reached the retired domain".into(),
        );
    }
    drop(d);

    // 3. A failed reset: unclean, refused, then clean again.
    handle.fail_next_resets(2);
    drop(d2);
    let c = handle.counters();
    lines.push(format!(
        "isolation: failed reset: unclean {}, resets failed {}, bus master on after quiesce {}, last unmap {} bytes",
        c.unclean, c.reset_failures, c.bus_master_after_quiesce, c.last_unmapped_bytes
    ));
    if !c.unclean || c.last_unmapped_bytes != MEMORY {
        return fail(
            &mut lines,
            "a failed reset did not leave the device unclean and unmapped".into(),
        );
    }
    match boot(&hv, &device, 3) {
        Ok(_) => {
            return fail(
                &mut lines,
                "an unclean device whose reset failed again was handed to a domain".into(),
            )
        }
        Err(e) => lines.push(format!(
            "isolation: the next domain was refused the unclean device: {e:#}"
        )),
    }
    let d4 = boot(&hv, &device, 4)?;
    let mut ch4 = channel(&d4)?;
    let r = testclient::run(&d4, &mut ch4, &Workload { requests: 200, ..w })?;
    let c = handle.counters();
    lines.push(format!(
        "isolation: the reset succeeded at the attach after: unclean {}, {} verified requests ({} errors, {} mismatches)",
        c.unclean,
        r.reads + r.writes,
        r.errors,
        r.mismatches
    ));
    if c.unclean || r.errors != 0 || r.mismatches != 0 {
        return fail(&mut lines, "the device did not come back clean".into());
    }
    drop(d4);
    let c = handle.counters();
    lines.push(format!(
        "isolation: {} quiesces, bus master read back on after {} of them, {} unmaps incomplete",
        c.quiesces, c.bus_master_after_quiesce, c.unmap_failures
    ));
    if c.bus_master_after_quiesce != 0 || c.unmap_failures != 0 {
        return fail(
            &mut lines,
            "a quiesce left bus mastering on or memory mapped".into(),
        );
    }
    lines.push("isolation: PASS".into());
    Ok(IsolationReport {
        lines,
        passed: true,
    })
}
