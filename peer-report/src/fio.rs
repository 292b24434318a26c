//! What the report takes from fio's JSON output (`--output-format=json`, fio 3.x): per job,
//! its direction's throughput and latencies, the other direction's (verify reads of a write
//! job are reads), and the errors fio counted.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One direction of a job (`read` or `write` in fio's report).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Direction {
    /// Bytes moved.
    pub io_bytes: u64,
    /// Operations done.
    pub total_ios: u64,
    /// Bytes per second (over the direction's own runtime).
    pub bw_bytes: u64,
    /// Operations per second.
    pub iops: f64,
    /// Milliseconds the direction ran.
    pub runtime_ms: u64,
    /// Completion latency percentiles in ns: 50, 99 and 99.9 (0 when fio gave none).
    pub clat_p50_ns: u64,
    /// 99th percentile.
    pub clat_p99_ns: u64,
    /// 99.9th percentile.
    pub clat_p999_ns: u64,
    /// The longest total latency (submission to completion) of one I/O, ns.
    pub lat_max_ns: u64,
}

/// One job of fio's report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FioJob {
    /// Its name (`jobname`).
    pub name: String,
    /// Its `rw` option.
    pub rw: String,
    /// Its block size option.
    pub bs: String,
    /// Its queue depth option.
    pub iodepth: String,
    /// fio's `error` (the first error's errno, 0 if none).
    pub error: i64,
    /// Errors fio counted and went on from (`total_err`, with continue_on_error).
    pub total_err: u64,
    /// Reads (including a write job's verify reads).
    pub read: Direction,
    /// Writes.
    pub write: Direction,
}

impl Direction {
    /// MiB per second over the direction's own runtime (fio's `bw_bytes` when it gives no
    /// runtime).
    pub fn mib_s(&self) -> f64 {
        const MIB: f64 = 1024.0 * 1024.0;
        if self.runtime_ms > 0 {
            self.io_bytes as f64 / MIB / (self.runtime_ms as f64 / 1000.0)
        } else {
            self.bw_bytes as f64 / MIB
        }
    }
}

impl FioJob {
    /// The direction the job is about: writes for a write job, reads otherwise.
    pub fn main(&self) -> &Direction {
        if self.rw.contains("write") {
            &self.write
        } else {
            &self.read
        }
    }

    /// Operations of both directions (a write job's verify reads are operations too).
    pub fn total_ios(&self) -> u64 {
        self.read.total_ios + self.write.total_ios
    }

    /// The longest single I/O of the job in either direction, ns.
    pub fn lat_max_ns(&self) -> u64 {
        self.read.lat_max_ns.max(self.write.lat_max_ns)
    }
}

/// The jobs of a fio JSON report.
pub fn jobs(json: &str) -> Result<Vec<FioJob>, String> {
    let v: Value =
        serde_json::from_str(json).map_err(|e| format!("the JSON report does not parse: {e}"))?;
    let jobs = v
        .get("jobs")
        .and_then(Value::as_array)
        .ok_or("the JSON report has no `jobs` array")?;
    jobs.iter()
        .map(|j| {
            let opt = |k: &str| {
                j.get("job options")
                    .and_then(|o| o.get(k))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            Ok(FioJob {
                name: j
                    .get("jobname")
                    .and_then(Value::as_str)
                    .ok_or("a job without a `jobname`")?
                    .to_string(),
                rw: opt("rw"),
                bs: opt("bs"),
                iodepth: opt("iodepth"),
                error: j.get("error").and_then(Value::as_i64).unwrap_or(0),
                total_err: u(j.get("total_err")),
                read: direction(j.get("read")),
                write: direction(j.get("write")),
            })
        })
        .collect()
}

fn u(v: Option<&Value>) -> u64 {
    v.and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f.max(0.0) as u64)))
        .unwrap_or(0)
}

fn direction(d: Option<&Value>) -> Direction {
    let Some(d) = d else {
        return Direction::default();
    };
    let pct = |p: &str| {
        u(d.get("clat_ns")
            .and_then(|c| c.get("percentile"))
            .and_then(|c| c.get(p)))
    };
    Direction {
        io_bytes: u(d.get("io_bytes")),
        total_ios: u(d.get("total_ios")),
        bw_bytes: u(d.get("bw_bytes")),
        iops: d
            .get("iops")
            .and_then(Value::as_f64)
            .filter(|f| f.is_finite())
            .unwrap_or(0.0),
        runtime_ms: u(d.get("runtime")),
        clat_p50_ns: pct("50.000000"),
        clat_p99_ns: pct("99.000000"),
        clat_p999_ns: pct("99.900000"),
        lat_max_ns: u(d.get("lat_ns").and_then(|l| l.get("max"))),
    }
}
