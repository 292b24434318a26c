//! A NIC domain whose e1000 is on a TAP device, in a network namespace the test creates, with
//! a TCP server of the host's own kernel there: two workload clients (smoltcp over
//! virtio-net) each move a verified stream both ways with it while the NIC domain is killed,
//! and the far end — Linux's TCP — says what the kills cost it (retransmitted segments,
//! timeouts), besides the clients' own reports.
//!
//! Nothing leaves the namespace: it has only its loopback and the TAP, and no route anywhere
//! else; the transfers are bounded in bytes and time. The test needs root, TAP devices and
//! network namespaces (as CI has): without them it fails, it is not skipped.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ddvm::config::Config;
use ddvm::console::Echo;
use ddvm::hypervisor::Hypervisor;
use ddvm::topology::Topology;

const TAP: &str = "ddvm-tcp0";
const SERVER: &str = "10.0.0.1";
const PORT: u16 = 5001;
/// Bytes each way per connection.
const BYTES: u64 = 8 << 20;
/// The clients: name, address, MAC, seed.
const CLIENTS: [(&str, &str, &str, u64); 2] = [
    ("a", "10.0.0.2", "52:54:00:00:00:0a", 11),
    ("b", "10.0.0.3", "52:54:00:00:00:0b", 12),
];

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The workload's stream of one direction (0: client to server, 1: server to client): byte
/// `i` is a function of the seed, the direction and `i` alone (as the guest's `tcp::Stream`).
struct Stream {
    key: u64,
}

impl Stream {
    fn new(seed: u64, direction: u64) -> Stream {
        Stream {
            key: splitmix(seed ^ splitmix(0x7463_7000 + direction)),
        }
    }

    fn byte(&self, i: u64) -> u8 {
        splitmix(self.key ^ (i >> 3)).to_le_bytes()[(i & 7) as usize]
    }
}

/// Moves the calling thread (and the threads it starts from now on) into a new, empty
/// network namespace.
fn private_netns() {
    // SAFETY: unshare takes no pointers; CLONE_NEWNET affects only the calling thread's
    // network namespace, which no other thread of this test binary relies on.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        r,
        0,
        "unshare(CLONE_NEWNET) failed ({}): this test needs root and network namespaces",
        std::io::Error::last_os_error()
    );
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (Debian: iproute2): {e}"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A counter of the namespace's TCP statistics (`/proc/thread-self/net/{snmp,netstat}`, read
/// from a thread inside it), by its group (`Tcp`, `TcpExt`) and name.
fn tcp_counter(group: &str, name: &str) -> u64 {
    for file in ["snmp", "netstat"] {
        let text = std::fs::read_to_string(format!("/proc/thread-self/net/{file}")).unwrap();
        let mut lines = text.lines();
        while let (Some(head), Some(values)) = (lines.next(), lines.next()) {
            let prefix = format!("{group}:");
            if !head.starts_with(&prefix) {
                continue;
            }
            let names = head.split_whitespace().skip(1);
            let values = values.split_whitespace().skip(1);
            if let Some((_, v)) = names.zip(values).find(|(n, _)| *n == name) {
                return v.parse().unwrap_or(0);
            }
        }
    }
    panic!("no {group}:{name} in the namespace's TCP statistics");
}

/// What the server saw of one connection.
#[derive(Debug, Default)]
struct Served {
    client: String,
    received: u64,
    corrupt: u64,
    sent: u64,
    error: Option<String>,
}

/// Serves one connection: reads the client's stream and checks every byte, writes its own,
/// both at once, `BYTES` each way; then waits for the client's close.
fn serve(mut conn: TcpStream) -> Served {
    let peer = conn
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let mut served = Served {
        client: peer.clone(),
        ..Served::default()
    };
    let Some(&(_, _, _, seed)) = CLIENTS.iter().find(|c| c.1 == peer) else {
        served.error = Some(format!("unknown client {peer}"));
        return served;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(60)));
    let mut writer = conn.try_clone().expect("a second handle on the connection");
    let sender = std::thread::spawn(move || -> Result<u64, String> {
        let s = Stream::new(seed, 1);
        let mut buf = vec![0u8; 16 << 10];
        let mut off = 0u64;
        while off < BYTES {
            let n = buf.len().min((BYTES - off) as usize);
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = s.byte(off + i as u64);
            }
            writer.write_all(&buf[..n]).map_err(|e| e.to_string())?;
            off += n as u64;
        }
        Ok(off)
    });
    let s = Stream::new(seed, 0);
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                for (i, b) in buf[..n].iter().enumerate() {
                    if *b != s.byte(served.received + i as u64) {
                        served.corrupt += 1;
                    }
                }
                served.received += n as u64;
            }
            Err(e) => {
                served.error = Some(format!("read: {e}"));
                break;
            }
        }
    }
    match sender.join() {
        Ok(Ok(n)) => served.sent = n,
        Ok(Err(e)) => served.error = served.error.take().or(Some(format!("write: {e}"))),
        Err(_) => served.error = Some("the writer panicked".into()),
    }
    let _ = conn.shutdown(Shutdown::Both);
    served
}

fn topology() -> String {
    let mut t = format!(
        "[[domain]]\nname = \"nic0\"\n[domain.device]\nkind = \"emulated-e1000\"\n\
         wire = {{ kind = \"tap\", name = \"{TAP}\" }}\n\
         [domain.recovery]\nheartbeat_ms = 20\n"
    );
    for (name, addr, mac, seed) in CLIENTS {
        t += &format!(
            "[[client]]\nname = \"{name}\"\nnic = \"nic0\"\nmac = \"{mac}\"\n\
             workload = \"workload=net-tcp role=client ip={addr}/24 peer={SERVER} port={PORT} \
             mode=bulk bytes={BYTES} seed={seed} timeout_ms=90000\"\n"
        );
    }
    t
}

#[test]
fn tcp_to_a_server_behind_a_tap_survives_nic_domain_kills() {
    private_netns();
    ip(&["link", "set", "lo", "up"]);
    ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]);
    ip(&["addr", "add", &format!("{SERVER}/24"), "dev", TAP]);
    ip(&["link", "set", TAP, "up"]);
    let listener = TcpListener::bind((SERVER, PORT)).expect("the server listens on the TAP");
    let server: JoinHandle<Vec<Served>> = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for _ in 0..CLIENTS.len() {
            match listener.accept() {
                Ok((c, _)) => conns.push(std::thread::spawn(move || serve(c))),
                Err(e) => panic!("accept: {e}"),
            }
        }
        conns.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let retrans0 = tcp_counter("Tcp", "RetransSegs");
    let timeouts0 = tcp_counter("TcpExt", "TCPTimeouts");

    let hv = Arc::new(
        Hypervisor::open(std::path::Path::new(ddvm::hypervisor::DEFAULT_KVM_PATH)).unwrap(),
    );
    let file = std::path::Path::new("net-tap.toml");
    let cfg = Config::parse(file, &topology()).expect("the topology parses");
    let mut topo = Topology::start(&hv, &cfg, file, Echo::Off).expect("the topology starts");
    let nic = topo
        .recovery
        .iter()
        .find(|(n, _)| n == "nic0")
        .map(|(_, h)| h.clone())
        .unwrap();
    // Kills while the transfers run.
    let kills = 4u64;
    let t0 = Instant::now();
    for i in 0..kills {
        std::thread::sleep(Duration::from_millis(250));
        common::kill_and_wait_recovered(&nic, i, t0, Duration::from_secs(60));
    }
    // The kills came during the transfers: both clients were still moving bytes.
    let running = topo
        .clients
        .iter()
        .filter(|c| c.wait(Duration::ZERO).is_none())
        .count();
    assert_eq!(
        running,
        CLIENTS.len(),
        "a transfer ended before the last kill: make it longer"
    );
    let outcomes = topo.wait_clients(Duration::from_secs(120));
    let still_running = topo
        .clients
        .iter()
        .filter(|c| c.wait(Duration::ZERO).is_none())
        .count();
    topo.stop();
    let served = server.join().expect("the server thread");
    let retrans = tcp_counter("Tcp", "RetransSegs") - retrans0;
    let timeouts = tcp_counter("TcpExt", "TCPTimeouts") - timeouts0;
    assert_eq!(still_running, 0);
    for o in &outcomes {
        let r = o
            .tcp
            .as_ref()
            .unwrap_or_else(|| panic!("no TCP report from {}: {o:?}", o.name));
        assert!(r.clean(), "{}: {r:?}", o.name);
        assert_eq!(
            (r.verified, r.corrupt, r.resets, r.link_down),
            (BYTES, 0, 0, 0),
            "{}: {r:?}",
            o.name
        );
    }
    for s in &served {
        assert_eq!(
            s.error, None,
            "the server's connection with {}: {s:?}",
            s.client
        );
        assert_eq!((s.received, s.corrupt, s.sent), (BYTES, 0, BYTES), "{s:?}");
    }
    assert_eq!(served.len(), CLIENTS.len());
    let client_retrans: u64 = outcomes
        .iter()
        .filter_map(|o| o.tcp.as_ref())
        .map(|r| r.retransmits)
        .sum();
    println!(
        "{kills} kills of the NIC domain during {} MiB each way with each of {} clients: clients retransmitted {client_retrans} segments; the far end (Linux) {retrans}, with {timeouts} retransmission timeouts",
        BYTES >> 20,
        CLIENTS.len()
    );
    assert!(nic.with(|o| o.recovered) >= kills);
}
