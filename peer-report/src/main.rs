//! `ddvm-peer-report --log FILE`: the report of a `scripts/rig peer` run (see the crate's
//! documentation), as a markdown table on stdout and, with `--json`, as JSON.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use ddvm_peer_report::{PeerLog, Report};

/// The report of a `scripts/rig peer` run.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// The rig's output of images/linux-client/peer.sh.
    #[arg(long)]
    log: PathBuf,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The machine, as the table should name it.
    #[arg(long, default_value = "")]
    machine: String,
    /// The date of the run, as the table should give it.
    #[arg(long, default_value = "")]
    date: String,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ddvm-peer-report: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let text = std::fs::read(&cli.log).with_context(|| format!("{}", cli.log.display()))?;
    let text = String::from_utf8_lossy(&text);
    let log = PeerLog::parse(&text).with_context(|| format!("{}", cli.log.display()))?;
    if log.runs.is_empty() {
        anyhow::bail!(
            "{}: no runs (expected `peer-run: begin` lines of images/linux-client/peer.sh)",
            cli.log.display()
        );
    }
    let done = log.done;
    let report = Report::new(log, &cli.machine, &cli.date);
    if let Some(path) = &cli.json {
        let json = serde_json::to_string_pretty(&report).context("the report as JSON")?;
        std::fs::write(path, json + "\n").with_context(|| format!("{}", path.display()))?;
    }
    print!("{}", report.markdown());
    if !done {
        eprintln!(
            "ddvm-peer-report: {}: the run did not reach its end; the report covers what ran",
            cli.log.display()
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
