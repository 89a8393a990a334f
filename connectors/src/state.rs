//! The state store: small JSON documents under keys, written only by conditional writes.
//!
//! Every write names the version it read; a writer whose read went stale gets
//! [`ConnectorError::StateConflict`] instead of overwriting a newer value. That one primitive
//! carries watermarks, ingested-file sets and run records, and it maps one to one onto a
//! DynamoDB conditional `PutItem`.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ConnectorError;

/// A value with the version it was stored at.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub version: u64,
}

/// Durable key-value state with compare-and-set writes.
#[async_trait]
pub trait StateStore: Send + Sync + std::fmt::Debug {
    /// The value under `key`, if any.
    async fn get(&self, key: &str) -> Result<Option<Versioned<Value>>, ConnectorError>;

    /// Stores `value` under `key` if the stored version is still `expected` (`None`: the key
    /// must be absent). Returns the new version.
    async fn put(
        &self,
        key: &str,
        value: Value,
        expected: Option<u64>,
    ) -> Result<u64, ConnectorError>;

    /// Fails with a message a user can act on when the store cannot be used (a missing
    /// table, refused credentials, an endpoint that does not answer). Runs call it before
    /// they write anything.
    async fn check(&self) -> Result<(), ConnectorError> {
        Ok(())
    }

    /// Creates what the store keeps its keys in (`medallion init`); a no-op when it exists.
    async fn init(&self) -> Result<(), ConnectorError> {
        Ok(())
    }

    /// Where the state lives, for messages.
    fn describe(&self) -> String;
}

/// Reads a typed value (its default when absent) with the version to write it back at.
pub async fn get_typed<T: for<'de> Deserialize<'de> + Default>(
    store: &dyn StateStore,
    key: &str,
) -> Result<(T, Option<u64>), ConnectorError> {
    match store.get(key).await? {
        None => Ok((T::default(), None)),
        Some(v) => {
            let value =
                serde_json::from_value(v.value).map_err(|e| ConnectorError::StateStore {
                    store: store.describe(),
                    reason: format!("key {key} holds a value of the wrong shape: {e}"),
                })?;
            Ok((value, Some(v.version)))
        }
    }
}

/// Writes a typed value conditionally; see [`StateStore::put`].
pub async fn put_typed<T: Serialize>(
    store: &dyn StateStore,
    key: &str,
    value: &T,
    expected: Option<u64>,
) -> Result<u64, ConnectorError> {
    let value = serde_json::to_value(value).map_err(|e| ConnectorError::StateStore {
        store: store.describe(),
        reason: format!("key {key}: {e}"),
    })?;
    store.put(key, value, expected).await
}

/// The embedded default: one JSON file per key under a directory, replaced atomically
/// (write to a temporary file, fsync, rename) while an exclusive lock on `.lock` is held.
#[derive(Debug, Clone)]
pub struct LocalFileStateStore {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct StoredDocument {
    version: u64,
    value: Value,
}

impl LocalFileStateStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn error(&self, reason: impl std::fmt::Display) -> ConnectorError {
        ConnectorError::StateStore {
            store: self.describe(),
            reason: reason.to_string(),
        }
    }

    fn file_for(&self, key: &str) -> Result<PathBuf, ConnectorError> {
        let valid = !key.is_empty()
            && key.split('/').all(|s| {
                !s.is_empty()
                    && s != "."
                    && s != ".."
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.=".contains(c))
            });
        if !valid {
            return Err(self.error(format!("invalid key '{key}'")));
        }
        Ok(self.dir.join(format!("{key}.json")))
    }

    fn read(&self, path: &Path) -> Result<Option<StoredDocument>, ConnectorError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| self.error(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.error(format!("{}: {e}", path.display()))),
        }
    }

    fn put_blocking(
        &self,
        key: &str,
        value: Value,
        expected: Option<u64>,
    ) -> Result<u64, ConnectorError> {
        let path = self.file_for(key)?;
        let parent = path.parent().unwrap_or(&self.dir).to_path_buf();
        std::fs::create_dir_all(&parent)
            .map_err(|e| self.error(format!("{}: {e}", parent.display())))?;
        std::fs::create_dir_all(&self.dir).map_err(|e| self.error(e))?;
        let lock = File::create(self.dir.join(".lock")).map_err(|e| self.error(e))?;
        lock.lock().map_err(|e| self.error(e))?;
        let found = self.read(&path)?.map(|d| d.version);
        if found != expected {
            return Err(ConnectorError::StateConflict {
                key: key.to_string(),
                expected,
                found,
            });
        }
        let version = found.map_or(1, |v| v + 1);
        let doc = serde_json::to_vec_pretty(&StoredDocument { version, value })
            .map_err(|e| self.error(e))?;
        let mut tmp = tempfile_in(&parent).map_err(|e| self.error(e))?;
        tmp.1.write_all(&doc).map_err(|e| self.error(e))?;
        tmp.1.sync_all().map_err(|e| self.error(e))?;
        std::fs::rename(&tmp.0, &path).map_err(|e| self.error(e))?;
        // The lock is released when `lock` drops, after the rename made the write visible.
        Ok(version)
    }
}

fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, File)> {
    let name = format!(
        ".tmp-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
    );
    let path = dir.join(name);
    let file = File::create(&path)?;
    Ok((path, file))
}

#[async_trait]
impl StateStore for LocalFileStateStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned<Value>>, ConnectorError> {
        let path = self.file_for(key)?;
        Ok(self.read(&path)?.map(|d| Versioned {
            value: d.value,
            version: d.version,
        }))
    }

    async fn put(
        &self,
        key: &str,
        value: Value,
        expected: Option<u64>,
    ) -> Result<u64, ConnectorError> {
        let this = self.clone();
        let key = key.to_string();
        tokio::task::spawn_blocking(move || this.put_blocking(&key, value, expected))
            .await
            .map_err(|e| self.error(e))?
    }

    async fn init(&self) -> Result<(), ConnectorError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| self.error(e))
    }

    fn describe(&self) -> String {
        format!("file://{}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stale_writer_gets_a_conflict() -> Result<(), ConnectorError> {
        let dir = tempfile::tempdir().map_err(|e| ConnectorError::StateStore {
            store: "tmp".into(),
            reason: e.to_string(),
        })?;
        let store = LocalFileStateStore::new(dir.path());
        assert_eq!(store.get("p/bronze/t").await?, None);
        let v1 = store
            .put("p/bronze/t", serde_json::json!({"w": 1}), None)
            .await?;
        let v2 = store
            .put("p/bronze/t", serde_json::json!({"w": 2}), Some(v1))
            .await?;
        let stale = store
            .put("p/bronze/t", serde_json::json!({"w": 3}), Some(v1))
            .await;
        assert!(
            matches!(stale, Err(ConnectorError::StateConflict { found: Some(f), .. }) if f == v2)
        );
        assert_eq!(
            store.get("p/bronze/t").await?.map(|v| v.value),
            Some(serde_json::json!({"w": 2}))
        );
        assert!(store.put("../x", serde_json::json!(1), None).await.is_err());
        Ok(())
    }
}
