//! Chaos runs: the configured clients run the verifying workload for a fixed time while faults
//! are injected into the disk domains; first the same topology runs fault-free for the same
//! time, for the throughput baseline.
//!
//! Fault injection is compiled in only with the `fault-injection` cargo feature; a build
//! without it (such as the release binary) refuses to inject.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ddvm_recovery::chaos::{ChaosReport, ClientResult, FaultKind, DEFAULT_BIN};

use crate::blk::channel::Command;
use crate::config::Config;
use crate::console::Echo;
use crate::hypervisor::Hypervisor;
use crate::topology::Topology;

/// Whether this build can inject faults.
pub const ENABLED: bool = cfg!(feature = "fault-injection");

/// Errors of a chaos run.
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    /// Built without fault injection.
    #[error(
        "this ddvm was built without fault injection; rebuild with `--features fault-injection`"
    )]
    Disabled,
    /// The topology has no client on a driver domain.
    #[error("{0}: expected at least one [[client]] on a [[domain]] with a device")]
    NoTarget(String),
    /// Starting the topology failed.
    #[error(transparent)]
    Topology(#[from] crate::topology::TopologyError),
}

/// The chaos run's parameters.
#[derive(Clone, Debug)]
pub struct ChaosPlan {
    /// Fault kinds, injected in turn.
    pub faults: Vec<FaultKind>,
    /// Time between injections.
    pub every: Duration,
    /// Length of each run (baseline and chaos).
    pub duration: Duration,
    /// Skip the fault-free baseline run.
    pub skip_baseline: bool,
}

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

fn client_results(outcomes: &[crate::topology::ClientOutcome]) -> Outcome {
    let mut clients = Vec::new();
    let mut iops = 0.0;
    for o in outcomes {
        let (ops, errors, mismatches, verified, i) = match &o.report {
            Some(r) => (r.ops, r.errors, r.mismatches, r.verified, r.iops),
            // No report: the client did not finish cleanly; count it as an error.
            None => (0, 1, 0, 0, 0.0),
        };
        iops += i;
        clients.push(ClientResult {
            name: o.name.clone(),
            ops,
            errors,
            mismatches,
            verified,
            iops: i,
        });
    }
    Outcome { clients, iops }
}

/// Runs the baseline (unless skipped) and the chaos run; returns the report.
pub fn run(
    hv: &Arc<Hypervisor>,
    config: &Config,
    file: &Path,
    plan: &ChaosPlan,
) -> Result<ChaosReport, ChaosError> {
    if !ENABLED {
        return Err(ChaosError::Disabled);
    }
    let config = timed(config, plan.duration);
    let limit = plan.duration + Duration::from_secs(120);
    let baseline = if plan.skip_baseline {
        0.0
    } else {
        let mut topo = Topology::start(hv, &config, file, Echo::Off)?;
        let outcomes = topo.wait_clients(limit);
        topo.stop();
        client_results(&outcomes).iops
    };
    let mut topo = Topology::start(hv, &config, file, Echo::Off)?;
    let Some((_, handle)) = topo.recovery.first().cloned() else {
        topo.stop();
        return Err(ChaosError::NoTarget(file.display().to_string()));
    };
    let start = Instant::now();
    let mut report = ChaosReport::new(
        file.display().to_string(),
        &plan.faults,
        plan.every,
        plan.duration,
        start,
        DEFAULT_BIN,
    );
    // Inject on schedule; sample completions for the timeline.
    let mut next_fault = start + plan.every;
    let mut next_sample = start + Duration::from_millis(10);
    let mut last_answered = 0;
    let mut k = 0;
    let end = start + plan.duration;
    while Instant::now() < end {
        let now = Instant::now();
        if now >= next_fault && !plan.faults.is_empty() {
            let kind = plan.faults[k % plan.faults.len()];
            k += 1;
            handle.send(Command::Inject { kind, arg: 0 });
            report.injected(kind, now);
            next_fault += plan.every;
        }
        if now >= next_sample {
            let answered: u64 = topo
                .services
                .iter()
                .map(|s| s.counters().answered.load(Ordering::Relaxed))
                .sum();
            report.completed(now, answered - last_answered);
            last_answered = answered;
            next_sample += Duration::from_millis(10);
        }
        let wake = next_fault.min(next_sample).min(end);
        std::thread::sleep(wake.saturating_duration_since(Instant::now()));
    }
    let outcomes = topo.wait_clients(limit);
    // Let a recovery in progress finish before reading the numbers.
    std::thread::sleep(Duration::from_millis(50));
    handle.with(|o| {
        for (name, _) in &o.detections {
            report.detected(name);
        }
        for &(injected, detected, recovered) in &o.recoveries {
            let f2d = injected.map(|i| detected.saturating_duration_since(i));
            report.recovered(detected, f2d, recovered.saturating_duration_since(detected));
        }
        if o.status.as_ref().is_some_and(|s| s.broken) {
            report.gave_up();
        }
    });
    topo.stop();
    let chaos = client_results(&outcomes);
    report.clients = chaos.clients;
    report.finish(baseline);
    Ok(report)
}
