//! What the seccomp filters cost: the same topology (an NVMe driver domain serving two workload
//! clients, 4 KiB random reads and writes at queue depth 16) run by the `ddvm` binary with
//! `--seccomp true` and with `--seccomp false`, in alternating order, several rounds.
//!
//! It prints, per round and side, the clients' IOPS together and the driver domain's VM exits
//! per request, then the median IOPS of each side and their ratio (filters on / off), measured
//! in the same run.
//!
//! `cargo bench -p ddvm --bench seccomp` (`-- --rounds N`, default 4; `--count N` requests per
//! client, default 20000).

use std::path::{Path, PathBuf};
use std::process::Command;

fn topology(dir: &Path, count: u64) -> PathBuf {
    let cfg = dir.join("seccomp-bench.toml");
    let mut text = format!(
        "[[domain]]\nname = \"nvme0\"\nmemory_mib = 32\nchannel_kib = 8448\n[domain.device]\nkind = \"emulated-nvme\"\nbacking = \"{}\"\nsize_mib = 64\nlba_size = 4096\nvolatile_write_cache = true\n",
        dir.join("nvme.img").display()
    );
    for i in 0..2 {
        text += &format!(
            "[[client]]\nname = \"c{i}\"\ndisk = \"nvme0\"\noffset_mib = {}\nsize_mib = 32\nworkload = \"workload=randrw rwmix=70 bs=4096 qd=16 count={count} id={i} seed={}\"\n",
            32 * i,
            i + 1
        );
    }
    std::fs::write(&cfg, text).expect("write the topology");
    cfg
}

/// One run: the clients' IOPS together, and the domain's exits per answered request.
fn run(mode: &str, cfg: &Path, json: &Path) -> (f64, f64) {
    let out = Command::new(env!("CARGO_BIN_EXE_ddvm"))
        .args(["--seccomp", mode, "run"])
        .arg(cfg)
        .arg("--json")
        .arg(json)
        .env_remove("DDVM_SECCOMP")
        .output()
        .expect("run ddvm");
    assert!(
        out.status.success(),
        "ddvm --seccomp {mode} run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).expect("the JSON summary"))
            .expect("a JSON summary");
    let iops: f64 = report["clients"]
        .as_array()
        .expect("clients")
        .iter()
        .map(|c| c["workload"]["iops"].as_f64().unwrap_or(0.0))
        .sum();
    let disk = &report["disks"][0];
    let exits = disk["domain_exits"].as_f64().unwrap_or(0.0)
        / disk["answered"].as_f64().unwrap_or(1.0).max(1.0);
    (iops, exits)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut rounds = 4;
    let mut count = 20_000;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => rounds = args.next().and_then(|v| v.parse().ok()).unwrap_or(rounds),
            "--count" => count = args.next().and_then(|v| v.parse().ok()).unwrap_or(count),
            // cargo bench passes --bench.
            _ => {}
        }
    }
    let dir = std::env::temp_dir().join(format!("ddvm-bench-seccomp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let cfg = topology(&dir, count);
    let json = dir.join("summary.json");
    let (mut on, mut off) = (Vec::new(), Vec::new());
    println!(
        "seccomp cost: 2 clients x {count} requests, 4 KiB randrw 70/30, QD16, {rounds} rounds"
    );
    for r in 0..rounds {
        // Alternate which side goes first, so that drift falls on both alike.
        let order = if r % 2 == 0 {
            ["true", "false"]
        } else {
            ["false", "true"]
        };
        for mode in order {
            let (iops, exits) = run(mode, &cfg, &json);
            println!(
                "round {r}: --seccomp {mode:5}  {iops:9.0} IOPS  {exits:.3} domain exits/request"
            );
            if mode == "true" { &mut on } else { &mut off }.push(iops);
        }
    }
    let (m_on, m_off) = (median(on), median(off));
    println!(
        "median IOPS: filters on {m_on:.0}, off {m_off:.0}; on/off = {:.3}",
        m_on / m_off
    );
    let _ = std::fs::remove_dir_all(&dir);
}
