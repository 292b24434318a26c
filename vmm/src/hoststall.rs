//! How much time the host kept a disk's domain and its service from running: steal from the
//! hypervisor below (this machine is itself a VM) and run-queue delay of the threads that serve
//! the disk. The recovery detectors age requests and heartbeats on a clock that leaves this
//! time out ([`ddvm_recovery::monitor::ServiceClock`]).
//!
//! Detection leaves out the domain's part ([`Lost::total`]); the service's wait is measured
//! for operators.
//!
//! Sources, all read through procfs with kept-open files (a read is ~1 µs for a thread's
//! `schedstat`, ~8 µs for `/proc/stat`, measured here):
//! - `/proc/stat`, each CPU's steal (in `USER_HZ` ticks, so read at most every
//!   [`STEAL_EVERY`]): the most any CPU lost. Which CPU the domain ran on is not known, and
//!   counting more only delays a detection.
//! - `/proc/self/task/<tid>/schedstat`, second field: nanoseconds the thread was runnable but
//!   waited for a CPU (kept by the kernel's `CONFIG_SCHED_INFO`), for the thread that runs the
//!   detectors and for the domain's vCPU thread.
//!
//! A source that cannot be read counts nothing: detection is then as it was, on the wall clock.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// Steal counts in ticks of 10 ms: reading it more often finds nothing new.
pub const STEAL_EVERY: Duration = Duration::from_millis(10);

/// Time lost, by source, since the previous sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lost {
    /// The most steal any CPU saw.
    pub steal: Duration,
    /// Run-queue delay of the thread that samples (the disk's service thread).
    pub service: Duration,
    /// Run-queue delay of the domain's vCPU thread.
    pub domain: Duration,
}

impl Lost {
    /// The time the domain lost in the interval: the more of steal and its own wait (they
    /// overlap: a thread waiting for a CPU waits through its steal too). The service's wait is
    /// measured but not counted. On a busy host the domain and the service wait in turn while
    /// the other runs, so counting both (summed, or the most of them per interval) adds up to
    /// nearly the whole time and stops detection's clock: measured, a hung domain in the rig
    /// on one vCPU was never found, and with spinning threads on both cores here a domain
    /// five times slower than its deadline never passed it. A service starved by other work
    /// on its own host is what the configured deadline's floor must cover.
    pub fn total(&self) -> Duration {
        self.steal.max(self.domain)
    }

    fn add(&mut self, other: Lost) {
        self.steal += other.steal;
        self.service += other.service;
        self.domain += other.domain;
    }
}

/// A thread's run-queue delay, from its `schedstat`.
///
/// The kernel adds a wait to the counter only when it ends (when the thread gets the CPU), so
/// for the sampling thread itself the counter is always current, but another thread's may be
/// behind by the wait it is in. For such a thread (`watch_state`) the current wait is
/// estimated: runnable at two samples in a row, it waited for the part of the interval it did
/// not run. The estimate is counted at once and taken back from the counter when the wait
/// ends and the kernel adds it. The run time `schedstat` gives a running thread is as old as
/// its last tick (4 ms here), which would read as waiting: the caller passes the thread's CPU
/// clock instead, which is current.
#[derive(Debug)]
struct RunDelay {
    tid: i32,
    schedstat: File,
    /// `/proc/<tid>/stat`, for the thread's state (none for the sampling thread itself).
    stat: Option<File>,
    /// Run time, run-queue delay and times scheduled in at the last sample, and whether it
    /// was runnable then.
    last: (u64, u64, u64, bool),
    last_at: Instant,
    /// Estimated waits the counter has not caught up with yet.
    estimated: Duration,
}

impl RunDelay {
    fn open(tid: i32, watch_state: bool, now: Instant, ran: Option<u64>) -> Option<RunDelay> {
        let schedstat = File::open(format!("/proc/self/task/{tid}/schedstat")).ok()?;
        let stat = match watch_state {
            true => Some(File::open(format!("/proc/self/task/{tid}/stat")).ok()?),
            false => None,
        };
        let mut r = RunDelay {
            tid,
            schedstat,
            stat,
            last: (0, 0, 0, false),
            last_at: now,
            estimated: Duration::ZERO,
        };
        r.last = r.read(ran)?;
        Some(r)
    }

    /// Run time (`ran`, when the caller knows it better), run-queue delay, and whether the
    /// thread is runnable (running or waiting for a CPU; always false when the state is not
    /// watched).
    fn read(&self, ran: Option<u64>) -> Option<(u64, u64, u64, bool)> {
        let mut buf = [0u8; 128];
        let n = self.schedstat.read_at(&mut buf, 0).ok()?;
        let (run, delay, slices) = parse_schedstat(std::str::from_utf8(&buf[..n]).ok()?)?;
        let run = ran.unwrap_or(run);
        let runnable = match &self.stat {
            Some(f) => {
                let mut buf = [0u8; 512];
                let n = f.read_at(&mut buf, 0).ok()?;
                parse_state(std::str::from_utf8(&buf[..n]).ok()?)? == 'R'
            }
            None => false,
        };
        Some((run, delay, slices, runnable))
    }

    /// Time the thread waited for a CPU since the last call (counters that went back count
    /// nothing).
    fn advance(&mut self, now: Instant, ran: Option<u64>) -> Duration {
        let Some(cur) = self.read(ran) else {
            return Duration::ZERO;
        };
        let (run0, delay0, slices0, runnable0) = self.last;
        let (run, delay, slices, runnable) = cur;
        let interval = now.saturating_duration_since(self.last_at);
        self.last = cur;
        self.last_at = now;
        let ended = Duration::from_nanos(delay.saturating_sub(delay0));
        // Waits that ended are counted less what was estimated of them already.
        let mut lost = ended.saturating_sub(self.estimated);
        self.estimated = self.estimated.saturating_sub(ended);
        // Runnable at both samples and not scheduled in between: it did not sleep, so what it
        // did not run of the interval it waited. (Scheduled in meanwhile, it may have slept;
        // its waits then reach the counter, as `ended`.)
        if runnable0 && runnable && slices == slices0 {
            let waiting = interval.saturating_sub(Duration::from_nanos(run.saturating_sub(run0)));
            lost += waiting;
            self.estimated += waiting;
        } else if !runnable {
            // Not runnable now: every wait it was in has ended and been counted.
            self.estimated = Duration::ZERO;
        }
        lost
    }
}

/// The domain's vCPU thread, as a sample sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainThread {
    /// A key unique to the domain (its epoch).
    pub key: u64,
    /// The thread's id.
    pub tid: i32,
    /// Its CPU time now, from its CPU clock (`None`: `schedstat`'s, a tick old).
    pub ran: Option<Duration>,
}

/// Samples the time the host took from a disk's domain and its service.
#[derive(Debug, Default)]
pub struct StallMeter {
    stat: Option<File>,
    stat_failed: bool,
    steal: Vec<(u32, u64)>,
    steal_read: Option<Instant>,
    service: Option<RunDelay>,
    domain: Option<(u64, RunDelay)>,
    total: Lost,
}

impl StallMeter {
    /// A meter that has measured nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Time lost since the previous sample (the first sample sets the baselines). Run on the
    /// thread whose delay counts as the service's; `domain` is the domain's vCPU thread.
    pub fn sample(&mut self, now: Instant, domain: Option<DomainThread>) -> Lost {
        let mut lost = Lost {
            steal: self.steal(now),
            ..Lost::default()
        };
        let tid = crate::sys::gettid();
        match &mut self.service {
            Some(r) if r.tid == tid => lost.service = r.advance(now, None),
            _ => self.service = RunDelay::open(tid, false, now, None),
        }
        let nanos = |d: Option<Duration>| d.map(|d| d.as_nanos() as u64);
        match (&mut self.domain, domain) {
            (Some((key, r)), Some(d)) if *key == d.key && r.tid == d.tid => {
                lost.domain = r.advance(now, nanos(d.ran))
            }
            (_, Some(d)) => {
                self.domain = RunDelay::open(d.tid, true, now, nanos(d.ran)).map(|r| (d.key, r))
            }
            (_, None) => self.domain = None,
        }
        self.total.add(lost);
        lost
    }

    /// All the time measured lost so far, by source.
    pub fn so_far(&self) -> Lost {
        self.total
    }

    fn steal(&mut self, now: Instant) -> Duration {
        if self.stat_failed || self.steal_read.is_some_and(|t| now < t + STEAL_EVERY) {
            return Duration::ZERO;
        }
        self.steal_read = Some(now);
        if self.stat.is_none() {
            self.stat = File::open("/proc/stat").ok();
        }
        let mut buf = [0u8; 4096];
        let text = self
            .stat
            .as_ref()
            .and_then(|f| f.read_at(&mut buf, 0).ok())
            .and_then(|n| std::str::from_utf8(&buf[..n]).ok());
        let Some(text) = text else {
            tracing::debug!("/proc/stat unreadable: host steal is not discounted");
            self.stat_failed = true;
            return Duration::ZERO;
        };
        let steal = parse_steal(text);
        let ticks = self
            .steal
            .iter()
            .filter_map(|&(cpu, before)| {
                let after = steal.iter().find(|&&(c, _)| c == cpu)?.1;
                Some(after.saturating_sub(before))
            })
            .max()
            .unwrap_or(0);
        self.steal = steal;
        ticks_to_duration(ticks)
    }
}

fn ticks_to_duration(ticks: u64) -> Duration {
    let hz = crate::sys::clock_ticks_per_second().unwrap_or(100);
    Duration::from_nanos(ticks.saturating_mul(1_000_000_000 / hz))
}

/// Each CPU's steal from `/proc/stat`'s text: `(cpu, ticks)` for every `cpuN` line (the
/// aggregate `cpu` line is skipped).
pub fn parse_steal(text: &str) -> Vec<(u32, u64)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let cpu = fields.next()?.strip_prefix("cpu")?.parse().ok()?;
            // user nice system idle iowait irq softirq steal
            let steal = fields.nth(7)?.parse().ok()?;
            Some((cpu, steal))
        })
        .collect()
}

/// Run time and run-queue delay in nanoseconds, and times scheduled in, from a thread's
/// `schedstat` text (`run_ns wait_ns timeslices`).
pub fn parse_schedstat(text: &str) -> Option<(u64, u64, u64)> {
    let mut f = text.split_ascii_whitespace();
    let mut next = || f.next()?.parse().ok();
    Some((next()?, next()?, next()?))
}

/// The state letter from a thread's `stat` text (`pid (comm) S ...`; the name may hold spaces
/// and parentheses, so the state follows the last `)`).
pub fn parse_state(text: &str) -> Option<char> {
    text[text.rfind(')')? + 1..].trim_start().chars().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dt(key: u64, tid: i32) -> DomainThread {
        DomainThread {
            key,
            tid,
            ran: None,
        }
    }

    const STAT: &str = "cpu  2200326 2817 338867 3210177 68569 0 15413 1182977 300132 219
cpu0 1100000 1400 170000 1600000 34000 0 7700 591000 150000 100
cpu1 1100326 1417 168867 1610177 34569 0 7713 591977 150132 119
intr 123 4 5
ctxt 99
";

    #[test]
    fn overlapping_sources_count_once() {
        let ms = Duration::from_millis;
        let l = Lost {
            steal: ms(3),
            service: ms(7),
            domain: ms(5),
        };
        assert_eq!(l.total(), ms(5), "the domain's wait, not the service's");
        assert_eq!(Lost::default().total(), Duration::ZERO);
    }

    #[test]
    fn steal_is_read_per_cpu_from_proc_stat() {
        assert_eq!(parse_steal(STAT), vec![(0, 591000), (1, 591977)]);
        assert_eq!(parse_steal("cpu0 1 2 3\ncpux 1 2 3 4 5 6 7 8\n"), vec![]);
        assert_eq!(
            parse_schedstat("155641154 35868005 1452\n"),
            Some((155641154, 35868005, 1452))
        );
        assert_eq!(parse_schedstat("12\n"), None);
        assert_eq!(parse_state("31 (vcpu-a) b) R 1 2 3"), Some('R'));
        assert_eq!(parse_state("31 (x) S 1"), Some('S'));
        assert_eq!(parse_state("31 x"), None);
    }

    #[test]
    fn this_host_gives_steal_and_run_delay() {
        let text = std::fs::read_to_string("/proc/stat").unwrap();
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert!(parse_steal(&text).len() >= cpus, "{text}");
        let mut m = StallMeter::new();
        let t0 = Instant::now();
        assert_eq!(
            m.sample(t0, None),
            Lost::default(),
            "the first sample is a baseline"
        );
        assert!(m.service.is_some(), "this thread's schedstat");
        // Runnable threads beyond the CPUs wait on the run queue: this thread's delay grows.
        let spinners = Spinners::start(2 * cpus);
        let mut waited = Duration::ZERO;
        let until = Instant::now() + Duration::from_secs(20);
        while waited < Duration::from_millis(5) && Instant::now() < until {
            let spin = Instant::now();
            while spin.elapsed() < Duration::from_millis(2) {
                std::hint::spin_loop();
            }
            waited += m.sample(Instant::now(), None).service;
        }
        drop(spinners);
        assert!(
            waited >= Duration::from_millis(5),
            "run-queue delay {waited:?}"
        );
        assert_eq!(m.so_far().service, waited);
    }

    /// Threads that spin until dropped.
    struct Spinners {
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
        threads: Vec<std::thread::JoinHandle<()>>,
    }

    impl Spinners {
        fn start(n: usize) -> Spinners {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let threads = (0..n)
                .map(|_| {
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            std::hint::spin_loop();
                        }
                    })
                })
                .collect();
            Spinners { stop, threads }
        }
    }

    impl Drop for Spinners {
        fn drop(&mut self) {
            self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }

    #[test]
    fn a_starved_thread_is_counted_while_it_still_waits() {
        // A runnable thread in SCHED_IDLE behind busy cores hardly runs, and its waits end
        // (reach its counter) rarely: the meter must count them as they go.
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let starved = std::thread::spawn(move || {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: `param` is valid; only this thread's policy changes.
            let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
            // SAFETY: no preconditions.
            tx.send((r, unsafe { libc::gettid() })).unwrap();
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        let (r, tid) = rx.recv().unwrap();
        assert_eq!(r, 0, "SCHED_IDLE");
        let cpus = std::thread::available_parallelism().unwrap().get();
        let spinners = Spinners::start(2 * cpus);
        let mut m = StallMeter::new();
        let t0 = Instant::now();
        m.sample(t0, Some(dt(1, tid)));
        let mut lost = Duration::ZERO;
        while t0.elapsed() < Duration::from_millis(300) {
            std::thread::sleep(Duration::from_millis(2));
            lost += m.sample(Instant::now(), Some(dt(1, tid))).domain;
        }
        let wall = t0.elapsed();
        drop(spinners);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        starved.join().unwrap();
        assert!(lost >= wall / 2, "counted {lost:?} of {wall:?}");
    }

    #[test]
    fn a_domain_thread_is_measured_from_its_first_sample_and_replaced_with_its_key() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // SAFETY: no preconditions.
            tx.send(unsafe { libc::gettid() }).unwrap();
            done_rx.recv().unwrap();
        });
        let tid = rx.recv().unwrap();
        let mut m = StallMeter::new();
        let now = Instant::now();
        assert_eq!(m.sample(now, Some(dt(1, tid))).domain, Duration::ZERO);
        assert_eq!(m.domain.as_ref().map(|(k, r)| (*k, r.tid)), Some((1, tid)));
        m.sample(now, Some(dt(2, tid)));
        assert_eq!(m.domain.as_ref().map(|(k, _)| *k), Some(2), "a new domain");
        m.sample(now, None);
        assert!(m.domain.is_none());
        // A thread that is gone cannot be read: nothing is counted. (`join` returns once the
        // kernel clears the thread's id, which is before its /proc entry goes.)
        done_tx.send(()).unwrap();
        t.join().unwrap();
        let task = std::path::PathBuf::from(format!("/proc/self/task/{tid}"));
        let until = Instant::now() + Duration::from_secs(5);
        while task.exists() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            !task.exists(),
            "the thread's /proc entry outlived it by 5 s"
        );
        assert_eq!(m.sample(now, Some(dt(3, tid))).domain, Duration::ZERO);
        assert!(m.domain.is_none());
    }
}
