//! `ddvm demo` shows what ddvm is for: a disk and a NIC, each served through its own driver
//! domain, each killed by the operator while the clients run, every kill recovered, and the
//! clients see no error, no mismatch and no link down. A build without fault injection does
//! the same (operator kills need none).

mod common;

use common::*;

/// The summary's row of `name` in a table (its words after the first).
fn row<'a>(out: &'a str, name: &str) -> Vec<&'a str> {
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .map(|l| l.split_whitespace().skip(1).collect())
        .unwrap_or_default()
}

#[test]
fn the_demo_kills_the_disk_and_nic_domains_and_the_clients_see_nothing() {
    let dir = scratch("demo-json");
    let json = dir.join("demo.json");
    let out = ddvm(&[
        "demo",
        "--requests",
        "20000",
        "--frames",
        "3000",
        "--kills",
        "6",
        "--kill-every",
        "100ms",
        "--json",
        json.to_str().unwrap(),
    ]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ddvm demo failed:\n{text}");
    // The disk's clients: every request answered, no error, no mismatch.
    for client in ["client0", "client1"] {
        let r = row(&text, client);
        assert_eq!(r.len(), 8, "no report of {client}:\n{text}");
        assert_eq!(r[0], "20000", "{client} ops:\n{text}");
        assert_eq!(
            (r[5], r[6]),
            ("0", "0"),
            "{client} errors, mismatches:\n{text}"
        );
    }
    // The NIC's clients: every frame back, none corrupt, no error, the link never down.
    // role frames frames/s retries dupes corrupt p50 p99 max errors link_down
    let net = text
        .lines()
        .filter(|l| l.starts_with("net0 ") && l.contains(" send "))
        .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>())
        .next()
        .unwrap_or_else(|| panic!("no net-echo report of net0:\n{text}"));
    assert_eq!(net[1], "3000", "net0 frames:\n{text}");
    assert_eq!(
        (net[5], net[9], net[10]),
        ("0", "0", "0"),
        "net0 corrupt, errors, link down:\n{text}"
    );
    // Each domain was killed, and every kill was recovered.
    let mut kills = 0;
    for domain in ["nvme0", "nic0", "nic1"] {
        let r = row(&text, domain);
        // kills recovered p50 p99 max (each "N.N ms")
        assert!(r.len() >= 2, "no kill row of {domain}:\n{text}");
        let made: u32 = r[0].parse().unwrap();
        let recovered: u32 = r[1].parse().unwrap();
        assert!(made >= 1, "{domain} was never killed:\n{text}");
        assert!(
            recovered >= made,
            "{domain}: {recovered} recoveries of {made} kills:\n{text}"
        );
        kills += made;
    }
    assert_eq!(
        kills, 6,
        "every planned kill is made while the clients run:\n{text}"
    );
    assert!(
        text.contains("ddvm: 6 kill(s) of the driver domains, 6 recovered")
            && text.contains("the clients saw no error, no mismatch and no link down"),
        "{text}"
    );
    // The same summary as JSON.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(summary["ok"], true, "{summary}");
    assert_eq!(summary["ddvm_version"], env!("CARGO_PKG_VERSION"));
    let clients = summary["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 4, "{summary}");
    assert!(clients.iter().all(|c| c["ok"] == true), "{summary}");
    assert_eq!(clients[0]["workload"]["ops"], 20000, "{summary}");
    assert_eq!(clients[2]["net_echo"]["frames"], 3000, "{summary}");
    let kills: u64 = summary["kills"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kills"].as_u64().unwrap())
        .sum();
    assert_eq!(kills, 6, "{summary}");
    // The temporary disk image is gone.
    let image = text
        .split_whitespace()
        .find(|w| w.starts_with("/tmp/ddvm-demo-"))
        .expect("the demo names its disk image");
    assert!(
        !std::path::Path::new(image.trim_end_matches(')')).exists(),
        "{image} left behind"
    );
}

/// SIGINT (Ctrl-C) during the demo ends it in order: the clients stopped, the summary printed
/// (a client stopped on request is not a failure), the exit status 0 and the temporary disk
/// image removed.
#[test]
fn ctrl_c_during_the_demo_prints_the_summary_and_leaves_nothing_behind() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let mut child = Command::new(ddvm_bin())
        .args(["demo", "--requests", "100000000", "--frames", "100000000"])
        .env_remove("DDVM_KVM")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run ddvm");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    let t0 = Instant::now();
    // Wait for the first progress line: the clients are running.
    loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap_or(0) == 0 {
            let _ = child.kill();
            panic!("the demo ended before its first progress line:\n{seen}");
        }
        seen += &line;
        if line.starts_with("ddvm demo: ") && line.contains(" s: ") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no progress:\n{seen}"
        );
    }
    let image = seen
        .split_whitespace()
        .find(|w| w.starts_with("/tmp/ddvm-demo-"))
        .map(|w| w.trim_end_matches(')').to_string())
        .expect("the demo names its disk image");
    assert!(
        std::path::Path::new(&image).exists(),
        "{image} before the stop"
    );
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = child.wait().unwrap();
    let text = seen + &rest;
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(
        text.contains("stopped on request before it finished")
            && text.contains("ddvm: stopped on request"),
        "{text}"
    );
    assert!(text.contains("kill(s) of the driver domains"), "{text}");
    assert!(
        !std::path::Path::new(&image).exists(),
        "{image} left behind"
    );
}
