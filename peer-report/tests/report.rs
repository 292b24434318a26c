//! The report of `scripts/rig peer`, from logs shaped as the rig prints them, carrying real fio
//! 3.33 JSON reports (tests/fixtures: two jobs of a run in the rig) or variants of them.

use std::io::Write as _;

use base64::Engine as _;
use ddvm_peer_report::{Mode, PeerLog, Report, Spread};
use serde_json::Value;

const RANDWRITE: &str = include_str!("fixtures/randwrite-4k-qd32.json");
const SEQWRITE: &str = include_str!("fixtures/seqwrite-128k-qd8.json");

/// fio's report as the client prints it: gzip, base64, 76 characters a line.
fn json_lines(job: &str, json: &str) -> Vec<String> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(json.as_bytes()).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(gz.finish().unwrap());
    let chunks: Vec<&str> = b64
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let n = chunks.len();
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| format!("ddvm-fio: json {job} {}/{n} {c}", i + 1))
        .collect()
}

/// The fixture `json` with its `dir` direction's bytes, runtime and errors changed.
fn variant(json: &str, dir: &str, io_bytes: u64, runtime_ms: u64, total_err: u64) -> String {
    let mut v: Value = serde_json::from_str(json).unwrap();
    let j = &mut v["jobs"][0];
    j[dir]["io_bytes"] = io_bytes.into();
    j[dir]["runtime"] = runtime_ms.into();
    j[dir]["iops"] = (io_bytes as f64 / 4096.0 / (runtime_ms as f64 / 1000.0)).into();
    j["total_err"] = total_err.into();
    v.to_string()
}

struct Job<'a> {
    name: &'a str,
    json: String,
    verify_failures: u64,
}

fn job<'a>(name: &'a str, json: String) -> Job<'a> {
    Job {
        name,
        json,
        verify_failures: 0,
    }
}

/// One run's lines; the client's lines carry the prefix ddvm's console echo gives them.
fn run(peer: &str, round: u32, mode: &str, jobs: &[Job], kills: u32) -> Vec<String> {
    let mut out = vec![format!("peer-run: begin {peer} {round} {mode}")];
    out.push("[   14.0] kvm [108]: vcpu0, guest rIP: 0xffffffff8b87e744 Unhandled WRMSR".into());
    for j in jobs {
        out.push(format!("[linux0] ddvm-fio: start {}", j.name));
        out.extend(
            json_lines(j.name, &j.json)
                .into_iter()
                .map(|l| format!("[linux0] {l}")),
        );
        out.push(format!(
            "[linux0] ddvm-fio: end {} {{\"status\":0,\"io_errors\":0,\"verify_failures\":{},\"centiseconds\":300}}",
            j.name, j.verify_failures
        ));
    }
    out.push(format!(
        "peer-run: end {peer} {round} {mode} {{\"status\":0,\"seconds\":27,\"kills\":{kills},\"timed_out\":false}}"
    ));
    out
}

fn log(runs: Vec<Vec<String>>) -> String {
    let mut lines = vec![
        "rig: up in 5.43 s, 1 vCPUs, kvm_amd npt=Y".to_string(),
        r#"peer-run: setup {"rounds":3,"disk_mib":64,"qd1_mib":4,"rand_mib":16,"kill_seconds":30,"client_mib":512,"client_vcpus":1,"rig_vcpus":1}"#.to_string(),
    ];
    lines.extend(runs.into_iter().flatten());
    lines.push("peer-run: done".to_string());
    lines.join("\r\n") + "\r\n"
}

#[test]
fn a_real_fio_report_is_read_from_the_console_lines() {
    let text = log(vec![run(
        "d",
        1,
        "peer",
        &[
            job("seqwrite-128k-qd8", SEQWRITE.to_string()),
            job("randwrite-4k-qd32", RANDWRITE.to_string()),
        ],
        0,
    )]);
    let parsed = PeerLog::parse(&text).unwrap();
    assert!(parsed.done);
    assert_eq!(parsed.setup.rounds, 3);
    assert_eq!(parsed.runs.len(), 1);
    let r = &parsed.runs[0];
    assert_eq!((r.peer.as_str(), r.round, r.mode), ("d", 1, Mode::Peer));
    assert_eq!(r.jobs.len(), 2);
    let f = &r.jobs[1].fio[0];
    assert_eq!(r.jobs[1].json_error, None);
    assert_eq!(f.name, "randwrite-4k-qd32");
    assert_eq!(
        (f.rw.as_str(), f.bs.as_str(), f.iodepth.as_str()),
        ("randwrite", "4k", "32")
    );
    // The figures of the fixture, as fio wrote them.
    assert_eq!(f.write.io_bytes, 2_097_152);
    assert_eq!(f.write.runtime_ms, 1141);
    assert!((f.write.iops - 448.729185).abs() < 1e-6);
    assert_eq!(f.write.lat_max_ns, 116_123_772);
    // A write job is about its writes; its verify reads are reads.
    assert_eq!(f.main(), &f.write);
    assert_eq!(f.read.io_bytes, 2_097_152);
    assert_eq!((f.error, f.total_err), (0, 0));

    let report = Report::new(parsed, "m", "d");
    let row = report
        .jobs
        .iter()
        .find(|j| j.job == "randwrite-4k-qd32")
        .unwrap();
    // 2 MiB in 1.141 s.
    assert!((row.mib_s.median - 2.0 / 1.141).abs() < 1e-9);
    assert!((row.lat_max_ms - 116.123772).abs() < 1e-9);
    assert_eq!(row.ratio_to_b, None, "no (b) in this run");
}

#[test]
fn throughput_is_the_median_of_the_rounds_and_its_ratio_is_to_b() {
    let mib2 = 2 << 20;
    let mut runs = Vec::new();
    for (round, a_ms, b_ms, d_ms) in [
        (1, 1000, 500, 2000),
        (2, 2000, 500, 2000),
        (3, 4000, 1000, 2000),
    ] {
        runs.push(run(
            "a",
            round,
            "peer",
            &[job(
                "randwrite-4k-qd32",
                variant(RANDWRITE, "write", mib2, a_ms, 0),
            )],
            0,
        ));
        runs.push(run(
            "b",
            round,
            "peer",
            &[job(
                "randwrite-4k-qd32",
                variant(RANDWRITE, "write", mib2, b_ms, 0),
            )],
            0,
        ));
        runs.push(run(
            "d",
            round,
            "peer",
            &[job(
                "randwrite-4k-qd32",
                variant(RANDWRITE, "write", mib2, d_ms, 0),
            )],
            0,
        ));
    }
    let report = Report::new(PeerLog::parse(&log(runs)).unwrap(), "m", "d");
    let row = |p: &str| report.jobs.iter().find(|r| r.peer == p).unwrap();
    // a: 2, 1, 0.5 MiB/s; b: 4, 4, 2; d: 1, 1, 1.
    assert_eq!(
        row("a").mib_s,
        Spread {
            median: 1.0,
            min: 0.5,
            max: 2.0
        }
    );
    assert_eq!(row("b").mib_s.median, 4.0);
    assert_eq!(row("a").samples, 3);
    assert_eq!(row("a").ratio_to_b, Some(0.25));
    assert_eq!(row("b").ratio_to_b, Some(1.0));
    assert_eq!(row("d").ratio_to_b, Some(0.25));
    // a's median equals d's: the target is met (at least d's).
    assert!(report.targets[0].met, "{:?}", report.targets);
    let md = report.markdown();
    assert!(
        md.contains("| randwrite-4k-qd32 | (a) ddvm, NVMe driver domain | 1.0 (0.5–2.0) |"),
        "{md}"
    );
    assert!(md.contains("| 0.25 |"), "{md}");
}

#[test]
fn a_with_less_than_d_on_one_job_misses_the_target() {
    let mib2 = 2 << 20;
    let runs = vec![
        run(
            "a",
            1,
            "peer",
            &[
                job(
                    "seqwrite-128k-qd8",
                    variant(SEQWRITE, "write", mib2, 1000, 0),
                ),
                job(
                    "randwrite-4k-qd32",
                    variant(RANDWRITE, "write", mib2, 3000, 0),
                ),
            ],
            0,
        ),
        run(
            "d",
            1,
            "peer",
            &[
                job(
                    "seqwrite-128k-qd8",
                    variant(SEQWRITE, "write", mib2, 2000, 0),
                ),
                job(
                    "randwrite-4k-qd32",
                    variant(RANDWRITE, "write", mib2, 2000, 0),
                ),
            ],
            0,
        ),
    ];
    let report = Report::new(PeerLog::parse(&log(runs)).unwrap(), "m", "d");
    let t = &report.targets[0];
    assert!(!t.met);
    assert!(
        t.detail.contains("randwrite-4k-qd32 0.7 vs 1.0"),
        "{}",
        t.detail
    );
}

#[test]
fn a_line_lost_on_the_console_costs_that_job_s_report_only() {
    let mut lines = run(
        "a",
        1,
        "peer",
        &[
            job("seqwrite-128k-qd8", SEQWRITE.to_string()),
            job("randwrite-4k-qd32", RANDWRITE.to_string()),
        ],
        0,
    );
    // The second line of the first job's JSON, cut short by a kernel message.
    let at = lines
        .iter()
        .position(|l| l.contains("json seqwrite-128k-qd8 2/"))
        .unwrap();
    lines[at] = "[linux0] ddvm-fio: json seqwr".to_string();
    let parsed = PeerLog::parse(&log(vec![lines])).unwrap();
    let jobs = &parsed.runs[0].jobs;
    assert!(jobs[0].fio.is_empty());
    assert!(
        jobs[0].json_error.as_deref().unwrap().contains("arrived"),
        "{:?}",
        jobs[0].json_error
    );
    assert_eq!(jobs[1].fio[0].name, "randwrite-4k-qd32");
    let report = Report::new(parsed, "m", "d");
    let seq = report
        .jobs
        .iter()
        .find(|r| r.job == "randwrite-4k-qd32")
        .unwrap();
    assert_eq!(seq.samples, 1);
    // The lost report is counted as missing, not as a zero.
    assert!(report.jobs.iter().all(|r| r.job != "seqwrite-128k-qd8"));
}

#[test]
fn kill_rows_carry_errors_failed_checks_stalls_and_the_ratio_to_the_fault_free_run() {
    let mib = 1 << 20;
    let mut killed = job(
        "kill-randwrite-4k-qd32",
        variant(RANDWRITE, "write", 4 * mib, 8000, 3),
    );
    killed.verify_failures = 2;
    let runs = vec![
        run(
            "a",
            1,
            "base",
            &[job(
                "kill-randwrite-4k-qd32",
                variant(RANDWRITE, "write", 8 * mib, 8000, 0),
            )],
            0,
        ),
        run("a", 1, "kill", &[killed], 7),
    ];
    let report = Report::new(PeerLog::parse(&log(runs)).unwrap(), "m", "d");
    assert_eq!(report.kills.len(), 2);
    let k = &report.kills[1];
    assert_eq!((k.mode, k.kills), (Mode::Kill, 7));
    assert_eq!(k.mib_s, 0.5);
    assert_eq!(k.ratio_to_base, Some(0.5));
    assert_eq!((k.io_errors, k.verify_failures), (3, 2));
    assert_eq!(k.outcome, "completed");
    let t = report
        .targets
        .iter()
        .find(|t| t.what.starts_with("ddvm under kills"))
        .unwrap();
    assert!(!t.met);
    assert!(
        t.detail.contains("3 I/O errors, 2 verify failures"),
        "{}",
        t.detail
    );
}

#[test]
fn a_hung_run_shows_as_a_hang_and_its_wait_as_the_stall() {
    let text = log(vec![vec![
        "peer-run: begin d 1 kill".to_string(),
        "[linux0] ddvm-fio: start kill-randwrite-4k-qd32".to_string(),
        "peer-run: log qemu-system-x86_64: Failed to read msg header.".to_string(),
        r#"peer-run: end d 1 kill {"status":137,"seconds":640,"kills":12,"timed_out":true}"#
            .to_string(),
    ]]);
    let parsed = PeerLog::parse(&text).unwrap();
    let r = &parsed.runs[0];
    assert_eq!(r.jobs.len(), 1);
    assert!(r.jobs[0].end.is_none());
    assert_eq!(r.log.len(), 1);
    let report = Report::new(parsed, "m", "d");
    let k = &report.kills[0];
    assert_eq!(k.outcome, "hung: the client was killed after 640 s");
    assert!(k.lat_max_ms >= 640_000.0);
    assert_eq!(k.kills, 12);
}

#[test]
fn a_malformed_line_of_the_harness_is_an_error_naming_it() {
    let text = "peer-run: begin a one peer\n";
    let e = PeerLog::parse(text).unwrap_err();
    assert_eq!(e.line, 1);
    assert_eq!(e.what, "a round number");
    let e = PeerLog::parse("peer-run: begin a 1 slow\n").unwrap_err();
    assert_eq!(e.what, "mode peer, base or kill");
    let e = PeerLog::parse("peer-run: begin a 1 peer\nddvm-fio: end x {bad\n").unwrap_err();
    assert_eq!(e.line, 2);
}

#[test]
fn a_json_report_that_is_not_fio_s_is_named_not_trusted() {
    let runs = vec![run(
        "b",
        1,
        "peer",
        &[job("randread-4k-qd1", r#"{"jobs": "none"}"#.to_string())],
        0,
    )];
    let parsed = PeerLog::parse(&log(runs)).unwrap();
    assert_eq!(
        parsed.runs[0].jobs[0].json_error.as_deref(),
        Some("the JSON report has no `jobs` array")
    );
}

#[test]
fn medians_of_even_counts_and_of_nothing() {
    assert_eq!(Spread::of(&[4.0, 1.0, 3.0, 2.0]).median, 2.5);
    assert_eq!(Spread::of(&[]), Spread::default());
    assert_eq!(Spread::of(&[f64::NAN, 1.0]).median, 1.0);
}

/// A run's `peer-cost` line for `job`, as the harness prints it.
fn cost_line(peer: &str, round: u32, mode: &str, job: &str, busy: i64, exits: i64) -> String {
    format!(
        "[  99.0] peer-cost: {peer} {round} {mode} {job} {{\"centiseconds\":300,\"busy_ticks\":{busy},\
         \"idle_ticks\":0,\"context_switches\":{},\"exits\":{exits},\"io_exits\":{},\"mmio_exits\":{},\
         \"halt_exits\":{},\"irq_injections\":{},\"ticks\":{{\"vcpu-linux-\":{},\"blk-nvme\":{},\"sh\":1}}}}",
        busy * 10,
        exits / 4,
        exits / 4,
        exits / 8,
        exits / 2,
        busy / 2,
        busy / 4
    )
}

#[test]
fn an_io_s_cost_is_the_rig_s_counters_over_the_job_s_ios_median_of_the_fault_free_runs() {
    // The fixture's randwrite job did 512 writes and 512 verify reads: 1024 I/Os.
    let ios = 1024.0;
    let mut runs = Vec::new();
    for (round, busy) in [(1, 100), (2, 300), (3, 200)] {
        let mut r = run(
            "a",
            round,
            "peer",
            &[job("randwrite-4k-qd32", RANDWRITE.into())],
            0,
        );
        r.insert(
            r.len() - 1,
            cost_line("a", round, "peer", "randwrite-4k-qd32", busy, 4096),
        );
        runs.push(r);
    }
    // A cost for another run than the one it follows is not this run's.
    let mut b = run(
        "b",
        1,
        "peer",
        &[job("randwrite-4k-qd32", RANDWRITE.into())],
        0,
    );
    b.insert(
        b.len() - 1,
        cost_line("a", 1, "peer", "randwrite-4k-qd32", 1, 1),
    );
    runs.push(b);
    // A kill run's cost is not believed (its VMs and threads end during the job).
    let mut k = run("a", 1, "kill", &[job("kill-4k", RANDWRITE.into())], 20);
    k.insert(k.len() - 1, cost_line("a", 1, "kill", "kill-4k", 5000, -3));
    runs.push(k);
    let parsed = PeerLog::parse(&log(runs)).unwrap();
    assert_eq!(parsed.runs[0].costs.len(), 1);
    assert_eq!(parsed.runs[0].costs[0].cost.exits, 4096);
    assert!(parsed.runs[3].costs.is_empty());
    let report = Report::new(parsed, "test machine", "2026-12-07");
    assert_eq!(report.costs.len(), 1, "{:?}", report.costs);
    let c = &report.costs[0];
    assert_eq!(
        (c.job.as_str(), c.peer.as_str(), c.samples),
        ("randwrite-4k-qd32", "a", 3)
    );
    // The median of 100, 300 and 200 ticks of 10 ms.
    assert!(
        (c.cpu_us - 200.0 * 10_000.0 / ios).abs() < 1e-6,
        "{}",
        c.cpu_us
    );
    assert!((c.exits - 4.0).abs() < 1e-9);
    assert!((c.io_exits - 2.0).abs() < 1e-9);
    assert!((c.halt_exits - 0.5).abs() < 1e-9);
    assert!((c.irqs - 2.0).abs() < 1e-9);
    assert!((c.switches - 2000.0 / ios).abs() < 1e-9);
    let names: Vec<&str> = c.threads.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(names, ["vcpu-linux-", "blk-nvme", "sh"]);
    assert!((c.threads[0].1 - 100.0 * 10_000.0 / ios).abs() < 1e-6);
    let md = report.markdown();
    assert!(md.contains("What an I/O cost the rig"), "{md}");
    assert!(
        md.contains("| randwrite-4k-qd32 | (a) ddvm, NVMe driver domain | 1953 | 4.0 | 2.0 | 0.5 | 2.0 | 2.0 | vcpu-linux- 977, blk-nvme 488, sh 10 |"),
        "{md}"
    );
}
