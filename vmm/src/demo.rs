//! `ddvm demo`: a disk and a NIC, each served through its own driver domain, each killed
//! several times while the clients run, and a summary of what the clients saw.
//!
//! The topology (built in, nothing to configure): an NVMe driver domain on an emulated
//! controller backed by a temporary file, with two block clients running the verifying
//! workload; two NIC driver domains whose emulated e1000s are joined by an in-process wire,
//! with a client on each exchanging verified frames across both domains. While the clients
//! run, the demo kills one domain at a time, in turn, as an operator would (`ddvm ctl kill`:
//! no fault-injection build needed), each only while its clients are still running and only
//! once the previous kill was recovered, so that every kill is followed by a recovery that a
//! client's request ends.

use std::path::Path;
use std::time::{Duration, Instant};

use ddvm_recovery::events::Samples;

use crate::reincarnation::{Command, RecoveryHandle};
use crate::topology::Topology;

/// The disk domain's name.
pub const DISK_DOMAIN: &str = "nvme0";
/// The NIC domains' names (joined by the wire).
pub const NIC_DOMAINS: [&str; 2] = ["nic0", "nic1"];

/// The demo's topology, as TOML: `requests` verified 4 KiB requests per block client at
/// queue depth `qd`, `frames` verified frames from the NIC client on nic0 to the one on nic1.
pub fn topology(disk: &Path, requests: u64, qd: u32, frames: u64) -> String {
    format!(
        r#"
[[domain]]
name = "{DISK_DOMAIN}"
memory_mib = 16
[domain.device]
kind = "emulated-nvme"
backing = "{disk}"
size_mib = 64
lba_size = 4096
volatile_write_cache = true

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
name = "client0"
disk = "{DISK_DOMAIN}"
offset_mib = 0
size_mib = 32
workload = "workload=randrw rwmix=70 bs=4096 qd={qd} count={requests} id=0 seed=1"

[[client]]
name = "client1"
disk = "{DISK_DOMAIN}"
offset_mib = 32
size_mib = 32
workload = "workload=randrw rwmix=70 bs=4096 qd={qd} count={requests} id=1 seed=2"

[[client]]
name = "net0"
nic = "nic0"
mac = "52:54:00:00:00:0a"
workload = "workload=net-echo role=send peer=52:54:00:00:00:0b count={frames} window=8 id=1 seed=1"

[[client]]
name = "net1"
nic = "nic1"
mac = "52:54:00:00:00:0b"
workload = "workload=net-echo role=echo peer=52:54:00:00:00:0a seed=1"
"#,
        disk = disk.display()
    )
}

/// The clients of each domain the demo kills, by name.
fn clients_of(domain: &str) -> &'static [&'static str] {
    match domain {
        DISK_DOMAIN => &["client0", "client1"],
        // The sender and the echo side both need both NIC domains.
        _ => &["net0", "net1"],
    }
}

/// Operator kills of the demo's domains, in turn, while their clients run.
pub struct Kills {
    /// The domains, in the order they are killed (round robin).
    order: Vec<(String, RecoveryHandle)>,
    /// Kills left to make.
    left: u32,
    /// Time between a recovery and the next kill.
    every: Duration,
    /// When the next kill may be made.
    next_at: Instant,
    /// The domain of the kill not yet recovered, with its recovery count before the kill.
    pending: Option<(usize, u64)>,
    cursor: usize,
    /// Kills made, per domain (by index into `order`).
    made: Vec<u32>,
}

impl Kills {
    /// `count` kills of the domains named in `order` (those `topo` has), the first after
    /// `every`, each next one `every` after the previous one recovered.
    pub fn new(topo: &Topology, order: &[&str], count: u32, every: Duration) -> Kills {
        let order: Vec<(String, RecoveryHandle)> = order
            .iter()
            .filter_map(|n| {
                topo.recovery
                    .iter()
                    .find(|(name, _)| name == n)
                    .map(|(name, h)| (name.clone(), h.clone()))
            })
            .collect();
        Kills {
            made: vec![0; order.len()],
            order,
            left: count,
            every,
            next_at: Instant::now() + every,
            pending: None,
            cursor: 0,
        }
    }

    /// Kills made so far.
    pub fn made(&self) -> u32 {
        self.made.iter().sum()
    }

    /// Whether the last kill was made and its recovery not yet seen (by the last tick).
    pub fn pending(&self) -> bool {
        self.pending
            .is_some_and(|(i, before)| self.order[i].1.with(|o| o.recovered) == before)
    }

    /// Called while the clients run: makes the next kill when it is due.
    pub fn tick(&mut self, topo: &Topology) {
        let now = Instant::now();
        if let Some((i, before)) = self.pending {
            if self.order[i].1.with(|o| o.recovered) == before {
                return;
            }
            self.pending = None;
            self.next_at = now + self.every;
        }
        if self.left == 0 || now < self.next_at || self.order.is_empty() {
            return;
        }
        // The next domain in turn whose clients all still run (a domain whose clients are done
        // would see no request after its restart, and so no recovery to measure).
        for _ in 0..self.order.len() {
            let i = self.cursor % self.order.len();
            self.cursor += 1;
            let (name, handle) = &self.order[i];
            if !clients_running(topo, clients_of(name)) {
                continue;
            }
            let before = handle.with(|o| o.recovered);
            handle.send(Command::Kill);
            self.made[i] += 1;
            self.left -= 1;
            self.pending = Some((i, before));
            return;
        }
    }

    /// Per domain killed: its name, the kills made, the recoveries it made, and the
    /// detection-to-first-completion times of its recoveries.
    pub fn results(&self) -> Vec<DomainKills> {
        self.order
            .iter()
            .zip(&self.made)
            .map(|((name, h), &kills)| {
                let mut recovery = Samples::default();
                let recovered = h.with(|o| {
                    for r in &o.recoveries {
                        recovery.push(r.recovered.saturating_duration_since(r.detected));
                    }
                    o.recovered
                });
                DomainKills {
                    name: name.clone(),
                    kills,
                    recovered,
                    recovery,
                }
            })
            .collect()
    }
}

/// What the kills of one domain came to.
pub struct DomainKills {
    /// Domain name.
    pub name: String,
    /// Operator kills made.
    pub kills: u32,
    /// Recoveries it made (each ended by a client's first completed request after it).
    pub recovered: u64,
    /// Detection to the first completion after the restart, per recovery.
    pub recovery: Samples,
}

/// Whether every client named in `names` is still running.
fn clients_running(topo: &Topology, names: &[&str]) -> bool {
    names.iter().all(|n| {
        topo.clients
            .iter()
            .find(|c| c.guest().name() == *n)
            .is_some_and(|c| c.wait(Duration::ZERO).is_none())
    })
}

/// The progress line: once a second, what the services answered and the kills so far.
pub struct Progress {
    t0: Instant,
    next: Instant,
}

impl Progress {
    /// Starts the clock.
    pub fn new() -> Progress {
        let t0 = Instant::now();
        Progress {
            t0,
            next: t0 + Duration::from_secs(1),
        }
    }

    /// Prints the line when a second has passed since the last one.
    pub fn tick(&mut self, topo: &Topology, kills: &Kills) {
        let now = Instant::now();
        if now < self.next {
            return;
        }
        self.next = now + Duration::from_secs(1);
        let requests: u64 = topo
            .services
            .iter()
            .map(|s| {
                s.counters()
                    .answered
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum();
        let frames: u64 = topo.nets.iter().map(|n| n.stats().class.tx_sent).sum();
        let recovered: u64 = kills
            .order
            .iter()
            .map(|(_, h)| h.with(|o| o.recovered))
            .sum();
        let running = topo
            .clients
            .iter()
            .filter(|c| c.wait(Duration::ZERO).is_none())
            .count();
        println!(
            "ddvm demo: {:>4.1} s: {running} client(s) running, {requests} disk requests answered, {frames} frames sent, {} kill(s), {recovered} recovered",
            now.duration_since(self.t0).as_secs_f64(),
            kills.made(),
        );
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}
