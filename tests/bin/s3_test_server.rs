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
//! Buckets are folders of ROOT.

use std::path::PathBuf;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

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

    let fs = s3s_fs::FileSystem::new(root).map_err(|e| format!("{e:?}"))?;
    let mut builder = S3ServiceBuilder::new(fs);
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
