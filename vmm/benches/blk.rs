//! What isolation costs: the same workload client guest against (a) an NVMe driver domain over
//! the channel and (b) the same file served directly by the VMM, in one run.
//!
//! For each case it prints the client's IOPS and latency, the ratio (a)/(b), VM exits per
//! request (client vCPU and driver-domain vCPU, from KVM's own counters, over every request of
//! the run as the block service counted them, the prefill included) and the copy cost of
//! the VMM (bytes copied between client and backend, and the time spent copying).
//!
//! It also prints, per thread of the run (client vCPU, block service, domain vCPU), the time
//! on a CPU, the time runnable but waiting for one (the cost of three busy threads on two
//! cores) and the context switches, from `/proc/self/task/*/{schedstat,status}`, sampled every
//! 20 ms while the run lasts (so a thread that ended is counted up to its last sample), and
//! for each side the CPU time of all those threads per request and the CPUs they kept busy:
//! where (b) keeps the CPUs busy, (a) can reach at most (b)'s CPU per request over its own of
//! (b)'s IOPS.
//!
//! The `attack` case measures fairness: a well-behaved client guest (4 KiB random reads, QD16)
//! on the driver domain, alone and then with a hostile neighbour on the same disk and block
//! service — a scripted driver in the VMM that keeps all 256 heads of its queue busy with
//! valid reads (`--attack-bs`, default 4 KiB) and every `--bomb-ms` (default 20) publishes a
//! 65,535-descriptor indirect table and resets its device when it is refused. It prints the
//! client's IOPS in both runs and their ratio (target: at least 50%), and what the attacker
//! got: its answered requests per second and the resets it was told to do.
//!
//! `cargo bench -p ddvm --bench blk` (`-- --quick` for a short run; `--runs N` repeats each
//! case N times and prints every ratio; `--case randread|randread-qd1|seqwrite|attack` runs one case;
//! `--side a|b` runs one side only and `--count N` sets the requests of the 4 KiB case, for
//! profiling; `--echo` shows the guests' consoles).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ddvm::blk::{
    Backend, BlockGeometry, BlockService, ChannelBackend, ClientPort, LbaRange, VirtioBlock,
};
use ddvm::client::{Client, WorkloadReport};
use ddvm::config::Config;
use ddvm::console::Echo;
use ddvm::hypervisor::Hypervisor;
use ddvm::topology::{client_config, domain_config, Topology};
use ddvm::virtio::{Interrupt, Queue, VirtioDevice};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

struct Run {
    report: WorkloadReport,
    /// Every request the client made (prefill, checks and the timed phase): what the exits
    /// are counted over.
    requests: u64,
    client_exits: u64,
    domain_exits: u64,
    copy_bytes: u64,
    copy_ns: u64,
    wall: Duration,
    threads: Vec<ThreadStat>,
    /// CPU time other processes used during the run.
    others: Duration,
}

/// What the scheduler says about one thread.
#[derive(Clone, Debug, Default)]
struct ThreadStat {
    name: String,
    /// Time on a CPU.
    run_ns: u64,
    /// Time runnable, waiting for a CPU.
    wait_ns: u64,
    voluntary: u64,
    involuntary: u64,
}

fn thread_stats() -> BTreeMap<u32, ThreadStat> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        let path = e.path();
        let read = |f: &str| std::fs::read_to_string(path.join(f)).unwrap_or_default();
        let mut t = ThreadStat {
            name: read("comm").trim().to_string(),
            ..ThreadStat::default()
        };
        let sched: Vec<u64> = read("schedstat")
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        if let [run, wait, ..] = sched[..] {
            t.run_ns = run;
            t.wait_ns = wait;
        }
        for line in read("status").lines() {
            let value = |l: &str| l.split_whitespace().nth(1).and_then(|v| v.parse().ok());
            if line.starts_with("voluntary_ctxt_switches") {
                t.voluntary = value(line).unwrap_or(0);
            } else if line.starts_with("nonvoluntary_ctxt_switches") {
                t.involuntary = value(line).unwrap_or(0);
            }
        }
        out.insert(tid, t);
    }
    out
}

/// CPU time used so far, in clock ticks: by the whole machine (busy, not idle), and by this
/// process. Their difference over a run is what other processes took from it.
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let machine = stat
        .lines()
        .next()
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal (guest time is inside user).
            v.iter().take(8).sum::<u64>() - v.get(3).unwrap_or(&0) - v.get(4).unwrap_or(&0)
        })
        .unwrap_or(0);
    let own = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let own = own
        .rsplit_once(')')
        .map(|(_, rest)| {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let field = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
            // `rest` starts at field 3 (the state).
            field(14 - 3) + field(15 - 3)
        })
        .unwrap_or(0);
    (machine, own)
}

/// Samples the stats of threads that were not there at the start, until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<BTreeMap<u32, ThreadStat>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Sampler {
    fn start() -> Sampler {
        let before = thread_stats();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let (s, v) = (stop.clone(), seen.clone());
        let thread = std::thread::Builder::new()
            .name("sampler".into())
            .spawn(move || loop {
                let done = s.load(Ordering::Acquire);
                let now = thread_stats();
                let mut v = v.lock().unwrap();
                for (tid, t) in now {
                    if !before.contains_key(&tid) {
                        v.insert(tid, t);
                    }
                }
                drop(v);
                if done {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            })
            .expect("sampler thread");
        Sampler { stop, seen, thread }
    }

    fn finish(self) -> Vec<ThreadStat> {
        self.stop.store(true, Ordering::Release);
        let _ = self.thread.join();
        let v = self.seen.lock().unwrap();
        v.values()
            .filter(|t| t.name.starts_with("vcpu-") || t.name.starts_with("blk-"))
            .cloned()
            .collect()
    }
}

fn run(
    hv: &Arc<Hypervisor>,
    disk: &Path,
    direct: bool,
    workload: &str,
    echo: Echo,
    domain_cmdline: &str,
) -> Run {
    let mut text = String::new();
    let target = if direct {
        format!("file:{}", disk.display())
    } else {
        text += &format!(
            "[[domain]]\nname = \"nvme0\"\nmemory_mib = 32\nchannel_kib = 8448\ncmdline = \"{domain_cmdline}\"\n[domain.device]\nkind = \"emulated-nvme\"\nbacking = \"{}\"\nsize_mib = 64\nlba_size = 4096\n",
            disk.display()
        );
        "nvme0".to_string()
    };
    text += &format!(
        "[[client]]\nname = \"bench\"\ndisk = \"{target}\"\nsize_mib = 64\nmemory_mib = 64\nworkload = \"{workload}\"\n"
    );
    let file = Path::new("bench.toml");
    let config = Config::parse(file, &text).expect("bench config");
    let sampler = Sampler::start();
    let cpu0 = cpu_ticks();
    let t0 = Instant::now();
    let mut topo = Topology::start(hv, &config, file, echo).expect("start");
    let outcome = topo.wait_clients(Duration::from_secs(600)).remove(0);
    let wall = t0.elapsed();
    let cpu1 = cpu_ticks();
    let threads = sampler.finish();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let other_ticks = (cpu1.0 - cpu0.0).saturating_sub(cpu1.1 - cpu0.1);
    let others = Duration::from_secs_f64(other_ticks as f64 / hz);
    let client_exits = topo.clients[0].guest().vcpu_stat("exits").unwrap_or(0);
    let s = &mut topo.services[0];
    let copy_bytes = s.counters().copy_bytes.load(Ordering::Relaxed);
    let copy_ns = s.counters().copy_ns.load(Ordering::Relaxed);
    let requests = s.counters().answered.load(Ordering::Relaxed);
    let domain_exits = match s.stop() {
        Ok(Backend::Channel(b)) => {
            let d = b.domain().expect("the domain is up");
            d.vcpu_stat("exits").unwrap_or(0)
        }
        _ => 0,
    };
    topo.stop();
    let report = outcome
        .report
        .unwrap_or_else(|| panic!("no report: {:?}", outcome.exit));
    assert!(report.clean(), "{report:?}");
    Run {
        report,
        requests,
        client_exits,
        domain_exits,
        copy_bytes,
        copy_ns,
        wall,
        threads,
        others,
    }
}

impl Run {
    /// CPU time of every thread of the run per request answered, in µs.
    fn cpu_per_request_us(&self) -> f64 {
        let ns: u64 = self.threads.iter().map(|t| t.run_ns).sum();
        ns as f64 / 1e3 / self.requests.max(1) as f64
    }

    /// CPUs the run's threads kept busy on average.
    fn busy_cpus(&self) -> f64 {
        let ns: u64 = self.threads.iter().map(|t| t.run_ns).sum();
        ns as f64 / self.wall.as_nanos().max(1) as f64
    }
}

fn line(label: &str, r: &Run) {
    let per = |x: u64| x as f64 / r.requests.max(1) as f64;
    println!(
        "  {label:<10} {:>9.0} IOPS {:>8.1} MiB/s  p50 {:>6} us  p99 {:>6} us  exits/request client {:.2} domain {:.2}  copy {:.1} MiB in {:.1} ms ({:.2} GiB/s)",
        r.report.iops,
        r.report.mib_s,
        r.report.lat_us.p50,
        r.report.lat_us.p99,
        per(r.client_exits),
        per(r.domain_exits),
        r.copy_bytes as f64 / (1 << 20) as f64,
        r.copy_ns as f64 / 1e6,
        r.copy_bytes as f64 / r.copy_ns.max(1) as f64 / 1.073_741_824,
    );
    let wall = r.wall.as_secs_f64() * 1e3;
    println!(
        "             other processes used {:.0} ms of CPU during the {wall:.0} ms run",
        r.others.as_secs_f64() * 1e3
    );
    for t in &r.threads {
        println!(
            "             thread {:<12} on CPU {:>6.0} ms ({:>3.0}% of {:.0} ms)  waiting for a CPU {:>6.0} ms  switches {} voluntary, {} involuntary  ({:.2} per request)",
            t.name,
            t.run_ns as f64 / 1e6,
            t.run_ns as f64 / 1e6 / wall * 100.0,
            wall,
            t.wait_ns as f64 / 1e6,
            t.voluntary,
            t.involuntary,
            per(t.voluntary + t.involuntary),
        );
    }
}

/// The hostile neighbour of the `attack` case: a driver scripted in the VMM on a client port of
/// its own (no vCPU), as hostile as the device lets it be.
struct Attacker {
    mem: ddvm::memory::GuestMem,
    port: Arc<ClientPort>,
    device: VirtioBlock,
    avail: u16,
    used_seen: u16,
    bs: u32,
    sectors: u64,
    seed: u64,
}

const QSIZE: u16 = ddvm::blk::device::QUEUE_SIZE;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const A_DESC: u64 = 0x10000;
const A_AVAIL: u64 = 0x20000;
const A_USED: u64 = 0x30000;
const A_TABLES: u64 = 0x40000;
const A_HDR: u64 = 0x50000;
const A_STATUS: u64 = 0x58000;
const A_BOMB: u64 = 0x100000;
const A_DATA: u64 = 0x300000;
const BOMB_ENTRIES: u64 = 65_535;

/// What the attacker got.
#[derive(Default)]
struct AttackStats {
    answered: u64,
    refused: u64,
    wall: Duration,
}

impl Attacker {
    fn new(range: LbaRange, block_size: u32, bs: u32) -> Attacker {
        let mem = ddvm::memory::create(8 << 20, 1 << 30).expect("attacker memory");
        let geometry = BlockGeometry {
            range,
            block_size,
            read_only: false,
            discard: false,
            write_zeroes: false,
            serial: "attacker".into(),
            queues: 1,
        };
        let port = ClientPort::new(
            "attacker",
            mem.clone(),
            geometry,
            Interrupt::new(Arc::new(|| {})),
        )
        .expect("attacker port");
        let device = VirtioBlock::new(port.clone());
        // The bomb: a read whose indirect table holds 65,535 descriptors.
        let mut table = Vec::with_capacity(BOMB_ENTRIES as usize * 16);
        for i in 0..BOMB_ENTRIES {
            let (addr, len, flags) = match i {
                0 => (A_HDR, 16, F_NEXT),
                _ if i == BOMB_ENTRIES - 1 => (A_STATUS, 1, F_WRITE),
                _ => (A_DATA, 512, F_WRITE | F_NEXT),
            };
            table.extend_from_slice(&u64::to_le_bytes(addr));
            table.extend_from_slice(&u32::to_le_bytes(len));
            table.extend_from_slice(&u16::to_le_bytes(flags));
            table.extend_from_slice(&u16::to_le_bytes((i + 1) as u16));
        }
        mem.write_slice(&table, GuestAddress(A_BOMB))
            .expect("bomb table");
        let mut a = Attacker {
            mem,
            port,
            device,
            avail: 0,
            used_seen: 0,
            bs,
            sectors: range.sectors,
            seed: 0x9e37_79b9_7f4a_7c15,
        };
        a.reset();
        a
    }

    fn w<T: vm_memory::ByteValued>(&self, v: T, at: u64) {
        self.mem
            .write_obj(v, GuestAddress(at))
            .expect("attacker memory");
    }

    fn reset(&mut self) {
        self.device.reset();
        self.avail = 0;
        self.used_seen = 0;
        self.w(0u16, A_AVAIL + 2);
        self.w(0u16, A_USED + 2);
        let mut q = Queue::new(QSIZE).expect("queue");
        q.set_size(QSIZE);
        q.try_set_desc_table_address(GuestAddress(A_DESC))
            .expect("desc");
        q.try_set_avail_ring_address(GuestAddress(A_AVAIL))
            .expect("avail");
        q.try_set_used_ring_address(GuestAddress(A_USED))
            .expect("used");
        q.set_ready(true);
        self.device.activate(0, vec![Some(q)]).expect("activate");
    }

    /// Head `i`: a valid read of `bs` bytes at a random block, through a 3-entry indirect table.
    fn request(&mut self, i: u16) {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let blocks = self.sectors / u64::from(self.bs / 512);
        let sector = (self.seed % blocks.max(1)) * u64::from(self.bs / 512);
        let (hdr, status, table) = (
            A_HDR + u64::from(i) * 16,
            A_STATUS + u64::from(i),
            A_TABLES + u64::from(i) * 48,
        );
        self.w(virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN, hdr);
        self.w(0u32, hdr + 4);
        self.w(sector, hdr + 8);
        for (k, (addr, len, flags)) in [
            (hdr, 16, F_NEXT),
            (A_DATA, self.bs, F_WRITE | F_NEXT),
            (status, 1, F_WRITE),
        ]
        .into_iter()
        .enumerate()
        {
            let at = table + k as u64 * 16;
            self.w(addr, at);
            self.w(len, at + 8);
            self.w(flags, at + 12);
            self.w(k as u16 + 1, at + 14);
        }
        self.desc(i, table, 48, F_INDIRECT);
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16) {
        let at = A_DESC + u64::from(i) * 16;
        self.w(addr, at);
        self.w(len, at + 8);
        self.w(flags, at + 12);
        self.w(0u16, at + 14);
    }

    fn publish(&mut self, heads: &[u16]) {
        for &h in heads {
            self.w(h, A_AVAIL + 4 + u64::from(self.avail % QSIZE) * 2);
            self.avail = self.avail.wrapping_add(1);
        }
        self.w(self.avail, A_AVAIL + 2);
        let _ = self.port.notify.write(1);
    }

    /// Heads answered since the last look.
    fn reap(&mut self) -> Vec<u16> {
        let idx: u16 = self.mem.read_obj(GuestAddress(A_USED + 2)).expect("used");
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = A_USED + 4 + u64::from(self.used_seen % QSIZE) * 8;
            let id: u32 = self.mem.read_obj(GuestAddress(e)).expect("used");
            out.push(id as u16);
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Every head busy with a valid read.
    fn flood(&mut self) {
        let heads: Vec<u16> = (0..QSIZE).collect();
        for &h in &heads {
            self.request(h);
        }
        self.publish(&heads);
    }

    /// Runs until `stop`: the queue kept full, and a bomb every `bomb_every`.
    fn run(mut self, stop: Arc<AtomicBool>, bomb_every: Duration) -> AttackStats {
        let mut st = AttackStats::default();
        let t0 = Instant::now();
        let mut last_bomb = Instant::now();
        self.flood();
        while !stop.load(Ordering::Relaxed) {
            if last_bomb.elapsed() >= bomb_every {
                last_bomb = Instant::now();
                // Reset with the flood in flight, then the bomb on a fresh queue.
                self.reset();
                self.desc(0, A_BOMB, (BOMB_ENTRIES * 16) as u32, F_INDIRECT);
                self.publish(&[0]);
                let t = Instant::now();
                while !self.device.needs_reset() && t.elapsed() < Duration::from_millis(100) {
                    std::thread::sleep(Duration::from_micros(50));
                }
                if self.device.needs_reset() {
                    st.refused += 1;
                }
                self.reset();
                self.flood();
                continue;
            }
            let done = self.reap();
            if done.is_empty() {
                std::thread::sleep(Duration::from_micros(100));
                continue;
            }
            st.answered += done.len() as u64;
            for &h in &done {
                self.request(h);
            }
            self.publish(&done);
        }
        st.wall = t0.elapsed();
        st
    }
}

/// The `attack` case: the bench client on the domain with the attacker on the same disk (or
/// alone); returns its report and what the attacker got.
fn attack_run(
    hv: &Arc<Hypervisor>,
    disk: &Path,
    workload: &str,
    echo: Echo,
    attack: Option<(u32, Duration)>,
) -> (WorkloadReport, Option<AttackStats>) {
    let text = format!(
        "[[domain]]\nname = \"nvme0\"\nmemory_mib = 32\nchannel_kib = 8448\n[domain.device]\nkind = \"emulated-nvme\"\nbacking = \"{}\"\nsize_mib = 64\nlba_size = 4096\n[[client]]\nname = \"bench\"\ndisk = \"nvme0\"\nsize_mib = 32\nmemory_mib = 64\nworkload = \"{workload}\"\n",
        disk.display()
    );
    let file = Path::new("bench.toml");
    let config = Config::parse(file, &text).expect("bench config");
    let d = &config.domains[0];
    let dc = domain_config(file, d, echo).expect("domain config");
    let policy = d.recovery.to_policy().expect("policy");
    let backend = ChannelBackend::start(hv.clone(), dc, policy).expect("domain");
    let info = backend.disk();
    let mut client = Client::boot(
        hv,
        &client_config(file, &config.clients[0], Some(&info), echo).expect("client"),
    )
    .expect("client boot");
    let mut ports = vec![client.port().expect("a disk").clone()];
    let stop = Arc::new(AtomicBool::new(false));
    let mut thread = None;
    if let Some((bs, bomb_every)) = attack {
        let half = (32 << 20) / 512;
        let range = LbaRange {
            first: half,
            sectors: info.sectors.saturating_sub(half).min(half),
        };
        let a = Attacker::new(range, info.block_size, bs);
        ports.push(a.port.clone());
        let s = stop.clone();
        thread = Some(
            std::thread::Builder::new()
                .name("attacker".into())
                .spawn(move || a.run(s, bomb_every))
                .expect("attacker thread"),
        );
    }
    let mut svc =
        BlockService::spawn("nvme0", ports, Backend::Channel(Box::new(backend))).expect("service");
    let exit = client.wait(Duration::from_secs(600));
    stop.store(true, Ordering::Relaxed);
    let stats = thread.map(|t| t.join().expect("attacker"));
    let console = client.guest().console().text();
    client.guest_mut().stop();
    let _ = svc.stop();
    let report =
        WorkloadReport::find(&console).unwrap_or_else(|| panic!("no report ({exit:?}): {console}"));
    assert!(report.clean(), "{report:?}");
    (report, stats)
}

fn attack_case(hv: &Arc<Hypervisor>, disk: &Path, n: u64, echo: Echo, bs: u32, bomb_ms: u64) {
    let workload = format!("workload=randread bs=4096 qd=16 count={n} verify_pass=0");
    println!(
        "attack: 4 KiB random read, QD16, alone and next to an attacker ({bs}-byte reads on all 256 heads, a 65,535-descriptor table and a reset every {bomb_ms} ms)"
    );
    let (alone, _) = attack_run(hv, disk, &workload, echo, None);
    let (shared, stats) = attack_run(
        hv,
        disk,
        &workload,
        echo,
        Some((bs, Duration::from_millis(bomb_ms))),
    );
    let stats = stats.unwrap_or_default();
    println!(
        "  alone          {:>9.0} IOPS  p50 {:>6} us  p99 {:>6} us",
        alone.iops, alone.lat_us.p50, alone.lat_us.p99
    );
    println!(
        "  with attacker  {:>9.0} IOPS  p50 {:>6} us  p99 {:>6} us",
        shared.iops, shared.lat_us.p50, shared.lat_us.p99
    );
    let wall = stats.wall.as_secs_f64().max(1e-9);
    println!(
        "  attacker: {:.0} requests/s answered, {} tables refused with a reset in {:.1} s",
        stats.answered as f64 / wall,
        stats.refused,
        wall
    );
    println!(
        "  ratio: {:.1}% of its IOPS alone (target >= 50%)",
        100.0 * shared.iops / alone.iops.max(1.0)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    let value = |f: &str| {
        args.iter()
            .position(|a| a == f)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let quick = flag("--quick");
    let runs: usize = value("--runs").and_then(|v| v.parse().ok()).unwrap_or(1);
    let only_case = value("--case");
    let side = value("--side");
    let domain_cmdline = value("--domain-cmdline").unwrap_or_default();
    let echo = if flag("--echo") {
        Echo::Stderr
    } else {
        Echo::Off
    };
    let hv = Arc::new(
        Hypervisor::open(Path::new(ddvm::hypervisor::DEFAULT_KVM_PATH)).expect("/dev/kvm"),
    );
    let dir = std::env::temp_dir().join(format!("ddvm-bench-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let disk: PathBuf = dir.join("disk.img");
    let n: u64 = value("--count")
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 5_000 } else { 50_000 });
    let cases = [
        (
            "randread",
            "4 KiB random read, QD32",
            format!("workload=randread bs=4096 qd=32 count={n} verify_pass=0"),
        ),
        (
            "randread-qd1",
            "4 KiB random read, QD1",
            format!(
                "workload=randread bs=4096 qd=1 count={} verify_pass=0",
                n / 5
            ),
        ),
        (
            "seqwrite",
            "128 KiB sequential write, QD8",
            format!(
                "workload=seqwrite bs=131072 qd=8 count={} verify_pass=0",
                n / 10
            ),
        ),
    ];
    println!(
        "ddvm blk bench: the same client against (a) a driver domain and (b) the file directly"
    );
    for (i, (key, name, workload)) in cases.iter().enumerate() {
        if only_case.as_deref().is_some_and(|c| c != *key) {
            continue;
        }
        let mut ratios = Vec::new();
        for r in 0..runs {
            // Alternate the order so neither side always runs on a warmer page cache.
            let (first_direct, second_direct) = if (i + r) % 2 == 0 {
                (true, false)
            } else {
                (false, true)
            };
            let mut done: Vec<(bool, Run)> = Vec::new();
            for direct in [first_direct, second_direct] {
                let wanted = match side.as_deref() {
                    Some("a") => !direct,
                    Some("b") => direct,
                    _ => true,
                };
                if wanted {
                    done.push((
                        direct,
                        run(&hv, &disk, direct, workload, echo, &domain_cmdline),
                    ));
                }
            }
            println!(
                "{name}{}:",
                if runs > 1 {
                    format!(" (run {})", r + 1)
                } else {
                    String::new()
                }
            );
            let a = done.iter().find(|(d, _)| !d).map(|(_, r)| r);
            let b = done.iter().find(|(d, _)| *d).map(|(_, r)| r);
            // Exits over every request of the run (the prefill included), as the service counted.
            if let Some(a) = a {
                line("(a) domain", a);
            }
            if let Some(b) = b {
                line("(b) direct", b);
            }
            if let (Some(a), Some(b)) = (a, b) {
                let ratio = 100.0 * a.report.iops / b.report.iops.max(1.0);
                ratios.push(ratio);
                println!("  ratio (a)/(b): {ratio:.1}% of the direct IOPS (target >= 80%)");
                let (ca, cb) = (a.cpu_per_request_us(), b.cpu_per_request_us());
                println!(
                    "  CPU per request (every thread of the run): (a) {ca:.1} us, (b) {cb:.1} us, {:.2}x; busy CPUs (a) {:.2}, (b) {:.2} of {}",
                    ca / cb.max(f64::MIN_POSITIVE),
                    a.busy_cpus(),
                    b.busy_cpus(),
                    std::thread::available_parallelism().map_or(0, |n| n.get()),
                );
            }
        }
        if ratios.len() > 1 {
            let text: Vec<String> = ratios.iter().map(|r| format!("{r:.0}%")).collect();
            let min = ratios.iter().cloned().fold(f64::MAX, f64::min);
            let max = ratios.iter().cloned().fold(f64::MIN, f64::max);
            println!(
                "{name}: ratios (a)/(b) of {} runs: {} (min {min:.0}%, max {max:.0}%)",
                ratios.len(),
                text.join(" ")
            );
        }
    }
    if only_case.as_deref().is_none_or(|c| c == "attack") {
        let bs = value("--attack-bs")
            .and_then(|v| v.parse().ok())
            .unwrap_or(4096);
        let bomb_ms = value("--bomb-ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(20);
        attack_case(&hv, &disk, n, echo, bs, bomb_ms);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
