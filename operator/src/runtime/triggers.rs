//! Streams that trigger reconciles, and turning a busy watch into few
//! reconciles: at ten thousand pods, the
//! WorkloadEntry watch brings thousands of events a minute, and each used
//! to reconcile every Mesh. [`throttle`] passes the first event at once and
//! then at most one per period, so a burst costs a reconcile or two while
//! the last change is never lost.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

/// At most one `()` per `period` while `events` has events: the first at
/// once, later ones at the end of the period they fell in. Every event of
/// `events` is consumed as it comes (so a reflector behind it stays
/// current); the stream ends when `events` does.
pub fn throttle<S>(events: S, period: Duration) -> impl Stream<Item = ()> + Send
where
    S: Stream + Send + Unpin + 'static,
{
    futures::stream::unfold(
        (events, None::<Instant>, false),
        move |(mut events, mut quiet_until, mut pending)| async move {
            loop {
                let deadline = quiet_until.filter(|_| pending);
                let due = async {
                    match deadline {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    event = events.next() => {
                        event?;
                        if quiet_until.is_some_and(|t| Instant::now() < t) {
                            pending = true;
                            continue;
                        }
                    }
                    () = due => {}
                }
                pending = false;
                quiet_until = Some(Instant::now() + period);
                return Some(((), (events, quiet_until, pending)));
            }
        },
    )
}

/// A stream of the items an unbounded channel receives.
pub fn received<T>(mut rx: mpsc::UnboundedReceiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A stream that yields once every `period`, the first time after one period.
pub fn every(period: Duration) -> impl futures::Stream<Item = ()> + Send {
    futures::stream::unfold((), move |()| async move {
        tokio::time::sleep(period).await;
        Some(((), ()))
    })
}

/// A stream that yields each time `notify` is notified.
pub fn notified(notify: Arc<Notify>) -> futures::stream::BoxStream<'static, ()> {
    futures::stream::unfold(notify, |notify| async move {
        notify.notified().await;
        Some(((), notify))
    })
    .boxed()
}

/// A stream that yields each time the value behind `rx` changes.
pub fn changes<T: Send + Sync + 'static>(
    rx: watch::Receiver<T>,
) -> impl futures::Stream<Item = ()> + Send {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    })
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_becomes_one_trigger_now_and_one_at_the_end_of_the_period() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<u32>();
        let mut triggers = Box::pin(throttle(rx, Duration::from_secs(1)));
        for i in 0..1000 {
            tx.unbounded_send(i).expect("send");
        }
        let started = Instant::now();
        assert_eq!(
            triggers.next().await,
            Some(()),
            "the first event passes at once"
        );
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(
            triggers.next().await,
            Some(()),
            "the rest of the burst: one more"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        // Quiet: nothing more until the next event, which passes at once.
        let waited = tokio::time::timeout(Duration::from_secs(5), triggers.next()).await;
        assert!(waited.is_err(), "no event, no trigger");
        tx.unbounded_send(7).expect("send");
        let before = Instant::now();
        assert_eq!(triggers.next().await, Some(()));
        assert_eq!(before.elapsed(), Duration::ZERO);
        drop(tx);
        assert_eq!(triggers.next().await, None, "ends with its events");
    }
}
