//! Reading the API server's own view from its `/metrics`: the webhook's
//! admission latency histogram and request and rejection counters, and the
//! requests it served by resource and verb, compared between two scrapes.

use std::collections::BTreeMap;

use prometheus_parse::{Sample, Scrape, Value};

/// The API server's latency of calls to admission webhooks.
pub const ADMISSION_DURATION: &str = "apiserver_admission_webhook_admission_duration_seconds";
/// The API server's count of webhook calls, by HTTP `code`.
pub const WEBHOOK_REQUESTS: &str = "apiserver_admission_webhook_request_total";
/// The API server's count of webhook calls that failed or were refused.
pub const WEBHOOK_REJECTIONS: &str = "apiserver_admission_webhook_rejection_count";

/// The API server's count of requests served, by `resource` and `verb`
/// (server-side apply counts as `APPLY`).
pub const REQUESTS: &str = "apiserver_request_total";

/// One scrape of a `/metrics` page.
pub struct Metrics(Scrape);

impl Metrics {
    /// Scrapes the API server that `client` talks to.
    pub async fn scrape(client: &kube::Client) -> anyhow::Result<Self> {
        let request = http::Request::get("/metrics").body(Vec::new())?;
        Self::parse(&client.request_text(request).await?)
    }

    /// Parses the Prometheus text format.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        Ok(Self(Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))?))
    }

    fn samples<'a>(
        &'a self,
        metric: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> {
        self.0.samples.iter().filter(move |s| {
            s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
    }

    /// The sum of the counters of `metric` whose labels include `labels`.
    pub fn counter(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(metric, labels)
            .map(|s| match s.value {
                Value::Counter(v) | Value::Untyped(v) | Value::Gauge(v) => v,
                _ => 0.0,
            })
            .sum()
    }

    /// The counters of `metric` added up by the values of the labels
    /// `keys` (a missing label counts as empty).
    pub fn counters_by(&self, metric: &str, keys: &[&str]) -> BTreeMap<Vec<String>, f64> {
        let mut sums = BTreeMap::new();
        for sample in self.samples(metric, &[]) {
            if let Value::Counter(v) | Value::Untyped(v) = sample.value {
                let key = keys
                    .iter()
                    .map(|k| sample.labels.get(k).unwrap_or_default().to_owned())
                    .collect();
                *sums.entry(key).or_insert(0.0) += v;
            }
        }
        sums
    }

    /// The histograms of `metric` whose labels include `labels`, added up.
    pub fn histogram(&self, metric: &str, labels: &[(&str, &str)]) -> Histogram {
        let mut sum = Histogram::default();
        for sample in self.samples(metric, labels) {
            if let Value::Histogram(buckets) = &sample.value {
                sum = sum.plus(&Histogram(
                    buckets.iter().map(|b| (b.less_than, b.count)).collect(),
                ));
            }
        }
        sum
    }
}

/// Cumulative buckets: (upper bound, observations at or below it), the
/// last bound `+Inf`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram(Vec<(f64, f64)>);

impl Histogram {
    fn combine(&self, other: &Self, sign: f64) -> Self {
        if self.0.is_empty() {
            return Self(other.0.iter().map(|&(le, n)| (le, sign * n)).collect());
        }
        Self(
            self.0
                .iter()
                .map(|&(le, n)| {
                    let theirs = other.0.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1);
                    (le, n + sign * theirs)
                })
                .collect(),
        )
    }

    /// Both histograms' observations (same bucket bounds).
    pub fn plus(&self, other: &Self) -> Self {
        self.combine(other, 1.0)
    }

    /// The observations made after `earlier` was scraped.
    pub fn since(&self, earlier: &Self) -> Self {
        self.combine(earlier, -1.0)
    }

    /// How many observations.
    pub fn count(&self) -> f64 {
        self.0.last().map_or(0.0, |b| b.1)
    }

    /// The `q` quantile, interpolated linearly inside its bucket as
    /// Prometheus' `histogram_quantile` does; `None` without observations.
    /// Returns the bucket's lower bound when it falls in the `+Inf` bucket.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let (mut lower, mut below) = (0.0, 0.0);
        for &(le, n) in &self.0 {
            if n >= rank {
                if le.is_infinite() {
                    return Some(lower);
                }
                let inside = n - below;
                let fraction = if inside > 0.0 {
                    (rank - below) / inside
                } else {
                    1.0
                };
                return Some(lower + (le - lower) * fraction);
            }
            (lower, below) = (le, n);
        }
        Some(lower)
    }

    /// The upper bound of the bucket the `q` quantile falls in: what the
    /// histogram can promise, without interpolation.
    pub fn bucket_bound(&self, q: f64) -> Option<f64> {
        let rank = q * self.count();
        (self.count() > 0.0)
            .then(|| self.0.iter().find(|b| b.1 >= rank).map(|b| b.0))
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"
# HELP apiserver_admission_webhook_admission_duration_seconds [STABLE] Admission webhook latency
# TYPE apiserver_admission_webhook_admission_duration_seconds histogram
apiserver_admission_webhook_admission_duration_seconds_bucket{name="a.example",operation="CREATE",rejected="false",type="admit",le="0.005"} 90
apiserver_admission_webhook_admission_duration_seconds_bucket{name="a.example",operation="CREATE",rejected="false",type="admit",le="0.025"} 98
apiserver_admission_webhook_admission_duration_seconds_bucket{name="a.example",operation="CREATE",rejected="false",type="admit",le="0.1"} 100
apiserver_admission_webhook_admission_duration_seconds_bucket{name="a.example",operation="CREATE",rejected="false",type="admit",le="+Inf"} 100
apiserver_admission_webhook_admission_duration_seconds_sum{name="a.example",operation="CREATE",rejected="false",type="admit"} 0.4
apiserver_admission_webhook_admission_duration_seconds_count{name="a.example",operation="CREATE",rejected="false",type="admit"} 100
apiserver_admission_webhook_admission_duration_seconds_bucket{name="a.example",operation="UPDATE",rejected="false",type="admit",le="0.005"} 7
apiserver_admission_webhook_admission_duration_seconds_bucket{name="a.example",operation="UPDATE",rejected="false",type="admit",le="0.025"} 7
apiserver_admission_webhook_admission_duration_seconds_bucket{name="a.example",operation="UPDATE",rejected="false",type="admit",le="0.1"} 7
apiserver_admission_webhook_admission_duration_seconds_bucket{name="a.example",operation="UPDATE",rejected="false",type="admit",le="+Inf"} 7
apiserver_admission_webhook_admission_duration_seconds_sum{name="a.example",operation="UPDATE",rejected="false",type="admit"} 0.01
apiserver_admission_webhook_admission_duration_seconds_count{name="a.example",operation="UPDATE",rejected="false",type="admit"} 7
# TYPE apiserver_admission_webhook_request_total counter
apiserver_admission_webhook_request_total{code="200",name="a.example",operation="CREATE",rejected="false",type="admit"} 100
apiserver_admission_webhook_request_total{code="500",name="a.example",operation="CREATE",rejected="true",type="admit"} 2
"#;

    #[test]
    fn counters_add_up_by_the_labels_asked_for() {
        let metrics = Metrics::parse(PAGE).expect("parses");
        let by_code = metrics.counters_by(WEBHOOK_REQUESTS, &["code", "absent"]);
        assert_eq!(
            by_code.into_iter().collect::<Vec<_>>(),
            [
                (vec!["200".to_owned(), String::new()], 100.0),
                (vec!["500".to_owned(), String::new()], 2.0)
            ]
        );
        let by_name = metrics.counters_by(WEBHOOK_REQUESTS, &["name"]);
        assert_eq!(by_name.get(&vec!["a.example".to_owned()]), Some(&102.0));
    }

    fn create() -> Histogram {
        let metrics = Metrics::parse(PAGE).expect("parses");
        metrics.histogram(ADMISSION_DURATION, &[("operation", "CREATE")])
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket_like_prometheus() {
        let h = create();
        assert_eq!(h.count(), 100.0, "UPDATE calls are left out");
        // p50: rank 50 of the 90 in [0, 5 ms].
        assert!((h.quantile(0.5).expect("p50") - 0.005 * 50.0 / 90.0).abs() < 1e-12);
        // p95: rank 95, 5 into the 8 of (5 ms, 25 ms].
        assert!((h.quantile(0.95).expect("p95") - (0.005 + 0.020 * 5.0 / 8.0)).abs() < 1e-12);
        assert_eq!(h.bucket_bound(0.99), Some(0.1));
        assert_eq!(h.bucket_bound(0.9), Some(0.005));
    }

    #[test]
    fn a_later_scrape_minus_an_earlier_one_is_what_happened_between() {
        let later = create().plus(&create());
        let between = later.since(&create());
        assert_eq!(between, create());
        assert_eq!(
            create().since(&create()).quantile(0.99),
            None,
            "nothing happened"
        );
    }

    #[test]
    fn counters_add_up_over_the_matching_labels() {
        let metrics = Metrics::parse(PAGE).expect("parses");
        assert_eq!(metrics.counter(WEBHOOK_REQUESTS, &[]), 102.0);
        assert_eq!(metrics.counter(WEBHOOK_REQUESTS, &[("code", "200")]), 100.0);
        assert_eq!(metrics.counter(WEBHOOK_REJECTIONS, &[]), 0.0);
    }
}
