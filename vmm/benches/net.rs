//! What isolating a NIC costs: the same two workload client guests, one sending verified
//! frames and one echoing them, (a) each through its own NIC driver domain (an emulated e1000
//! in each, the two joined back to back by an in-process wire) and (b) each on a virtio-net
//! the VMM serves itself on the same kind of wire (no domain, no device model: the switch's
//! frames go straight onto the wire), in one run, in alternating rounds.
//!
//! Per side it prints the frames per second and the round-trip p50/p99 the sender measured
//! (every frame crosses the path twice: there and echoed back), the VM exits per frame of the
//! client vCPUs and of the domain vCPUs (KVM's own counters), and the CPU time of the whole
//! process per frame (`getrusage`); then the ratios (a)/(b) of each round.
//!
//! `cargo bench -p ddvm --bench net` (`-- --frames N` per round, default 20000; `--rounds N`,
//! default 2; `--window N` frames in flight, default 8; `--echo` shows the guests' consoles).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ddvm::client::{Client, NetEchoReport};
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

fn config(frames: u64, window: u64) -> String {
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
name = "send"
nic = "nic0"
mac = "{SENDER}"
workload = "workload=net-echo role=send peer={ECHO} count={frames} window={window} id=1 seed=7"

[[client]]
name = "echo"
nic = "nic1"
mac = "{ECHO}"
workload = "workload=net-echo role=echo peer={SENDER} seed=7"
"#
    )
}

struct Side {
    report: NetEchoReport,
    platform: &'static str,
    client_exits: u64,
    domain_exits: Option<u64>,
    cpu: Duration,
}

impl Side {
    fn per_frame(&self, n: u64) -> f64 {
        n as f64 / self.report.frames.max(1) as f64
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

fn sender_report(clients: &[Client]) -> NetEchoReport {
    let console = clients[0].guest().console().text();
    NetEchoReport::find(&console).unwrap_or_else(|| panic!("no report from the sender:\n{console}"))
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
    let report = sender_report(&topo.clients);
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
    let report = sender_report(&clients);
    let platform = clients[0].guest().platform().name();
    assert!(report.clean(), "the sender's report: {report:?}");
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
    println!(
        "{label:<28} {:>9} {:>8} {:>8} {:>8} {:>12} {:>12} {:>10.1}",
        s.report.frames_s,
        s.report.rtt_us.p50,
        s.report.rtt_us.p99,
        s.report.retries,
        format!("{:.2}", s.per_frame(s.client_exits)),
        s.domain_exits
            .map_or("-".to_string(), |e| format!("{:.2}", s.per_frame(e))),
        s.cpu.as_secs_f64() * 1e6 / s.report.frames.max(1) as f64
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
    let frames = value("--frames", 20_000);
    let rounds = value("--rounds", 2);
    let window = value("--window", 8);
    let echo = if args.iter().any(|a| a == "--echo") {
        Echo::Stderr
    } else {
        Echo::Off
    };
    let file = Path::new("builtin:net-bench.toml");
    let cfg = Config::parse(file, &config(frames, window)).expect("the bench's topology");
    let hv =
        Arc::new(Hypervisor::open(Path::new(ddvm::hypervisor::DEFAULT_KVM_PATH)).expect("KVM"));
    println!(
        "net bench: {frames} frames (60 to 1514 bytes, {window} in flight) sent and echoed back, per side and round"
    );
    println!(
        "{:<28} {:>9} {:>8} {:>8} {:>8} {:>12} {:>12} {:>10}",
        "side", "frames/s", "p50 us", "p99 us", "retries", "client ex/f", "domain ex/f", "CPU us/f"
    );
    let mut ratios = Vec::new();
    for round in 0..rounds {
        // Alternating order: a side that runs second on a warmer machine does not always win.
        let (a, b) = if round % 2 == 0 {
            let a = domains(&hv, &cfg, file, echo);
            (a, direct(&hv, &cfg, file, echo))
        } else {
            let b = direct(&hv, &cfg, file, echo);
            (domains(&hv, &cfg, file, echo), b)
        };
        if round == 0 {
            println!("KVM platform {}", a.platform);
        }
        print(&format!("(a) NIC domains, round {}", round + 1), &a);
        print(&format!("(b) VMM-served, round {}", round + 1), &b);
        ratios.push((
            a.report.frames_s as f64 / b.report.frames_s.max(1) as f64,
            a.report.rtt_us.p50 as f64 / b.report.rtt_us.p50.max(1) as f64,
        ));
    }
    for (i, (tput, rtt)) in ratios.iter().enumerate() {
        println!(
            "round {}: (a)/(b) frames/s {tput:.2}, round-trip p50 {rtt:.2}",
            i + 1
        );
    }
}
