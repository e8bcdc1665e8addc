//! Knowing when a cache holds its first full list, for any number of
//! waiters.
//!
//! A kube-runtime `Store::wait_until_ready` keeps a single waker: when two
//! tasks wait, only the one that polled last is woken, and the other stalls
//! until something else happens to wake it. [`Synced`] is a watch channel
//! set from the event stream that fills the cache, so every waiter wakes.

use kube::runtime::watcher;
use tokio::sync::watch;

/// Creates a not-yet-synced pair: the half the cache's event stream
/// feeds, and the half that waits.
pub fn synced() -> (MarkSynced, Synced) {
    let (tx, rx) = watch::channel(false);
    (MarkSynced(tx), Synced(rx))
}

/// Marks a cache synced once its event stream completes its first list.
#[derive(Debug)]
pub struct MarkSynced(watch::Sender<bool>);

impl MarkSynced {
    /// Looks at one event of the cache's stream: the end of a list marks
    /// the cache synced (for good: a re-list keeps the last state meanwhile).
    pub fn observe<K, E>(&self, event: &Result<watcher::Event<K>, E>) {
        if matches!(event, Ok(watcher::Event::InitDone)) {
            self.0
                .send_if_modified(|synced| !std::mem::replace(synced, true));
        }
    }
}

/// Waits for a cache to be synced; cheap to clone, one per waiter.
#[derive(Debug, Clone)]
pub struct Synced(watch::Receiver<bool>);

impl Synced {
    /// Resolves once the cache is synced: `true`, or `false` if its event
    /// stream was dropped before.
    pub async fn wait(&self) -> bool {
        self.0.clone().wait_for(|synced| *synced).await.is_ok()
    }
}

/// Resolves once every one of `caches` is synced (`false` if one never
/// will be).
pub async fn all(caches: &[&Synced]) -> bool {
    for cache in caches {
        if !cache.wait().await {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    type Event = Result<watcher::Event<()>, ()>;

    #[tokio::test(start_paused = true)]
    async fn every_waiter_wakes_when_the_first_list_ends() {
        let (mark, synced) = synced();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let synced = synced.clone();
                tokio::spawn(async move { synced.wait().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        mark.observe(&Event::Ok(watcher::Event::Init));
        mark.observe(&Event::Ok(watcher::Event::InitApply(())));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            waiters.iter().all(|w| !w.is_finished()),
            "not synced before the list ends"
        );
        mark.observe(&Event::Ok(watcher::Event::InitDone));
        for waiter in waiters {
            let woke = tokio::time::timeout(Duration::from_secs(1), waiter).await;
            assert!(woke.expect("woken").expect("task"), "synced");
        }
        assert!(all(&[&synced, &synced]).await, "stays synced");
    }

    #[tokio::test]
    async fn a_cache_whose_stream_is_gone_never_syncs() {
        let (mark, synced) = synced();
        mark.observe(&Event::Err(()));
        drop(mark);
        assert!(!synced.wait().await);
        assert!(!all(&[&synced]).await);
    }
}
