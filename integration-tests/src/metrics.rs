//! Scraping a service's Prometheus endpoint (`--metrics-listen`, on a free
//! port the testkit chose) and reading the parsed samples
//! (`prometheus-parse`, a real parser of the text format).

use std::time::Duration;

use anyhow::Context as _;
pub use prometheus_parse::{Sample, Scrape, Value};

/// `GET url` and parse the Prometheus text format.
pub async fn scrape(url: &str) -> anyhow::Result<Metrics> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let response = client.get(url).send().await.with_context(|| format!("GET {url}"))?;
    let status = response.status();
    let text = response.text().await.with_context(|| format!("reading {url}"))?;
    anyhow::ensure!(status.is_success(), "GET {url}: {status}: {text}");
    let scrape = Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).context("parsing the scrape")?;
    Ok(Metrics { scrape, text })
}

/// One parsed scrape, and its text (for failure messages).
#[derive(Debug)]
pub struct Metrics {
    pub scrape: Scrape,
    pub text: String,
}

impl Metrics {
    /// Samples named `name` whose labels include every `(label, value)`.
    pub fn samples<'a>(&'a self, name: &'a str, labels: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = &'a Sample> {
        self.scrape
            .samples
            .iter()
            .filter(move |s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
    }

    /// The sum of the counter, gauge or untyped samples `name` matching
    /// `labels` (0 when there are none: an unused counter is absent).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name, labels)
            .map(|s| match &s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
                Value::Histogram(_) | Value::Summary(_) => 0.0,
            })
            .sum()
    }

    /// Whether any sample is named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.scrape.samples.iter().any(|s| s.metric == name)
    }

    /// How many observations histogram `name` (matching `labels`) holds: its
    /// `+Inf` bucket, or its `_count` sample.
    pub fn histogram_count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let from_buckets: f64 = self
            .samples(name, labels)
            .filter_map(|s| match &s.value {
                Value::Histogram(buckets) => buckets.iter().find(|b| b.less_than.is_infinite()).map(|b| b.count),
                _ => None,
            })
            .sum();
        if from_buckets > 0.0 { from_buckets } else { self.sum(&format!("{name}_count"), labels) }
    }
}
