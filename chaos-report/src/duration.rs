//! Durations on the command line (`--every`, `--duration`, `--timeout`, ...): a number and a
//! unit, or a bare number of seconds.

use std::time::Duration;

/// A duration that is malformed, zero or too large; the message says what is wrong and what
/// is accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {problem} (expected a number and a unit: ns, us, ms, s, m or h, as in 500us, 100ms, 1.5s, 2m; a bare number is seconds)")]
pub struct DurationError {
    /// The text given.
    pub input: String,
    /// What is wrong with it.
    pub problem: &'static str,
}

/// Parses a command-line duration: a decimal number and a unit (`ns`, `us` or `µs`, `ms`,
/// `s`, `m`, `h`), as in `500us`, `100ms`, `1.5s`, `60s`, `2m`; a bare number is seconds
/// (`30` is `30s`), as the commands took it before units. Fractions finer than a
/// nanosecond are cut off. Zero is refused (every chaos duration must be positive), as is
/// anything above `u64::MAX` nanoseconds (about 584 years).
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let err = |problem| DurationError {
        input: input.to_string(),
        problem,
    };
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty() {
        return Err(err("it does not start with a number"));
    }
    if frac.contains('.') {
        return Err(err("the number has more than one decimal point"));
    }
    let unit_ns: u128 = match unit.trim() {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "" => 1_000_000_000,
        _ => return Err(err("the unit is unknown")),
    };
    let too_large = || err("it is too large");
    // Digits only: parsing fails on overflow alone.
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| too_large())?
    };
    // At most 18 fraction digits (finer than any unit's nanosecond), so nothing overflows.
    let frac = &frac[..frac.len().min(18)];
    let frac_ns = if frac.is_empty() {
        0
    } else {
        let digits: u128 = frac.parse().map_err(|_| too_large())?;
        let scale = 10u128.pow(u32::try_from(frac.len()).unwrap_or(18));
        digits * unit_ns / scale
    };
    let ns = int
        .checked_mul(unit_ns)
        .and_then(|ns| ns.checked_add(frac_ns))
        .and_then(|ns| u64::try_from(ns).ok())
        .ok_or_else(too_large)?;
    if ns == 0 {
        return Err(err("it must be greater than zero"));
    }
    Ok(Duration::from_nanos(ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn durations_parse_with_units_and_fractions() {
        assert_eq!(parse_duration("100ms"), Ok(ms(100)));
        assert_eq!(parse_duration("1s"), Ok(ms(1000)));
        // A bare number is seconds.
        assert_eq!(parse_duration("30"), Ok(ms(30_000)));
        assert_eq!(parse_duration("0.25"), Ok(ms(250)));
        assert_eq!(parse_duration("1.5s"), Ok(ms(1500)));
        assert_eq!(parse_duration("60s"), Ok(ms(60_000)));
        assert_eq!(parse_duration("2m"), Ok(ms(120_000)));
        assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("500µs"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration(" .25 s "), Ok(ms(250)));
        assert_eq!(parse_duration("1h"), Ok(ms(3_600_000)));
        assert_eq!(parse_duration("7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(parse_duration("0.0000000015s"), Ok(Duration::from_nanos(1)));
    }

    #[test]
    fn bad_durations_say_what_is_wrong() {
        for (input, problem) in [
            ("", "it does not start with a number"),
            ("s", "it does not start with a number"),
            ("-1s", "it does not start with a number"),
            ("10 parsecs", "the unit is unknown"),
            ("1e3ms", "the unit is unknown"),
            ("1.2.3s", "the number has more than one decimal point"),
            ("0ms", "it must be greater than zero"),
            ("0.0000000001s", "it must be greater than zero"),
            ("99999999999999h", "it is too large"),
            (
                "9999999999999999999999999999999999999999s",
                "it is too large",
            ),
        ] {
            let err = parse_duration(input).unwrap_err();
            assert_eq!(
                err,
                DurationError {
                    input: input.into(),
                    problem
                },
                "{input}"
            );
        }
        let msg = parse_duration("100x").unwrap_err().to_string();
        assert!(msg.starts_with("invalid duration \"100x\": the unit is unknown"));
        assert!(msg.contains("100ms"));
    }
}
