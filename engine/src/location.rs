//! Lake and landing locations: a local path or an object-store URL, always as a [`Url`]
//! ending in `/` so that joining never drops a segment.

use std::sync::Arc;

use object_store::{ObjectStore, path::Path};
use url::Url;

use crate::error::{EngineError, Result};

/// Parses `s` as a URL (`s3://bucket/prefix`, `file:///abs`) or, without a scheme, as a
/// local path made absolute against the current directory.
pub fn parse_location(s: &str) -> Result<Url> {
    let invalid = |reason: String| EngineError::InvalidLocation {
        location: s.to_string(),
        reason,
    };
    if s.trim().is_empty() {
        return Err(invalid("empty location".into()));
    }
    let mut url = if s.contains("://") {
        Url::parse(s).map_err(|e| invalid(e.to_string()))?
    } else {
        let abs = std::path::absolute(s).map_err(|e| invalid(e.to_string()))?;
        Url::from_directory_path(&abs).map_err(|()| invalid("not an absolute path".into()))?
    };
    match url.scheme() {
        "file" | "s3" | "s3a" | "memory" => {}
        other => return Err(invalid(format!("unsupported scheme '{other}'"))),
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// `<root>/<segments...>/` as a directory URL.
pub fn join(root: &Url, segments: &[&str]) -> Result<Url> {
    let mut url = root.clone();
    for segment in segments {
        url = url
            .join(&format!("{}/", segment.trim_matches('/')))
            .map_err(|e| EngineError::InvalidLocation {
                location: format!("{root}{segment}"),
                reason: e.to_string(),
            })?;
    }
    Ok(url)
}

/// Where a table of a layer lives: `<lake>/<layer>/<table>/`.
pub fn table_url(lake: &Url, layer: &str, table: &str) -> Result<Url> {
    join(lake, &[layer, table])
}

/// A local directory URL as a filesystem path, for stores that only work on local disk.
pub fn local_path(url: &Url) -> Option<std::path::PathBuf> {
    (url.scheme() == "file")
        .then(|| url.to_file_path().ok())
        .flatten()
}

/// The object store serving `url` and the path of `url` inside it. Credentials and endpoints
/// come from the environment (the standard AWS variables), never from pipeline files.
pub fn object_store_for(url: &Url) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let opts: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("AWS_"))
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    let (store, path) =
        object_store::parse_url_opts(url, opts).map_err(|source| EngineError::ObjectStore {
            location: url.to_string(),
            source: Box::new(source),
        })?;
    Ok((Arc::from(store), path))
}
