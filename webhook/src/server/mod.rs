//! The HTTPS admission server and the plain-HTTP admin server.
//!
//! `/inject` (and Istio's `/inject/cluster/<id>/net/<network>` form) over
//! TLS; `/metrics`, `/healthz` and `/readyz` on the admin port. `/readyz`
//! turns ready once the configuration source has synced and unready as soon
//! as shutdown starts, so endpoints drop the replica before it stops.

pub mod admission;
pub mod metrics;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum_server::Handle;
use axum_server::accept::NoDelayAcceptor;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use hyper_util::rt::TokioTimer;
use prometheus_client::registry::Registry;
use rustls::ServerConfig;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use self::admission::Refusal;
use self::metrics::Metrics;
use crate::config::ConfigSource;

/// The largest AdmissionReview accepted (larger bodies get 413).
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// How the servers run.
pub struct Settings {
    /// Address of the HTTPS admission server.
    pub listen: SocketAddr,
    /// Address of the plain-HTTP admin server.
    pub admin_listen: SocketAddr,
    /// TLS configuration (certificate reloading included).
    pub tls: Arc<ServerConfig>,
    /// Where the mesh configuration comes from.
    pub source: Arc<dyn ConfigSource>,
    /// Admissions handled at once; more wait their turn.
    pub max_concurrent_requests: usize,
    /// Time allowed to receive a request's headers.
    pub header_timeout: Duration,
    /// Time allowed for a whole request, body included.
    pub request_timeout: Duration,
    /// Time in-flight requests get to finish on shutdown.
    pub shutdown_grace: Duration,
}

#[derive(Clone)]
struct AppState {
    source: Arc<dyn ConfigSource>,
    metrics: Metrics,
    registry: Arc<Registry>,
    stopping: Arc<AtomicBool>,
}

fn json_error(status: StatusCode, message: String) -> Response {
    let body = serde_json::json!({ "error": message }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn inject(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let path = uri.path().to_owned();
    let source = Arc::clone(&state.source);
    let metrics = state.metrics.clone();
    let result = admission::review(&path, content_type, &body, source.as_ref(), &metrics);
    match result {
        Ok(answer) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            answer.body,
        )
            .into_response(),
        Err(refusal) => {
            let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::BAD_REQUEST);
            if refusal != Refusal::NotFound {
                tracing::warn!(path, status = status.as_u16(), error = %refusal.message(), "admission request refused");
            }
            json_error(status, refusal.message())
        }
    }
}

async fn not_found() -> Response {
    json_error(StatusCode::NOT_FOUND, Refusal::NotFound.message())
}

/// The admission router: `/inject`, `/inject/`, `/inject/<params>`.
fn admission_router(state: AppState, settings: &Settings) -> Router {
    Router::new()
        .route("/inject", post(inject))
        .route("/inject/", post(inject))
        .route("/inject/{*params}", post(inject))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            settings.request_timeout,
        ))
        .layer(GlobalConcurrencyLimitLayer::new(
            settings.max_concurrent_requests,
        ))
        .with_state(state)
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn ready(State(state): State<AppState>) -> Response {
    if state.stopping.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else if state.source.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "configuration not synced yet\n",
        )
            .into_response()
    }
}

fn admin_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(state)
}

/// The running servers.
pub struct Running {
    /// Bound address of the admission server.
    pub addr: SocketAddr,
    /// Bound address of the admin server.
    pub admin_addr: SocketAddr,
    handle: Handle<SocketAddr>,
    admin_handle: Handle<SocketAddr>,
    stopping: Arc<AtomicBool>,
    grace: Duration,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
    admin_served: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Binds both servers and starts serving.
pub async fn start(settings: Settings) -> anyhow::Result<Running> {
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let stopping = Arc::new(AtomicBool::new(false));
    let state = AppState {
        source: Arc::clone(&settings.source),
        metrics,
        registry: Arc::new(registry),
        stopping: Arc::clone(&stopping),
    };

    let handle = Handle::new();
    // TCP_NODELAY: a response leaves at once, not held back by Nagle.
    let acceptor = RustlsAcceptor::new(RustlsConfig::from_config(Arc::clone(&settings.tls)))
        .acceptor(NoDelayAcceptor::new());
    let mut server = axum_server::bind(settings.listen)
        .acceptor(acceptor)
        .handle(handle.clone())
        .http1_only();
    server
        .http_builder()
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout);
    let app = admission_router(state.clone(), &settings);
    let served = tokio::spawn(server.serve(app.into_make_service()));

    let admin_handle = Handle::new();
    let admin = axum_server::bind(settings.admin_listen).handle(admin_handle.clone());
    let admin_served = tokio::spawn(admin.serve(admin_router(state).into_make_service()));

    let (Some(addr), Some(admin_addr)) = (handle.listening().await, admin_handle.listening().await)
    else {
        let failed = if served.is_finished() {
            served.await
        } else {
            admin_served.await
        };
        return Err(match failed {
            Ok(Err(e)) => anyhow::anyhow!("cannot listen: {e}"),
            _ => anyhow::anyhow!(
                "cannot listen on {} / {}",
                settings.listen,
                settings.admin_listen
            ),
        });
    };
    tracing::info!(%addr, %admin_addr, "serving admission reviews");
    Ok(Running {
        addr,
        admin_addr,
        handle,
        admin_handle,
        stopping,
        grace: settings.shutdown_grace,
        served,
        admin_served,
    })
}

impl Running {
    /// Stops gracefully: `/readyz` turns unready, no new connections are
    /// accepted, in-flight requests finish (within the grace period), then
    /// both servers stop.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stopping.store(true, Ordering::Release);
        tracing::info!(grace = ?self.grace, "shutting down");
        self.handle.graceful_shutdown(Some(self.grace));
        let served = self.served.await;
        self.admin_handle
            .graceful_shutdown(Some(Duration::from_secs(1)));
        let admin_served = self.admin_served.await;
        served??;
        admin_served??;
        Ok(())
    }
}
