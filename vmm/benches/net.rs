//! What isolating a NIC costs: the same two workload client guests (a) each through its own
//! NIC driver domain (an emulated e1000 in each, the two joined back to back by an in-process
//! wire) and (b) each on a virtio-net the VMM serves itself on the same kind of wire (no
//! domain, no device model: the switch's frames go straight onto the wire), in one run, in
//! alternating rounds, for three cases:
//!
//! - `echo`: verified frames (60 to 1514 bytes, 8 in flight) sent and echoed back: frames per
//!   second and the round trip p50/p99;
//! - `tcp-bulk`: one TCP connection (smoltcp at both ends) moving a verified stream both ways
//!   at once: MB/s each way;
//! - `tcp-rr`: 256-byte requests and answers, one at a time: the round trip p50/p99.
//!
//! Per side it also prints the VM exits per frame of the client vCPUs and of the domain vCPUs
//! (KVM's own counters) and the CPU time of the whole process per frame (`getrusage`; frames
//! are the echo client's, or the TCP segments both ends sent); then the ratios (a)/(b).
//!
//! `cargo bench -p ddvm --bench net` (`-- --case echo|tcp-bulk|tcp-rr` for one case; `--rounds
//! N`, default 2; `--frames N` echoed, default 20000; `--mib N` each way, default 8; `--count
//! N` round trips, default 1000; `--echo` shows the guests' consoles).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ddvm::client::{Client, NetEchoReport, NetTcpReport};
use ddvm::config::Config;
use ddvm::console::Echo;
use ddvm::hypervisor::Hypervisor;
use ddvm::net::direct::DirectNic;
use ddvm::net::service::NetService;
use ddvm::net::switch::Switch;
use ddvm::topology::{client_config, Topology};
use ddvm_passthrough::net::{wire_pair, PairConfig};

const SENDER: &str = "52:54:00:00:00:0a";
const ECHO: &str = "52:54:00:00:00:0b";

/// The bench's topology with `a`'s and `b`'s workloads.
fn config(a: &str, b: &str) -> String {
    format!(
        r#"
[[domain]]
name = "nic0"
[domain.device]
kind = "emulated-e1000"
wire = {{ kind = "pair", with = "nic1" }}

[[domain]]
name = "nic1"
[domain.device]
kind = "emulated-e1000"
wire = {{ kind = "pair", with = "nic0" }}

[[client]]
name = "a"
nic = "nic0"
mac = "{SENDER}"
workload = "{a}"

[[client]]
name = "b"
nic = "nic1"
mac = "{ECHO}"
workload = "{b}"
"#
    )
}

/// A case: its name and the workloads of the two clients.
fn cases(frames: u64, mib: u64, count: u64) -> Vec<(&'static str, String, String)> {
    let tcp = |role: &str, ip: &str, peer: &str, mode: &str| {
        format!(
            "workload=net-tcp role={role} ip={ip}/24 peer={peer} port=5001 mode={mode} bytes={mib}M count={count} size=256 seed=5 timeout_ms=120000"
        )
    };
    vec![
        (
            "echo",
            format!("workload=net-echo role=send peer={ECHO} count={frames} window=8 id=1 seed=7"),
            format!("workload=net-echo role=echo peer={SENDER} seed=7"),
        ),
        (
            "tcp-bulk",
            tcp("client", "10.0.0.1", "10.0.0.2", "bulk"),
            tcp("server", "10.0.0.2", "10.0.0.1", "bulk"),
        ),
        (
            "tcp-rr",
            tcp("client", "10.0.0.1", "10.0.0.2", "rr"),
            tcp("server", "10.0.0.2", "10.0.0.1", "rr"),
        ),
    ]
}

/// What the first client (the sender, or the TCP client) reported.
enum Report {
    Echo(NetEchoReport),
    Tcp {
        client: NetTcpReport,
        /// Segments both ends sent.
        segments: u64,
    },
}

impl Report {
    fn of(clients: &[Client]) -> Report {
        let console = |i: usize| clients[i].guest().console().text();
        if let Some(r) = NetEchoReport::find(&console(0)) {
            assert!(r.clean(), "the sender's report: {r:?}");
            return Report::Echo(r);
        }
        let client = NetTcpReport::find(&console(0))
            .unwrap_or_else(|| panic!("no report from the first client:\n{}", console(0)));
        let server = NetTcpReport::find(&console(1))
            .unwrap_or_else(|| panic!("no report from the second client:\n{}", console(1)));
        assert!(client.clean() && server.clean(), "{client:?} {server:?}");
        Report::Tcp {
            segments: client.segments + server.segments,
            client,
        }
    }

    /// Frames the run's costs are counted over.
    fn frames(&self) -> u64 {
        match self {
            Report::Echo(r) => r.frames,
            Report::Tcp { segments, .. } => *segments,
        }
    }

    /// The case's figure of merit and its round trips: (throughput, unit, p50 us, p99 us).
    fn figures(&self) -> (f64, &'static str, u64, u64) {
        match self {
            Report::Echo(r) => (r.frames_s as f64, "frames/s", r.rtt_us.p50, r.rtt_us.p99),
            Report::Tcp { client, .. } if client.mode == "rr" => (
                client.rounds as f64 * 1e6 / client.elapsed_us.max(1) as f64,
                "rounds/s",
                client.rtt_us.p50,
                client.rtt_us.p99,
            ),
            Report::Tcp { client, .. } => {
                (client.tx_mb_s + client.rx_mb_s, "MB/s (both ways)", 0, 0)
            }
        }
    }
}

struct Side {
    report: Report,
    platform: &'static str,
    client_exits: u64,
    domain_exits: Option<u64>,
    cpu: Duration,
}

impl Side {
    fn per_frame(&self, n: u64) -> f64 {
        n as f64 / self.report.frames().max(1) as f64
    }
}

/// User and system CPU time of the whole process so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage writes the struct it is given, a local of the right type.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is a valid target.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// (a): through two NIC driver domains.
fn domains(hv: &Arc<Hypervisor>, cfg: &Config, file: &Path, echo: Echo) -> Side {
    let cpu0 = cpu_time();
    let mut topo = Topology::start(hv, cfg, file, echo).expect("the topology starts");
    let outcomes = topo.wait_clients(Duration::from_secs(300));
    assert!(
        outcomes.iter().all(|o| o.ok()),
        "a client failed: {outcomes:?}"
    );
    let cpu = cpu_time() - cpu0;
    let client_exits = topo
        .clients
        .iter()
        .filter_map(|c| c.guest().vcpu_stat("exits"))
        .sum();
    let report = Report::of(&topo.clients);
    let platform = topo.clients[0].guest().platform().name();
    for n in &mut topo.nets {
        n.stop();
    }
    let domain_exits = topo
        .nets
        .iter()
        .map(|n| n.stats().domain_exits)
        .sum::<Option<u64>>();
    topo.stop();
    Side {
        report,
        platform,
        client_exits,
        domain_exits,
        cpu,
    }
}

/// (b): the same clients on NICs the VMM serves itself, joined by the same kind of wire.
fn direct(hv: &Arc<Hypervisor>, cfg: &Config, file: &Path, echo: Echo) -> Side {
    let cpu0 = cpu_time();
    let (end0, end1) = wire_pair(PairConfig::default()).expect("a wire pair");
    let mut clients = Vec::new();
    let mut services = Vec::new();
    for (c, end) in cfg.clients.iter().zip([end0, end1]) {
        let client = Client::boot(
            hv,
            &client_config(file, c, None, echo).expect("client config"),
        )
        .expect("the client boots");
        let port = client.net_port().expect("a NIC client").clone();
        let mut switch = Switch::new(1518);
        switch
            .add_client(port.config.mac)
            .expect("the client's MAC");
        let nic = DirectNic::new(Box::new(end));
        services
            .push(NetService::spawn(&c.name, vec![port], switch, nic, None).expect("the service"));
        clients.push(client);
    }
    for c in &clients {
        let exit = c.wait(Duration::from_secs(300));
        assert!(exit.is_some(), "{} did not finish", c.guest().name());
    }
    let cpu = cpu_time() - cpu0;
    let client_exits = clients
        .iter()
        .filter_map(|c| c.guest().vcpu_stat("exits"))
        .sum();
    let report = Report::of(&clients);
    let platform = clients[0].guest().platform().name();
    for s in &mut services {
        s.stop();
    }
    Side {
        report,
        platform,
        client_exits,
        domain_exits: None,
        cpu,
    }
}

fn print(label: &str, s: &Side) {
    let (tput, unit, p50, p99) = s.report.figures();
    println!(
        "{label:<30} {:>10.1} {:<17} {:>8} {:>8} {:>12} {:>12} {:>10.1}",
        tput,
        unit,
        p50,
        p99,
        format!("{:.2}", s.per_frame(s.client_exits)),
        s.domain_exits
            .map_or("-".to_string(), |e| format!("{:.2}", s.per_frame(e))),
        s.cpu.as_secs_f64() * 1e6 / s.report.frames().max(1) as f64
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |key: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == key)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| v.parse().expect("a number"))
    };
    let only = args
        .iter()
        .position(|a| a == "--case")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let rounds = value("--rounds", 2);
    let echo = if args.iter().any(|a| a == "--echo") {
        Echo::Stderr
    } else {
        Echo::Off
    };
    let file = Path::new("builtin:net-bench.toml");
    let hv =
        Arc::new(Hypervisor::open(Path::new(ddvm::hypervisor::DEFAULT_KVM_PATH)).expect("KVM"));
    let cases = cases(
        value("--frames", 20_000),
        value("--mib", 8),
        value("--count", 1000),
    );
    println!(
        "{:<30} {:>10} {:<17} {:>8} {:>8} {:>12} {:>12} {:>10}",
        "case, side", "", "", "p50 us", "p99 us", "client ex/f", "domain ex/f", "CPU us/f"
    );
    let mut ratios = Vec::new();
    for (name, a, b) in &cases {
        if only.as_deref().is_some_and(|o| o != *name) {
            continue;
        }
        let cfg = Config::parse(file, &config(a, b)).expect("the bench's topology");
        for round in 0..rounds {
            // Alternating order: a side that runs second on a warmer machine does not always
            // win.
            let (da, db) = if round % 2 == 0 {
                let da = domains(&hv, &cfg, file, echo);
                (da, direct(&hv, &cfg, file, echo))
            } else {
                let db = direct(&hv, &cfg, file, echo);
                (domains(&hv, &cfg, file, echo), db)
            };
            if ratios.is_empty() {
                println!("KVM platform {}", da.platform);
            }
            print(&format!("{name} (a) NIC domains, {}", round + 1), &da);
            print(&format!("{name} (b) VMM-served, {}", round + 1), &db);
            let (ta, _, pa, _) = da.report.figures();
            let (tb, _, pb, _) = db.report.figures();
            ratios.push((
                *name,
                round + 1,
                ta / tb.max(f64::MIN_POSITIVE),
                pa as f64 / pb.max(1) as f64,
            ));
        }
    }
    for (name, round, tput, rtt) in ratios {
        println!("{name} round {round}: (a)/(b) throughput {tput:.2}, round-trip p50 {rtt:.2}");
    }
}
