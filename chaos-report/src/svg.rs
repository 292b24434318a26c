//! The report's plots as self-contained SVG: throughput over time, and a histogram of the
//! recovery times.

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};

use ddvm_recovery::fault::FaultKind;

use crate::{ChaosReport, Summary};

impl ChaosReport {
    /// Throughput over time as a self-contained SVG (900x360): per-bin IOPS as a polyline,
    /// the baseline as a dashed line, each fault as a thin vertical line (`class="fault"`,
    /// red, or coloured by kind when there are several), recoveries shaded, a legend at the
    /// right.
    pub fn throughput_svg(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_throughput_svg(&mut out);
        out
    }

    fn write_throughput_svg(&self, o: &mut String) -> fmt::Result {
        let t = &self.timeline;
        let iops = t.iops();
        let (x_step, x_top) = axis(t.length().as_secs_f64(), 10.0);
        let peak = iops.iter().copied().fold(self.baseline_iops, f64::max);
        let (y_step, y_top) = axis(peak * 1.05, 6.0);
        let plot = Plot {
            right: LEGEND_LEFT - 16.0,
            x_lo: 0.0,
            x_hi: x_top,
            log_x: false,
            y_top,
        };
        let faults: Vec<&str> = self.faults.iter().map(|k| k.name()).collect();
        let title = format!(
            "Throughput under chaos: {} (faults {}, every {} ms)",
            self.config,
            faults.join(","),
            self.every_ms
        );
        plot.begin(o, &title)?;
        for r in t.recoveries() {
            let x0 = plot.x(r.detected.as_secs_f64());
            let x1 = plot.x(r.recovered.as_secs_f64());
            writeln!(
                o,
                r##"<rect class="recovery" x="{x0:.1}" y="{TOP}" width="{:.1}" height="{}" fill="{RECOVERY}" fill-opacity="0.35"/>"##,
                (x1 - x0).max(1.0),
                BOTTOM - TOP
            )?;
        }
        let ticks_x: Vec<(f64, String)> = ticks(0.0, x_top, x_step)
            .into_iter()
            .map(|v| (v, fmt_tick(v, x_step)))
            .collect();
        plot.axes(o, &ticks_x, "time (s)", y_step, "IOPS")?;
        let points: Vec<String> = iops
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let (begin, width) = t.bin_span(i);
                let mid = begin.as_secs_f64() + width.as_secs_f64() / 2.0;
                format!("{:.1},{:.1}", plot.x(mid), plot.y(*v))
            })
            .collect();
        writeln!(
            o,
            r#"<polyline points="{}" fill="none" stroke="{THROUGHPUT}" stroke-width="1.5"/>"#,
            points.join(" ")
        )?;
        if self.baseline_iops > 0.0 {
            let y = plot.y(self.baseline_iops);
            writeln!(
                o,
                r#"<line class="baseline" x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="{BASELINE}" stroke-dasharray="6 4"/>"#,
                plot.right
            )?;
        }
        let kinds: BTreeSet<FaultKind> = t.marks().iter().map(|m| m.kind).collect();
        let colour = |k: FaultKind| {
            if kinds.len() > 1 {
                PALETTE[index(k) % PALETTE.len()]
            } else {
                PALETTE[0]
            }
        };
        for m in t.marks() {
            let secs = m.at.as_secs_f64();
            let x = plot.x(secs);
            writeln!(
                o,
                r#"<line class="fault" x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{BOTTOM}" stroke="{}" stroke-width="1"><title>{} at {secs:.3} s</title></line>"#,
                colour(m.kind),
                m.kind
            )?;
        }
        let mut legend = vec![
            ("throughput".to_string(), THROUGHPUT, ""),
            (
                "baseline (fault-free)".into(),
                BASELINE,
                r#" stroke-dasharray="6 4""#,
            ),
            (
                "recovery".into(),
                RECOVERY,
                r#" stroke-width="8" stroke-opacity="0.5""#,
            ),
        ];
        legend.extend(
            kinds
                .iter()
                .map(|&k| (format!("fault: {k}"), colour(k), "")),
        );
        for (i, (label, colour, style)) in legend.iter().enumerate() {
            let y = TOP + 8.0 + i as f64 * 16.0;
            writeln!(
                o,
                r#"<line class="legend" x1="{LEGEND_LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="{colour}"{style}/><text x="{}" y="{}">{}</text>"#,
                LEGEND_LEFT + 20.0,
                LEGEND_LEFT + 26.0,
                y + 4.0,
                escape(label)
            )?;
        }
        writeln!(o, "</svg>")
    }

    /// A histogram of the recovery times (detection to first completion) as a self-contained
    /// SVG (900x360), p50 and p99 marked. Bins are linear (20 to 50 over the samples' range,
    /// at least 1% of the largest wide) when the samples span less than a factor of 50, logarithmic (5 per decade) otherwise, so that a few
    /// slow recoveries do not squash the common case into one bar.
    pub fn recovery_histogram_svg(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_histogram_svg(&mut out);
        out
    }

    fn write_histogram_svg(&self, o: &mut String) -> fmt::Result {
        let samples = &self.samples.detection_to_first_completion_us;
        let ms: Vec<f64> = samples.iter().map(|&us| us as f64 / 1000.0).collect();
        let hist = Histogram::of(&ms);
        let peak = hist.counts.iter().copied().max().unwrap_or(0);
        let (y_step, y_top) = axis(peak as f64, 5.0);
        let plot = Plot {
            right: WIDTH - 24.0,
            x_lo: hist.lo,
            x_hi: hist.hi,
            log_x: hist.log,
            y_top,
        };
        let summary = Summary::of(samples);
        let pct = |v: Option<u64>| v.map_or("-".into(), |us| format!("{:.2}", us as f64 / 1e3));
        let title = format!(
            "Recovery time, detection to first completion: {} recoveries, p50 {} ms, p99 {} ms",
            samples.len(),
            pct(summary.p50),
            pct(summary.p99)
        );
        plot.begin(o, &title)?;
        if ms.is_empty() {
            writeln!(
                o,
                r#"<text x="{}" y="{}" text-anchor="middle">no recoveries</text>"#,
                (LEFT + plot.right) / 2.0,
                (TOP + BOTTOM) / 2.0
            )?;
        }
        for (i, &count) in hist.counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let x0 = plot.x(hist.edges[i]);
            let x1 = plot.x(hist.edges[i + 1]);
            let y = plot.y(count as f64);
            writeln!(
                o,
                r#"<rect class="bar" x="{x0:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{THROUGHPUT}" stroke="white"><title>{count}</title></rect>"#,
                (x1 - x0).max(1.0),
                BOTTOM - y
            )?;
        }
        let ticks_x: Vec<(f64, String)> = if hist.log {
            let (d0, d1) = (hist.lo.log10().round(), hist.hi.log10().round());
            // Decades: a few dozen at most.
            (d0 as i32..=d1 as i32)
                .map(|d| {
                    let decimals = usize::try_from(-d).unwrap_or(0);
                    let v = 10f64.powi(d);
                    (v, format!("{v:.decimals$}"))
                })
                .collect()
        } else {
            let (step, _) = axis(hist.hi - hist.lo, 8.0);
            ticks(hist.lo, hist.hi, step)
                .into_iter()
                .map(|v| (v, fmt_tick(v, step)))
                .collect()
        };
        let x_label = if hist.log { "ms (log scale)" } else { "ms" };
        plot.axes(o, &ticks_x, x_label, y_step.max(1.0), "recoveries")?;
        // Short labels above the plot: p50 to the left of its line, p99 to the right.
        for (name, value, colour, anchor, dx) in [
            ("p50", summary.p50, "#2ca02c", "end", -3.0),
            ("p99", summary.p99, "#d62728", "start", 3.0),
        ] {
            let Some(us) = value else { continue };
            let x = plot.x(us as f64 / 1000.0);
            writeln!(
                o,
                r#"<line class="{name}" x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{BOTTOM}" stroke="{colour}" stroke-dasharray="4 3"/><text x="{:.1}" y="{}" fill="{colour}" text-anchor="{anchor}">{name}</text>"#,
                x + dx,
                TOP - 5.0
            )?;
        }
        writeln!(o, "</svg>")
    }
}

/// SVG size and plot area (pixels); plots end at their own right edge.
const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 360.0;
const LEFT: f64 = 72.0;
const TOP: f64 = 52.0;
const BOTTOM: f64 = 308.0;
/// The throughput plot's legend, right of the plot.
const LEGEND_LEFT: f64 = 736.0;

const THROUGHPUT: &str = "#1f77b4";
const BASELINE: &str = "#555555";
const RECOVERY: &str = "#f5b041";
/// Fault colours; the first (red) when there is one kind.
const PALETTE: [&str; 16] = [
    "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#ff7f0e",
    "#2ca02c", "#393b79", "#637939", "#843c39", "#000000", "#e7ba52", "#7b4173", "#3182bd",
];

/// Position of `kind` in [`FaultKind::ALL`], for its colour.
fn index(kind: FaultKind) -> usize {
    FaultKind::ALL.iter().position(|&k| k == kind).unwrap_or(0)
}

/// Escapes text for SVG content and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// 1, 2 or 5 times a power of ten: the nearest at or above `raw` (`up`), or at or below it.
/// `raw` must be finite and positive.
fn nice(raw: f64, up: bool) -> f64 {
    let magnitude = 10f64.powf(raw.log10().floor());
    let f = raw / magnitude;
    let m = if up {
        [1.0, 2.0, 5.0, 10.0]
            .into_iter()
            .find(|&m| f <= m)
            .unwrap_or(10.0)
    } else {
        [5.0, 2.0, 1.0].into_iter().find(|&m| f >= m).unwrap_or(1.0)
    };
    m * magnitude
}

/// A tick step giving about `ticks` ticks over `0..=max`, and the axis top (a multiple of
/// the step, at least `max`). Degenerate ranges (zero, negative, not finite) give 0..=1.
fn axis(max: f64, ticks: f64) -> (f64, f64) {
    let raw = max / ticks;
    if !(raw.is_finite() && raw > 0.0) {
        return (0.2, 1.0);
    }
    let step = nice(raw, true);
    (step, ((max / step).ceil() * step).max(step))
}

/// The multiples of `step` in `lo..=hi` (at most 100), computed each from its index so that
/// rounding does not build up.
fn ticks(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    if !(step > 0.0 && lo.is_finite() && hi.is_finite()) {
        return Vec::new();
    }
    let first = (lo / step - 1e-6).ceil() as i64;
    let last = (hi / step + 1e-6).floor() as i64;
    (first..=last).take(100).map(|k| k as f64 * step).collect()
}

/// `v` with as many decimals as `step` needs.
fn fmt_tick(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()).clamp(0.0, 9.0) as usize
    };
    format!("{v:.decimals$}")
}

fn finite_or_zero(v: f64) -> f64 {
    if v.is_finite() {
        v
    } else {
        0.0
    }
}

/// Maps data to a plot area from `LEFT` to `right` and `TOP` to `BOTTOM`: x over
/// `x_lo..=x_hi` (logarithmic when `log_x`, then `x_lo > 0`), y over `0..=y_top`; values
/// outside are clamped to the edges.
struct Plot {
    right: f64,
    x_lo: f64,
    x_hi: f64,
    log_x: bool,
    y_top: f64,
}

impl Plot {
    fn x(&self, v: f64) -> f64 {
        let f = if self.log_x {
            let lo = self.x_lo.log10();
            (v.max(self.x_lo).log10() - lo) / (self.x_hi.log10() - lo)
        } else {
            (v - self.x_lo) / (self.x_hi - self.x_lo)
        };
        LEFT + finite_or_zero(f).clamp(0.0, 1.0) * (self.right - LEFT)
    }

    fn y(&self, v: f64) -> f64 {
        BOTTOM - finite_or_zero(v / self.y_top).clamp(0.0, 1.0) * (BOTTOM - TOP)
    }

    /// The SVG's start, background and title.
    fn begin(&self, o: &mut String, title: &str) -> fmt::Result {
        writeln!(
            o,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">"#
        )?;
        writeln!(
            o,
            r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
        )?;
        writeln!(
            o,
            r#"<text x="{}" y="24" text-anchor="middle" font-size="14">{}</text>"#,
            WIDTH / 2.0,
            escape(title)
        )
    }

    /// Axes: x ticks at the given values and labels, y ticks every `y_step` from 0, grid
    /// lines, axis labels.
    fn axes(
        &self,
        o: &mut String,
        x_ticks: &[(f64, String)],
        x_label: &str,
        y_step: f64,
        y_label: &str,
    ) -> fmt::Result {
        for v in ticks(0.0, self.y_top, y_step) {
            let y = self.y(v);
            writeln!(
                o,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#e8e8e8"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                self.right,
                LEFT - 6.0,
                y + 4.0,
                fmt_tick(v, y_step)
            )?;
        }
        for (v, label) in x_ticks {
            let x = self.x(*v);
            writeln!(
                o,
                r#"<line x1="{x:.1}" y1="{BOTTOM}" x2="{x:.1}" y2="{}" stroke="black"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#,
                BOTTOM + 5.0,
                BOTTOM + 18.0,
                escape(label)
            )?;
        }
        writeln!(
            o,
            r#"<path d="M{LEFT},{TOP} V{BOTTOM} H{}" fill="none" stroke="black"/>"#,
            self.right
        )?;
        writeln!(
            o,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            (LEFT + self.right) / 2.0,
            HEIGHT - 14.0,
            escape(x_label)
        )?;
        writeln!(
            o,
            r#"<text transform="translate(18 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
            (TOP + BOTTOM) / 2.0,
            escape(y_label)
        )
    }
}

/// Recovery times binned for the histogram (ms).
struct Histogram {
    log: bool,
    /// The axis range: `edges` first and last.
    lo: f64,
    hi: f64,
    edges: Vec<f64>,
    counts: Vec<u64>,
}

impl Histogram {
    /// Smallest time on a log axis (1 µs): zero has no logarithm.
    const LOG_FLOOR: f64 = 0.001;
    const PER_DECADE: f64 = 5.0;

    fn of(ms: &[f64]) -> Self {
        if ms.is_empty() {
            return Histogram {
                log: false,
                lo: 0.0,
                hi: 1.0,
                edges: vec![0.0, 1.0],
                counts: vec![0],
            };
        }
        let lo = ms.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ms.iter().copied().fold(0.0, f64::max);
        let floor = lo.max(Self::LOG_FLOOR);
        let (log, edges): (bool, Vec<f64>) = if hi / floor > 50.0 {
            let d0 = floor.log10().floor();
            let d1 = hi.log10().ceil().max(d0 + 1.0);
            // A few dozen: samples are at most u64::MAX µs.
            let n = ((d1 - d0) * Self::PER_DECADE) as usize;
            let edges = (0..=n)
                .map(|i| 10f64.powf(d0 + i as f64 / Self::PER_DECADE))
                .collect();
            (true, edges)
        } else {
            // About a twentieth of the span (rounded down: at most 50 bins), but at least a
            // hundredth of the largest time: a tight cluster gets a few bars, not a comb.
            let span = (hi - lo).max(hi * 0.2).max(Self::LOG_FLOOR);
            let step = nice(span / 20.0, false);
            let first = (lo / step + 1e-9).floor();
            let n = ((hi / step - first + 1e-9).floor() as usize).saturating_add(1);
            let edges = (0..=n).map(|i| (first + i as f64) * step).collect();
            (false, edges)
        };
        let bins = edges.len() - 1;
        let mut counts = vec![0u64; bins];
        for &v in ms {
            let i = edges[1..].iter().position(|&e| v < e).unwrap_or(bins - 1);
            counts[i] += 1;
        }
        Histogram {
            log,
            lo: edges[0],
            hi: edges[bins],
            edges,
            counts,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::report::tests::sample_report;
    use crate::tests::ms;

    /// Tags balance, text and attributes hold no raw `<`, `>` or stray `&`.
    fn assert_well_formed(svg: &str) {
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"));
        let entities_only = |s: &str| {
            s.match_indices('&').all(|(i, _)| {
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                    .iter()
                    .any(|e| s[i..].starts_with(e))
            })
        };
        let mut open = Vec::new();
        let mut rest = svg;
        while let Some(i) = rest.find('<') {
            assert!(!rest[..i].contains('>') && entities_only(&rest[..i]));
            let end = i + rest[i..].find('>').expect("unclosed tag");
            let tag = &rest[i + 1..end];
            assert!(!tag.contains('<') && entities_only(tag), "{tag}");
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(open.pop(), Some(name), "{svg}");
            } else if !tag.ends_with('/') {
                open.push(tag.split_whitespace().next().unwrap_or(""));
            }
            rest = &rest[end + 1..];
        }
        assert!(open.is_empty(), "unclosed {open:?}");
    }

    #[test]
    fn throughput_svg_has_a_point_per_bin_and_a_line_per_fault() {
        let r = sample_report();
        let svg = r.throughput_svg();
        assert_well_formed(&svg);
        assert_eq!(svg.matches("<polyline").count(), 1);
        let points = svg
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(points.split_whitespace().count(), 20);
        assert_eq!(svg.matches(r#"class="fault""#).count(), 3);
        assert_eq!(svg.matches(r#"class="recovery""#).count(), 3);
        assert_eq!(svg.matches(r#"class="baseline""#).count(), 1);
        assert!(svg.contains("chaos &lt;&amp;&gt; test.toml"));
        assert!(!svg.contains("chaos <&> test"));
        assert!(svg.contains(">fault: kill<") && svg.contains(">fault: panic<"));
        assert!(svg.contains(">time (s)<") && svg.contains(">IOPS<"));

        // Nothing recorded, no baseline, zero length: still a well-formed plot.
        let mut empty = ChaosReport::new("x", &[], ms(1), Duration::ZERO, Instant::now(), ms(100));
        empty.finish(0.0);
        let svg = empty.throughput_svg();
        assert_well_formed(&svg);
        assert!(svg.contains(r#"<polyline points="""#));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn histogram_svg_marks_percentiles_on_sensible_bins() {
        let r = sample_report();
        let svg = r.recovery_histogram_svg();
        assert_well_formed(&svg);
        assert!(svg.contains(r#"class="p50""#) && svg.contains(r#"class="p99""#));
        assert!(svg.contains("3 recoveries, p50 2.50 ms, p99 12.00 ms"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));

        let narrow = Histogram::of(&[4.9, 5.0, 5.1, 5.1]);
        assert!(!narrow.log);
        assert_eq!(narrow.counts.iter().sum::<u64>(), 4);
        assert_eq!(narrow.counts.len(), 5, "50 us bins: 4.9 to 5.15 ms");
        let wide = Histogram::of(&[0.0, 0.05, 1.0, 1.0, 300.0]);
        assert!(wide.log);
        assert_eq!(wide.counts.iter().sum::<u64>(), 5);
        assert!((wide.lo - 0.001).abs() < 1e-9 && (wide.hi - 1000.0).abs() < 1e-6);
        assert_eq!(wide.counts.len(), 30, "5 bins per decade from 1 us to 1 s");
        let same = Histogram::of(&[0.0, 0.0]);
        assert_eq!(same.counts.iter().sum::<u64>(), 2);

        let mut none = sample_report();
        none.samples.detection_to_first_completion_us.clear();
        let svg = none.recovery_histogram_svg();
        assert_well_formed(&svg);
        assert!(svg.contains(">no recoveries<") && !svg.contains("class=\"bar\""));
        assert!(!svg.contains(r#"class="p50""#));
    }
}
