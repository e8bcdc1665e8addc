//! What a connection may cost before it sends a request: at most
//! `max_connections` are open at once (past it, a new one is closed as soon
//! as it is accepted), and the CPU-heavy step of a TLS handshake (the key
//! exchange and the signature, done on the client's first message) runs on
//! a few threads of its own, one handshake each at a time, never on the
//! threads that serve requests. A flood of new connections then waits its
//! turn for those threads, while the requests of clients already connected
//! with keep-alive (the API server) are served at once.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Context, Poll};
use std::time::Duration;

use axum_server::accept::Accept;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

use super::limits::LogLimiter;
use super::metrics::Metrics;

/// Why a connection was closed before it could send a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// `max_connections` were open already.
    ConnectionLimit,
    /// The TLS handshake was not done within the handshake timeout
    /// (waiting for a handshake thread included).
    HandshakeTimeout,
    /// The TLS handshake failed (not TLS, no common cipher, a client
    /// certificate refused, the peer gone).
    HandshakeFailed,
}

impl Closed {
    /// The `reason` label of `ferrimesh_webhook_connections_closed_total`.
    pub fn metric_label(self) -> &'static str {
        match self {
            Self::ConnectionLimit => "connection_limit",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::HandshakeFailed => "handshake_failed",
        }
    }
}

/// Work for a handshake thread.
type Job = Box<dyn FnOnce() + Send>;

/// Starts `count` threads that run the jobs sent on the returned channel,
/// in turn; they end when every sender is dropped.
fn start_handshake_threads(count: usize) -> io::Result<mpsc::Sender<Job>> {
    let (jobs, queue) = mpsc::channel::<Job>();
    let queue = Arc::new(Mutex::new(queue));
    for n in 0..count.max(1) {
        let queue = Arc::clone(&queue);
        std::thread::Builder::new()
            .name(format!("tls-handshake-{n}"))
            .spawn(move || {
                loop {
                    let next = match queue.lock() {
                        Ok(queue) => queue.recv(),
                        Err(poisoned) => poisoned.into_inner().recv(),
                    };
                    match next {
                        Ok(job) => job(),
                        Err(_) => break,
                    }
                }
            })?;
    }
    Ok(jobs)
}

/// Accepts TLS connections within the limits (an `axum_server` acceptor).
#[derive(Clone)]
pub struct LimitedTlsAcceptor {
    tls: Arc<ServerConfig>,
    open: Arc<Semaphore>,
    handshakes: mpsc::Sender<Job>,
    handshake_timeout: Duration,
    metrics: Metrics,
    log_limiter: Arc<LogLimiter>,
}

impl LimitedTlsAcceptor {
    /// At most `max_connections` open, handshakes computed on
    /// `handshake_threads` threads of their own, each done within
    /// `handshake_timeout` of the connection's acceptance. Fails when the
    /// threads cannot be started.
    pub fn new(
        tls: Arc<ServerConfig>,
        max_connections: usize,
        handshake_threads: usize,
        handshake_timeout: Duration,
        metrics: Metrics,
        log_limiter: Arc<LogLimiter>,
    ) -> io::Result<Self> {
        Ok(Self {
            tls,
            open: Arc::new(Semaphore::new(max_connections.max(1))),
            handshakes: start_handshake_threads(handshake_threads)?,
            handshake_timeout,
            metrics,
            log_limiter,
        })
    }

    /// Counts and logs (at most once a second per reason) a closed connection.
    fn closed(&self, why: Closed, error: Option<&io::Error>) {
        self.metrics.connection_closed(why.metric_label());
        if let Some(suppressed) = self.log_limiter.allow(why.metric_label()) {
            tracing::warn!(
                reason = why.metric_label(),
                error = error.map(tracing::field::display),
                suppressed,
                "connection closed before its first request"
            );
        }
    }

    /// The TLS handshake on `tcp`: the client's first message is read here;
    /// what it takes to answer it is computed on a handshake thread, in
    /// turn with the other new connections.
    async fn handshake(&self, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
        let config = Arc::clone(&self.tls);
        let (answer, answered) = oneshot::channel();
        self.handshakes
            .send(Box::new(move || {
                let _ = answer.send(start.into_stream(config));
            }))
            .map_err(|_| io::Error::other("no handshake thread"))?;
        let rest = answered.await.map_err(io::Error::other)?;
        rest.await
    }

    async fn accept_tls(&self, tcp: TcpStream) -> io::Result<Limited<TlsStream<TcpStream>>> {
        let Ok(permit) = Arc::clone(&self.open).try_acquire_owned() else {
            self.closed(Closed::ConnectionLimit, None);
            return Err(io::Error::other("too many open connections"));
        };
        let place = Place::new(permit, &self.metrics);
        // TCP_NODELAY: a response leaves at once, not held back by Nagle.
        tcp.set_nodelay(true)?;
        match tokio::time::timeout(self.handshake_timeout, self.handshake(tcp)).await {
            Ok(Ok(stream)) => Ok(Limited {
                stream,
                _place: place,
            }),
            Ok(Err(e)) => {
                self.closed(Closed::HandshakeFailed, Some(&e));
                Err(e)
            }
            Err(_) => {
                self.closed(Closed::HandshakeTimeout, None);
                Err(io::ErrorKind::TimedOut.into())
            }
        }
    }
}

impl<S: Send + 'static> Accept<TcpStream, S> for LimitedTlsAcceptor {
    type Stream = Limited<TlsStream<TcpStream>>;
    type Service = S;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Self::Stream, S)>> + Send>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let acceptor = self.clone();
        Box::pin(async move {
            let stream = acceptor.accept_tls(stream).await?;
            Ok((stream, service))
        })
    }
}

/// A connection's place among the open ones, counted in
/// `ferrimesh_webhook_open_connections` while it is held.
struct Place {
    _permit: OwnedSemaphorePermit,
    metrics: Metrics,
}

impl Place {
    fn new(permit: OwnedSemaphorePermit, metrics: &Metrics) -> Self {
        metrics.open_connections.inc();
        Self {
            _permit: permit,
            metrics: metrics.clone(),
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.metrics.open_connections.dec();
    }
}

/// An established connection, holding its place among the open ones until
/// it is dropped.
pub struct Limited<T> {
    stream: T,
    _place: Place,
}

impl<T: AsyncRead + Unpin> AsyncRead for Limited<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Limited<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
