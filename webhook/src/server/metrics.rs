//! The webhook's Prometheus metrics, under Istio's names.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Why an admission skipped injection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkipLabels {
    /// A `Reason::metric_label()`.
    pub reason: String,
}

/// What kind of failure an admission ended in.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// `rejected` (a bad value in the pod), `invalid_request` (unreadable
    /// review), `body_too_large` (413), `body_timeout` (408), `overloaded`
    /// (503: the body budget or the review queue is full),
    /// `review_timeout` (503: no answer in time) or `internal`.
    pub r#type: String,
}

/// Why a connection was closed before its first request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabels {
    /// `connection_limit` (too many open connections), `handshake_timeout`
    /// or `handshake_failed`.
    pub reason: String,
}

/// The metric families, registered once.
#[derive(Clone)]
pub struct Metrics {
    /// Every admission review received.
    pub requests: Counter,
    /// Pods injected.
    pub success: Counter,
    /// Pods not injected, by reason.
    pub skip: Family<SkipLabels, Counter>,
    /// Reviews that failed, by type.
    pub failure: Family<FailureLabels, Counter>,
    /// Time spent per admission, in seconds.
    pub time: Histogram,
    /// Connections closed before their first request, by reason.
    pub connections_closed: Family<ClosedLabels, Counter>,
    /// Connections open now (in their TLS handshake or established).
    pub open_connections: Gauge,
}

impl Metrics {
    /// Creates the families and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: Counter::default(),
            success: Counter::default(),
            skip: Family::default(),
            failure: Family::default(),
            time: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            connections_closed: Family::default(),
            open_connections: Gauge::default(),
        };
        registry.register(
            "sidecar_injection_requests",
            "Total number of sidecar injection requests",
            metrics.requests.clone(),
        );
        registry.register(
            "sidecar_injection_success",
            "Total number of successful sidecar injection requests",
            metrics.success.clone(),
        );
        registry.register(
            "sidecar_injection_skip",
            "Total number of skipped sidecar injection requests",
            metrics.skip.clone(),
        );
        registry.register(
            "sidecar_injection_failure",
            "Total number of failed sidecar injection requests",
            metrics.failure.clone(),
        );
        registry.register(
            "sidecar_injection_time_seconds",
            "Time taken by sidecar injection requests",
            metrics.time.clone(),
        );
        registry.register(
            "ferrimesh_webhook_connections_closed",
            "Connections closed before their first request, by reason",
            metrics.connections_closed.clone(),
        );
        registry.register(
            "ferrimesh_webhook_open_connections",
            "Connections open now, in their TLS handshake or established",
            metrics.open_connections.clone(),
        );
        metrics
    }

    /// Counts a connection closed before its first request.
    pub fn connection_closed(&self, reason: &str) {
        self.connections_closed
            .get_or_create(&ClosedLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts a failure of the given type.
    pub fn fail(&self, kind: &str) {
        self.failure
            .get_or_create(&FailureLabels {
                r#type: kind.to_owned(),
            })
            .inc();
    }

    /// Counts a skip for the given reason.
    pub fn skip(&self, reason: &str) {
        self.skip
            .get_or_create(&SkipLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }
}
