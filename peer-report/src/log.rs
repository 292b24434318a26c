//! The rig's output of `images/linux-client/peer.sh`, read back: the runs, each with its
//! clients' fio jobs (their JSON reports decoded from the console lines) and how it ended.

use std::io::Read as _;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::fio::{self, FioJob};

/// The largest fio JSON report accepted, decompressed (a report of one job is some tens of
/// KiB; anything near this is not one).
const MAX_JSON: u64 = 16 << 20;

/// What a run measured: fio's standard jobs, the kill job without faults, or the kill job
/// while the backend is killed every second.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The standard jobs (`peer.fio`).
    Peer,
    /// The long verify job (`kill.fio`), no faults.
    Base,
    /// The long verify job while the backend is killed every second.
    Kill,
}

impl Mode {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "peer" => Some(Self::Peer),
            "base" => Some(Self::Base),
            "kill" => Some(Self::Kill),
            _ => None,
        }
    }
}

/// The parameters the run was given (`peer-run: setup {json}`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Setup {
    /// Rounds of the standard jobs.
    pub rounds: u32,
    /// The disk's size in MiB.
    pub disk_mib: u64,
    /// MiB of 4 KiB random reads at queue depth 1.
    pub qd1_mib: u64,
    /// MiB of each other 4 KiB random job.
    pub rand_mib: u64,
    /// Seconds of the kill job.
    pub kill_seconds: u64,
    /// Each client's memory.
    pub client_mib: u64,
    /// Each client's vCPUs.
    pub client_vcpus: u32,
    /// The rig's vCPUs.
    pub rig_vcpus: u32,
}

/// How a run ended (`peer-run: end ... {json}`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunEnd {
    /// The exit status of the VMM (ddvm or QEMU).
    pub status: i32,
    /// Wall-clock seconds of the run, boot to power-off.
    pub seconds: u64,
    /// Kills of the backend during the run.
    pub kills: u32,
    /// The client did not finish in time and was killed.
    pub timed_out: bool,
}

/// The client's own account of one job (`ddvm-fio: end JOB {json}`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobEnd {
    /// fio's exit status.
    pub status: i32,
    /// `io_u error` messages fio printed.
    pub io_errors: u64,
    /// Failed verifications fio printed.
    pub verify_failures: u64,
    /// The job's wall-clock time in the client.
    pub centiseconds: u64,
}

/// One fio job of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// The job file's name (`peer`, `kill`).
    pub file: String,
    /// The jobs of fio's JSON report (none if it was lost).
    pub fio: Vec<FioJob>,
    /// What the client counted; `None` when the client never finished the job.
    pub end: Option<JobEnd>,
    /// The first lines fio wrote on stderr.
    pub stderr: Vec<String>,
    /// Why the JSON report could not be read, if it could not.
    pub json_error: Option<String>,
}

/// What one job cost the whole rig (`peer-cost: PEER ROUND MODE JOB {json}`): counters read
/// when the client started the job and when fio returned. KVM's counters are sums over the
/// VMs that exist when read, and a thread's CPU time is lost when it ends, so a run in which
/// a VM or a thread ends during the job (a kill run) has no meaningful cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Cost {
    /// The time between the readings.
    pub centiseconds: i64,
    /// The rig's CPU time spent running anything (user, nice, system, irq, softirq), ticks
    /// of 1/100 s.
    pub busy_ticks: i64,
    /// Its idle time (idle, iowait), ticks.
    pub idle_ticks: i64,
    /// Context switches.
    pub context_switches: i64,
    /// VM exits of every VM, all kinds.
    pub exits: i64,
    /// Exits for port I/O.
    pub io_exits: i64,
    /// Exits for MMIO that reached userspace or an ioeventfd.
    pub mmio_exits: i64,
    /// Exits for HLT.
    pub halt_exits: i64,
    /// Halted vCPUs woken.
    pub halt_wakeup: i64,
    /// Interrupts injected into the VMs.
    pub irq_injections: i64,
    /// Exits for host interrupts.
    pub irq_exits: i64,
    /// Exits for signals.
    pub signal_exits: i64,
    /// CPU time by thread name (digits left out), ticks.
    pub ticks: std::collections::BTreeMap<String, i64>,
}

/// The cost of one job of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobCost {
    /// fio's job name.
    pub job: String,
    /// The counters.
    pub cost: Cost,
}

/// One run: a peer's client booted, ran its jobs and powered off (or did not).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// `a`, `b`, `c` or `d`.
    pub peer: String,
    /// The round (from 1).
    pub round: u32,
    /// What ran.
    pub mode: Mode,
    /// The client's jobs, in order.
    pub jobs: Vec<Job>,
    /// How the run ended; `None` if the output stops inside it.
    pub end: Option<RunEnd>,
    /// The last lines of the VMM's output, when the client printed no end of its jobs.
    pub log: Vec<String>,
    /// What each job cost the rig, in the order the jobs ran.
    #[serde(default)]
    pub costs: Vec<JobCost>,
}

/// The whole output.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerLog {
    /// The parameters.
    pub setup: Setup,
    /// The runs, in the order they ran.
    pub runs: Vec<Run>,
    /// The script reached its end.
    pub done: bool,
}

/// A line that does not say what its prefix promises.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {what}: {text:?}")]
pub struct LogError {
    /// 1-based line number.
    pub line: usize,
    /// What was expected.
    pub what: &'static str,
    /// The line (at most 200 characters of it).
    pub text: String,
}

struct Pending {
    file: String,
    chunks: Vec<(usize, String)>,
    expected: usize,
    stderr: Vec<String>,
}

impl Pending {
    fn new(file: &str) -> Self {
        Pending {
            file: file.to_string(),
            chunks: Vec::new(),
            expected: 0,
            stderr: Vec::new(),
        }
    }
}

impl PeerLog {
    /// Reads the rig's output. Lines other than `peer-run:` and `ddvm-fio:` ones are skipped;
    /// a malformed line of those is an error naming it. A job whose JSON report is missing
    /// or broken keeps a `json_error` instead of failing the whole log.
    pub fn parse(text: &str) -> Result<Self, LogError> {
        let mut log = PeerLog::default();
        let mut pending: Option<Pending> = None;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim_end_matches(['\r', ' ']);
            let err = |what: &'static str| LogError {
                line: i + 1,
                what,
                text: line.chars().take(200).collect(),
            };
            if let Some(rest) = after(line, "peer-run: ") {
                let (word, rest) = rest.split_once(' ').unwrap_or((rest, ""));
                match word {
                    "setup" => {
                        log.setup = serde_json::from_str(rest)
                            .map_err(|_| err("a setup line with the run's parameters"))?
                    }
                    "begin" => {
                        let mut w = rest.split(' ');
                        let (peer, round, mode) = (w.next(), w.next(), w.next());
                        let (Some(peer), Some(round), Some(mode)) = (peer, round, mode) else {
                            return Err(err("begin PEER ROUND MODE"));
                        };
                        let round = round.parse().map_err(|_| err("a round number"))?;
                        let mode =
                            Mode::parse(mode).ok_or_else(|| err("mode peer, base or kill"))?;
                        pending = None;
                        log.runs.push(Run {
                            peer: peer.to_string(),
                            round,
                            mode,
                            jobs: Vec::new(),
                            end: None,
                            log: Vec::new(),
                            costs: Vec::new(),
                        });
                    }
                    "end" => {
                        let json = rest.split_once('{').map(|(_, j)| format!("{{{j}"));
                        let end: RunEnd = json
                            .and_then(|j| serde_json::from_str(&j).ok())
                            .ok_or_else(|| err("end PEER ROUND MODE {json}"))?;
                        let run = log
                            .runs
                            .last_mut()
                            .ok_or_else(|| err("an end after a begin"))?;
                        if let Some(p) = pending.take() {
                            run.jobs.push(unfinished(p));
                        }
                        run.end = Some(end);
                    }
                    "log" | "qsd" | "qemu" => {
                        if let Some(run) = log.runs.last_mut() {
                            run.log.push(format!("{word}: {rest}"));
                        }
                    }
                    "done" => log.done = true,
                    _ => {}
                }
            } else if let Some(rest) = after(line, "peer-cost: ") {
                // PEER ROUND MODE JOB {json}, for the run it names.
                let mut w = rest.splitn(5, ' ');
                let (peer, round, mode, job, json) =
                    (w.next(), w.next(), w.next(), w.next(), w.next());
                let (Some(peer), Some(round), Some(mode), Some(job), Some(json)) =
                    (peer, round, mode, job, json)
                else {
                    return Err(err("peer-cost: PEER ROUND MODE JOB {json}"));
                };
                let cost: Cost = serde_json::from_str(json)
                    .map_err(|_| err("peer-cost: PEER ROUND MODE JOB {json}"))?;
                if let Some(run) = log.runs.last_mut().filter(|r| {
                    r.peer == peer
                        && round.parse() == Ok(r.round)
                        && Mode::parse(mode) == Some(r.mode)
                }) {
                    run.costs.push(JobCost {
                        job: job.to_string(),
                        cost,
                    });
                }
            } else if let Some(rest) = after(line, "ddvm-fio: ") {
                let Some(run) = log.runs.last_mut() else {
                    continue;
                };
                let (word, rest) = rest.split_once(' ').unwrap_or((rest, ""));
                match word {
                    "start" => {
                        if let Some(p) = pending.take() {
                            run.jobs.push(unfinished(p));
                        }
                        pending = Some(Pending::new(rest));
                    }
                    "stderr" => {
                        if let Some(p) = pending.as_mut() {
                            p.stderr.push(rest.to_string());
                        }
                    }
                    "json" => {
                        // A line cut or garbled on the way (a console shared with the
                        // kernel's messages) is left out: the job's report then lacks a
                        // line, and says so, rather than the whole log failing.
                        let mut w = rest.splitn(3, ' ');
                        let (_, index, chunk) = (w.next(), w.next(), w.next());
                        let parsed = index.and_then(|i| i.split_once('/')).and_then(|(i, n)| {
                            Some((i.parse::<usize>().ok()?, n.parse::<usize>().ok()?))
                        });
                        if let (Some(p), Some((i, n)), Some(chunk)) =
                            (pending.as_mut(), parsed, chunk)
                        {
                            p.expected = n;
                            p.chunks.push((i, chunk.to_string()));
                        }
                    }
                    "end" => {
                        let (file, json) = rest.split_once(' ').unwrap_or((rest, ""));
                        let end: JobEnd = serde_json::from_str(json).map_err(|_| {
                            err("end JOB {status, io_errors, verify_failures, centiseconds}")
                        })?;
                        let p = pending.take().unwrap_or_else(|| Pending::new(file));
                        let (fio, json_error) = match decode(&p) {
                            Ok(jobs) => (jobs, None),
                            Err(e) => (Vec::new(), Some(e)),
                        };
                        run.jobs.push(Job {
                            file: p.file,
                            fio,
                            end: Some(end),
                            stderr: p.stderr,
                            json_error,
                        });
                    }
                    _ => {}
                }
            }
        }
        Ok(log)
    }
}

/// The text after `prefix` where it occurs in `line` (a console line may carry the VMM's
/// own prefix before the client's text).
fn after<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    line.find(prefix).map(|at| &line[at + prefix.len()..])
}

fn unfinished(p: Pending) -> Job {
    Job {
        file: p.file,
        fio: Vec::new(),
        end: None,
        stderr: p.stderr,
        json_error: Some("the client never finished this job".to_string()),
    }
}

/// fio's JSON report of a job, from its base64 lines of gzip.
fn decode(p: &Pending) -> Result<Vec<FioJob>, String> {
    if p.chunks.is_empty() {
        return Err("no JSON report".to_string());
    }
    let whole =
        p.chunks.len() == p.expected && p.chunks.iter().enumerate().all(|(k, (i, _))| *i == k + 1);
    if !whole {
        return Err(format!(
            "{} of the {} lines of its JSON report arrived, or out of order",
            p.chunks.len(),
            p.expected
        ));
    }
    let text: String = p.chunks.iter().map(|(_, c)| c.as_str()).collect();
    let gz = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("the JSON report is not base64: {e}"))?;
    let mut json = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .take(MAX_JSON)
        .read_to_string(&mut json)
        .map_err(|e| format!("the JSON report is not gzip of text: {e}"))?;
    fio::jobs(&json)
}
