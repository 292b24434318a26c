//! The runs, summarised: per job and peer, the throughput over the rounds and its ratio to
//! peer (b); per peer, the kill job without and with kills; the targets; and all of it as a
//! markdown table.

use std::fmt::Write as _;

use serde::Serialize;

use crate::fio::FioJob;
use crate::log::{Mode, PeerLog, Run};

/// The peers, in the order of the table: (b) is the reference of the ratios.
pub const PEERS: [(&str, &str); 4] = [
    ("a", "(a) ddvm, NVMe driver domain"),
    ("b", "(b) ddvm, file in the VMM"),
    ("c", "(c) QEMU virtio-blk, iothread"),
    ("d", "(d) QEMU vhost-user-blk, qemu-storage-daemon"),
];

/// The median, least and greatest of some samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Spread {
    /// The median (the mean of the middle two for an even count).
    pub median: f64,
    /// The least.
    pub min: f64,
    /// The greatest.
    pub max: f64,
}

impl Spread {
    /// The spread of `samples`; all zero when there are none. Non-finite samples are left out.
    pub fn of(samples: &[f64]) -> Self {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Self {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }
}

/// One job of the standard set, under one peer, over the rounds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JobRow {
    /// fio's job name.
    pub job: String,
    /// The peer (`a`..`d`).
    pub peer: String,
    /// Rounds that reported this job.
    pub samples: usize,
    /// Rounds whose run of this peer reported nothing for it (a hang, a crash).
    pub missing: usize,
    /// MiB/s of the job's direction.
    pub mib_s: Spread,
    /// Operations per second of the job's direction.
    pub iops: Spread,
    /// The median MiB/s over (b)'s median; `None` without (b).
    pub ratio_to_b: Option<f64>,
    /// The median over the rounds of the completion latency's 50th percentile, µs.
    pub clat_p50_us: f64,
    /// The same of the 99th percentile, µs.
    pub clat_p99_us: f64,
    /// The longest single I/O in any round, ms.
    pub lat_max_ms: f64,
    /// I/O errors, all rounds together.
    pub io_errors: u64,
    /// Failed verifications, all rounds together.
    pub verify_failures: u64,
}

/// The kill job under one peer, without faults or with kills.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KillRow {
    /// The peer.
    pub peer: String,
    /// `base` or `kill`.
    pub mode: Mode,
    /// Kills of the backend during the run.
    pub kills: u32,
    /// MiB/s of the writes.
    pub mib_s: f64,
    /// Writes per second.
    pub iops: f64,
    /// MiB/s over the same peer's fault-free run; `None` for that run itself or without it.
    pub ratio_to_base: Option<f64>,
    /// I/O errors.
    pub io_errors: u64,
    /// Failed verifications.
    pub verify_failures: u64,
    /// The longest single I/O, ms: the longest stall a request saw.
    pub lat_max_ms: f64,
    /// `completed`, or how it did not.
    pub outcome: String,
}

/// What an I/O of one job cost the rig under one peer: the rig's counters between the job's
/// start and fio's return ([`crate::log::Cost`]) over the job's I/Os, medians over the runs
/// that measured it (the standard rounds, and the kill job's fault-free run).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CostRow {
    /// fio's job name.
    pub job: String,
    /// The peer.
    pub peer: String,
    /// Runs that measured it.
    pub samples: usize,
    /// CPU time of the whole rig, µs per I/O.
    pub cpu_us: f64,
    /// VM exits of every VM, per I/O.
    pub exits: f64,
    /// Port I/O and MMIO exits (notifications, doorbells, device registers), per I/O.
    pub io_exits: f64,
    /// HLT exits, per I/O.
    pub halt_exits: f64,
    /// Interrupts injected, per I/O.
    pub irqs: f64,
    /// Context switches, per I/O.
    pub switches: f64,
    /// CPU µs per I/O by thread name, the busiest first.
    pub threads: Vec<(String, f64)>,
}

/// A target of the comparison, and whether this run met it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Target {
    /// What it asks.
    pub what: String,
    /// Whether it was met.
    pub met: bool,
    /// The figures behind the verdict.
    pub detail: String,
}

/// The whole report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// The machine, as the caller described it.
    pub machine: String,
    /// The date of the run, as the caller gave it.
    pub date: String,
    /// The run's parameters.
    pub setup: crate::log::Setup,
    /// The standard jobs, job by job, peer by peer.
    pub jobs: Vec<JobRow>,
    /// The kill job, peer by peer.
    pub kills: Vec<KillRow>,
    /// What an I/O cost, job by job, peer by peer (when the rig measured it).
    pub costs: Vec<CostRow>,
    /// The targets.
    pub targets: Vec<Target>,
    /// Every run, as parsed.
    pub runs: Vec<Run>,
}

/// The job's errors: what fio counted, or the `io_u error` lines the client saw if more.
fn errors(run_job: &crate::log::Job, fio: &FioJob) -> u64 {
    let printed = run_job.end.as_ref().map_or(0, |e| e.io_errors);
    fio.total_err.max(printed)
}

fn failed_checks(run_job: &crate::log::Job) -> u64 {
    run_job.end.as_ref().map_or(0, |e| e.verify_failures)
}

/// The outcome of a run that went to its end with its report.
const COMPLETED: &str = "completed";

/// How a run ended, in words.
fn outcome(run: &Run) -> String {
    match &run.end {
        None => "the output stops inside the run".to_string(),
        Some(e) if e.timed_out => format!("hung: the client was killed after {} s", e.seconds),
        Some(e) => {
            let job = run.jobs.first();
            match job.and_then(|j| j.end.as_ref()) {
                None => format!("no fio report (VMM exit status {})", e.status),
                Some(j) if j.status != 0 => format!("fio exit status {}", j.status),
                Some(_) if job.is_some_and(|j| j.fio.is_empty()) => {
                    "fio's JSON report was lost".to_string()
                }
                Some(_) => COMPLETED.to_string(),
            }
        }
    }
}

impl Report {
    /// Summarises `log`.
    pub fn new(log: PeerLog, machine: &str, date: &str) -> Self {
        let peers: Vec<&str> = PEERS
            .iter()
            .map(|(p, _)| *p)
            .filter(|p| log.runs.iter().any(|r| r.peer == *p))
            .collect();
        // The standard jobs, in the order they ran.
        let mut names: Vec<String> = Vec::new();
        for run in log.runs.iter().filter(|r| r.mode == Mode::Peer) {
            for j in run.jobs.iter().flat_map(|j| &j.fio) {
                if !names.contains(&j.name) {
                    names.push(j.name.clone());
                }
            }
        }
        let mut jobs = Vec::new();
        for name in &names {
            let mut rows: Vec<JobRow> =
                peers.iter().map(|peer| job_row(&log, name, peer)).collect();
            let b = rows
                .iter()
                .find(|r| r.peer == "b" && r.samples > 0)
                .map(|r| r.mib_s.median);
            for r in &mut rows {
                r.ratio_to_b = b.filter(|b| *b > 0.0).map(|b| r.mib_s.median / b);
            }
            jobs.extend(rows);
        }
        let mut kills = Vec::new();
        for peer in &peers {
            let base = log
                .runs
                .iter()
                .find(|r| r.peer == *peer && r.mode == Mode::Base)
                .map(kill_row);
            let killed = log
                .runs
                .iter()
                .find(|r| r.peer == *peer && r.mode == Mode::Kill)
                .map(kill_row);
            let base_mib = base
                .as_ref()
                .filter(|r| r.outcome == COMPLETED)
                .map(|r| r.mib_s);
            if let Some(b) = base {
                kills.push(b);
            }
            if let Some(mut k) = killed {
                k.ratio_to_base = base_mib.filter(|b| *b > 0.0).map(|b| k.mib_s / b);
                kills.push(k);
            }
        }
        let mut costs = Vec::new();
        let kill_jobs = log
            .runs
            .iter()
            .filter(|r| r.mode == Mode::Base)
            .flat_map(|r| r.jobs.iter().flat_map(|j| &j.fio))
            .map(|f| f.name.clone());
        let mut cost_names = names.clone();
        for n in kill_jobs {
            if !cost_names.contains(&n) {
                cost_names.push(n);
            }
        }
        for name in &cost_names {
            costs.extend(peers.iter().filter_map(|peer| cost_row(&log, name, peer)));
        }
        let targets = targets(&names, &jobs, &kills);
        Self {
            machine: machine.to_string(),
            date: date.to_string(),
            setup: log.setup,
            jobs,
            kills,
            costs,
            targets,
            runs: log.runs,
        }
    }

    /// The report as markdown: the setup, the table of the standard jobs, the kill table and
    /// the targets.
    pub fn markdown(&self) -> String {
        let mut o = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_markdown(&mut o);
        o
    }

    fn write_markdown(&self, o: &mut String) -> std::fmt::Result {
        let s = &self.setup;
        writeln!(o, "`scripts/rig peer`, {}, {}.", self.date, self.machine)?;
        writeln!(
            o,
            "Each client: the same kernel and initramfs (Debian's fio), {} vCPU, {} MiB; its disk a \
             {} MiB raw file on the rig's tmpfs. {} of the standard jobs, the peers' order \
             reversed every other round; `seqwrite` fills the disk, the others use {} MiB (4 KiB \
             QD1: {} MiB); every job verifies its data (crc32c).",
            s.client_vcpus,
            s.client_mib,
            s.disk_mib,
            if s.rounds == 1 {
                "1 round".to_string()
            } else {
                format!("{} rounds", s.rounds)
            },
            s.rand_mib,
            s.qd1_mib
        )?;
        writeln!(o)?;
        writeln!(
            o,
            "| job | peer | MiB/s, median (min–max) | IOPS, median | vs (b) | clat p50 µs | clat p99 µs | longest I/O ms | I/O errors | verify failures |"
        )?;
        writeln!(
            o,
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        )?;
        for r in &self.jobs {
            let name = peer_name(&r.peer);
            if r.samples == 0 {
                writeln!(
                    o,
                    "| {} | {name} | no report in {} rounds | | | | | | | |",
                    r.job, r.missing
                )?;
                continue;
            }
            let missing = if r.missing > 0 {
                format!(" ({} rounds without a report)", r.missing)
            } else {
                String::new()
            };
            writeln!(
                o,
                "| {} | {name} | {:.1} ({:.1}–{:.1}){missing} | {:.0} | {} | {:.0} | {:.0} | {:.1} | {} | {} |",
                r.job,
                r.mib_s.median,
                r.mib_s.min,
                r.mib_s.max,
                r.iops.median,
                ratio(r.ratio_to_b),
                r.clat_p50_us,
                r.clat_p99_us,
                r.lat_max_ms,
                r.io_errors,
                r.verify_failures
            )?;
        }
        if !self.kills.is_empty() {
            writeln!(o)?;
            writeln!(
                o,
                "The kill job: 4 KiB random writes at QD32 for {} s, each batch of 64 read back and \
                 checked while the writes go on; once without faults, and for (a) and (d) while the \
                 backend is killed every second (ddvm: `ddvm ctl kill` of the driver domain; (d): \
                 SIGKILL of qemu-storage-daemon, restarted at once, QEMU's chardev reconnecting). \
                 (b) and (c) serve the disk inside the VMM's process: no backend of theirs can be \
                 killed alone.",
                s.kill_seconds
            )?;
            writeln!(o)?;
            writeln!(
                o,
                "| peer | faults | kills | MiB/s | IOPS | vs fault-free | I/O errors | verify failures | longest I/O ms | outcome |"
            )?;
            writeln!(
                o,
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
            )?;
            for k in &self.kills {
                let faults = match k.mode {
                    Mode::Kill => "kill every 1 s",
                    _ => "none",
                };
                writeln!(
                    o,
                    "| {} | {faults} | {} | {:.1} | {:.0} | {} | {} | {} | {:.1} | {} |",
                    peer_name(&k.peer),
                    k.kills,
                    k.mib_s,
                    k.iops,
                    ratio(k.ratio_to_base),
                    k.io_errors,
                    k.verify_failures,
                    k.lat_max_ms,
                    k.outcome
                )?;
            }
        }
        if !self.costs.is_empty() {
            writeln!(o)?;
            writeln!(
                o,
                "What an I/O cost the rig: its counters from the job's start to fio's return \
                 (KVM's exits of every VM, the CPU time of every thread; the rig's {} vCPU \
                 runs the client, the VMM, the backend and the harness), over the job's I/Os \
                 (a write job's verify reads included), medians over the runs.",
                s.rig_vcpus
            )?;
            writeln!(o)?;
            writeln!(
                o,
                "| job | peer | CPU µs | VM exits | of which I/O and MMIO | of which HLT | interrupts injected | context switches | busiest threads, CPU µs |"
            )?;
            writeln!(o, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")?;
            for c in &self.costs {
                let threads = c
                    .threads
                    .iter()
                    .take(4)
                    .map(|(t, us)| format!("{t} {us:.0}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                writeln!(
                    o,
                    "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {threads} |",
                    c.job,
                    peer_name(&c.peer),
                    c.cpu_us,
                    c.exits,
                    c.io_exits,
                    c.halt_exits,
                    c.irqs,
                    c.switches
                )?;
            }
        }
        writeln!(o)?;
        for t in &self.targets {
            writeln!(
                o,
                "- {}: **{}** ({})",
                t.what,
                if t.met { "met" } else { "not met" },
                t.detail
            )?;
        }
        Ok(())
    }
}

fn peer_name(peer: &str) -> &str {
    PEERS
        .iter()
        .find(|(p, _)| *p == peer)
        .map_or(peer, |(_, n)| n)
}

fn ratio(r: Option<f64>) -> String {
    r.map_or("–".to_string(), |r| format!("{r:.2}"))
}

fn job_row(log: &PeerLog, name: &str, peer: &str) -> JobRow {
    let mut mib = Vec::new();
    let mut iops = Vec::new();
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    let (mut lat_max, mut io_errors, mut verify_failures, mut missing) = (0u64, 0, 0, 0);
    for run in log
        .runs
        .iter()
        .filter(|r| r.peer == peer && r.mode == Mode::Peer)
    {
        let found = run
            .jobs
            .iter()
            .find_map(|j| j.fio.iter().find(|f| f.name == name).map(|f| (j, f)));
        let Some((j, f)) = found else {
            missing += 1;
            continue;
        };
        let d = f.main();
        mib.push(d.mib_s());
        iops.push(d.iops);
        p50.push(d.clat_p50_ns as f64 / 1000.0);
        p99.push(d.clat_p99_ns as f64 / 1000.0);
        lat_max = lat_max.max(f.lat_max_ns());
        io_errors += errors(j, f);
        verify_failures += failed_checks(j);
    }
    JobRow {
        job: name.to_string(),
        peer: peer.to_string(),
        samples: mib.len(),
        missing,
        mib_s: Spread::of(&mib),
        iops: Spread::of(&iops),
        ratio_to_b: None,
        clat_p50_us: Spread::of(&p50).median,
        clat_p99_us: Spread::of(&p99).median,
        lat_max_ms: lat_max as f64 / 1e6,
        io_errors,
        verify_failures,
    }
}

/// The cost of job `name` under `peer`, from every fault-free run that measured it.
fn cost_row(log: &PeerLog, name: &str, peer: &str) -> Option<CostRow> {
    let mut per_io: Vec<[f64; 6]> = Vec::new();
    let mut threads: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for run in log
        .runs
        .iter()
        .filter(|r| r.peer == peer && r.mode != Mode::Kill)
    {
        let ios = run
            .jobs
            .iter()
            .flat_map(|j| &j.fio)
            .find(|f| f.name == name)
            .map(FioJob::total_ios);
        let cost = run.costs.iter().find(|c| c.job == name).map(|c| &c.cost);
        let (Some(ios), Some(c)) = (ios.filter(|n| *n > 0), cost) else {
            continue;
        };
        let n = ios as f64;
        let tick_us = 10_000.0;
        per_io.push([
            c.busy_ticks as f64 * tick_us / n,
            c.exits as f64 / n,
            (c.io_exits + c.mmio_exits) as f64 / n,
            c.halt_exits as f64 / n,
            c.irq_injections as f64 / n,
            c.context_switches as f64 / n,
        ]);
        for (t, ticks) in &c.ticks {
            threads
                .entry(t)
                .or_default()
                .push(*ticks as f64 * tick_us / n);
        }
    }
    if per_io.is_empty() {
        return None;
    }
    let median = |i: usize| Spread::of(&per_io.iter().map(|v| v[i]).collect::<Vec<_>>()).median;
    // A thread missing from a run cost nothing in it.
    let mut threads: Vec<(String, f64)> = threads
        .into_iter()
        .map(|(t, mut v)| {
            v.resize(per_io.len(), 0.0);
            (t.to_string(), Spread::of(&v).median)
        })
        .filter(|(_, us)| *us > 0.0)
        .collect();
    threads.sort_by(|a, b| b.1.total_cmp(&a.1));
    Some(CostRow {
        job: name.to_string(),
        peer: peer.to_string(),
        samples: per_io.len(),
        cpu_us: median(0),
        exits: median(1),
        io_exits: median(2),
        halt_exits: median(3),
        irqs: median(4),
        switches: median(5),
        threads,
    })
}

fn kill_row(run: &Run) -> KillRow {
    let job = run.jobs.first();
    let fio = job.and_then(|j| j.fio.first());
    let (mib_s, iops, lat_max_ms, io_errors) = match (job, fio) {
        (Some(j), Some(f)) => (
            f.write.mib_s(),
            f.write.iops,
            f.lat_max_ns() as f64 / 1e6,
            errors(j, f),
        ),
        (Some(j), None) => (0.0, 0.0, 0.0, j.end.as_ref().map_or(0, |e| e.io_errors)),
        _ => (0.0, 0.0, 0.0, 0),
    };
    let mut lat_max_ms = lat_max_ms;
    if let Some(e) = run.end.as_ref().filter(|e| e.timed_out) {
        // A hung run's longest stall is at least what the harness waited.
        lat_max_ms = lat_max_ms.max(e.seconds as f64 * 1000.0);
    }
    KillRow {
        peer: run.peer.clone(),
        mode: run.mode,
        kills: run.end.as_ref().map_or(0, |e| e.kills),
        mib_s,
        iops,
        ratio_to_base: None,
        io_errors,
        verify_failures: job.map_or(0, failed_checks),
        lat_max_ms,
        outcome: outcome(run),
    }
}

fn targets(names: &[String], jobs: &[JobRow], kills: &[KillRow]) -> Vec<Target> {
    let mut out = Vec::new();
    let row = |job: &str, peer: &str| jobs.iter().find(|r| r.job == job && r.peer == peer);
    let pairs: Vec<(String, Option<f64>, Option<f64>)> = names
        .iter()
        .map(|n| {
            let a = row(n, "a")
                .filter(|r| r.samples > 0)
                .map(|r| r.mib_s.median);
            let d = row(n, "d")
                .filter(|r| r.samples > 0)
                .map(|r| r.mib_s.median);
            (n.clone(), a, d)
        })
        .collect();
    if !pairs.is_empty() && jobs.iter().any(|r| r.peer == "a") && jobs.iter().any(|r| r.peer == "d")
    {
        let met = pairs.iter().all(|(_, a, d)| {
            matches!((a, d), (Some(a), Some(d)) if a >= d) || matches!((a, d), (Some(_), None))
        });
        let detail = pairs
            .iter()
            .map(|(n, a, d)| {
                let f = |x: &Option<f64>| x.map_or("no report".to_string(), |x| format!("{x:.1}"));
                format!("{n} {} vs {}", f(a), f(d))
            })
            .collect::<Vec<_>>()
            .join("; ");
        out.push(Target {
            what: "(a) at least (d)'s throughput on every job (median MiB/s)".to_string(),
            met,
            detail,
        });
    }
    if let Some(k) = kills.iter().find(|k| k.peer == "a" && k.mode == Mode::Kill) {
        out.push(Target {
            what: "ddvm under kills: 0 I/O errors and 0 verify failures".to_string(),
            met: k.io_errors == 0 && k.verify_failures == 0 && k.outcome == COMPLETED,
            detail: format!(
                "{} kills, {} I/O errors, {} verify failures, {}",
                k.kills, k.io_errors, k.verify_failures, k.outcome
            ),
        });
    }
    out
}
