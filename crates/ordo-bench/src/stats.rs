//! Small statistics: latency histograms (HdrHistogram, microseconds) reduced
//! to the percentiles the reports print, and the mean with its 95% confidence
//! interval (Student's t) for the experiment's error rates.

use hdrhistogram::Histogram;
use serde::Serialize;

/// A latency histogram in microseconds, 1 µs to 10 min, 3 significant digits.
#[derive(Debug, Clone)]
pub struct Latencies {
    histogram: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    pub fn new() -> Self {
        let histogram = Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds are valid");
        Self { histogram }
    }

    /// Records one value in nanoseconds; negative values (clock skew between
    /// two stamps of the same machine) count as zero.
    pub fn record_nanos(&mut self, nanos: i128) {
        let micros = (nanos.max(0) / 1000) as u64;
        self.histogram.saturating_record(micros.clamp(1, 600_000_000));
    }

    pub fn len(&self) -> u64 {
        self.histogram.len()
    }

    pub fn is_empty(&self) -> bool {
        self.histogram.is_empty()
    }

    /// p50, p99, p99.9, max and mean, in milliseconds.
    pub fn summary(&self) -> Option<LatencySummary> {
        if self.histogram.is_empty() {
            return None;
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Some(LatencySummary {
            count: self.histogram.len(),
            mean_ms: self.histogram.mean() / 1000.0,
            p50_ms: ms(self.histogram.value_at_quantile(0.50)),
            p99_ms: ms(self.histogram.value_at_quantile(0.99)),
            p999_ms: ms(self.histogram.value_at_quantile(0.999)),
            max_ms: ms(self.histogram.max()),
        })
    }
}

/// Percentiles of a [`Latencies`], in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// Mean, sample standard deviation and the half-width of the 95% confidence
/// interval of the mean (Student's t with n-1 degrees of freedom).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MeanCi {
    pub n: usize,
    pub mean: f64,
    pub std_dev: f64,
    pub ci95_half_width: f64,
}

pub fn mean_ci(values: &[f64]) -> MeanCi {
    let n = values.len();
    if n == 0 {
        return MeanCi { n, mean: 0.0, std_dev: 0.0, ci95_half_width: 0.0 };
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return MeanCi { n, mean, std_dev: 0.0, ci95_half_width: 0.0 };
    }
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let std_dev = variance.sqrt();
    MeanCi { n, mean, std_dev, ci95_half_width: t975(n - 1) * std_dev / (n as f64).sqrt() }
}

/// The 0.975 quantile of Student's t with `df` degrees of freedom.
fn t975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        1..=30 => TABLE[df - 1],
        31..=60 => 2.000 + (2.042 - 2.000) * (60 - df) as f64 / 30.0,
        61..=120 => 1.980 + (2.000 - 1.980) * (120 - df) as f64 / 60.0,
        _ => 1.960,
    }
}

/// The paper's equation 1: the smallest n with n ≥ (z·s/E)².
pub fn sample_size(z: f64, s: f64, e: f64) -> u64 {
    ((z * s / e).powi(2)).ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentiles_in_ms() {
        let mut h = Latencies::new();
        for i in 1..=1000 {
            h.record_nanos(i * 1_000_000);
        }
        let s = h.summary().expect("values");
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 500.0).abs() < 1.0, "{s:?}");
        assert!((s.p99_ms - 990.0).abs() < 1.0, "{s:?}");
        assert!(Latencies::new().summary().is_none());
        h.record_nanos(-5);
        assert_eq!(h.len(), 1001);
    }

    #[test]
    fn confidence_interval_of_known_samples() {
        let ci = mean_ci(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(ci.mean, 3.0);
        assert!((ci.std_dev - 1.5811).abs() < 1e-3);
        assert!((ci.ci95_half_width - 2.776 * 1.5811 / 5f64.sqrt()).abs() < 1e-3);
        let zeros = mean_ci(&[0.0; 389]);
        assert_eq!((zeros.mean, zeros.ci95_half_width), (0.0, 0.0));
    }

    #[test]
    fn the_papers_sample_size() {
        // s = 0.01366, E = ±0.001366 at 95%: (1.96 · 10)² = 384.2 → 385. The
        // paper reports 389, which (z·10)² gives for z ≈ 1.972.
        assert_eq!(sample_size(1.96, 0.01366, 0.001366), 385);
        assert_eq!(sample_size(1.9723, 0.01366, 0.001366), 389);
    }
}
