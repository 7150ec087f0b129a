//! Human-readable durations: `250us`, `10ms`, `1.5s`, `2m`, `24h`, `0`.

use std::time::Duration;

/// Parses a duration with a unit suffix (`ns`, `us`, `ms`, `s`, `m`, `h`).
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("duration {text:?} needs a unit (ns, us, ms, s, m or h)"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("duration {text:?} does not start with a number"))?;
    let seconds = match unit {
        "ns" => value / 1e9,
        "us" | "µs" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("duration {text:?} has unknown unit {other:?} (ns, us, ms, s, m or h)")),
    };
    if !seconds.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&seconds) {
        return Err(format!("duration {text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Formats a duration the way [`parse`] reads it.
pub fn format(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        "0".into()
    } else if nanos.is_multiple_of(1_000_000_000) {
        format!("{}s", nanos / 1_000_000_000)
    } else if nanos.is_multiple_of(1_000_000) {
        format!("{}ms", nanos / 1_000_000)
    } else if nanos.is_multiple_of(1_000) {
        format!("{}us", nanos / 1_000)
    } else {
        format!("{nanos}ns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse("10ms"), Ok(Duration::from_millis(10)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "10", "ms", "10 parsecs", "-1s", "1e400s", "1.2.3ms"] {
            assert!(parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    proptest::proptest! {
        #[test]
        fn format_round_trips(nanos in 0u64..10_000_000_000_000) {
            let d = Duration::from_nanos(nanos);
            let back = parse(&format(d)).map_err(proptest::test_runner::TestCaseError::fail)?;
            // f64 parsing of large nanosecond counts may lose < 1 µs.
            proptest::prop_assert!(back.abs_diff(d) < Duration::from_micros(1));
        }
    }
}
