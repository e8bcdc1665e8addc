//! The HTTPS admission server and the plain-HTTP admin server.
//!
//! `/inject` (and Istio's `/inject/cluster/<id>/net/<network>` form) over
//! TLS; `/metrics`, `/healthz` and `/readyz` on the admin port. `/readyz`
//! turns ready once the configuration source has synced and unready as soon
//! as shutdown starts, so endpoints drop the replica before it stops.

pub mod admission;
pub mod connections;
pub mod limits;
pub mod metrics;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum_server::Handle;
use hyper_util::rt::TokioTimer;
use prometheus_client::registry::Registry;
use rustls::ServerConfig;

use self::admission::Refusal;
use self::connections::LimitedTlsAcceptor;
use self::limits::{BodyBudget, LogLimiter, Reservation, ReviewPool};
use self::metrics::Metrics;
use crate::config::ConfigSource;

/// The largest AdmissionReview accepted (larger bodies get 413).
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// Read buffer of one connection: enough for any request head, and the
/// most hyper holds for a connection at a time.
const CONNECTION_BUFFER_BYTES: usize = 64 * 1024;

/// How the servers run.
pub struct Settings {
    /// Address of the HTTPS admission server.
    pub listen: SocketAddr,
    /// Address of the plain-HTTP admin server.
    pub admin_listen: SocketAddr,
    /// TLS configuration (certificate reloading included).
    pub tls: Arc<ServerConfig>,
    /// Connections open at once, in their handshake or established; past
    /// it, a new connection is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Threads of their own computing TLS handshakes (key exchange and
    /// signature), one handshake each at a time; new connections wait
    /// for one, requests on established connections never do.
    pub handshake_threads: usize,
    /// Where the mesh configuration comes from.
    pub source: Arc<dyn ConfigSource>,
    /// Reviews waiting for a worker or running; more wait for a place
    /// until the request deadline (then 503).
    pub max_concurrent_requests: usize,
    /// Reviews running at once, each on a blocking thread.
    pub review_workers: usize,
    /// Request-body bytes buffered at once, all requests together; past
    /// it, 503 with `Retry-After`.
    pub max_buffered_body_bytes: usize,
    /// Time allowed to complete the TLS handshake and send a request's headers.
    pub header_timeout: Duration,
    /// Time allowed for the body, counted from the end of the headers
    /// (408 past it); the body takes no review slot meanwhile.
    pub body_timeout: Duration,
    /// Time allowed for a whole request after its headers: body, wait for a
    /// worker and review (503 when the review is not done by then).
    pub request_timeout: Duration,
    /// After SIGTERM: time during which `/readyz` is 503 and requests are
    /// still accepted and served, so endpoints can drop the replica.
    pub shutdown_delay: Duration,
    /// Time in-flight requests get to finish after the delay.
    pub shutdown_grace: Duration,
}

#[derive(Clone)]
struct AppState {
    source: Arc<dyn ConfigSource>,
    metrics: Metrics,
    registry: Arc<Registry>,
    stopping: Arc<AtomicBool>,
    budget: Arc<BodyBudget>,
    pool: ReviewPool,
    body_timeout: Duration,
    request_timeout: Duration,
    log_limiter: Arc<LogLimiter>,
}

fn json_error(status: StatusCode, message: String) -> Response {
    let body = serde_json::json!({ "error": message }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Counts, logs (at most once a second per kind) and answers a refusal.
fn refuse(state: &AppState, path: &str, refusal: &Refusal) -> Response {
    let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::BAD_REQUEST);
    if refusal != &Refusal::NotFound
        && let Some(suppressed) = state.log_limiter.allow(refusal.metric_label())
    {
        tracing::warn!(
            path,
            status = status.as_u16(),
            error = %refusal.message(),
            suppressed,
            "admission request refused"
        );
    }
    let mut response = json_error(status, refusal.message());
    if let Some(seconds) = refusal.retry_after() {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// Counts a refusal that never reached [`admission::review`].
fn refuse_early(state: &AppState, path: &str, refusal: &Refusal) -> Response {
    state.metrics.requests.inc();
    state.metrics.fail(refusal.metric_label());
    refuse(state, path, refusal)
}

async fn inject(State(state): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    if parts.method != Method::POST {
        let mut response = refuse_early(&state, &path, &Refusal::MethodNotAllowed);
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let started = tokio::time::Instant::now();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let mut reservation = Reservation::new(&state.budget);
    let body = match limits::read_body(
        body,
        declared,
        MAX_BODY_BYTES,
        &mut reservation,
        started + state.body_timeout,
    )
    .await
    {
        Ok(body) => body,
        Err(refusal) => return refuse_early(&state, &path, &refusal),
    };
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let reviewed = {
        let (source, metrics, path) = (
            Arc::clone(&state.source),
            state.metrics.clone(),
            path.clone(),
        );
        state
            .pool
            .run(body.len(), started + state.request_timeout, move || {
                // The body's bytes stay reserved until the review is done.
                let _reservation = reservation;
                admission::review(
                    &path,
                    content_type.as_deref(),
                    &body,
                    source.as_ref(),
                    &metrics,
                )
            })
            .await
    };
    match reviewed {
        Ok(Ok(answer)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            answer.body,
        )
            .into_response(),
        Ok(Err(refusal)) => refuse(&state, &path, &refusal),
        Err(refusal) => refuse_early(&state, &path, &refusal),
    }
}

async fn not_found(State(state): State<AppState>, request: Request) -> Response {
    refuse(&state, request.uri().path(), &Refusal::NotFound)
}

/// While shutting down, every answer asks the client to close its
/// connection, so its next request opens a new one, which the Service
/// routes to a replica that is still ready.
async fn close_when_stopping(State(state): State<AppState>, mut response: Response) -> Response {
    if state.stopping.load(Ordering::Acquire) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The admission router: `/inject`, `/inject/`, `/inject/<params>`.
fn admission_router(state: AppState) -> Router {
    Router::new()
        .route("/inject", any(inject))
        .route("/inject/", any(inject))
        .route("/inject/{*params}", any(inject))
        .fallback(not_found)
        .layer(axum::middleware::map_response_with_state(
            state.clone(),
            close_when_stopping,
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
    delay: Duration,
    grace: Duration,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
    admin_served: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Binds both servers and starts serving.
pub async fn start(settings: Settings) -> anyhow::Result<Running> {
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let budget = BodyBudget::new(settings.max_buffered_body_bytes);
    let stopping = Arc::new(AtomicBool::new(false));
    let state = AppState {
        source: Arc::clone(&settings.source),
        metrics,
        registry: Arc::new(registry),
        stopping: Arc::clone(&stopping),
        budget,
        pool: ReviewPool::new(settings.review_workers, settings.max_concurrent_requests),
        body_timeout: settings.body_timeout,
        request_timeout: settings.request_timeout,
        log_limiter: Arc::new(LogLimiter::new(Duration::from_secs(1))),
    };

    let handle = Handle::new();
    let acceptor = LimitedTlsAcceptor::new(
        Arc::clone(&settings.tls),
        settings.max_connections,
        settings.handshake_threads,
        settings.header_timeout,
        state.metrics.clone(),
        Arc::clone(&state.log_limiter),
    )?;
    let mut server = axum_server::bind(settings.listen)
        .acceptor(acceptor)
        .handle(handle.clone())
        .http1_only();
    server
        .http_builder()
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_buf_size(CONNECTION_BUFFER_BYTES);
    let app = admission_router(state.clone());
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
        delay: settings.shutdown_delay,
        grace: settings.shutdown_grace,
        served,
        admin_served,
    })
}

impl Running {
    /// Stops without losing an admission: `/readyz` turns unready at once
    /// while requests are still accepted and served for the shutdown delay
    /// (each answer asking its client to reconnect), so endpoints drop the
    /// replica first; then no new connections are accepted, in-flight
    /// requests finish (within the grace period), and both servers stop.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stopping.store(true, Ordering::Release);
        tracing::info!(delay = ?self.delay, grace = ?self.grace, "shutting down: unready, still serving");
        tokio::time::sleep(self.delay).await;
        tracing::info!("shutdown delay over: draining");
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
