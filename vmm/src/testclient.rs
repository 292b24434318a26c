//! The in-VMM test client: reads and writes through a driver domain's channel, verifying every
//! byte.
//!
//! Every sector written carries a header — block number, write generation, sector index — and a
//! body derived from them, so a read proves which write it returns: a lost, stale or misplaced
//! write is a mismatch. The client never has two requests on the same block in flight, so the
//! expected content of every block is known exactly.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ddvm_abi::channel::blk::op;
use ddvm_abi::channel::status;

use crate::domain::Domain;
use crate::host_channel::{DomainProtocolError, Done, HostChannel, SubmitError};
use crate::vcpu::wait_eventfd;

/// What to run.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Requests to complete.
    pub requests: u64,
    /// Requests kept in flight.
    pub queue_depth: u32,
    /// Sectors per request (a multiple of the device block size in sectors).
    pub block_sectors: u32,
    /// Percentage of writes (the rest are reads).
    pub write_percent: u8,
    /// Random (true) or sequential block order.
    pub random: bool,
    /// First sector of the range used.
    pub first_sector: u64,
    /// Sectors in the range used.
    pub range_sectors: u64,
    /// Seed of the random choices.
    pub seed: u64,
    /// Give up waiting for a completion after this long.
    pub timeout: Duration,
}

/// What happened.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Reads completed.
    pub reads: u64,
    /// Writes completed.
    pub writes: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Completions with an error status.
    pub errors: u64,
    /// First error, described.
    pub first_error: Option<String>,
    /// Reads whose data was not what the last acknowledged write put there.
    pub mismatches: u64,
    /// Reads of blocks this run had not written (content unknown, not verified).
    pub unverified_reads: u64,
    /// First mismatch, described.
    pub first_mismatch: Option<String>,
    /// Wall time.
    pub elapsed: Duration,
    /// Latency of each request, sorted.
    pub latencies: Vec<Duration>,
    /// VM exits of the domain during the run (KVM `exits` stat).
    pub exits: u64,
    /// Kicks the VMM sent.
    pub kicks: u64,
}

impl Report {
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        (self.reads + self.writes) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency percentile (0.0..=1.0).
    pub fn latency(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[i]
    }

    /// VM exits per request.
    pub fn exits_per_request(&self) -> f64 {
        self.exits as f64 / (self.reads + self.writes).max(1) as f64
    }
}

/// Why a run stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The domain broke the protocol.
    #[error("driver domain protocol violation: {0}")]
    Protocol(#[from] DomainProtocolError),
    /// No completion arrived in time.
    #[error("no completion for {0:?} with {1} requests in flight")]
    Timeout(Duration, usize),
    /// The workload asks for something impossible.
    #[error("workload: {0}")]
    Workload(String),
}

/// Fills `buf` (a whole number of sectors) with the content of `block` at `generation`.
pub fn pattern(buf: &mut [u8], block: u64, generation: u64) {
    for (i, sector) in buf.chunks_mut(512).enumerate() {
        sector[0..8].copy_from_slice(&block.to_le_bytes());
        sector[8..16].copy_from_slice(&generation.to_le_bytes());
        sector[16..24].copy_from_slice(&(i as u64).to_le_bytes());
        let mut x = block
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(generation.wrapping_mul(0xbf58_476d_1ce4_e5b9))
            .wrapping_add(i as u64 + 1);
        for chunk in sector[24..].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs `w` against the domain through `ch`.
pub fn run(domain: &Domain, ch: &mut HostChannel, w: &Workload) -> Result<Report, ClientError> {
    let mem = domain.memory();
    let blocks = w.range_sectors / u64::from(w.block_sectors.max(1));
    if blocks == 0 || w.queue_depth == 0 {
        return Err(ClientError::Workload(
            "empty range or zero queue depth".into(),
        ));
    }
    let bytes = w.block_sectors as usize * 512;
    if bytes > ch.max_transfer() as usize {
        return Err(ClientError::Workload(format!(
            "{bytes} bytes per request, the channel carries at most {}",
            ch.max_transfer()
        )));
    }
    let mut rng = Rng(w.seed | 1);
    // Generation of the last acknowledged write of each block.
    let mut generation: HashMap<u64, u64> = HashMap::new();
    let mut busy: HashSet<u64> = HashSet::new();
    // tag -> (block, generation written or 0 for reads)
    let mut pending: HashMap<u32, (u64, u64)> = HashMap::new();
    let mut report = Report::default();
    let mut buf = vec![0u8; bytes];
    let mut expect = vec![0u8; bytes];
    let mut next_seq = 0u64;
    let mut issued = 0u64;
    let mut done = Vec::new();
    let exits0 = domain.vcpu_stat("exits").unwrap_or(0);
    let kicks0 = ch.counters.kicks.load(Ordering::Relaxed);
    let start = Instant::now();
    let mut last_progress = Instant::now();
    while report.reads + report.writes + report.errors < w.requests {
        // Fill the queue.
        let mut posted = false;
        while issued < w.requests && pending.len() < w.queue_depth as usize && ch.has_room() {
            let block = if w.random {
                rng.next() % blocks
            } else {
                let b = next_seq % blocks;
                next_seq += 1;
                b
            };
            if busy.contains(&block) {
                break;
            }
            let sector = w.first_sector + block * u64::from(w.block_sectors);
            let write = (rng.next() % 100) < u64::from(w.write_percent);
            let (operation, gen) = if write {
                let g = generation.get(&block).map_or(1, |g| g + 1);
                pattern(&mut buf, block, g);
                (op::WRITE, g)
            } else {
                (op::READ, 0)
            };
            match ch.submit(mem, operation, sector, w.block_sectors, Some(&buf)) {
                Ok(tag) => {
                    pending.insert(tag, (block, gen));
                    busy.insert(block);
                    issued += 1;
                    posted = true;
                }
                Err(SubmitError::Full) => break,
                Err(SubmitError::Broken) => {
                    return Err(ch.broken().map_or(
                        ClientError::Workload("channel broken".into()),
                        ClientError::Protocol,
                    ))
                }
                Err(e @ (SubmitError::TooLarge { .. } | SubmitError::RingInvariant)) => {
                    return Err(ClientError::Workload(e.to_string()))
                }
            }
        }
        if posted && ch.publish(mem) {
            domain.kick();
        }
        // Collect completions: poll, then ask for a notification and sleep on it.
        done.clear();
        let mut n = ch.poll(mem, &mut done)?;
        if n == 0 {
            let spin = Instant::now();
            while n == 0 && spin.elapsed() < Duration::from_micros(30) {
                std::hint::spin_loop();
                n = ch.poll(mem, &mut done)?;
            }
        }
        if n == 0 {
            ch.set_notify(mem, true);
            n = ch.poll(mem, &mut done)?;
            if n == 0 {
                wait_eventfd(domain.notify_eventfd(), Duration::from_millis(50));
                let _ = domain.notify_eventfd().read();
                n = ch.poll(mem, &mut done)?;
            }
            ch.set_notify(mem, false);
        }
        if n == 0 {
            if last_progress.elapsed() > w.timeout {
                return Err(ClientError::Timeout(w.timeout, pending.len()));
            }
            continue;
        }
        last_progress = Instant::now();
        for d in done.drain(..) {
            complete(
                ch,
                domain,
                &d,
                &mut pending,
                &mut busy,
                &mut generation,
                &mut report,
                &mut buf,
                &mut expect,
            );
        }
    }
    report.elapsed = start.elapsed();
    report.exits = domain.vcpu_stat("exits").unwrap_or(0) - exits0;
    report.kicks = ch.counters.kicks.load(Ordering::Relaxed) - kicks0;
    report.latencies.sort();
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn complete(
    ch: &mut HostChannel,
    domain: &Domain,
    d: &Done,
    pending: &mut HashMap<u32, (u64, u64)>,
    busy: &mut HashSet<u64>,
    generation: &mut HashMap<u64, u64>,
    report: &mut Report,
    buf: &mut [u8],
    expect: &mut [u8],
) {
    let mem = domain.memory();
    let Some((block, gen)) = pending.remove(&d.request.tag) else {
        ch.finish(mem, d, None);
        return;
    };
    busy.remove(&block);
    report.latencies.push(d.submitted.elapsed());
    if d.status != status::OK {
        report.errors += 1;
        if report.first_error.is_none() {
            report.first_error = Some(format!(
                "op {} sector {} sectors {}: status {} detail {:#x}",
                d.request.op, d.request.sector, d.request.sectors, d.status, d.detail
            ));
        }
        ch.finish(mem, d, None);
        return;
    }
    report.bytes += u64::from(d.len);
    if d.request.op == op::WRITE {
        report.writes += 1;
        generation.insert(block, gen);
        ch.finish(mem, d, None);
        return;
    }
    report.reads += 1;
    ch.finish(mem, d, Some(buf));
    // A block this run never wrote holds whatever the disk had: nothing to verify.
    let Some(&g) = generation.get(&block) else {
        report.unverified_reads += 1;
        return;
    };
    pattern(expect, block, g);
    let ok = buf == expect;
    if !ok {
        report.mismatches += 1;
        if report.first_mismatch.is_none() {
            let found_block = u64::from_le_bytes(buf[0..8].try_into().unwrap_or_default());
            let found_gen = u64::from_le_bytes(buf[8..16].try_into().unwrap_or_default());
            report.first_mismatch = Some(format!(
                "block {block} (sector {}): expected generation {g}, found block {found_block} generation {found_gen}",
                d.request.sector
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_identify_block_and_generation() {
        let mut a = vec![0u8; 1024];
        let mut b = vec![0u8; 1024];
        pattern(&mut a, 5, 1);
        pattern(&mut b, 5, 2);
        assert_ne!(a, b, "generations differ");
        pattern(&mut b, 6, 1);
        assert_ne!(a, b, "blocks differ");
        pattern(&mut b, 5, 1);
        assert_eq!(a, b, "deterministic");
        assert_ne!(a[..512], a[512..], "sectors differ");
        assert_eq!(u64::from_le_bytes(a[0..8].try_into().unwrap()), 5);
    }
}
