//! Lake and landing locations: a local path or an object-store URL, always as a [`Url`]
//! ending in `/` so that joining never drops a segment.

use std::collections::HashMap;
use std::sync::{Arc, Once};

use object_store::{ObjectStore, path::Path};
use url::Url;

use crate::error::{EngineError, Result};

/// Parses `s` as a URL (`s3://bucket/prefix`, `file:///abs`) or, without a scheme, as a
/// local path made absolute against the current directory, its `.` and `..` folded away.
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
        Url::from_directory_path(without_dot_segments(&abs))
            .map_err(|()| invalid("not an absolute path".into()))?
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

/// `abs` with `.` and `..` resolved by name, as a shell's `cd` and Hadoop's `Path` resolve
/// them: `std::path::absolute` keeps `..` on Unix, and object_store refuses a path with a
/// `..` segment, so `--var landing=../landing` failed at the first file it listed. By name,
/// not through the file system, because a lake folder may not exist yet.
fn without_dot_segments(abs: &std::path::Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut folded = std::path::PathBuf::new();
    for component in abs.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                folded.pop();
            }
            other => folded.push(other),
        }
    }
    folded
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

/// Storage options for the Delta tables and landed files at `url`, on top of what the
/// standard AWS variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, keys) already say.
///
/// An `http://` endpoint (MinIO, a local S3 server) gets plain HTTP allowed, and requests are
/// path-style (object_store's default), so no setting beyond the endpoint is needed. Retries
/// are bounded so that an unreachable endpoint fails a run within a minute instead of the
/// client's default three.
pub fn storage_options(url: &Url) -> HashMap<String, String> {
    let mut options = HashMap::new();
    if matches!(url.scheme(), "s3" | "s3a") {
        register_object_stores();
        let endpoint = s3_endpoint().unwrap_or_default();
        // The S3-only variable of the AWS SDKs; object_store reads only AWS_ENDPOINT_URL.
        if let Ok(s3_only) = std::env::var("AWS_ENDPOINT_URL_S3") {
            options.insert("aws_endpoint".to_string(), s3_only);
        }
        if endpoint.starts_with("http://") {
            options.insert("allow_http".to_string(), "true".to_string());
        }
        options.insert("max_retries".to_string(), "6".to_string());
        options.insert("retry_timeout".to_string(), "60s".to_string());
    }
    options
}

/// The S3 endpoint the AWS variables name, if any (`AWS_ENDPOINT_URL_S3` first, as the AWS
/// SDKs read them).
fn s3_endpoint() -> Option<String> {
    std::env::var("AWS_ENDPOINT_URL_S3")
        .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
        .ok()
}

/// Makes `s3://` and `s3a://` known to deltalake (its AWS crate registers them on demand).
fn register_object_stores() {
    static REGISTERED: Once = Once::new();
    REGISTERED.call_once(|| deltalake::aws::register_handlers(None));
}

/// The object store serving `url` and the path of `url` inside it, built by deltalake's
/// factory for the scheme: landed files and Delta tables reach S3 with the same endpoint,
/// credentials (the AWS chain: environment, profile, web identity, container and instance
/// roles) and retries. Nothing comes from pipeline files.
pub fn object_store_for(url: &Url) -> Result<(Arc<dyn ObjectStore>, Path)> {
    object_store_with_options(url, storage_options(url))
}

/// [`object_store_for`] with explicit storage options (tests, preflight checks).
pub fn object_store_with_options(
    url: &Url,
    options: HashMap<String, String>,
) -> Result<(Arc<dyn ObjectStore>, Path)> {
    register_object_stores();
    let invalid = |reason: String| EngineError::InvalidLocation {
        location: url.to_string(),
        reason,
    };
    let scheme = Url::parse(&format!("{}://", url.scheme())).map_err(|e| invalid(e.to_string()))?;
    let factory = deltalake::logstore::object_store_factories()
        .get(&scheme)
        .map(|f| Arc::clone(f.value()))
        .ok_or_else(|| invalid(format!("no object store for scheme '{}'", url.scheme())))?;
    // The factory is delta-rs's, but the location may be a landing folder: its refusal is
    // the location's, not a table's.
    let config = deltalake::logstore::StorageConfig::parse_options(options)
        .map_err(|e| invalid(e.to_string()))?;
    let (store, path) = factory
        .parse_url_opts(url, &config)
        .map_err(|e| invalid(e.to_string()))?;
    Ok((store, path))
}

/// Checks that `url` can be listed, so that a missing bucket, refused credentials or an
/// unreachable endpoint stop a run before it writes anything, with a message that says
/// which. Local folders need no check: a missing one is created or holds no files.
pub async fn check_reachable(url: &Url) -> Result<()> {
    if !matches!(url.scheme(), "s3" | "s3a") {
        return Ok(());
    }
    let mut options = storage_options(url);
    // One quick answer is enough to tell a missing bucket from a wrong key.
    options.insert("max_retries".to_string(), "1".to_string());
    options.insert("retry_timeout".to_string(), "10s".to_string());
    let (store, prefix) = object_store_with_options(url, options)?;
    match store.list_with_delimiter(Some(&prefix)).await {
        Ok(_) => Ok(()),
        Err(e) => {
            let (hint, retryable) = unreachable_hint(url, &e);
            Err(EngineError::Unreachable {
                location: url.to_string(),
                hint,
                retryable,
                source: Box::new(e),
            })
        }
    }
}

/// What a user can do about a failed first request to `url`, read from the error's text
/// (object_store keeps the S3 error code there, not in its variants), and whether trying
/// again later could help.
fn unreachable_hint(url: &Url, error: &object_store::Error) -> (String, bool) {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    let bucket = url.host_str().unwrap_or_default();
    let endpoint = s3_endpoint().unwrap_or_else(|| "the AWS S3 endpoint".to_string());
    if text.contains("NoSuchBucket") || matches!(error, object_store::Error::NotFound { .. }) {
        (
            format!(
                "bucket '{bucket}' does not exist at {endpoint}: create it or fix the location"
            ),
            false,
        )
    } else if matches!(
        error,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    ) || text
        // Whole words only: a bare "403" also turns up inside the request's timing
        // ("in 100.974036ms"), which once made an unreachable endpoint read as a refusal.
        .split(|c: char| !c.is_ascii_alphanumeric())
        .any(|word| {
            [
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "AccessDenied",
                "403",
                "Forbidden",
            ]
            .contains(&word)
        })
    {
        (
            format!(
                "{endpoint} refused the credentials for bucket '{bucket}': check AWS_ACCESS_KEY_ID \
                 and AWS_SECRET_ACCESS_KEY (or the profile or role the AWS chain picked)"
            ),
            false,
        )
    } else if [
        "connect",
        "sending request",
        "timed out",
        "dns error",
        "Connection refused",
    ]
    .iter()
    .any(|sign| text.contains(sign))
    {
        (
            format!("cannot reach {endpoint}: check AWS_ENDPOINT_URL and that the server is up"),
            true,
        )
    } else {
        (
            format!("the first request to bucket '{bucket}' at {endpoint} failed"),
            true,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_path_with_dot_segments_becomes_the_folder_it_names() {
        let cwd = std::env::current_dir().unwrap();
        let parent = cwd.parent().unwrap();
        let url = parse_location("../landing/./orders/..").unwrap();
        assert_eq!(
            url,
            Url::from_directory_path(parent.join("landing")).unwrap()
        );
        assert!(
            !url.path().contains("/../") && !url.path().contains("/./"),
            "{url}"
        );
        // object_store takes the folded path, where it refused `..`.
        assert!(object_store::path::Path::parse(url.path()).is_ok(), "{url}");
        assert_eq!(
            parse_location("/a/b/../../..").unwrap(),
            Url::parse("file:///").unwrap()
        );
    }

    fn hint_for(message: &str) -> String {
        let url = Url::parse("s3://bucket/lake/").unwrap();
        let error = object_store::Error::Generic {
            store: "S3",
            source: message.to_string().into(),
        };
        unreachable_hint(&url, &error).0
    }

    #[test]
    fn a_refused_connection_is_not_read_as_refused_credentials_from_its_timing() {
        let hint = hint_for(
            "Error performing GET http://127.0.0.1:9/bucket in 100.974036ms, after 1 retries \
             - HTTP error: error sending request",
        );
        assert!(hint.starts_with("cannot reach"), "{hint}");
    }

    #[test]
    fn a_403_or_an_s3_credentials_code_is_read_as_refused_credentials() {
        for message in [
            "Client error with status 403 Forbidden: <Error></Error>",
            "<Code>InvalidAccessKeyId</Code>",
            "<Code>SignatureDoesNotMatch</Code>",
        ] {
            assert!(
                hint_for(message).contains("refused the credentials"),
                "{message}"
            );
        }
    }
}
