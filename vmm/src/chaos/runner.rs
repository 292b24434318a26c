//! The chaos runner itself (built with the `fault-injection` feature only): the rounds of
//! baseline and chaos segments, the faults sent one period apart, and what the report is fed.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ddvm_chaos_report::{ChaosReport, ClientResult, NetResult, DEFAULT_BIN};

use super::{ChaosError, ChaosPlan};
use crate::config::Config;
use crate::console::Echo;
use crate::hypervisor::Hypervisor;
use crate::reincarnation::Command;
use crate::stop::Stop;
use crate::topology::Topology;

/// At most this many periods a fault waits for the last one's recovery.
const SETTLE_EVERIES: u32 = 8;
/// How often a fault held back looks again.
const SETTLE_POLL: Duration = Duration::from_millis(5);

/// Gives every client the run's length (replacing any `count=` or `duration_ms=` it had).
fn timed(config: &Config, duration: Duration) -> Config {
    let mut c = config.clone();
    for cl in &mut c.clients {
        let kept: Vec<&str> = cl
            .workload
            .split_whitespace()
            .filter(|t| !t.starts_with("count=") && !t.starts_with("duration_ms="))
            .collect();
        cl.workload = format!("{} duration_ms={}", kept.join(" "), duration.as_millis())
            .trim()
            .to_string();
    }
    c
}

struct Outcome {
    clients: Vec<ClientResult>,
    iops: f64,
}

/// What the clients saw; `stopped`: the run was stopped on request, and a client it stopped
/// before its report (no exit) saw no error.
fn client_results(outcomes: &[crate::topology::ClientOutcome], stopped: bool) -> Outcome {
    let mut clients = Vec::new();
    let mut iops = 0.0;
    for o in outcomes {
        let (ops, errors, mismatches, verified, i) = match (&o.report, &o.net) {
            (Some(r), _) => (r.ops, r.errors, r.mismatches, r.verified, r.iops),
            // A network client: frames delivered (sender) or echoed are its operations, each
            // checked byte for byte; a corrupt frame is a mismatch; a sender short of frames
            // an error.
            (None, Some(n)) => (
                n.frames,
                n.errors + u64::from(!n.clean() && n.errors == 0 && n.corrupt == 0),
                n.corrupt,
                n.frames,
                n.frames_s as f64,
            ),
            (None, None) => match &o.tcp {
                // A TCP client: its verified bytes are its operations, its rate the bytes
                // it verified per second of its run (a bulk transfer keeps its size: the
                // chaos and baseline segments each move the same bytes); corrupt bytes are
                // mismatches; a reset, timeout, error or short transfer is an error.
                Some(t) => (
                    t.verified,
                    t.errors.max(u64::from(!t.clean() && t.corrupt == 0)),
                    t.corrupt,
                    t.verified,
                    t.verified as f64 * 1e6 / t.elapsed_us.max(1) as f64,
                ),
                // Stopped on request before it reported: nothing to count.
                None if stopped && o.exit.is_none() => (0, 0, 0, 0, 0.0),
                // No report: the client did not finish cleanly; count it as an error.
                None => (0, 1, 0, 0, 0.0),
            },
        };
        iops += i;
        clients.push(ClientResult {
            name: o.name.clone(),
            ops,
            errors,
            mismatches,
            verified,
            iops: i,
            net: match (&o.net, &o.tcp) {
                (Some(n), _) => Some(NetResult {
                    lost: n.retries,
                    duplicated: n.duplicates,
                    link_down: n.link_down,
                    retransmits: None,
                    resets: None,
                }),
                // TCP hides losses and duplicates from its user: what they cost shows as the
                // segments each end sent again, and a reset or timeout if TCP gave up.
                (None, Some(t)) => Some(NetResult {
                    lost: 0,
                    duplicated: 0,
                    link_down: t.link_down,
                    retransmits: Some(t.retransmits),
                    resets: Some(t.resets + u64::from(t.timeout)),
                }),
                (None, None) => None,
            },
        });
    }
    Outcome { clients, iops }
}

/// Runs the rounds of baseline and chaos segments (see the module docs); returns the report.
pub fn run(
    hv: &Arc<Hypervisor>,
    config: &Config,
    file: &Path,
    plan: &ChaosPlan,
    stop: &Stop,
) -> Result<ChaosReport, ChaosError> {
    let rounds = plan.rounds.max(1);
    let segment = plan.duration / rounds;
    let config = timed(config, segment);
    let limit = segment + Duration::from_secs(120);
    let mut report = ChaosReport::new(
        file.display().to_string(),
        &plan.faults,
        plan.every,
        plan.duration,
        Instant::now(),
        DEFAULT_BIN,
    );
    let mut run = ChaosRun {
        report_start: Instant::now(),
        faults_sent: 0,
        clients: Vec::new(),
        round: 0,
        rounds,
        recovered: 0,
    };
    let mut baseline_iops = 0.0;
    // Segments run to their end (a stop cuts the one running short and skips the rest).
    let (mut chaos_segments, mut baselines) = (0u32, 0u32);
    let baseline_line = |round: u32| {
        println!(
            "ddvm chaos: round {}/{rounds}: baseline, {:.1} s without faults",
            round + 1,
            segment.as_secs_f64()
        );
    };
    for round in 0..rounds {
        run.round = round;
        let baseline_first = round % 2 == 0;
        if baseline_first && !plan.skip_baseline && !stop.requested() {
            baseline_line(round);
            baseline_iops += baseline(hv, &config, file, limit, stop)?;
            baselines += 1;
        }
        if stop.requested() {
            break;
        }
        let offset = segment * round;
        run.segment(
            hv,
            &config,
            file,
            plan,
            segment,
            offset,
            limit,
            &mut report,
            stop,
        )?;
        chaos_segments += 1;
        if !baseline_first && !plan.skip_baseline && !stop.requested() {
            baseline_line(round);
            baseline_iops += baseline(hv, &config, file, limit, stop)?;
            baselines += 1;
        }
    }
    report.stopped = stop.requested();
    // Each client's IOPS: the mean over the chaos segments (all of the same length).
    for c in &mut run.clients {
        c.iops /= f64::from(chaos_segments.max(1));
    }
    report.clients = run.clients;
    let baseline = if plan.skip_baseline || baselines == 0 {
        0.0
    } else {
        baseline_iops / f64::from(baselines)
    };
    report.finish(baseline);
    Ok(report)
}

/// One fault-free segment; returns the clients' summed IOPS.
fn baseline(
    hv: &Arc<Hypervisor>,
    config: &Config,
    file: &Path,
    limit: Duration,
    stop: &Stop,
) -> Result<f64, ChaosError> {
    let mut topo = Topology::start(hv, config, file, Echo::Off)?;
    let outcomes = topo.wait_clients_or_stop(limit, stop);
    topo.stop();
    Ok(client_results(&outcomes, stop.requested()).iops)
}

/// The chaos segments of a run, with what they add up to.
struct ChaosRun {
    report_start: Instant,
    faults_sent: usize,
    clients: Vec<ClientResult>,
    // The round under way and their number, for the progress line.
    round: u32,
    rounds: u32,
    // Recoveries of the segments before this one.
    recovered: u64,
}

impl ChaosRun {
    /// Runs one chaos segment that starts `offset` into the report's timeline.
    #[allow(clippy::too_many_arguments)]
    fn segment(
        &mut self,
        hv: &Arc<Hypervisor>,
        config: &Config,
        file: &Path,
        plan: &ChaosPlan,
        length: Duration,
        offset: Duration,
        limit: Duration,
        report: &mut ChaosReport,
        stop: &Stop,
    ) -> Result<(), ChaosError> {
        let mut topo = Topology::start(hv, config, file, Echo::Off)?;
        if let Some(c) = topo.clients.first() {
            report.run.platform = c.guest().platform().name().to_string();
        }
        // Faults go to each disk's domain in turn; each domain gets every kind in turn.
        let handles: Vec<_> = topo.recovery.iter().map(|(_, h)| h.clone()).collect();
        if handles.is_empty() {
            topo.stop();
            return Err(ChaosError::NoTarget(file.display().to_string()));
        }
        let start = Instant::now();
        // Where an instant of this segment lies on the report's timeline.
        let on_timeline =
            |t: Instant| self.report_start + offset + t.saturating_duration_since(start);
        let mut next_fault = start + plan.every;
        let mut next_sample = start + Duration::from_millis(10);
        // A progress line every second, instead of a line per fault.
        let mut next_progress = start + Duration::from_secs(1);
        let progress = |now: Instant, faults: usize| {
            let recovered: u64 = handles.iter().map(|h| h.with(|o| o.recovered)).sum();
            let gave_up = handles
                .iter()
                .filter(|h| h.with(|o| o.status.as_ref().is_some_and(|s| s.broken)))
                .count();
            let given_up = if gave_up > 0 {
                format!(", {gave_up} domain(s) given up")
            } else {
                String::new()
            };
            println!(
                "ddvm chaos: round {}/{}: faults, {:.1} s of {:.1} s: {faults} fault(s) injected, \
                 {} recovered{given_up}",
                self.round + 1,
                self.rounds,
                now.saturating_duration_since(start).as_secs_f64(),
                length.as_secs_f64(),
                self.recovered + recovered
            );
        };
        let mut last_answered = 0;
        let mut k = self.faults_sent;
        let end = start + length;
        // The domain of the last fault and its recoveries counted when the fault went in (none
        // yet in this segment).
        let mut recovered_then: Option<(usize, u64, Instant)> = None;
        while Instant::now() < end && !stop.requested() {
            let now = Instant::now();
            // A fault goes into a domain that has recovered from the last one: injected into
            // one that is still hung (detection waits for the host's steal to be left out),
            // it would test nothing and hide the next kind. A fault that nothing detects
            // holds the next one back for at most `SETTLE_EVERIES` periods.
            let settled = recovered_then.is_none_or(|(d, r, at)| {
                handles[d].with(|o| o.recovered) > r || now >= at + plan.every * SETTLE_EVERIES
            });
            if now >= next_fault && !plan.faults.is_empty() && !settled {
                next_fault = now + SETTLE_POLL;
            } else if now >= next_fault && !plan.faults.is_empty() {
                let d = k % handles.len();
                let kind = plan.faults[(k / handles.len()) % plan.faults.len()];
                k += 1;
                recovered_then = Some((d, handles[d].with(|o| o.recovered), now));
                handles[d].send(Command::Inject { kind, arg: 0 });
                report.injected(kind, on_timeline(now));
                next_fault = now + plan.every;
            }
            if now >= next_sample {
                // Disk requests answered and client frames sent through the NICs.
                let answered: u64 = topo
                    .services
                    .iter()
                    .map(|s| s.counters().answered.load(Ordering::Relaxed))
                    .sum::<u64>()
                    + topo
                        .nets
                        .iter()
                        .map(|n| n.stats().class.tx_sent)
                        .sum::<u64>();
                report.completed(on_timeline(now), answered - last_answered);
                last_answered = answered;
                next_sample += Duration::from_millis(10);
            }
            // The segment's last line comes once its clients are done.
            if now >= next_progress && next_progress < end {
                progress(now, k);
                next_progress += Duration::from_secs(1);
            }
            let wake = next_fault.min(next_sample).min(end);
            stop.sleep(wake.saturating_duration_since(Instant::now()));
        }
        let outcomes = topo.wait_clients_or_stop(limit, stop);
        // Let a recovery in progress finish before reading the numbers.
        std::thread::sleep(Duration::from_millis(50));
        progress(Instant::now().min(end), k);
        self.faults_sent = k;
        self.recovered += handles.iter().map(|h| h.with(|o| o.recovered)).sum::<u64>();
        for handle in &handles {
            handle.with(|o| {
                for (name, _) in &o.detections {
                    report.detected(name);
                }
                for r in &o.recoveries {
                    let f2d = r
                        .injected
                        .map(|(at, _)| r.detected.saturating_duration_since(at));
                    report.recovered(
                        r.injected.map(|(_, kind)| kind),
                        on_timeline(r.detected),
                        f2d,
                        r.recovered.saturating_duration_since(r.detected),
                    );
                }
                if o.status.as_ref().is_some_and(|s| s.broken) {
                    report.gave_up();
                }
            });
        }
        topo.stop();
        for c in client_results(&outcomes, stop.requested()).clients {
            match self.clients.iter_mut().find(|x| x.name == c.name) {
                Some(x) => {
                    x.ops += c.ops;
                    x.errors += c.errors;
                    x.mismatches += c.mismatches;
                    x.verified += c.verified;
                    x.iops += c.iops;
                }
                None => self.clients.push(c),
            }
        }
        Ok(())
    }
}
