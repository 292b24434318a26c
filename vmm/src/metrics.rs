//! What the control plane's `metrics` reports: each device's I/O counters and request
//! latencies (kept by the service threads, read by the control connection without a lock), and
//! their rendering in the Prometheus text exposition format (version 0.0.4).
//!
//! Latencies go into a [`LatencyHistogram`]: buckets of a quarter of a power of two of
//! nanoseconds, so a percentile read from it is the upper bound of its bucket (at most 19% above
//! the true value), and recording one is two atomic additions.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

/// Sub-buckets per power of two.
const SUB: usize = 4;
/// Powers of two of nanoseconds covered (2^40 ns is about 18 minutes; longer counts there).
const POWERS: usize = 41;
const BUCKETS: usize = POWERS * SUB;

/// Request latencies, recorded by one thread and read by others.
pub struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.count.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// The bucket of `ns`: the power of two below it and which quarter of the next one it is in.
fn bucket(ns: u64) -> usize {
    if ns < SUB as u64 {
        return ns as usize;
    }
    let power = 63 - ns.leading_zeros() as usize; // ns >= 4: power >= 2
    let quarter = ((ns >> (power - 2)) & 3) as usize;
    (power * SUB + quarter).min(BUCKETS - 1)
}

/// The largest value in bucket `i`.
fn upper(i: usize) -> u64 {
    if i < 2 * SUB {
        // Below 4 ns each value has its bucket; 4 to 7 are never used.
        return i.min(SUB - 1) as u64;
    }
    let (power, quarter) = (i / SUB, (i % SUB) as u64);
    // Values (4 + quarter) << (power - 2) up to the next quarter's start, less one.
    ((4 + quarter + 1) << (power - 2)) - 1
}

impl LatencyHistogram {
    /// Records one latency.
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket(ns)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// What it holds now.
    pub fn snapshot(&self) -> Latency {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let at = |q: f64| -> Option<f64> {
            if total == 0 {
                return None;
            }
            // Nearest rank, 1-based.
            let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
            let mut seen = 0;
            counts.iter().enumerate().find_map(|(i, &c)| {
                seen += c;
                (seen >= rank).then(|| upper(i) as f64 / 1e9)
            })
        };
        Latency {
            count: total,
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            p50_seconds: at(0.5),
            p90_seconds: at(0.9),
            p99_seconds: at(0.99),
        }
    }
}

/// Latency percentiles of a device's requests, in seconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Requests measured.
    pub count: u64,
    /// Their total latency.
    pub sum_seconds: f64,
    /// Median (`None` before the first request).
    pub p50_seconds: Option<f64>,
    /// 90th percentile.
    pub p90_seconds: Option<f64>,
    /// 99th percentile.
    pub p99_seconds: Option<f64>,
}

/// One device's I/O as the control plane reports it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DeviceIo {
    /// The driver domain (or file) serving it.
    pub domain: String,
    /// `blk` or `net`.
    pub device: &'static str,
    /// Client requests answered (a disk) or frames moved, both ways (a NIC).
    pub requests: u64,
    /// Bytes copied between client memory and the backend (a disk), or frame bytes (a NIC).
    pub bytes: u64,
    /// Requests answered with an error status (a disk); frames dropped or failed (a NIC).
    pub errors: u64,
    /// Request latencies, from intake to answer (a disk).
    pub latency: Option<Latency>,
    /// VM exits of the domain serving now, where KVM counts them.
    pub vm_exits: Option<u64>,
}

/// How the control plane reads a device's I/O when asked.
pub type IoSource = Arc<dyn Fn() -> DeviceIo + Send + Sync>;

/// One domain's recovery figures as the control plane reports them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DomainFigures {
    /// Its name.
    pub domain: String,
    /// The supervisor's state name.
    pub state: String,
    /// Epoch of its latest boot.
    pub epoch: Option<u64>,
    /// The policy gave up on it.
    pub broken: bool,
    /// Recoveries completed.
    pub recoveries: u64,
    /// Restarts the policy decided.
    pub restarts: u64,
    /// Restarts the operator asked for.
    pub operator_restarts: u64,
    /// Times the policy gave up.
    pub give_ups: u64,
    /// Failures detected, by reason name.
    pub detections: Vec<(String, u64)>,
    /// Detections of a failure already handled.
    pub duplicate_detections: u64,
    /// Requests replayed to fresh domains.
    pub replayed_requests: u64,
    /// Hook runs that did not exit 0.
    pub hook_failures: u64,
    /// Restarts that promoted a warm standby.
    pub standby_promotions: u64,
    /// Warm standbys ready now.
    pub standbys: u64,
    /// Requests in flight at the domain.
    pub in_flight: u64,
    /// Requests queued for it.
    pub queued: u64,
    /// Recovery times (detection to first completion) over the recent recoveries, in seconds.
    pub recovery: Latency,
}

/// Everything `metrics` reports.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Snapshot {
    /// Per domain.
    pub domains: Vec<DomainFigures>,
    /// Per device.
    pub devices: Vec<DeviceIo>,
}

/// A label value, escaped as the exposition format asks (`\`, `"` and newlines).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A sample value: Prometheus floats (`NaN` where there is none yet).
fn value(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v}"),
        _ => "NaN".into(),
    }
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: String) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
            .collect();
        let _ = writeln!(self.out, "{name}{{{}}} {v}", labels.join(","));
    }
}

/// A family of one figure per item: its name, its help, and how to read it.
type Figure<T> = (&'static str, &'static str, fn(&T) -> u64);

/// One sample: its labels and value.
type Row = (Vec<(&'static str, String)>, String);

/// Writes one family with one sample per item.
fn family<T>(
    out: &mut String,
    items: &[T],
    (name, kind, help): (&str, &str, &str),
    f: impl Fn(&T) -> Option<Row>,
) {
    let rows: Vec<_> = items.iter().filter_map(&f).collect();
    if rows.is_empty() {
        return;
    }
    let mut fam = Family { out };
    fam.head(name, kind, help);
    for (labels, v) in rows {
        let l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        fam.sample(name, &l, v);
    }
}

/// Writes a summary family: the 0.5, 0.9 and 0.99 quantiles, the sum and the count.
fn summary(
    out: &mut String,
    name: &str,
    help: &str,
    rows: &[(Vec<(&'static str, String)>, &Latency)],
) {
    if rows.is_empty() {
        return;
    }
    let mut fam = Family { out };
    fam.head(name, "summary", help);
    for (labels, l) in rows {
        let base: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        for (q, v) in [
            ("0.5", l.p50_seconds),
            ("0.9", l.p90_seconds),
            ("0.99", l.p99_seconds),
        ] {
            let mut with = base.clone();
            with.push(("quantile", q));
            fam.sample(name, &with, value(v));
        }
        fam.sample(&format!("{name}_sum"), &base, value(Some(l.sum_seconds)));
        fam.sample(&format!("{name}_count"), &base, l.count.to_string());
    }
}

impl Snapshot {
    /// The Prometheus text exposition (format 0.0.4) of the snapshot: every family with its
    /// HELP and TYPE lines, `ddvm_` names, `_total` counters, labels `domain`, `device` and
    /// `reason`.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let d = &self.domains;
        let dom = |x: &DomainFigures| vec![("domain", x.domain.clone())];
        let counter = |f: fn(&DomainFigures) -> u64| {
            move |x: &DomainFigures| Some((dom(x), f(x).to_string()))
        };
        family(
            &mut out,
            d,
            (
                "ddvm_domain_up",
                "gauge",
                "1 while the domain serves (its supervisor is running), else 0.",
            ),
            |x| Some((dom(x), u8::from(x.state == "running").to_string())),
        );
        family(
            &mut out,
            d,
            (
                "ddvm_domain_broken",
                "gauge",
                "1 once the recovery policy gave up on the domain (its requests fail).",
            ),
            |x| Some((dom(x), u8::from(x.broken).to_string())),
        );
        family(
            &mut out,
            d,
            (
                "ddvm_domain_epoch",
                "gauge",
                "Boot generation of the domain's latest boot.",
            ),
            |x| x.epoch.map(|e| (dom(x), e.to_string())),
        );
        let counters: [Figure<DomainFigures>; 8] = [
            (
                "ddvm_domain_recoveries_total",
                "Recoveries completed: a fresh domain served again after a failure.",
                |x| x.recoveries,
            ),
            (
                "ddvm_domain_restarts_total",
                "Restarts the recovery policy decided after failures.",
                |x| x.restarts,
            ),
            (
                "ddvm_domain_operator_restarts_total",
                "Restarts the operator asked for (restart, update).",
                |x| x.operator_restarts,
            ),
            (
                "ddvm_domain_give_ups_total",
                "Times the recovery policy gave up on the domain.",
                |x| x.give_ups,
            ),
            (
                "ddvm_domain_duplicate_detections_total",
                "Detections of a failure already being handled.",
                |x| x.duplicate_detections,
            ),
            (
                "ddvm_domain_replayed_requests_total",
                "Requests resubmitted to fresh domains by replays.",
                |x| x.replayed_requests,
            ),
            (
                "ddvm_domain_hook_failures_total",
                "Restart hook runs that did not exit 0.",
                |x| x.hook_failures,
            ),
            (
                "ddvm_domain_standby_promotions_total",
                "Restarts that promoted a warm standby instead of booting a domain.",
                |x| x.standby_promotions,
            ),
        ];
        for (name, help, f) in counters {
            family(&mut out, d, (name, "counter", help), counter(f));
        }
        let rows: Vec<Row> = d
            .iter()
            .flat_map(|x| {
                x.detections.iter().map(|(r, n)| {
                    (
                        vec![("domain", x.domain.clone()), ("reason", r.clone())],
                        n.to_string(),
                    )
                })
            })
            .collect();
        if !rows.is_empty() {
            let mut fam = Family { out: &mut out };
            fam.head(
                "ddvm_domain_detections_total",
                "counter",
                "Failures detected, by reason.",
            );
            for (labels, v) in &rows {
                let l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                fam.sample("ddvm_domain_detections_total", &l, v.clone());
            }
        }
        let gauges: [Figure<DomainFigures>; 3] = [
            (
                "ddvm_domain_standbys",
                "Warm standby domains ready for the next restarts.",
                |x| x.standbys,
            ),
            (
                "ddvm_domain_in_flight_requests",
                "Requests sent to the domain and not yet completed.",
                |x| x.in_flight,
            ),
            (
                "ddvm_domain_queued_requests",
                "Requests waiting to be sent to the domain.",
                |x| x.queued,
            ),
        ];
        for (name, help, f) in gauges {
            family(&mut out, d, (name, "gauge", help), counter(f));
        }
        let rec: Vec<_> = d.iter().map(|x| (dom(x), &x.recovery)).collect();
        summary(
            &mut out,
            "ddvm_domain_recovery_seconds",
            "Recovery time, from the failure's detection to the first request completed after it (quantiles over recent recoveries).",
            &rec,
        );
        let v = &self.devices;
        let dev = |x: &DeviceIo| vec![("domain", x.domain.clone()), ("device", x.device.into())];
        let io: [Figure<DeviceIo>; 3] = [
            (
                "ddvm_device_requests_total",
                "Client requests answered (a disk) or frames moved both ways (a NIC).",
                |x| x.requests,
            ),
            (
                "ddvm_device_bytes_total",
                "Bytes copied between client memory and the device (a disk's data, a NIC's frames).",
                |x| x.bytes,
            ),
            (
                "ddvm_device_errors_total",
                "Requests answered with an error (a disk); frames dropped or failed (a NIC).",
                |x| x.errors,
            ),
        ];
        for (name, help, f) in io {
            family(&mut out, v, (name, "counter", help), |x| {
                Some((dev(x), f(x).to_string()))
            });
        }
        family(
            &mut out,
            v,
            (
                "ddvm_device_vm_exits_total",
                "counter",
                "VM exits of the driver domain serving the device now (from zero at each new domain).",
            ),
            |x| x.vm_exits.map(|e| (dev(x), e.to_string())),
        );
        let lat: Vec<_> = v
            .iter()
            .filter_map(|x| x.latency.as_ref().map(|l| (dev(x), l)))
            .collect();
        summary(
            &mut out,
            "ddvm_device_request_latency_seconds",
            "Request latency, from the request's intake to its answer.",
            &lat,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_each_value_within_a_quarter_power_of_two() {
        for ns in [
            0u64,
            1,
            3,
            4,
            5,
            7,
            8,
            1000,
            1023,
            1024,
            123_456_789,
            u64::MAX / 2,
        ] {
            let b = bucket(ns);
            if b == BUCKETS - 1 {
                // Past the last power covered: counted there.
                assert!(ns > upper(b - 1), "{ns}");
                continue;
            }
            assert!(upper(b) >= ns, "{ns}: bucket {b} ends at {}", upper(b));
            if b > 0 {
                assert!(
                    upper(b - 1) < ns,
                    "{ns}: bucket {b} is not the first to hold it"
                );
            }
            assert!(upper(b) as f64 <= ns as f64 * 1.25 + 1.0, "{ns}");
        }
    }

    #[test]
    fn percentiles_come_from_the_recorded_latencies() {
        let h = LatencyHistogram::default();
        assert_eq!(h.snapshot().p50_seconds, None);
        for us in 1..=100u64 {
            h.record(Duration::from_micros(us));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 100);
        let near = |got: Option<f64>, want_us: f64| {
            let got = got.unwrap() * 1e6;
            assert!(
                got >= want_us && got <= want_us * 1.25,
                "{got} vs {want_us}"
            );
        };
        near(s.p50_seconds, 50.0);
        near(s.p90_seconds, 90.0);
        near(s.p99_seconds, 99.0);
        assert!((s.sum_seconds - 5050e-6).abs() < 1e-9);
    }

    #[test]
    fn the_exposition_has_help_and_type_for_each_family() {
        let snap = Snapshot {
            domains: vec![DomainFigures {
                domain: "nvme\"0".into(),
                state: "running".into(),
                epoch: Some(3),
                detections: vec![("panic".into(), 2)],
                ..Default::default()
            }],
            devices: vec![DeviceIo {
                domain: "nvme\"0".into(),
                device: "blk",
                requests: 7,
                latency: Some(Latency::default()),
                ..Default::default()
            }],
        };
        let text = snap.prometheus();
        assert!(
            text.contains("ddvm_domain_up{domain=\"nvme\\\"0\"} 1\n"),
            "{text}"
        );
        assert!(text
            .contains("ddvm_domain_detections_total{domain=\"nvme\\\"0\",reason=\"panic\"} 2\n"));
        assert!(text.contains("ddvm_device_request_latency_seconds{domain=\"nvme\\\"0\",device=\"blk\",quantile=\"0.5\"} NaN\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let base = name
                .strip_suffix("_sum")
                .or(name.strip_suffix("_count"))
                .filter(|b| text.contains(&format!("# TYPE {b} summary")))
                .unwrap_or(name);
            assert!(text.contains(&format!("# TYPE {base} ")), "{line}");
            assert!(text.contains(&format!("# HELP {base} ")), "{line}");
        }
        // Each family is declared once.
        let types: Vec<_> = text.lines().filter(|l| l.starts_with("# TYPE")).collect();
        let mut unique = types.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(types.len(), unique.len());
    }
}
