//! The report as a table for the terminal.

use std::fmt::{self, Write as _};

use crate::{ChaosReport, Comparison};

impl ChaosReport {
    /// The report as a table for the terminal.
    pub fn table(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_table(&mut out);
        out
    }

    fn write_table(&self, o: &mut String) -> fmt::Result {
        let faults: Vec<&str> = self.faults.iter().map(|k| k.name()).collect();
        writeln!(o, "chaos run of {}", self.config)?;
        writeln!(
            o,
            "faults {} every {} ms for {} ms",
            faults.join(","),
            self.every_ms,
            self.duration_ms
        )?;
        if !self.run.ddvm_version.is_empty() {
            writeln!(
                o,
                "ddvm {} on {}, KVM platform {}, started {}",
                self.run.ddvm_version, self.run.host, self.run.platform, self.run.started
            )?;
        }
        if self.stopped {
            writeln!(
                o,
                "stopped on request before its end: the figures cover what ran"
            )?;
        }
        for (title, counts) in [
            ("faults injected", &self.faults_injected),
            ("detections", &self.detections),
        ] {
            writeln!(o, "\n{title:<34}{:>8}", "count")?;
            if counts.is_empty() {
                writeln!(o, "  (none)")?;
            }
            for (name, n) in counts {
                writeln!(o, "  {name:<32}{n:>8}")?;
            }
        }
        writeln!(
            o,
            "\nrecoveries {}, give-ups {}",
            self.recoveries, self.give_ups
        )?;
        writeln!(
            o,
            "\n{:<34}{:>8}{:>10}{:>10}{:>10}",
            "recovery times (ms)", "count", "p50", "p99", "max"
        )?;
        let ms = |v: Option<u64>| v.map_or("-".to_string(), |us| format!("{:.2}", us as f64 / 1e3));
        for (name, s) in [
            ("fault -> detection", &self.fault_to_detection_us),
            (
                "detection -> first completion",
                &self.detection_to_first_completion_us,
            ),
            (
                "fault -> first completion",
                &self.fault_to_first_completion_us,
            ),
        ] {
            writeln!(
                o,
                "  {name:<32}{:>8}{:>10}{:>10}{:>10}",
                s.count,
                ms(s.p50),
                ms(s.p99),
                ms(s.max)
            )?;
        }
        if !self.recovery_by_fault.is_empty() {
            writeln!(
                o,
                "\n{:<34}{:>8}{:>10}{:>10}{:>10}",
                "detection -> first completion", "count", "p50", "p99", "max"
            )?;
            for (kind, s) in &self.recovery_by_fault {
                writeln!(
                    o,
                    "  after {kind:<26}{:>8}{:>10}{:>10}{:>10}",
                    s.count,
                    ms(s.p50),
                    ms(s.p99),
                    ms(s.max)
                )?;
            }
        }
        writeln!(
            o,
            "\nrequests {}, client errors {}, mismatches {}",
            self.requests, self.client_errors, self.mismatches
        )?;
        writeln!(
            o,
            "throughput: chaos {:.1} IOPS, baseline {:.1} IOPS, ratio {:.3}",
            self.chaos_iops, self.baseline_iops, self.throughput_ratio
        )?;
        if !self.clients.is_empty() {
            writeln!(
                o,
                "\n{:<20}{:>12}{:>8}{:>12}{:>12}{:>12}",
                "client", "ops", "errors", "mismatches", "verified", "IOPS"
            )?;
            for c in &self.clients {
                writeln!(
                    o,
                    "  {:<18}{:>12}{:>8}{:>12}{:>12}{:>12.1}",
                    c.name, c.ops, c.errors, c.mismatches, c.verified, c.iops
                )?;
            }
        }
        if let Some(n) = &self.network {
            writeln!(
                o,
                "\nnetwork: frames lost {} ({:.1} per recovery), duplicated {} ({:.1} per recovery), link down {}, TCP retransmits {}, TCP resets or timeouts {}",
                n.lost,
                n.lost_per_recovery,
                n.duplicated,
                n.duplicated_per_recovery,
                n.link_down,
                n.retransmits,
                n.resets
            )?;
        }
        writeln!(o, "\ntargets")?;
        for t in self.targets() {
            let cmp = match t.comparison {
                Comparison::AtMost => "<=",
                Comparison::AtLeast => ">=",
            };
            let value = |v: f64| match t.name.as_str() {
                "recovery_p99_ms" => format!("{v:.2} ms"),
                "throughput_ratio" => format!("{v:.3}"),
                _ => format!("{v:.0}"),
            };
            let measured = t.measured.map_or("n/a".to_string(), value);
            write!(
                o,
                "  {}  {:<18}{:>12}  (target {cmp} {})",
                if t.pass { "PASS" } else { "FAIL" },
                t.name,
                measured,
                value(t.threshold)
            )?;
            match &t.note {
                Some(note) => writeln!(o, ": {note}")?,
                None => writeln!(o)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::report::tests::sample_report;

    #[test]
    fn table_shows_counts_timings_throughput_and_targets() {
        let table = sample_report().table();
        for line in [
            "faults kill,panic every 500 ms for 2000 ms",
            "  kill                                   2",
            "  operator-kill                          2",
            "recoveries 3, give-ups 0",
            "  detection -> first completion          3      2.50     12.00     12.00",
            "  fault -> detection                     2      0.00      1.00      1.00",
            "requests 1910, client errors 0, mismatches 0",
            "throughput: chaos 955.0 IOPS, baseline 1000.0 IOPS, ratio 0.955",
            "  PASS  client_errors                0  (target <= 0)",
            "  FAIL  recovery_p99_ms       12.00 ms  (target <= 10.00 ms)",
            "  PASS  throughput_ratio         0.955  (target >= 0.950): the target is set for --faults kill --every 1s",
            "  client0                   1000       0           0         500       500.0",
            "  after kill                             1     12.00     12.00     12.00",
            "  after panic                            1      2.50      2.50      2.50",
        ] {
            assert!(table.contains(line), "missing {line:?} in\n{table}");
        }
    }

    #[test]
    fn network_clients_add_their_losses_per_recovery() {
        let mut r = sample_report();
        assert!(
            !r.table().contains("network:"),
            "no network client, no line"
        );
        r.clients[0].net = Some(crate::NetResult {
            lost: 9,
            duplicated: 3,
            link_down: 0,
            retransmits: Some(4),
            resets: Some(0),
        });
        r.clients[1].net = Some(crate::NetResult {
            lost: 3,
            ..Default::default()
        });
        r.finish(1000.0);
        let n = r.network.clone().expect("a network summary");
        assert_eq!((n.lost, n.duplicated, n.retransmits), (12, 3, 4));
        assert_eq!((n.lost_per_recovery, n.duplicated_per_recovery), (4.0, 1.0));
        let line = "network: frames lost 12 (4.0 per recovery), duplicated 3 (1.0 per recovery), link down 0, TCP retransmits 4, TCP resets or timeouts 0";
        assert!(
            r.table().contains(line),
            "missing {line:?} in\n{}",
            r.table()
        );
    }

    #[test]
    fn targets_can_be_set() {
        let mut r = sample_report();
        r.target_recovery_p99_ms = 20.0;
        r.target_throughput_ratio = 0.99;
        let table = r.table();
        for line in [
            "  PASS  recovery_p99_ms       12.00 ms  (target <= 20.00 ms)",
            "  FAIL  throughput_ratio         0.955  (target >= 0.990)",
        ] {
            assert!(table.contains(line), "missing {line:?} in\n{table}");
        }
    }
}
