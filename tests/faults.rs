//! Fault injection for the S3 commit path, in the style of delta-rs's test stores: an HTTP
//! layer under object_store's S3 client that answers chosen requests with an error status,
//! cuts the connection before or after the server acted, or delays them.
//!
//! It sits *below* object_store's retry loop, so a test sees what production would: a 503
//! or a reset connection is retried with backoff, and only a fault that outlasts the retries
//! reaches delta-rs and medallion. [`install_faulty_s3a`] serves every `s3a://` location of
//! this process through it, against the same S3 server as `s3://`, so tests that inject
//! faults use `s3a://` and the others are untouched.

use std::str::FromStr as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deltalake::logstore::{
    ObjectStoreFactory, ObjectStoreRef, StorageConfig, object_store_factories,
};
use object_store::ObjectStoreScheme;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::client::{
    ClientOptions, HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse,
    HttpResponseBody, HttpService, ReqwestConnector,
};
use object_store::path::Path;
use url::Url;

/// What happens to a request a rule picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The server answers with this status (500, 503 SlowDown) without acting.
    Status(u16),
    /// The connection breaks before the request reaches the server.
    CutBeforeSend,
    /// The server acts on the request, then the connection breaks before the answer
    /// arrives: the client cannot tell whether its write happened.
    CutAfterSend,
    /// The request waits this long first (a slow network), then goes through.
    Delay(Duration),
}

/// Which requests a fault hits: a method, a part of the path, every `every`-th match, at
/// most `times` times (`None`: without end).
#[derive(Debug, Clone)]
pub struct FaultRule {
    pub method: Option<&'static str>,
    pub path_contains: String,
    pub every: usize,
    pub times: Option<usize>,
    pub fault: Fault,
}

impl FaultRule {
    pub fn new(fault: Fault) -> Self {
        Self {
            method: None,
            path_contains: String::new(),
            every: 1,
            times: None,
            fault,
        }
    }
    pub fn method(mut self, method: &'static str) -> Self {
        self.method = Some(method);
        self
    }
    pub fn path_contains(mut self, part: impl Into<String>) -> Self {
        self.path_contains = part.into();
        self
    }
    pub fn every(mut self, n: usize) -> Self {
        self.every = n.max(1);
        self
    }
    pub fn times(mut self, n: usize) -> Self {
        self.times = Some(n);
        self
    }
}

#[derive(Debug)]
struct RuleState {
    rule: FaultRule,
    matched: usize,
    fired: usize,
}

/// The faults in force; shared by every S3 client made while it is installed.
///
/// A request faulted by a rule with `every(n)`, n > 1, goes through on its next attempt, so
/// those faults are transient; a rule with `every(1)` fails every attempt of a matching
/// request, which outlasts the retries.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    rules: Arc<Mutex<Vec<RuleState>>>,
    injected: Arc<AtomicUsize>,
    /// Requests (method and path) faulted by a transient rule, let through on their retry.
    retrying: Arc<Mutex<std::collections::HashSet<String>>>,
}

impl FaultPlan {
    pub fn add(&self, rule: FaultRule) {
        if let Ok(mut rules) = self.rules.lock() {
            rules.push(RuleState {
                rule,
                matched: 0,
                fired: 0,
            });
        }
    }

    pub fn clear(&self) {
        if let Ok(mut rules) = self.rules.lock() {
            rules.clear();
        }
        if let Ok(mut retrying) = self.retrying.lock() {
            retrying.clear();
        }
    }

    /// Faults injected so far.
    pub fn injected(&self) -> usize {
        self.injected.load(Ordering::SeqCst)
    }

    fn pick(&self, method: &str, path: &str) -> Option<Fault> {
        let request = format!("{method} {path}");
        let mut retrying = self.retrying.lock().ok()?;
        if retrying.remove(&request) {
            return None;
        }
        let mut rules = self.rules.lock().ok()?;
        for state in rules.iter_mut() {
            let rule = &state.rule;
            if rule.method.is_some_and(|m| m != method) || !path.contains(&rule.path_contains) {
                continue;
            }
            if rule.times.is_some_and(|t| state.fired >= t) {
                continue;
            }
            state.matched += 1;
            if state.matched % rule.every == 0 {
                state.fired += 1;
                self.injected.fetch_add(1, Ordering::SeqCst);
                if rule.every > 1 {
                    retrying.insert(request);
                }
                return Some(rule.fault);
            }
        }
        None
    }
}

#[derive(Debug)]
struct FaultyService {
    inner: HttpClient,
    plan: FaultPlan,
}

fn reset() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "connection reset (injected)",
    )
}

#[async_trait::async_trait]
impl HttpService for FaultyService {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let fault = self.plan.pick(req.method().as_str(), req.uri().path());
        match fault {
            None => self.inner.execute(req).await,
            Some(Fault::Status(code)) => {
                let body = format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{}</Code><Message>injected</Message></Error>",
                    if code == 503 {
                        "SlowDown"
                    } else {
                        "InternalError"
                    }
                );
                http::Response::builder()
                    .status(code)
                    .body(HttpResponseBody::from(body))
                    .map_err(|e| HttpError::new(HttpErrorKind::Unknown, e))
            }
            Some(Fault::CutBeforeSend) => Err(HttpError::new(HttpErrorKind::Request, reset())),
            Some(Fault::CutAfterSend) => {
                let _ = self.inner.execute(req).await;
                Err(HttpError::new(HttpErrorKind::Interrupted, reset()))
            }
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                self.inner.execute(req).await
            }
        }
    }
}

#[derive(Debug)]
struct FaultyConnector {
    plan: FaultPlan,
}

impl HttpConnector for FaultyConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(FaultyService {
            inner,
            plan: self.plan.clone(),
        }))
    }
}

#[derive(Debug)]
struct FaultyS3Factory {
    plan: FaultPlan,
}

impl ObjectStoreFactory for FaultyS3Factory {
    fn parse_url_opts(
        &self,
        url: &Url,
        config: &StorageConfig,
    ) -> deltalake::DeltaResult<(ObjectStoreRef, Path)> {
        let mut builder = AmazonS3Builder::from_env()
            .with_url(url.to_string())
            .with_retry(config.retry.clone())
            .with_http_connector(FaultyConnector {
                plan: self.plan.clone(),
            });
        for (key, value) in &config.raw {
            if let Ok(key) = AmazonS3ConfigKey::from_str(&key.to_ascii_lowercase()) {
                builder = builder.with_config(key, value.clone());
            }
        }
        let store = builder.build()?;
        let (_, path) = ObjectStoreScheme::parse(url).map_err(|e| {
            deltalake::DeltaTableError::GenericError {
                source: Box::new(e),
            }
        })?;
        Ok((Arc::new(store), Path::parse(path)?))
    }
}

/// Serves `s3a://` in this process through S3 with `plan`'s faults (and `s3://` without).
pub fn install_faulty_s3a(plan: &FaultPlan) {
    // Let the engine register deltalake's own S3 handlers first, so they cannot replace ours.
    if let Ok(url) = Url::parse("s3a://any/") {
        let _ = medallion_engine::location::storage_options(&url);
    }
    if let Ok(scheme) = Url::parse("s3a://") {
        object_store_factories().insert(scheme, Arc::new(FaultyS3Factory { plan: plan.clone() }));
    }
}
