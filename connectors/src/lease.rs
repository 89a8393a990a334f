//! Leases: one run at a time per piece of work (a pipeline's layer), on any [`StateStore`].
//!
//! A lease is a state document `{owner, expires_at_ms, released}` written by conditional
//! writes only, so of two runs that read the same free lease exactly one wins the write.
//! The holder renews it in the background every third of its time to live; a run that is
//! killed stops renewing, and its lease is free again once `expires_at_ms` has passed.
//! Clocks of the machines taking part must agree to well within the time to live.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::error::ConnectorError;
use crate::state::{StateStore, get_typed, put_typed};

/// How long a lease lives without renewal unless a run says otherwise.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LeaseDocument {
    owner: String,
    expires_at_ms: i64,
    released: bool,
}

impl LeaseDocument {
    fn is_free_for(&self, owner: &str, now_ms: i64) -> bool {
        self.released
            || self.owner == owner
            || self.expires_at_ms <= now_ms
            || self.owner.is_empty()
    }
}

/// Builds a lease request: the key, the owner and how long to live and to wait.
#[derive(Debug, Clone)]
pub struct LeaseBuilder {
    store: Arc<dyn StateStore>,
    key: String,
    owner: String,
    ttl: Duration,
    wait: Duration,
}

impl LeaseBuilder {
    pub fn new(
        store: Arc<dyn StateStore>,
        key: impl Into<String>,
        owner: impl Into<String>,
    ) -> Self {
        Self {
            store,
            key: key.into(),
            owner: owner.into(),
            ttl: DEFAULT_LEASE_TTL,
            wait: Duration::ZERO,
        }
    }

    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_millis(300));
        self
    }

    /// Wait up to `wait` for a held lease to be released or to expire, instead of failing at
    /// once with [`ConnectorError::LeaseHeld`].
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Takes the lease, and keeps it renewed until the returned [`Lease`] is released or
    /// dropped.
    pub async fn acquire(self) -> Result<Lease, ConnectorError> {
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            match self.try_acquire().await {
                Ok(lease) => return Ok(lease),
                Err(ConnectorError::LeaseHeld { .. } | ConnectorError::StateConflict { .. })
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep((self.ttl / 4).min(Duration::from_secs(2))).await;
                }
                Err(ConnectorError::StateConflict { .. }) => {
                    // Another run wrote the lease between our read and our write.
                    let (doc, _) =
                        get_typed::<LeaseDocument>(self.store.as_ref(), &self.key).await?;
                    return Err(held(&self.key, &doc));
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn try_acquire(&self) -> Result<Lease, ConnectorError> {
        let (doc, version) = get_typed::<LeaseDocument>(self.store.as_ref(), &self.key).await?;
        let now = now_ms();
        if !doc.is_free_for(&self.owner, now) {
            return Err(held(&self.key, &doc));
        }
        let taken = LeaseDocument {
            owner: self.owner.clone(),
            expires_at_ms: now + millis(self.ttl),
            released: false,
        };
        let version = put_typed(self.store.as_ref(), &self.key, &taken, version).await?;
        let shared = Arc::new(Held {
            store: Arc::clone(&self.store),
            key: self.key.clone(),
            owner: self.owner.clone(),
            ttl: self.ttl,
            version: Mutex::new(Some(version)),
            lost: AtomicBool::new(false),
        });
        let renewer = tokio::spawn(renew(Arc::clone(&shared)));
        tracing::debug!(key = self.key, owner = self.owner, "lease taken");
        Ok(Lease { shared, renewer })
    }
}

fn held(key: &str, doc: &LeaseDocument) -> ConnectorError {
    ConnectorError::LeaseHeld {
        key: key.to_string(),
        owner: doc.owner.clone(),
        expires_at: chrono::DateTime::from_timestamp_millis(doc.expires_at_ms)
            .map_or_else(|| doc.expires_at_ms.to_string(), |t| t.to_rfc3339()),
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

struct Held {
    store: Arc<dyn StateStore>,
    key: String,
    owner: String,
    ttl: Duration,
    /// The version of our last write; `None` once released.
    version: Mutex<Option<u64>>,
    /// A renewal lost against another writer: the lease is no longer ours.
    lost: AtomicBool,
}

async fn renew(held: Arc<Held>) {
    loop {
        tokio::time::sleep(held.ttl / 3).await;
        let mut version = held.version.lock().await;
        let Some(current) = *version else { return };
        let doc = LeaseDocument {
            owner: held.owner.clone(),
            expires_at_ms: now_ms() + millis(held.ttl),
            released: false,
        };
        match put_typed(held.store.as_ref(), &held.key, &doc, Some(current)).await {
            Ok(v) => *version = Some(v),
            Err(ConnectorError::StateConflict { .. }) => {
                tracing::error!(key = held.key, "lease lost to another run");
                held.lost.store(true, Ordering::SeqCst);
                *version = None;
                return;
            }
            // A transient store error: the next tick tries again, well before expiry.
            Err(e) => tracing::warn!(key = held.key, error = %e, "lease renewal failed"),
        }
    }
}

/// A lease held by this process; renewed in the background.
pub struct Lease {
    shared: Arc<Held>,
    renewer: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.shared.key)
            .field("owner", &self.shared.owner)
            .finish()
    }
}

impl Lease {
    /// Fails when a renewal found the lease taken by another run (this one stalled past
    /// its time to live): work done from here on could overlap the other run's.
    pub async fn ensure_held(&self) -> Result<(), ConnectorError> {
        if self.shared.lost.load(Ordering::SeqCst) {
            let (doc, _) =
                get_typed::<LeaseDocument>(self.shared.store.as_ref(), &self.shared.key).await?;
            return Err(held(&self.shared.key, &doc));
        }
        Ok(())
    }

    /// Gives the lease back so that the next run need not wait for it to expire.
    pub async fn release(self) -> Result<(), ConnectorError> {
        // The lock first: a renewal in flight finishes and records its version, so the
        // release below does not conflict with our own last write.
        let mut version = self.shared.version.lock().await;
        self.renewer.abort();
        let Some(current) = version.take() else {
            return Ok(());
        };
        let doc = LeaseDocument {
            owner: self.shared.owner.clone(),
            expires_at_ms: now_ms(),
            released: true,
        };
        put_typed(
            self.shared.store.as_ref(),
            &self.shared.key,
            &doc,
            Some(current),
        )
        .await
        .map(|_| ())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Not released (an error path): stop renewing and let it expire.
        self.renewer.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::LocalFileStateStore;

    #[tokio::test]
    async fn one_holder_at_a_time_and_a_dead_holders_lease_expires() -> Result<(), ConnectorError> {
        let dir = tempfile::tempdir().map_err(|e| ConnectorError::StateStore {
            store: "tmp".into(),
            reason: e.to_string(),
        })?;
        let store: Arc<dyn StateStore> = Arc::new(LocalFileStateStore::new(dir.path()));
        let ttl = Duration::from_millis(600);
        let first = LeaseBuilder::new(Arc::clone(&store), "p/leases/silver", "run-a")
            .with_ttl(ttl)
            .acquire()
            .await?;
        // Renewal keeps it held past its first time to live.
        tokio::time::sleep(ttl * 2).await;
        let second = LeaseBuilder::new(Arc::clone(&store), "p/leases/silver", "run-b")
            .with_ttl(ttl)
            .acquire()
            .await;
        assert!(
            matches!(&second, Err(ConnectorError::LeaseHeld { owner, .. }) if owner == "run-a"),
            "{second:?}"
        );
        first.ensure_held().await?;
        first.release().await?;
        let second = LeaseBuilder::new(Arc::clone(&store), "p/leases/silver", "run-b")
            .with_ttl(ttl)
            .acquire()
            .await?;
        // run-b dies without releasing (dropped: no more renewals); run-c waits it out.
        drop(second);
        let third = LeaseBuilder::new(Arc::clone(&store), "p/leases/silver", "run-c")
            .with_ttl(ttl)
            .with_wait(ttl * 4)
            .acquire()
            .await?;
        third.release().await
    }
}
