//! A file-backed S3 server for the tests: `s3-test-server --port P --access-key K
//! --secret-key S ROOT`. It is s3s-fs (ListObjectsV2, ranged GET, PUT, multipart upload,
//! CopyObject, conditional PUT with `If-None-Match: *`) with two mends:
//!
//! - TCP_NODELAY on every connection, so that small responses are not held back by Nagle's
//!   algorithm (40 ms per response otherwise);
//! - conditional PUTs one at a time. s3s-fs checks that the key is absent, then writes a
//!   temporary file and renames it over the key, so two `If-None-Match: *` PUTs racing for
//!   one Delta log version could both succeed and the second silently replace the first
//!   commit. S3 makes that check atomic; so does this server.
//!
//! - ListObjectsV2 walks only the folder its prefix names. s3s-fs walks the whole bucket for
//!   every page of every listing, and the tests share one bucket: each Delta log listing then
//!   cost a walk of every other test's tables, and the SIGKILL test's orphan files grew it.
//!
//! Buckets are folders of ROOT.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::dto::*;
use s3s::service::S3ServiceBuilder;
use s3s::{S3, S3Request, S3Response, S3Result, s3_error};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: s3-test-server --port P --access-key K --secret-key S ROOT";
    let root = PathBuf::from(args.last().filter(|_| args.len() > 1).ok_or(usage)?);
    let port: u16 = arg(&args, "--port").ok_or(usage)?.parse()?;
    let access_key = arg(&args, "--access-key").ok_or(usage)?;
    let secret_key = arg(&args, "--secret-key").ok_or(usage)?;

    let fs = s3s_fs::FileSystem::new(&root).map_err(|e| format!("{e:?}"))?;
    let mut builder = S3ServiceBuilder::new(PrefixListing { fs, root });
    builder.set_auth(SimpleAuth::from_single(access_key, secret_key));
    let service = builder.build();
    let conditional_puts = Arc::new(tokio::sync::Mutex::new(()));
    let serve = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let service = service.clone();
        let conditional_puts = Arc::clone(&conditional_puts);
        async move {
            let conditional = req.method() == http::Method::PUT
                && (req.headers().contains_key(http::header::IF_NONE_MATCH)
                    || req.headers().contains_key(http::header::IF_MATCH));
            let _one_at_a_time = match conditional {
                true => Some(conditional_puts.lock().await),
                false => None,
            };
            service.call(req.map(s3s::Body::from)).await
        }
    });

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let (socket, _) = listener.accept().await?;
        socket.set_nodelay(true)?;
        let connection = http
            .serve_connection(TokioIo::new(socket), serve.clone())
            .into_owned();
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}

/// s3s-fs with a listing that reads only the folders its prefix can match.
struct PrefixListing {
    fs: s3s_fs::FileSystem,
    root: PathBuf,
}

/// The operations object_store and the tests use, passed to s3s-fs as they are. Spelled as
/// `#[async_trait]` expands a method, which it cannot do for methods a macro writes.
macro_rules! forward_to_s3s_fs {
    ($($op:ident: $input:ty => $output:ty,)*) => {$(
        fn $op<'life0, 'async_trait>(
            &'life0 self,
            req: S3Request<$input>,
        ) -> BoxedResponse<'async_trait, $output>
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            self.fs.$op(req)
        }
    )*};
}

type BoxedResponse<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = S3Result<S3Response<T>>> + Send + 'a>>;

#[async_trait::async_trait]
impl S3 for PrefixListing {
    forward_to_s3s_fs! {
        create_bucket: CreateBucketInput => CreateBucketOutput,
        copy_object: CopyObjectInput => CopyObjectOutput,
        delete_bucket: DeleteBucketInput => DeleteBucketOutput,
        delete_object: DeleteObjectInput => DeleteObjectOutput,
        delete_objects: DeleteObjectsInput => DeleteObjectsOutput,
        get_bucket_location: GetBucketLocationInput => GetBucketLocationOutput,
        get_object: GetObjectInput => GetObjectOutput,
        head_bucket: HeadBucketInput => HeadBucketOutput,
        head_object: HeadObjectInput => HeadObjectOutput,
        list_buckets: ListBucketsInput => ListBucketsOutput,
        put_object: PutObjectInput => PutObjectOutput,
        create_multipart_upload: CreateMultipartUploadInput => CreateMultipartUploadOutput,
        upload_part: UploadPartInput => UploadPartOutput,
        upload_part_copy: UploadPartCopyInput => UploadPartCopyOutput,
        list_parts: ListPartsInput => ListPartsOutput,
        complete_multipart_upload: CompleteMultipartUploadInput => CompleteMultipartUploadOutput,
        abort_multipart_upload: AbortMultipartUploadInput => AbortMultipartUploadOutput,
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let input = req.input;
        if input.bucket.contains(['/', '\\']) || input.bucket.starts_with('.') {
            return Err(s3_error!(InvalidBucketName));
        }
        let bucket_root = self.root.join(&input.bucket);
        if !bucket_root.is_dir() {
            return Err(s3_error!(NoSuchBucket));
        }
        let prefix = input.prefix.clone().unwrap_or_default();
        let delimiter = input.delimiter.clone().filter(|d| !d.is_empty());
        // A page starts after the later of the continuation token and start-after.
        let after = input
            .continuation_token
            .clone()
            .max(input.start_after.clone())
            .unwrap_or_default();
        let max_keys = input.max_keys.unwrap_or(1000).max(0);
        let (contents, common_prefixes, last_key, is_truncated) =
            tokio::task::spawn_blocking(move || {
                let keys = keys_under(&bucket_root, &prefix, delimiter.as_deref())?;
                let mut page = keys.into_iter().filter(|(key, _)| *key > after);
                let (mut contents, mut common_prefixes) = (Vec::new(), Vec::new());
                let mut last_key = None;
                for (key, path) in page.by_ref().take(max_keys as usize) {
                    last_key = Some(key.clone());
                    match path {
                        // Only the objects on the page are looked up for size and date; one
                        // deleted since the walk is left out, as S3 may leave it out.
                        Some(path) => {
                            let metadata = match std::fs::metadata(path) {
                                Ok(metadata) => metadata,
                                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                                Err(e) => return Err(e),
                            };
                            contents.push(Object {
                                last_modified: Some(Timestamp::from(metadata.modified()?)),
                                size: Some(metadata.len() as i64),
                                key: Some(key),
                                ..Default::default()
                            });
                        }
                        None => common_prefixes.push(CommonPrefix { prefix: Some(key) }),
                    }
                }
                let is_truncated = page.next().is_some();
                std::io::Result::Ok((contents, common_prefixes, last_key, is_truncated))
            })
            .await
            .map_err(|e| s3_error!(InternalError, "listing: {e}"))?
            .map_err(|e| s3_error!(InternalError, "listing: {e}"))?;
        let output = ListObjectsV2Output {
            key_count: Some((contents.len() + common_prefixes.len()) as i32),
            max_keys: Some(max_keys),
            is_truncated: Some(is_truncated),
            contents: (!contents.is_empty()).then_some(contents),
            common_prefixes: (!common_prefixes.is_empty()).then_some(common_prefixes),
            next_continuation_token: last_key.filter(|_| is_truncated),
            continuation_token: input.continuation_token,
            delimiter: input.delimiter,
            encoding_type: input.encoding_type,
            name: Some(input.bucket),
            prefix: input.prefix,
            start_after: input.start_after,
            ..Default::default()
        };
        Ok(S3Response::new(output))
    }
}

/// Every key under `bucket_root` that starts with `prefix`, in order: an object (its file), or
/// (`None`) a common prefix when `delimiter` follows the prefix within the key. Only the folder
/// the prefix names up to its last `/` is walked, and within it only folders the prefix can
/// match.
fn keys_under(
    bucket_root: &Path,
    prefix: &str,
    delimiter: Option<&str>,
) -> std::io::Result<BTreeMap<String, Option<PathBuf>>> {
    let mut keys = BTreeMap::new();
    let start = prefix.rfind('/').map_or("", |end| &prefix[..end]);
    let mut folders = vec![(bucket_root.join(start), start.to_owned())];
    while let Some((folder, folder_key)) = folders.pop() {
        let entries = match std::fs::read_dir(&folder) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let key = match folder_key.is_empty() {
                true => name,
                false => format!("{folder_key}/{name}"),
            };
            if entry.file_type()?.is_dir() {
                let as_prefix = format!("{key}/");
                if as_prefix.starts_with(prefix) || prefix.starts_with(&as_prefix) {
                    folders.push((entry.path(), key));
                }
                continue;
            }
            let Some(rest) = key.strip_prefix(prefix) else {
                continue;
            };
            match delimiter.and_then(|d| rest.find(d).map(|at| at + d.len())) {
                Some(end) => {
                    keys.insert(format!("{prefix}{}", &rest[..end]), None);
                }
                None => {
                    keys.insert(key, Some(entry.path()));
                }
            }
        }
    }
    Ok(keys)
}
