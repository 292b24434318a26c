//! The verified workload: pre-checks of the other request types, prefill, the timed phase, the
//! final flush, the verify pass, and the report.
//!
//! Per block the client keeps the generation of its last write and two flags: KNOWN (that
//! write was acknowledged, so a read must show exactly it) and IN_FLIGHT (a request for the
//! block is outstanding: no second one is issued, so every expectation is exact). A failed
//! write leaves its block unknown until the next acknowledged write.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use guest_kernel::time::{self, Instant};
use guest_kernel::{heap, println};

use crate::blk::{self, status, Completion, Disk, DiskError, Op, ID_BYTES, WRITE_ZEROES_UNMAP};
use crate::config::{BadArg, Config, SECTOR};
use crate::device::Found;
use crate::pattern::{self, Corruption, Stamp, Verdict};
use crate::stats::{Checks, PhaseStats, Report};

/// How long to poll the used ring before asking the VMM to wait.
const POLL_US: u64 = 30;
/// How long a wait lasts at most (the VMM ends it earlier when something completes).
const WAIT_US: u32 = 1_000;
/// Heap kept free for everything else (indirect descriptor lists, strings).
const HEAP_RESERVE: u64 = 1 << 20;

const KNOWN: u8 = 1;
const IN_FLIGHT: u8 = 2;

/// How the run ended.
pub enum Outcome {
    /// The command line does not fit the device (exit status 1).
    BadArg(BadArg),
    /// The run happened; the report was printed. Clean or not.
    Ran { clean: bool },
}

/// A condition that ends the run early (counted as an error).
struct Fatal(String);

impl From<DiskError> for Fatal {
    fn from(e: DiskError) -> Self {
        Fatal(format!("{e}"))
    }
}

/// What a slot's request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum What {
    Idle,
    Read {
        block: u64,
    },
    Write {
        block: u64,
        gen: u32,
    },
    Flush,
    /// A pre-check request, handled by its caller.
    Check,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    what: What,
    since: u64,
}

/// What to issue next.
enum Next {
    Read(u64),
    Write(u64),
    Flush,
    /// Nothing now (wait for completions).
    Stall,
    /// Nothing more in this phase.
    Done,
}

/// Where a phase takes its requests from.
enum Plan {
    /// Every block once, in order, written.
    Prefill { next: u64 },
    /// The configured workload.
    Timed(Timed),
    /// Every block written in the run, in order, read.
    Verify { next: u64 },
}

struct Timed {
    rng: u64,
    cursor: u64,
    issued: u64,
    count: Option<u64>,
    started: Option<Instant>,
    duration_us: u64,
    acked_since_flush: u64,
    flush_due: bool,
    flush_in_flight: bool,
}

struct Run<'a> {
    cfg: &'a Config,
    disk: Box<dyn Disk>,
    bs: usize,
    sectors_per_block: u64,
    blocks: u64,
    run: u64,
    gens: Vec<u32>,
    flags: Vec<u8>,
    pending: Vec<Pending>,
    free: Vec<usize>,
    done: Vec<Completion>,
    checks: Checks,
}

/// SplitMix64 step: the request sequence's PRNG.
fn rand(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn ticks_to_ns(ticks: u64) -> u64 {
    (u128::from(ticks) * 1_000_000 / u128::from(time::tsc_khz().max(1))) as u64
}

/// Runs the workload of `cfg` on `found` and prints the report line.
pub fn run(cfg: &Config, found: &Found) -> Outcome {
    let buffers = u64::from(cfg.qd) * cfg.bs.next_multiple_of(512);
    if buffers + HEAP_RESERVE > heap::free() as u64 {
        return Outcome::BadArg(BadArg::new(
            "qd",
            &format!("{}", cfg.qd),
            format!(
                "qd*bs ({buffers} bytes) to fit in the heap ({} bytes free)",
                heap::free()
            ),
        ));
    }
    let disk = match blk::open(found, cfg.qd as usize, cfg.bs as usize) {
        Ok(d) => d,
        Err(e) => {
            report_failure(cfg, format!("{e}"));
            return Outcome::Ran { clean: false };
        }
    };
    describe(found, disk.info());
    let mut run = match Run::new(cfg, disk) {
        Ok(r) => r,
        Err(bad) => return Outcome::BadArg(bad),
    };
    let mut timed = PhaseStats::default();
    if let Err(Fatal(e)) = run.all(&mut timed) {
        println!("ddvm-workload: stopped: {e}");
        run.checks.error(|| e);
    }
    let c = run.disk.counters();
    println!(
        "ddvm-workload: {} notifies ({} suppressed), {} waits",
        c.notifies, c.notifies_suppressed, c.waits
    );
    report(cfg, run.qd(), &timed, &run.checks);
    Outcome::Ran {
        clean: run.checks.clean(),
    }
}

/// Reports a run that could not start (no device, or it would not come up): one error.
pub fn report_failure(cfg: &Config, why: String) {
    let mut checks = Checks::default();
    checks.error(|| why);
    report(cfg, 0, &PhaseStats::default(), &checks);
}

fn report(cfg: &Config, qd: usize, timed: &PhaseStats, checks: &Checks) {
    let r = Report {
        id: cfg.id,
        workload: cfg.workload.name(),
        bs: cfg.bs,
        qd,
        timed,
        checks,
    };
    println!("ddvm-workload: {}", r.json());
}

fn describe(found: &Found, info: &blk::DiskInfo) {
    let f = info.features;
    let names = [
        (blk::Features::RING_INDIRECT_DESC, " indirect"),
        (blk::Features::RING_EVENT_IDX, " event-idx"),
        (blk::Features::FLUSH, " flush"),
        (blk::Features::DISCARD, " discard"),
        (blk::Features::WRITE_ZEROES, " write-zeroes"),
        (blk::Features::RO, " read-only"),
    ];
    let mut list = String::new();
    for (bit, name) in names {
        if f.contains(bit) {
            list.push_str(name);
        }
    }
    println!(
        "ddvm-workload: virtio-blk at {:#x} (virtio-mmio v{}): {} sectors ({} MiB), blk_size {}, \
         queue {} of {}, features {:#x} of {:#x}:{list}",
        found.window.base,
        info.version,
        info.capacity,
        (info.capacity * SECTOR) >> 20,
        info.blk_size,
        info.queue_size,
        info.queue_max,
        f.bits(),
        info.offered.bits()
    );
}

impl<'a> Run<'a> {
    fn new(cfg: &'a Config, disk: Box<dyn Disk>) -> Result<Self, BadArg> {
        let info = disk.info();
        let bs = cfg.bs;
        let capacity = info.capacity * SECTOR;
        if !bs.is_multiple_of(u64::from(info.blk_size)) {
            return Err(BadArg::new(
                "bs",
                &format!("{bs}"),
                format!("a multiple of the device's block size {}", info.blk_size),
            ));
        }
        let span = cfg.span.unwrap_or(capacity);
        if span > capacity || capacity < bs {
            return Err(BadArg::new(
                "span",
                &format!("{span}"),
                format!("at least bs={bs} and at most the device's {capacity} bytes"),
            ));
        }
        if info.read_only() && cfg.workload.writes() {
            return Err(BadArg::new(
                "workload",
                cfg.workload.name(),
                "randread or seqread: the device is read-only",
            ));
        }
        if info.read_only() && cfg.prefill {
            return Err(BadArg::new("prefill", "1", "0: the device is read-only"));
        }
        let blocks = span / bs;
        let table = blocks * 5;
        if table + HEAP_RESERVE > heap::free() as u64 {
            return Err(BadArg::new(
                "span",
                &format!("{span}"),
                format!(
                    "a span whose {blocks} blocks' state ({table} bytes) fits in the heap \
                     ({} bytes free): a smaller span or a larger bs",
                    heap::free()
                ),
            ));
        }
        let slots = disk.slots().min(blocks as usize);
        if slots < cfg.qd as usize {
            let why = if slots == disk.slots() {
                format!(
                    "a queue of {} without indirect descriptors holds {slots} requests",
                    info.queue_size
                )
            } else {
                format!("the span holds {blocks} blocks")
            };
            println!("ddvm-workload: qd {} reduced to {slots}: {why}", cfg.qd);
        }
        // The run nonce: the TSC after boot differs from boot to boot by at least its jitter.
        let mut nonce = time::ticks() ^ (u64::from(cfg.id) << 48);
        Ok(Run {
            cfg,
            bs: bs as usize,
            sectors_per_block: bs / SECTOR,
            blocks,
            run: rand(&mut nonce),
            gens: vec![0; blocks as usize],
            flags: vec![0; blocks as usize],
            pending: vec![
                Pending {
                    what: What::Idle,
                    since: 0
                };
                slots
            ],
            free: (0..slots).rev().collect(),
            done: Vec::with_capacity(slots),
            checks: Checks::default(),
            disk,
        })
    }

    /// The queue depth used: one slot per request in flight.
    fn qd(&self) -> usize {
        self.pending.len()
    }

    /// Pre-checks, prefill, timed phase, final flush, verify pass.
    fn all(&mut self, timed: &mut PhaseStats) -> Result<(), Fatal> {
        self.prechecks()?;
        if self.cfg.prefill {
            let mut stats = PhaseStats::default();
            self.phase(&mut Plan::Prefill { next: 0 }, &mut stats)?;
            println!(
                "ddvm-workload: prefill: {} blocks written in {} ms",
                stats.writes,
                stats.elapsed_us / 1000
            );
        }
        let cfg = self.cfg;
        let mut plan = Plan::Timed(Timed {
            rng: cfg.seed ^ (u64::from(cfg.id) << 32),
            cursor: 0,
            issued: 0,
            count: cfg.count,
            started: None,
            duration_us: cfg
                .duration_ms
                .map_or(u64::MAX, |ms| ms.saturating_mul(1000)),
            acked_since_flush: 0,
            flush_due: false,
            flush_in_flight: false,
        });
        self.phase(&mut plan, timed)?;
        if self.disk.info().flush() && self.cfg.flush {
            let c = self.sync(Op::Flush)?;
            if c.status == status::OK {
                timed.flushes += 1;
            } else {
                self.checks
                    .error(|| format!("final FLUSH: status {}", status::name(c.status)));
            }
        }
        println!(
            "ddvm-workload: {}: {} reads, {} writes, {} flushes in {} ms",
            self.cfg.workload.name(),
            timed.reads,
            timed.writes,
            timed.flushes,
            timed.elapsed_us / 1000
        );
        if self.cfg.verify_pass {
            let before = (self.checks.verified, self.checks.mismatches);
            let mut stats = PhaseStats::default();
            self.phase(&mut Plan::Verify { next: 0 }, &mut stats)?;
            println!(
                "ddvm-workload: verify pass: {} blocks read, {} verified, {} mismatches in {} ms",
                stats.reads,
                self.checks.verified - before.0,
                self.checks.mismatches - before.1,
                stats.elapsed_us / 1000
            );
        }
        Ok(())
    }

    /// GET_ID, WRITE_ZEROES (read back as zeroes), DISCARD, FLUSH: once each, when offered.
    fn prechecks(&mut self) -> Result<(), Fatal> {
        let info = self.disk.info().clone();
        let c = self.sync(Op::GetId)?;
        if c.status == status::OK {
            let raw = &self.disk.data(c.slot)[..ID_BYTES];
            let id: String = raw
                .iter()
                .take_while(|&&b| b != 0)
                .map(|&b| {
                    if b.is_ascii_graphic() || b == b' ' {
                        b as char
                    } else {
                        '?'
                    }
                })
                .collect();
            println!("ddvm-workload: device id \"{id}\"");
        } else {
            self.checks
                .error(|| format!("GET_ID: status {}", status::name(c.status)));
        }
        let spb = self.sectors_per_block;
        if let Some(wz) = info.write_zeroes.filter(|_| !info.read_only()) {
            let blocks = self.blocks.min(2).min(u64::from(wz.max_sectors) / spb);
            if blocks == 0 {
                println!(
                    "ddvm-workload: WRITE_ZEROES skipped: at most {} sectors, a block is {spb}",
                    wz.max_sectors
                );
            } else {
                for b in 0..blocks {
                    self.sync_write(b)?;
                }
                // Block 0 plainly, block 1 with the UNMAP flag: both must read back as zeroes.
                for b in 0..blocks {
                    let c = self.sync(Op::WriteZeroes {
                        sector: b * spb,
                        sectors: spb as u32,
                        flags: if b == 0 { 0 } else { WRITE_ZEROES_UNMAP },
                    })?;
                    self.flags[b as usize] &= !KNOWN;
                    if c.status != status::OK {
                        self.checks.error(|| {
                            format!(
                                "WRITE_ZEROES of block {b}: status {}",
                                status::name(c.status)
                            )
                        });
                    } else {
                        self.check_zeroes(b)?;
                    }
                }
            }
        }
        if let Some(d) = info.discard.filter(|_| !info.read_only()) {
            let first = 2.min(self.blocks - 1);
            let blocks = (self.blocks - first)
                .min(2)
                .min(u64::from(d.max_sectors) / spb);
            if blocks == 0 {
                println!(
                    "ddvm-workload: DISCARD skipped: at most {} sectors, a block is {spb}",
                    d.max_sectors
                );
            } else {
                let c = self.sync(Op::Discard {
                    sector: first * spb,
                    sectors: (blocks * spb) as u32,
                })?;
                for b in first..first + blocks {
                    self.flags[b as usize] &= !KNOWN;
                }
                if c.status != status::OK {
                    self.checks
                        .error(|| format!("DISCARD: status {}", status::name(c.status)));
                }
            }
        }
        if info.flush() && self.cfg.flush {
            let c = self.sync(Op::Flush)?;
            if c.status != status::OK {
                self.checks
                    .error(|| format!("FLUSH: status {}", status::name(c.status)));
            }
        }
        Ok(())
    }

    /// Writes the next generation of `block` and waits for it (pre-checks).
    fn sync_write(&mut self, block: u64) -> Result<(), Fatal> {
        let gen = self.gens[block as usize] + 1;
        let slot = self.free[self.free.len() - 1];
        self.fill(slot, block, gen);
        self.gens[block as usize] = gen;
        let c = self.sync(Op::Write {
            sector: block * self.sectors_per_block,
            len: self.bs,
        })?;
        if c.status == status::OK {
            self.flags[block as usize] |= KNOWN;
        } else {
            self.checks.error(|| {
                format!(
                    "write of block {block} (pre-check): status {}",
                    status::name(c.status)
                )
            });
        }
        Ok(())
    }

    /// Reads `block` and checks it is all zeroes (after WRITE_ZEROES).
    fn check_zeroes(&mut self, block: u64) -> Result<(), Fatal> {
        let c = self.sync(Op::Read {
            sector: block * self.sectors_per_block,
            len: self.bs,
        })?;
        if c.status != status::OK {
            self.checks.error(|| {
                format!(
                    "read of block {block} after WRITE_ZEROES: status {}",
                    status::name(c.status)
                )
            });
            return Ok(());
        }
        let data = &self.disk.data(c.slot)[..self.bs];
        if let Some(at) = data.iter().position(|&b| b != 0) {
            let byte = data[at];
            self.checks.mismatches += 1;
            self.checks.corrupt += 1;
            if self.checks.first_error.is_none() {
                self.checks.first_error = Some(format!(
                    "block {block} after WRITE_ZEROES: byte {at} is {byte:#04x}, not zero"
                ));
            }
        } else {
            self.checks.verified += 1;
        }
        Ok(())
    }

    /// Submits `op` on a free slot and waits for it (all other slots idle).
    fn sync(&mut self, op: Op) -> Result<Completion, Fatal> {
        let slot = self.free.pop().expect("a free slot");
        self.pending[slot] = Pending {
            what: What::Check,
            since: time::ticks(),
        };
        self.disk.submit(slot, op)?;
        self.disk.kick();
        let mut idle = Instant::now();
        loop {
            self.done.clear();
            if self.disk.poll(&mut self.done)? > 0 {
                let c = self.done[0];
                debug_assert_eq!(c.slot, slot);
                self.pending[slot].what = What::Idle;
                self.free.push(slot);
                return Ok(c);
            }
            if idle.elapsed_us() >= POLL_US {
                self.check_timeouts()?;
                self.disk.wait(WAIT_US);
                idle = Instant::now();
            }
        }
    }

    /// Fails the run when a request has been in flight longer than `timeout_ms`.
    fn check_timeouts(&self) -> Result<(), Fatal> {
        let now = time::ticks();
        let limit = time::us_to_ticks(self.cfg.timeout_ms.saturating_mul(1000));
        for (slot, p) in self.pending.iter().enumerate() {
            if p.what != What::Idle && now.saturating_sub(p.since) > limit {
                return Err(Fatal(format!(
                    "request {:?} on slot {slot} not completed after {} ms ({} in flight)",
                    p.what,
                    self.cfg.timeout_ms,
                    self.disk.in_flight()
                )));
            }
        }
        Ok(())
    }

    fn fill(&mut self, slot: usize, block: u64, gen: u32) {
        let stamp = Stamp {
            id: self.cfg.id,
            run: self.run,
            block,
            gen,
        };
        let bs = self.bs;
        pattern::fill(&mut self.disk.data_mut(slot)[..bs], &stamp);
    }

    /// Runs one phase to its end: keeps every slot busy, notifies once per batch, polls,
    /// waits when nothing completes.
    fn phase(&mut self, plan: &mut Plan, stats: &mut PhaseStats) -> Result<(), Fatal> {
        let start = Instant::now();
        if let Plan::Timed(t) = plan {
            t.started = Some(start);
        }
        let mut idle = Instant::now();
        let mut finished = false;
        loop {
            let before = self.free.len();
            while !finished && !self.free.is_empty() {
                match self.next(plan) {
                    Next::Read(block) => self.issue(What::Read { block })?,
                    Next::Write(block) => {
                        let gen = self.gens[block as usize] + 1;
                        self.issue(What::Write { block, gen })?
                    }
                    Next::Flush => self.issue(What::Flush)?,
                    Next::Stall => break,
                    Next::Done => finished = true,
                }
            }
            if self.free.len() < before {
                // Fresh requests get a full poll period before a wait.
                idle = Instant::now();
            }
            self.disk.kick();
            self.done.clear();
            let n = self.disk.poll(&mut self.done)?;
            for i in 0..n {
                let c = self.done[i];
                self.complete(c, plan, stats);
            }
            if n > 0 {
                idle = Instant::now();
                continue;
            }
            if self.disk.in_flight() == 0 {
                if finished {
                    break;
                }
                continue;
            }
            if idle.elapsed_us() >= POLL_US {
                self.check_timeouts()?;
                self.disk.wait(WAIT_US);
                idle = Instant::now();
            }
        }
        stats.elapsed_us = start.elapsed_us();
        Ok(())
    }

    /// The next request of `plan`.
    fn next(&mut self, plan: &mut Plan) -> Next {
        match plan {
            Plan::Prefill { next } => {
                if *next == self.blocks {
                    return Next::Done;
                }
                *next += 1;
                Next::Write(*next - 1)
            }
            Plan::Verify { next } => {
                while *next < self.blocks && self.gens[*next as usize] == 0 {
                    *next += 1;
                }
                if *next == self.blocks {
                    return Next::Done;
                }
                *next += 1;
                Next::Read(*next - 1)
            }
            Plan::Timed(t) => {
                if t.flush_due && !t.flush_in_flight {
                    t.flush_due = false;
                    t.flush_in_flight = true;
                    return Next::Flush;
                }
                if t.count.is_some_and(|c| t.issued >= c)
                    || t.started.is_some_and(|s| s.elapsed_us() >= t.duration_us)
                {
                    return Next::Done;
                }
                let w = self.cfg.workload;
                let read = match (w.reads(), w.writes()) {
                    (true, true) => rand(&mut t.rng) % 100 < u64::from(self.cfg.rwmix),
                    (reads, _) => reads,
                };
                let Some(block) = self.pick(t) else {
                    return Next::Stall;
                };
                t.issued += 1;
                if read {
                    Next::Read(block)
                } else {
                    Next::Write(block)
                }
            }
        }
    }

    /// A block with no request in flight: random or the next in order.
    fn pick(&self, t: &mut Timed) -> Option<u64> {
        let free = |b: u64| self.flags[b as usize] & IN_FLIGHT == 0;
        let start = if self.cfg.workload.random() {
            for _ in 0..8 {
                let b = rand(&mut t.rng) % self.blocks;
                if free(b) {
                    return Some(b);
                }
            }
            rand(&mut t.rng) % self.blocks
        } else {
            t.cursor
        };
        let found = (0..self.blocks)
            .map(|i| (start + i) % self.blocks)
            .find(|&b| free(b))?;
        if !self.cfg.workload.random() {
            t.cursor = (found + 1) % self.blocks;
        }
        Some(found)
    }

    fn issue(&mut self, what: What) -> Result<(), Fatal> {
        let slot = self.free.pop().expect("a free slot");
        let op = match what {
            What::Read { block } => {
                self.flags[block as usize] |= IN_FLIGHT;
                Op::Read {
                    sector: block * self.sectors_per_block,
                    len: self.bs,
                }
            }
            What::Write { block, gen } => {
                self.fill(slot, block, gen);
                self.gens[block as usize] = gen;
                let f = &mut self.flags[block as usize];
                *f = (*f | IN_FLIGHT) & !KNOWN;
                Op::Write {
                    sector: block * self.sectors_per_block,
                    len: self.bs,
                }
            }
            What::Flush => Op::Flush,
            What::Idle | What::Check => unreachable!("not issued by phases"),
        };
        self.pending[slot] = Pending {
            what,
            since: time::ticks(),
        };
        self.disk.submit(slot, op)?;
        Ok(())
    }

    fn complete(&mut self, c: Completion, plan: &mut Plan, stats: &mut PhaseStats) {
        let what = self.pending[c.slot].what;
        self.pending[c.slot].what = What::Idle;
        let ok = c.status == status::OK;
        let bytes = self.bs as u64;
        match what {
            What::Read { block } => {
                self.flags[block as usize] &= !IN_FLIGHT;
                stats.latency.record(ticks_to_ns(c.ticks));
                if ok {
                    stats.reads += 1;
                    stats.bytes += bytes;
                    self.verify(c.slot, block);
                } else {
                    self.checks.error(|| {
                        format!("read of block {block}: status {}", status::name(c.status))
                    });
                }
            }
            What::Write { block, gen } => {
                let f = &mut self.flags[block as usize];
                *f &= !IN_FLIGHT;
                stats.latency.record(ticks_to_ns(c.ticks));
                if ok {
                    *f |= KNOWN;
                    stats.writes += 1;
                    stats.bytes += bytes;
                    if let Plan::Timed(t) = plan {
                        t.acked_since_flush += 1;
                        if self.cfg.flush
                            && self.cfg.flush_every > 0
                            && t.acked_since_flush >= self.cfg.flush_every
                            && self.disk.info().flush()
                        {
                            t.acked_since_flush = 0;
                            t.flush_due = true;
                        }
                    }
                } else {
                    self.checks.error(|| {
                        format!(
                            "write of block {block} generation {gen}: status {}",
                            status::name(c.status)
                        )
                    });
                }
            }
            What::Flush => {
                if let Plan::Timed(t) = plan {
                    t.flush_in_flight = false;
                }
                if ok {
                    stats.flushes += 1;
                } else {
                    self.checks
                        .error(|| format!("FLUSH: status {}", status::name(c.status)));
                }
            }
            What::Idle | What::Check => unreachable!("phases complete only their requests"),
        }
        self.free.push(c.slot);
    }

    /// Checks the data a read of `block` returned into `slot`.
    fn verify(&mut self, slot: usize, block: u64) {
        if self.flags[block as usize] & KNOWN == 0 {
            self.checks.unverified += 1;
            return;
        }
        let expect = Stamp {
            id: self.cfg.id,
            run: self.run,
            block,
            gen: self.gens[block as usize],
        };
        let verdict = pattern::check(&self.disk.data(slot)[..self.bs], &expect);
        let c = &mut self.checks;
        let what = match verdict {
            Verdict::Ok => {
                c.verified += 1;
                return;
            }
            Verdict::Unwritten => {
                c.unwritten += 1;
                String::from("unwritten: no header")
            }
            Verdict::Corrupt(how) => {
                c.corrupt += 1;
                match how {
                    Corruption::BlockSize(bs) => format!("corrupt: header says bs {bs}"),
                    Corruption::Checksum => String::from("corrupt: checksum mismatch"),
                    Corruption::Payload(at) => format!("corrupt: payload differs at byte {at}"),
                    Corruption::Future(g) => format!("corrupt: generation {g} never written"),
                }
            }
            Verdict::Misplaced { id, block } => {
                c.misplaced += 1;
                format!("misplaced: holds client {id} block {block}")
            }
            Verdict::Lost { gen, earlier_run } => {
                c.lost += 1;
                if earlier_run {
                    format!("lost: holds generation {gen} of an earlier run")
                } else {
                    format!("lost: holds generation {gen}")
                }
            }
        };
        c.mismatches += 1;
        if c.first_error.is_none() {
            c.first_error = Some(format!(
                "read of block {block} (sector {}), acknowledged generation {}: {what}",
                block * self.sectors_per_block,
                expect.gen
            ));
        }
    }
}
