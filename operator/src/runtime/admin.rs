//! The admin server: `/metrics` (Prometheus text), `/healthz`, and
//! `/readyz` (ready once every cache has synced, or while standing by for
//! the lease).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    controller: String,
    result: String,
}

/// The operator's metrics: reconciles by controller and result.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    reconciles: Family<ReconcileLabels, Counter>,
}

impl Metrics {
    /// Counts one reconcile of `controller`.
    pub fn count(&self, controller: &str, ok: bool) {
        self.reconciles
            .get_or_create(&ReconcileLabels {
                controller: controller.into(),
                result: if ok { "ok" } else { "error" }.into(),
            })
            .inc();
    }
}

#[derive(Clone)]
struct Admin {
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
}

async fn encode_metrics(State(admin): State<Admin>) -> (StatusCode, String) {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &admin.registry) {
        Ok(()) => (StatusCode::OK, text),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn readiness(State(admin): State<Admin>) -> (StatusCode, &'static str) {
    if admin.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not synced\n")
    }
}

/// Binds `listen` and serves the admin endpoints in a background task;
/// `/readyz` reads `ready`.
pub async fn serve(
    listen: SocketAddr,
    metrics: &Metrics,
    ready: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let mut registry = Registry::default();
    registry.register(
        "ferrimesh_operator_reconciles",
        "Reconciles by controller and result",
        metrics.reconciles.clone(),
    );
    let admin = Admin {
        registry: Arc::new(registry),
        ready,
    };
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let app = Router::new()
        .route("/metrics", get(encode_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .with_state(admin);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(())
}
