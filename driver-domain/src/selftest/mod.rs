//! `selftest`: drives the devices it finds without a VMM (under QEMU, whose device models keep
//! the drivers honest), each test reporting one line, then exits with status 0 when every test
//! passed. `selftest` runs the NVMe test when there is an NVMe controller (or when there is no
//! device at all, to report that) and the network test ([`net`]) when there is an 8254x NIC;
//! `selftest=nvme` and `selftest=net` run only one.
//!
//! The NVMe test drives the controller and reports one line:
//! `nvme selftest: PASS blocks=N bytes=N ms=N` (exit status 0) or `nvme selftest: FAIL <what>`
//! (exit status 1).
//!
//! Two passes, each with its own seed, write 64 regions spread over the namespace (4 KiB to
//! 128 KiB, every 16th as large as the device takes in one command; some with buffers that
//! start inside a page, so PRP1 offsets, PRP2 and PRP lists are all used; the last region
//! ends at the namespace's last block), up to 16 commands in
//! flight; then read every region back into poisoned buffers and check every word: each block
//! carries its LBA, the pass seed and a pattern derived from both, so a misdirected, stale or
//! torn block is caught. Then Write Zeroes (read back as zeroes), Deallocate and Flush when
//! the device supports them. Finally the channel service runs against a stand-in VMM
//! ([`loopback`]).

#![forbid(unsafe_code)]

mod loopback;
mod net;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use guest_kernel::dma::{DmaBuffer, PAGE_SIZE};
use guest_kernel::time::{self, Instant};
use guest_kernel::{println, vmm};

use crate::nvme::probe::{self, Location};
use crate::nvme::{Controller, IoKind, IoRequest, Options};

/// Regions per pass.
const REGIONS: u64 = 64;
/// Commands in flight at once.
const BATCH: usize = 16;
/// Region sizes in KiB, used in turn.
const SIZES_KIB: [u64; 10] = [4, 8, 12, 16, 20, 32, 60, 64, 100, 128];
/// Offsets of buffers inside their first page, used in turn (dword/qword aligned, as PRPs
/// and this test's word checks need).
const BUFFER_OFFSETS: [u64; 3] = [0, 0x200, 0x88];
/// Regions zeroed with Write Zeroes.
const ZEROED_REGIONS: u64 = 8;

/// Which tests `selftest` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// Every test whose device is present (`selftest`).
    Found,
    /// The NVMe test (`selftest=nvme`).
    Nvme,
    /// The network test (`selftest=net`).
    Net,
}

impl Which {
    /// Parses the value of `selftest=`.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "nvme" => Some(Which::Nvme),
            "net" => Some(Which::Net),
            "all" => Some(Which::Found),
            _ => None,
        }
    }
}

/// Runs the self-tests `which` asks for and exits.
pub fn run(which: Which, location: Location, options: Options) -> ! {
    let nic = which == Which::Net || (which == Which::Found && net::present());
    let nvme = match which {
        Which::Nvme => true,
        Which::Net => false,
        Which::Found => !nic || nvme_present(location),
    };
    let mut passed = true;
    if nvme {
        passed &= run_nvme(location, options);
    }
    if nic {
        passed &= net::run();
    }
    vmm::exit(if passed { vmm::STATUS_SUCCESS } else { 1 })
}

/// Whether there is an NVMe controller at `location`.
fn nvme_present(location: Location) -> bool {
    use crate::driver::{pick, Driver};
    match location {
        Location::Nowhere => false,
        Location::At(_) => true,
        Location::Scan => guest_kernel::pci::enumerate_bus0()
            .iter()
            .any(|f| pick(f) == Some(Driver::Nvme)),
    }
}

/// Runs the NVMe self-test; prints its line; returns whether it passed.
fn run_nvme(location: Location, options: Options) -> bool {
    let start = Instant::now();
    match test(location, options) {
        Ok((blocks, bytes)) => {
            println!(
                "nvme selftest: PASS blocks={blocks} bytes={bytes} ms={}",
                start.elapsed_us() / 1000
            );
            true
        }
        Err(what) => {
            println!("nvme selftest: FAIL {what}");
            false
        }
    }
}

/// A region of the namespace and the buffer layout used for it.
#[derive(Clone, Copy, Debug)]
struct Region {
    lba: u64,
    blocks: u32,
    offset: u64,
}

/// The 64 regions for a namespace of `blocks` blocks of `block` bytes.
fn plan(blocks: u64, block: u32, max_transfer: u32) -> Result<Vec<Region>, String> {
    let stripe = blocks / REGIONS;
    let max_blocks = u64::from(max_transfer / block);
    let mut regions = Vec::new();
    for i in 0..REGIONS {
        let want = if i % 16 == 15 {
            max_blocks
        } else {
            SIZES_KIB[i as usize % SIZES_KIB.len()] * 1024 / u64::from(block)
        };
        let n = want.max(1).min(max_blocks).min(stripe);
        if n == 0 {
            return Err(format!("namespace of {blocks} blocks is too small"));
        }
        // Start somewhere inside the stripe; the last region ends at the last block.
        let slack = stripe - n;
        let lba = if i == REGIONS - 1 {
            blocks - n
        } else {
            i * stripe + (i * 7919) % (slack + 1)
        };
        regions.push(Region {
            lba,
            blocks: n as u32,
            offset: BUFFER_OFFSETS[i as usize % BUFFER_OFFSETS.len()],
        });
    }
    Ok(regions)
}

/// Word `word` of block `lba` in pass `seed`.
fn pattern(lba: u64, seed: u64, word: u64) -> u64 {
    match word {
        0 => lba,
        1 => seed,
        _ => {
            let mut x = lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed ^ word.rotate_left(29);
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^ (x >> 31)
        }
    }
}

/// A buffer for `region` (with its in-page offset).
fn buffer(region: &Region, block: u32) -> Result<DmaBuffer, String> {
    let bytes = region.offset + u64::from(region.blocks) * u64::from(block);
    DmaBuffer::new(bytes.div_ceil(PAGE_SIZE) as usize)
        .ok_or_else(|| format!("out of memory for a {bytes}-byte buffer"))
}

/// Runs `reqs` with up to [`BATCH`] in flight; fails on any unsuccessful completion.
fn execute(disk: &mut Controller, reqs: &[IoRequest]) -> Result<(), String> {
    let mut next = 0;
    let mut done = 0;
    let mut failure = None;
    while done < reqs.len() {
        while next < reqs.len() && disk.in_flight() < BATCH.min(disk.capacity()) {
            disk.submit(&reqs[next], next as u64)
                .map_err(|e| format!("submit {:?}: {e}", reqs[next]))?;
            next += 1;
        }
        disk.ring();
        let n = disk
            .poll(|d| {
                if !d.status.is_success() && failure.is_none() {
                    failure = Some((d.user, d.status));
                }
            })
            .map_err(|e| format!("{e}"))?;
        done += n;
        if let Some((i, status)) = failure {
            return Err(format!("{:?} completed with {status}", reqs[i as usize]));
        }
        if n == 0 {
            core::hint::spin_loop();
        }
    }
    Ok(())
}

/// Writes or reads `regions` through `buffers`.
fn transfer(
    disk: &mut Controller,
    kind: IoKind,
    regions: &[Region],
    buffers: &[DmaBuffer],
    block: u32,
) -> Result<(), String> {
    let reqs: Vec<IoRequest> = regions
        .iter()
        .zip(buffers)
        .map(|(r, b)| IoRequest {
            kind,
            lba: r.lba,
            blocks: r.blocks,
            buf: b.addr() + r.offset,
            len: r.blocks * block,
        })
        .collect();
    execute(disk, &reqs)
}

/// Calls `f(offset in buffer, lba, word index)` for every word of `region`'s data.
fn for_each_word(
    region: &Region,
    block: u32,
    mut f: impl FnMut(u64, u64, u64) -> Result<(), String>,
) -> Result<(), String> {
    let words = u64::from(block) / 8;
    for b in 0..u64::from(region.blocks) {
        for w in 0..words {
            f(region.offset + (b * words + w) * 8, region.lba + b, w)?;
        }
    }
    Ok(())
}

/// Writes all regions with `seed`, reads them back, checks them. Returns bytes moved.
fn pass(disk: &mut Controller, regions: &[Region], seed: u64) -> Result<u64, String> {
    let block = disk.info().block_size;
    let mut bytes = 0;
    for chunk in regions.chunks(BATCH) {
        let buffers = chunk
            .iter()
            .map(|r| buffer(r, block))
            .collect::<Result<Vec<_>, _>>()?;
        for (r, b) in chunk.iter().zip(&buffers) {
            for_each_word(r, block, |off, lba, w| {
                b.write::<u64>(off, pattern(lba, seed, w));
                Ok(())
            })?;
            bytes += u64::from(r.blocks) * u64::from(block);
        }
        transfer(disk, IoKind::Write, chunk, &buffers, block)?;
    }
    for chunk in regions.chunks(BATCH) {
        let buffers = chunk
            .iter()
            .map(|r| buffer(r, block))
            .collect::<Result<Vec<_>, _>>()?;
        for b in &buffers {
            b.fill(0, b.len(), 0xa5);
        }
        transfer(disk, IoKind::Read, chunk, &buffers, block)?;
        for (r, b) in chunk.iter().zip(&buffers) {
            for_each_word(r, block, |off, lba, w| {
                let got = b.read::<u64>(off);
                let want = pattern(lba, seed, w);
                if got != want {
                    return Err(format!(
                        "data mismatch at lba {lba} word {w}: read {got:#018x}, wrote \
                         {want:#018x} (seed {seed:#x})"
                    ));
                }
                Ok(())
            })?;
            bytes += u64::from(r.blocks) * u64::from(block);
        }
    }
    Ok(bytes)
}

/// Zeroes the first regions with Write Zeroes and reads them back. Returns bytes read.
fn zeroes(disk: &mut Controller, regions: &[Region]) -> Result<u64, String> {
    let block = disk.info().block_size;
    let regions = &regions[..ZEROED_REGIONS as usize];
    let reqs: Vec<IoRequest> = regions
        .iter()
        .map(|r| IoRequest {
            kind: IoKind::WriteZeroes,
            lba: r.lba,
            blocks: r.blocks,
            buf: 0,
            len: 0,
        })
        .collect();
    execute(disk, &reqs)?;
    let buffers = regions
        .iter()
        .map(|r| buffer(r, block))
        .collect::<Result<Vec<_>, _>>()?;
    for b in &buffers {
        b.fill(0, b.len(), 0xa5);
    }
    transfer(disk, IoKind::Read, regions, &buffers, block)?;
    let mut bytes = 0;
    for (r, b) in regions.iter().zip(&buffers) {
        for_each_word(r, block, |off, lba, w| match b.read::<u64>(off) {
            0 => Ok(()),
            got => Err(format!(
                "lba {lba} word {w} reads {got:#x} after Write Zeroes"
            )),
        })?;
        bytes += u64::from(r.blocks) * u64::from(block);
    }
    Ok(bytes)
}

fn test(location: Location, options: Options) -> Result<(u64, u64), String> {
    let found = probe::find(location, None)
        .map_err(|e| format!("{e}"))?
        .ok_or_else(|| String::from("no NVMe controller found"))?;
    println!(
        "nvme: controller {:04x}:{:04x} at {}, BAR0 {:#x} ({} KiB)",
        found.function.vendor,
        found.function.device,
        found.function.bdf,
        found.bar.base,
        found.bar.size >> 10
    );
    let init = Instant::now();
    let vector = crate::nvme::irq::enable(found.function.bdf, &found.bar, &found.registers);
    let mut disk =
        Controller::init(found.registers, options, vector).map_err(|e| format!("{e}"))?;
    println!("{} (ready in {} us)", disk.info(), init.elapsed_us());
    let info = *disk.info();
    let regions = plan(info.blocks, info.block_size, info.max_transfer)?;

    let mut bytes = 0;
    let seed = time::ticks() | 1;
    for round in 0..2u64 {
        bytes += pass(
            &mut disk,
            &regions,
            seed.wrapping_add(round.wrapping_mul(0x1234_5678_9abc)),
        )?;
    }
    let c = info.controller;
    if c.write_zeroes() {
        bytes += zeroes(&mut disk, &regions)?;
    }
    if c.dataset_management() {
        let last = regions[regions.len() - 1];
        execute(
            &mut disk,
            &[IoRequest {
                kind: IoKind::Deallocate,
                lba: last.lba,
                blocks: last.blocks,
                buf: 0,
                len: 0,
            }],
        )?;
    }
    let flush = IoRequest::FLUSH;
    execute(&mut disk, &[flush])?;
    let s = disk.stats();
    println!(
        "nvme selftest: doorbells sq mmio={} suppressed={} cq mmio={} suppressed={}",
        s.sq.mmio, s.sq.suppressed, s.cq.mmio, s.cq.suppressed
    );
    let (requests, channel_bytes) =
        loopback::run(disk).map_err(|e| format!("channel loopback: {e}"))?;
    println!("nvme selftest: channel loopback ok requests={requests} bytes={channel_bytes}");
    bytes += channel_bytes;
    Ok((bytes / u64::from(info.block_size), bytes))
}
