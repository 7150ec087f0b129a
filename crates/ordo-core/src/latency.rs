//! Simulated callback latency, as in the paper's experiment: every operation
//! honours the event attribute [`ATTRIBUTE`], one of
//! - `fixed:10ms` — always 10 ms;
//! - `uniform:0ms-5ms` — uniform between the two bounds;
//! - `exp:10ms` — exponential with mean 10 ms (the paper's callbacks).

use std::{fmt, time::Duration};

use rand::Rng;
use rand_distr::{Distribution, Exp};

use crate::duration;

/// The event attribute that carries the latency model.
pub const ATTRIBUTE: &str = "latency";

/// Longest latency a single event may ask for.
pub const MAX: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Latency {
    None,
    Fixed(Duration),
    Uniform(Duration, Duration),
    Exponential { mean: Duration },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed latency {text:?}: {reason} (expected fixed:D, uniform:D1-D2 or exp:MEAN, e.g. exp:10ms)")]
pub struct LatencyError {
    text: String,
    reason: String,
}

impl Latency {
    pub fn parse(text: &str) -> Result<Self, LatencyError> {
        let err = |reason: String| LatencyError { text: text.to_owned(), reason };
        let (kind, arg) = text.split_once(':').ok_or_else(|| err("missing ':'".into()))?;
        let bounded =
            |d: Duration| if d > MAX { Err(err(format!("longer than {}", duration::format(MAX)))) } else { Ok(d) };
        match kind {
            "none" => Ok(Self::None),
            "fixed" => Ok(Self::Fixed(bounded(duration::parse(arg).map_err(err)?)?)),
            "exp" => Ok(Self::Exponential { mean: bounded(duration::parse(arg).map_err(err)?)? }),
            "uniform" => {
                let (lo, hi) = arg.split_once('-').ok_or_else(|| err("uniform needs LOW-HIGH".into()))?;
                let lo = bounded(duration::parse(lo).map_err(err)?)?;
                let hi = bounded(duration::parse(hi).map_err(err)?)?;
                if lo > hi {
                    return Err(err("LOW is above HIGH".into()));
                }
                Ok(Self::Uniform(lo, hi))
            }
            other => Err(err(format!("unknown distribution {other:?}"))),
        }
    }

    /// Draws one delay.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> Duration {
        match *self {
            Self::None => Duration::ZERO,
            Self::Fixed(d) => d,
            Self::Uniform(lo, hi) if lo == hi => lo,
            Self::Uniform(lo, hi) => Duration::from_secs_f64(rng.random_range(lo.as_secs_f64()..hi.as_secs_f64())),
            Self::Exponential { mean } if mean.is_zero() => Duration::ZERO,
            Self::Exponential { mean } => match Exp::new(1.0 / mean.as_secs_f64()) {
                Ok(exp) => Duration::from_secs_f64(exp.sample(rng)).min(MAX),
                Err(_) => mean,
            },
        }
    }

    /// Mean of the distribution.
    pub fn mean(&self) -> Duration {
        match *self {
            Self::None => Duration::ZERO,
            Self::Fixed(d) => d,
            Self::Uniform(lo, hi) => (lo + hi) / 2,
            Self::Exponential { mean } => mean,
        }
    }
}

impl fmt::Display for Latency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::None => write!(f, "none:0"),
            Self::Fixed(d) => write!(f, "fixed:{}", duration::format(d)),
            Self::Uniform(lo, hi) => write!(f, "uniform:{}-{}", duration::format(lo), duration::format(hi)),
            Self::Exponential { mean } => write!(f, "exp:{}", duration::format(mean)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_form() {
        assert_eq!(Latency::parse("fixed:2ms"), Ok(Latency::Fixed(Duration::from_millis(2))));
        assert_eq!(Latency::parse("uniform:0ms-5ms"), Ok(Latency::Uniform(Duration::ZERO, Duration::from_millis(5))));
        assert_eq!(Latency::parse("exp:10ms"), Ok(Latency::Exponential { mean: Duration::from_millis(10) }));
    }

    #[test]
    fn rejects_malformed() {
        for bad in ["10ms", "exp:", "exp:ten", "uniform:5ms", "uniform:5ms-1ms", "gauss:1ms", "fixed:1h", "fixed:11m"] {
            assert!(Latency::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn display_round_trips() {
        for text in ["fixed:2ms", "uniform:0-5ms", "exp:10ms"] {
            let parsed = Latency::parse(text).expect("valid");
            assert_eq!(Latency::parse(&parsed.to_string()), Ok(parsed));
        }
    }

    #[test]
    fn exponential_mean_is_close() {
        let model = Latency::Exponential { mean: Duration::from_millis(10) };
        let mut rng = rand::rng();
        let n = 20_000;
        let total: f64 = (0..n).map(|_| model.sample(&mut rng).as_secs_f64()).sum();
        let mean = total / n as f64;
        assert!((mean - 0.010).abs() < 0.0008, "sample mean {mean}");
    }

    #[test]
    fn uniform_stays_in_bounds() {
        let model = Latency::Uniform(Duration::from_millis(1), Duration::from_millis(3));
        let mut rng = rand::rng();
        for _ in 0..1000 {
            let d = model.sample(&mut rng);
            assert!(d >= Duration::from_millis(1) && d <= Duration::from_millis(3));
        }
    }
}
