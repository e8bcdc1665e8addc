//! What a request may cost before and during its review: the body must
//! arrive within a deadline and fit a global budget of buffered bytes, and
//! the review runs in a bounded pool of blocking threads, all before any of
//! it can hold up another client's review.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::admission::Refusal;

/// Bodies up to this size may use the part of the byte budget that larger
/// bodies may not: a few huge stalled bodies cannot starve ordinary pods.
pub const SMALL_BODY_BYTES: usize = 256 * 1024;

/// A global budget of buffered request-body bytes.
///
/// Bytes are taken as they arrive and given back when the request is
/// answered. A body larger than [`SMALL_BODY_BYTES`] may not take the last
/// quarter of the budget, which stays for small ones.
#[derive(Debug)]
pub struct BodyBudget {
    used: AtomicUsize,
    limit: usize,
    reserved_for_small: usize,
}

impl BodyBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            limit,
            reserved_for_small: limit / 4,
        })
    }

    /// Bytes buffered now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Takes `bytes` for a body that will be `body_len` bytes long (so far),
    /// or nothing when the budget cannot spare them.
    fn take(&self, bytes: usize, body_len: usize) -> bool {
        let ceiling = if body_len <= SMALL_BODY_BYTES {
            self.limit
        } else {
            self.limit - self.reserved_for_small
        };
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|after| *after <= ceiling)
            })
            .is_ok()
    }
}

/// Bytes of a [`BodyBudget`] held by one request, given back on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl Reservation {
    /// An empty reservation on `budget`.
    pub fn new(budget: &Arc<BodyBudget>) -> Self {
        Self {
            budget: Arc::clone(budget),
            bytes: 0,
        }
    }

    /// Grows the reservation to `total` bytes; false when the budget cannot
    /// spare them.
    fn grow_to(&mut self, total: usize) -> bool {
        if total <= self.bytes {
            return true;
        }
        if !self.budget.take(total - self.bytes, total) {
            return false;
        }
        self.bytes = total;
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Reads a whole body into one buffer owned by the request.
///
/// Each chunk is copied out of hyper's read buffer at once, so a body sent
/// in tiny pieces costs its length and not one read buffer per piece. The
/// body must be complete by `deadline` (else [`Refusal::Timeout`]), be at
/// most `max` bytes ([`Refusal::TooLarge`]) and fit the budget
/// ([`Refusal::Overloaded`]). A declared `Content-Length` is checked and
/// reserved before the first byte is read.
pub async fn read_body(
    body: Body,
    declared: Option<usize>,
    max: usize,
    reservation: &mut Reservation,
    deadline: tokio::time::Instant,
) -> Result<Vec<u8>, Refusal> {
    if let Some(declared) = declared {
        if declared > max {
            return Err(Refusal::TooLarge(max));
        }
        if !reservation.grow_to(declared) {
            return Err(Refusal::Overloaded);
        }
    }
    let mut buffer = Vec::with_capacity(declared.unwrap_or(0));
    let mut body = body;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(Refusal::Timeout),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(Refusal::BadRequest(format!("reading the body: {e}")));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let total = buffer.len().saturating_add(data.len());
        if total > max {
            return Err(Refusal::TooLarge(max));
        }
        if !reservation.grow_to(total) {
            return Err(Refusal::Overloaded);
        }
        buffer.extend_from_slice(&data);
    }
    Ok(buffer)
}

/// The bounded pool reviews run in: at most `workers` at once on blocking
/// threads, at most `queue` waiting for a worker or running (more wait for
/// a place in the queue). Reviews of bodies over [`SMALL_BODY_BYTES`] may
/// use all workers but one, so a stream of huge pods cannot make an
/// ordinary pod wait for one of them to finish.
#[derive(Debug, Clone)]
pub struct ReviewPool {
    queue: Arc<Semaphore>,
    workers: Arc<Semaphore>,
    large: Arc<Semaphore>,
}

impl ReviewPool {
    /// A pool of `workers` threads' worth of reviews, `queue` admitted at once.
    pub fn new(workers: usize, queue: usize) -> Self {
        let workers = workers.max(1);
        Self {
            queue: Arc::new(Semaphore::new(queue.max(1))),
            workers: Arc::new(Semaphore::new(workers)),
            large: Arc::new(Semaphore::new((workers - 1).max(1))),
        }
    }

    /// Runs `review` of a body of `body_len` bytes on a blocking thread once
    /// a worker is free. Fails with [`Refusal::Overloaded`] when no worker
    /// is free by `deadline`, and with [`Refusal::ReviewTimeout`] when the
    /// review has not finished by then (it runs to its end regardless, and
    /// keeps its worker until then, so slow reviews cannot pile up).
    pub async fn run<T, F>(
        &self,
        body_len: usize,
        deadline: tokio::time::Instant,
        review: F,
    ) -> Result<T, Refusal>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let permits = async {
            let queued = Arc::clone(&self.queue).acquire_owned().await?;
            let large = if body_len > SMALL_BODY_BYTES {
                Some(Arc::clone(&self.large).acquire_owned().await?)
            } else {
                None
            };
            let worker = Arc::clone(&self.workers).acquire_owned().await?;
            Ok::<_, tokio::sync::AcquireError>((queued, large, worker))
        };
        let (queued, large, worker): (
            OwnedSemaphorePermit,
            Option<OwnedSemaphorePermit>,
            OwnedSemaphorePermit,
        ) = match tokio::time::timeout_at(deadline, permits).await {
            Ok(Ok(permits)) => permits,
            Ok(Err(_)) | Err(_) => return Err(Refusal::Overloaded),
        };
        drop(queued);
        let task = tokio::task::spawn_blocking(move || {
            let _permits = (worker, large);
            review()
        });
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(Refusal::Internal(format!("the review stopped: {e}"))),
            Err(_) => Err(Refusal::ReviewTimeout),
        }
    }
}

/// Lets a log line through at most once per `interval` per key, counting
/// what it held back.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    last: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl LogLimiter {
    /// A limiter letting one line per key through every `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(lines held back since the last one)` when a line for `key` may
    /// be written now, `None` when it is to be held back.
    pub fn allow(&self, key: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut last = match self.last.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        match last.get_mut(key) {
            Some((at, held)) if now.duration_since(*at) < self.interval => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                let suppressed = *held;
                *at = now;
                *held = 0;
                Some(suppressed)
            }
            None => {
                last.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_bodies_leave_the_last_quarter_of_the_budget_to_small_ones() {
        let budget = BodyBudget::new(1024 * 1024);
        let mut large = Reservation::new(&budget);
        assert!(large.grow_to(512 * 1024));
        assert!(!large.grow_to(768 * 1024 + 1), "a large body stops at 3/4");
        assert!(large.grow_to(768 * 1024));
        let mut small = Reservation::new(&budget);
        assert!(small.grow_to(200 * 1024), "small bodies use the rest");
        let mut another = Reservation::new(&budget);
        assert!(!another.grow_to(100 * 1024), "the budget is spent");
        drop(large);
        assert_eq!(budget.used(), 200 * 1024, "bytes come back on drop");
        assert!(another.grow_to(10));
    }

    #[tokio::test]
    async fn reads_a_body_within_its_declared_length() {
        let budget = BodyBudget::new(1 << 20);
        let mut reservation = Reservation::new(&budget);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let body = read_body(Body::from("hello"), Some(5), 10, &mut reservation, deadline).await;
        assert_eq!(body, Ok(b"hello".to_vec()));
        assert_eq!(budget.used(), 5);
        let mut reservation = Reservation::new(&budget);
        let too_large = read_body(
            Body::from("hello world"),
            None,
            10,
            &mut reservation,
            deadline,
        )
        .await;
        assert_eq!(too_large, Err(Refusal::TooLarge(10)));
        let declared_too_large =
            read_body(Body::from("x"), Some(11), 10, &mut reservation, deadline).await;
        assert_eq!(declared_too_large, Err(Refusal::TooLarge(10)));
    }

    #[tokio::test]
    async fn refuses_a_body_the_budget_cannot_hold() {
        let budget = BodyBudget::new(8);
        let mut reservation = Reservation::new(&budget);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let refused = read_body(
            Body::from("0123456789"),
            Some(10),
            100,
            &mut reservation,
            deadline,
        )
        .await;
        assert_eq!(refused, Err(Refusal::Overloaded));
    }

    #[test]
    fn log_limiter_lets_one_line_per_interval_through_and_counts_the_rest() {
        let limiter = LogLimiter::new(Duration::from_secs(3600));
        assert_eq!(limiter.allow("a"), Some(0));
        assert_eq!(limiter.allow("a"), None);
        assert_eq!(limiter.allow("a"), None);
        assert_eq!(limiter.allow("b"), Some(0), "keys are limited apart");
        let limiter = LogLimiter::new(Duration::ZERO);
        assert_eq!(limiter.allow("a"), Some(0));
        assert_eq!(limiter.allow("a"), Some(0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_pool_waits_for_a_worker_until_the_deadline() {
        let pool = ReviewPool::new(1, 4);
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let later = tokio::time::Instant::now() + Duration::from_secs(10);
        let busy = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.run(1, later, move || {
                    let _ = started_tx.send(());
                    let _ = release_rx.recv();
                    1
                })
                .await
            })
        };
        tokio::task::spawn_blocking(move || started_rx.recv())
            .await
            .expect("join")
            .expect("the first review started");
        let soon = tokio::time::Instant::now() + Duration::from_millis(50);
        assert_eq!(pool.run(1, soon, || 2).await, Err(Refusal::Overloaded));
        let waiting = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(1, later, || 3).await })
        };
        release_tx.send(()).expect("release");
        assert_eq!(busy.await.expect("join"), Ok(1));
        assert_eq!(waiting.await.expect("join"), Ok(3), "a waiting review runs");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_reviews_leave_a_worker_to_small_ones() {
        let pool = ReviewPool::new(2, 8);
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let later = tokio::time::Instant::now() + Duration::from_secs(10);
        let busy = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.run(SMALL_BODY_BYTES + 1, later, move || {
                    let _ = started_tx.send(());
                    let _ = release_rx.recv();
                })
                .await
            })
        };
        tokio::task::spawn_blocking(move || started_rx.recv())
            .await
            .expect("join")
            .expect("the large review started");
        let soon = tokio::time::Instant::now() + Duration::from_millis(100);
        assert_eq!(
            pool.run(SMALL_BODY_BYTES + 1, soon, || 2).await,
            Err(Refusal::Overloaded),
            "a second large review waits"
        );
        assert_eq!(pool.run(10, later, || 3).await, Ok(3), "a small one runs");
        release_tx.send(()).expect("release");
        assert_eq!(busy.await.expect("join"), Ok(()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_review_past_the_deadline_is_answered_at_the_deadline() {
        let pool = ReviewPool::new(1, 4);
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let soon = tokio::time::Instant::now() + Duration::from_millis(50);
        let answer = pool
            .run(1, soon, move || {
                let _ = release_rx.recv();
            })
            .await;
        assert_eq!(answer, Err(Refusal::ReviewTimeout));
        release_tx.send(()).expect("release");
    }
}
