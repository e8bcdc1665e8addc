//! Leader election: among replicas, only the holder of a
//! `coordination.k8s.io` Lease reconciles; the others stand by and take over
//! within the lease duration when it dies.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;

use crate::{Error, Result};

/// Leader election among replicas with a `coordination.k8s.io` Lease.
#[derive(Clone, Debug)]
pub struct LeaderElection {
    /// Name of the Lease, in the operator's namespace.
    pub lease_name: String,
    /// How long a holder keeps the lease without renewing it.
    pub lease_duration: Duration,
}

/// Runs a `term` of reconciling each time this replica (`identity`) takes
/// the lease, and drops it at once when the lease is lost, so a former
/// leader stops writing immediately; returns when a term ends on its own or
/// on `shutdown`, releasing the lease. `ready` is true while standing by
/// (the Service should not flap on followers) and left to the term while
/// leading.
pub async fn lead<T, F>(
    client: Client,
    namespace: &str,
    election: &LeaderElection,
    identity: &str,
    ready: &AtomicBool,
    shutdown: impl Future<Output = ()>,
    mut term: T,
) -> Result<()>
where
    T: FnMut() -> F,
    F: Future<Output = ()>,
{
    tokio::pin!(shutdown);
    let seconds = election.lease_duration.as_secs().max(1);
    let manager = LeaseManagerBuilder::new(client.clone(), &election.lease_name)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(seconds)
        .with_grace(seconds.div_ceil(3))
        .build()
        .await
        .map_err(|e| Error::Lease(e.to_string()))?;
    let (mut leader, lease_task) = manager.watch().await;
    // Standing by is a ready state: the Service should not flap on followers.
    ready.store(true, Ordering::Release);
    'terms: loop {
        while !*leader.borrow_and_update() {
            tracing::info!(%identity, lease = %election.lease_name, "waiting for the lease");
            tokio::select! {
                changed = leader.changed() => changed.map_err(|e| Error::Lease(e.to_string()))?,
                () = &mut shutdown => break 'terms,
            }
        }
        tracing::info!(%identity, "holding the lease");
        ready.store(false, Ordering::Release);
        let lost = async {
            while *leader.borrow_and_update() {
                if leader.changed().await.is_err() {
                    break;
                }
            }
        };
        // Dropping the controllers when the lease is lost stops every write at once.
        tokio::select! {
            () = term() => break 'terms,
            () = lost => tracing::warn!("lost the lease; stopped reconciling"),
            () = &mut shutdown => break 'terms,
        }
        ready.store(true, Ordering::Release);
    }
    drop(leader); // releases the lease
    if let Ok(Err(e)) = lease_task.await {
        tracing::warn!(error = %e, "releasing the lease failed; it expires on its own");
    }
    Ok(())
}
