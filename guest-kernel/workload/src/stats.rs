//! Latency histogram and the machine-readable report line.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write;

/// Sub-buckets per power of two: values are kept to within 1/16 (6 %).
const SUB_BITS: u32 = 4;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

/// A log-linear histogram of nanoseconds.
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

fn bucket(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = exp - SUB_BITS;
    let sub = (v >> shift) & (SUB - 1);
    ((shift + 1) as usize) * SUB as usize + sub as usize
}

/// The middle of bucket `i`'s range.
fn bucket_value(i: usize) -> u64 {
    let (group, sub) = (i / SUB as usize, (i % SUB as usize) as u64);
    if group == 0 {
        return sub;
    }
    let shift = group as u32 - 1;
    let low = (SUB + sub) << shift;
    low + ((1u64 << shift) >> 1)
}

impl Histogram {
    /// Adds one value.
    pub fn record(&mut self, ns: u64) {
        self.counts[bucket(ns)] += 1;
        self.total += 1;
        self.max = self.max.max(ns);
    }

    /// The value at `permille`/1000 of the distribution (0 when empty), never above the max.
    pub fn percentile(&self, permille: u64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = (self.total * permille).div_ceil(1000).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_value(i).min(self.max);
            }
        }
        self.max
    }

    /// The largest value.
    pub fn max(&self) -> u64 {
        self.max
    }
}

/// Data-path counts of one phase.
#[derive(Default)]
pub struct PhaseStats {
    /// Reads completed OK.
    pub reads: u64,
    /// Writes completed OK.
    pub writes: u64,
    /// Flushes completed OK.
    pub flushes: u64,
    /// Bytes read and written OK.
    pub bytes: u64,
    /// Latency of reads and writes (ns), whatever their status.
    pub latency: Histogram,
    /// Microseconds from the first submission to the last completion.
    pub elapsed_us: u64,
}

/// Errors and data checks, over the whole run.
#[derive(Default)]
pub struct Checks {
    /// Requests that failed (status not OK, timeouts, protocol violations).
    pub errors: u64,
    /// Reads whose data was wrong (lost + misplaced + corrupt + unwritten).
    pub mismatches: u64,
    /// ... showing an older write than the last acknowledged one.
    pub lost: u64,
    /// ... showing another block's or another client's data.
    pub misplaced: u64,
    /// ... failing the checksum or payload check.
    pub corrupt: u64,
    /// ... showing no header where a write was acknowledged.
    pub unwritten: u64,
    /// Reads of blocks with no acknowledged write in this run: not checked.
    pub unverified: u64,
    /// Reads whose data was checked and right.
    pub verified: u64,
    /// The first error or mismatch.
    pub first_error: Option<String>,
}

impl Checks {
    /// Counts an error.
    pub fn error(&mut self, what: impl FnOnce() -> String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(what());
        }
    }

    /// Whether the run is clean.
    pub fn clean(&self) -> bool {
        self.errors == 0 && self.mismatches == 0
    }
}

/// Everything the report line says.
pub struct Report<'a> {
    /// Client id.
    pub id: u32,
    /// Workload name.
    pub workload: &'a str,
    /// Block size.
    pub bs: u64,
    /// Queue depth used.
    pub qd: usize,
    /// The timed phase.
    pub timed: &'a PhaseStats,
    /// The whole run's checks.
    pub checks: &'a Checks,
}

impl Report<'_> {
    /// The JSON object of the `ddvm-workload: ` line (one line).
    pub fn json(&self) -> String {
        let t = self.timed;
        let ops = t.reads + t.writes;
        let iops = (ops * 1_000_000).checked_div(t.elapsed_us).unwrap_or(0);
        let mib_s = if t.elapsed_us == 0 {
            0.0
        } else {
            t.bytes as f64 / (t.elapsed_us as f64 / 1e6) / (1u64 << 20) as f64
        };
        let us = |ns: u64| (ns + 500) / 1000;
        let c = self.checks;
        let mut s = String::new();
        let _ = write!(
            s,
            "{{\"id\":{},\"workload\":\"{}\",\"bs\":{},\"qd\":{},\"ops\":{},\"reads\":{},\
             \"writes\":{},\"flushes\":{},\"bytes\":{},\"elapsed_us\":{},\"iops\":{},\
             \"mib_s\":{:.2},\"lat_us\":{{\"p50\":{},\"p90\":{},\"p99\":{},\"max\":{}}},\
             \"errors\":{},\"mismatches\":{},\"lost\":{},\"misplaced\":{},\"corrupt\":{},\
             \"unverified\":{},\"verified\":{},\"first_error\":",
            self.id,
            self.workload,
            self.bs,
            self.qd,
            ops,
            t.reads,
            t.writes,
            t.flushes,
            t.bytes,
            t.elapsed_us,
            iops,
            mib_s,
            us(t.latency.percentile(500)),
            us(t.latency.percentile(900)),
            us(t.latency.percentile(990)),
            us(t.latency.max()),
            c.errors,
            c.mismatches,
            c.lost,
            c.misplaced,
            c.corrupt,
            c.unverified,
            c.verified,
        );
        match &c.first_error {
            None => s.push_str("null"),
            Some(e) => json_string(&mut s, e),
        }
        s.push('}');
        s
    }
}

/// Appends `text` as a JSON string.
pub fn json_string(out: &mut String, text: &str) {
    out.push('"');
    for ch in text.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}
