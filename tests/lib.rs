//! Helpers shared by the end-to-end tests: temporary lakes, pipeline runs through the
//! library and through the `medallion` binary, and table snapshots as sorted text rows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use medallion_connectors::state::{LocalFileStateStore, StateStore};
use medallion_jobs::JobError;
use medallion_jobs::pipeline::Pipeline;
use medallion_jobs::run::{Layer, RunOptions, run_pipeline};
use medallion_jobs::summary::RunSummary;

pub use medallion_jobs::run::Layer as RunLayer;

pub mod faults;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The commerce pipeline folder (tests load it from disk, as a user would).
pub fn commerce_dir() -> PathBuf {
    workspace_root().join("pipelines").join("commerce")
}

/// A hand-made fixture under `tests/data/`.
pub fn fixture(name: &str) -> PathBuf {
    workspace_root().join("tests").join("data").join(name)
}

/// The `medallion` binary built beside this test binary (`cargo build --bin medallion`
/// puts it in the same target directory; the test command builds it first).
pub fn medallion_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MEDALLION_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/debug/deps/it-<hash> -> target/debug/medallion
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("medallion"))
        .unwrap_or_default();
    assert!(
        bin.exists(),
        "the medallion binary is not built at {}: run `cargo build --bin medallion` first",
        bin.display()
    );
    bin
}

/// A scratch folder with `landing/` and `lake/` inside.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temporary folder"),
        }
    }
    pub fn landing(&self) -> PathBuf {
        self.dir.path().join("landing")
    }
    pub fn lake(&self) -> PathBuf {
        self.dir.path().join("lake")
    }

    /// Lands `orders/batch-0002/part-00000.csv`, a copy of batch 1's orders file (the same
    /// orders re-sent), and returns its path.
    pub fn land_orders_again(&self) -> PathBuf {
        let batch2 = self.landing().join("orders/batch-0002");
        std::fs::create_dir_all(&batch2).expect("mkdir");
        let file = batch2.join("part-00000.csv");
        std::fs::copy(
            self.landing().join("orders/batch-0001/part-00000.csv"),
            &file,
        )
        .expect("copy");
        file
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

/// Loads the commerce pipeline from its folder with `landing` and `lake` set.
pub fn commerce(landing: &Path, lake: &Path) -> Pipeline {
    commerce_at(&landing.display().to_string(), &lake.display().to_string())
}

/// [`commerce`] with locations of any kind (`s3://…` or paths).
pub fn commerce_at(landing: &str, lake: &str) -> Pipeline {
    Pipeline::load(
        commerce_dir().to_str().unwrap_or_default(),
        &[
            ("landing".to_string(), landing.to_string()),
            ("lake".to_string(), lake.to_string()),
        ],
    )
    .expect("commerce pipeline loads")
}

/// Runs `layers` of commerce over `landing` into `lake` with the local state store.
pub async fn run_commerce(
    landing: &Path,
    lake: &Path,
    layers: &[Layer],
) -> (RunSummary, Result<(), JobError>) {
    run_commerce_at(
        &landing.display().to_string(),
        &lake.display().to_string(),
        Arc::new(LocalFileStateStore::new(lake.join("_medallion_state"))),
        layers,
    )
    .await
}

/// Runs all layers and panics with the error if the run fails.
pub async fn run_all_ok(landing: &Path, lake: &Path) -> RunSummary {
    let (summary, result) = run_commerce(landing, lake, &Layer::ALL).await;
    if let Err(e) = result {
        panic!("run failed: {e}\n{}", summary.to_json_line());
    }
    summary
}

fn uuid_like() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
    )
}

/// Rows of `<lake>/<layer>/<table>` as sorted lines `a|b|c` of `SELECT <columns>`, `None`
/// when the table does not exist.
pub async fn table_lines(
    lake: &Path,
    layer: &str,
    table: &str,
    columns: &str,
) -> Option<Vec<String>> {
    table_lines_at(lake.to_str()?, layer, table, columns).await
}

/// [`table_lines`] for a lake at any location (`s3://…` or a path).
pub async fn table_lines_at(
    lake: &str,
    layer: &str,
    table: &str,
    columns: &str,
) -> Option<Vec<String>> {
    let lake_url = medallion_engine::location::parse_location(lake).ok()?;
    let url = medallion_engine::location::table_url(&lake_url, layer, table).ok()?;
    let t = medallion_engine::table::open_table(&url)
        .await
        .expect("open table")?;
    let ctx = medallion_engine::session::new_session(&Default::default()).expect("session");
    medallion_engine::table::register_table(&ctx, layer, table, &t)
        .await
        .expect("register");
    let batches = ctx
        .sql(&format!("SELECT {columns} FROM {layer}.{table}"))
        .await
        .expect("query plans")
        .collect()
        .await
        .expect("query runs");
    let text = datafusion::arrow::util::pretty::pretty_format_batches(&batches)
        .expect("format")
        .to_string();
    // Cells trimmed and joined by `|`: rows compare by value, not by column width.
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with('|'))
        .skip(1)
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect();
    lines.sort();
    Some(lines)
}

/// Number of rows of a table (0 when absent).
pub async fn count(lake: &Path, layer: &str, table: &str) -> u64 {
    table_lines(lake, layer, table, "1 AS one")
        .await
        .map_or(0, |l| l.len() as u64)
}

/// Every gold table of commerce as sorted text rows.
pub async fn gold_snapshot(lake: &Path) -> BTreeMap<String, Vec<String>> {
    gold_snapshot_at(lake.to_str().unwrap_or_default()).await
}

/// [`gold_snapshot`] for a lake at any location.
pub async fn gold_snapshot_at(lake: &str) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for t in ["daily_sales", "customer_360", "daily_engagement"] {
        out.insert(
            t.to_string(),
            table_lines_at(lake, "gold", t, "*")
                .await
                .unwrap_or_default(),
        );
    }
    out
}

/// Every Delta table under `<lake>/<layer>/`, as `(layer, name, table)`.
pub async fn lake_tables(lake: &Path) -> Vec<(&'static str, String, deltalake::DeltaTable)> {
    let mut out = Vec::new();
    for layer in ["bronze", "silver", "gold"] {
        let Ok(entries) = std::fs::read_dir(lake.join(layer)) else {
            continue;
        };
        for e in entries.flatten() {
            let url =
                medallion_engine::location::parse_location(e.path().to_str().unwrap_or_default())
                    .expect("url");
            if let Some(t) = medallion_engine::table::open_table(&url)
                .await
                .expect("open")
            {
                out.push((layer, e.file_name().to_string_lossy().into_owned(), t));
            }
        }
    }
    out
}

/// Delta versions of every table of `lake`.
pub async fn versions(lake: &Path) -> BTreeMap<String, Option<u64>> {
    lake_tables(lake)
        .await
        .into_iter()
        .map(|(layer, name, t)| (format!("{layer}/{name}"), t.version()))
        .collect()
}

/// Copies `<src>/<entity>/<batch>/` to `<dst>/<entity>/<batch>/` for every entity.
pub fn land_batch(src: &Path, dst: &Path, batch: &str) {
    for entity in std::fs::read_dir(src).expect("landing").flatten() {
        let from = entity.path().join(batch);
        if !from.is_dir() {
            continue;
        }
        let to = dst.join(entity.file_name()).join(batch);
        std::fs::create_dir_all(&to).expect("mkdir");
        for f in std::fs::read_dir(&from).expect("batch").flatten() {
            std::fs::copy(f.path(), to.join(f.file_name())).expect("copy");
        }
    }
}

/// Copies a whole folder tree.
pub fn copy_tree(src: &Path, dst: &Path) {
    for e in std::fs::read_dir(src).expect("read").flatten() {
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            std::fs::create_dir_all(&to).expect("mkdir");
            copy_tree(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).expect("copy");
        }
    }
}

/// Lands the first `lines` lines (after a CSV header) of `entity`'s files of `batch` in
/// `source`, as one file of the same batch under `landing`.
pub fn land_first_lines(source: &Path, landing: &Path, entity: &str, batch: &str, lines: usize) {
    let files = files_in(&source.join(entity).join(batch));
    let text = std::fs::read_to_string(&files[0]).expect("read");
    let header = usize::from(files[0].extension().is_some_and(|e| e == "csv"));
    let kept: Vec<&str> = text.lines().take(header + lines).collect();
    let to = landing.join(entity).join(batch);
    std::fs::create_dir_all(&to).expect("mkdir");
    let name = files[0].file_name().expect("file name");
    std::fs::write(to.join(name), kept.join("\n") + "\n").expect("write");
}

/// The files in folder `dir`, by name.
pub fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("folder")
        .flatten()
        .map(|f| f.path())
        .collect();
    files.sort();
    files
}

/// Replaces the first `from` in the file at `path` with `to`; `from` must be there.
pub fn replace_in_file(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from} not in {}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

/// A session with every table of `lake` registered as `<layer>.<table>`.
pub async fn lake_session(lake: &Path) -> datafusion::prelude::SessionContext {
    let ctx = medallion_engine::session::new_session(&Default::default()).expect("session");
    for (layer, name, t) in lake_tables(lake).await {
        medallion_engine::table::register_table(&ctx, layer, &name, &t)
            .await
            .expect("register");
    }
    ctx
}

/// The single integer a query returns.
pub async fn scalar(ctx: &datafusion::prelude::SessionContext, sql: &str) -> i64 {
    let batches = ctx
        .sql(sql)
        .await
        .expect("plans")
        .collect()
        .await
        .expect("runs");
    let v =
        datafusion::common::ScalarValue::try_from_array(batches[0].column(0), 0).expect("value");
    match v {
        datafusion::common::ScalarValue::Int64(Some(n)) => n,
        other => panic!("{sql} returned {other:?}"),
    }
}

/// `run <pipeline> --var landing=<landing> --var lake=<lake>`: the arguments of a run on
/// local disk, for a test to extend with options.
pub fn local_run_args(pipeline: &Path, landing: &Path, lake: &Path) -> Vec<String> {
    vec![
        "run".into(),
        pipeline.display().to_string(),
        "--var".into(),
        format!("landing={}", landing.display()),
        "--var".into(),
        format!("lake={}", lake.display()),
    ]
}

/// Runs the `medallion` binary; when this process is root, without the capabilities that
/// let root read any file, so that a file without read permission is unreadable to it too.
pub fn medallion<S: AsRef<str>>(args: &[S]) -> std::process::Output {
    let bin = medallion_bin();
    let mut cmd = if is_root() {
        let mut c = std::process::Command::new("setpriv");
        c.arg("--bounding-set=-dac_override,-dac_read_search")
            .arg(&bin);
        c
    } else {
        std::process::Command::new(&bin)
    };
    cmd.args(args.iter().map(AsRef::as_ref))
        .env("MEDALLION_LOG", "warn")
        .output()
        .expect("medallion runs")
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs the `medallion` binary, which must exit 0, and returns its run summary.
pub fn medallion_ok<S: AsRef<str>>(args: &[S]) -> serde_json::Value {
    let out = medallion(args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "medallion {}: {}",
        args.iter()
            .map(AsRef::as_ref)
            .collect::<Vec<&str>>()
            .join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    summary_of(&out)
}

/// The last line of a command's stdout, parsed as the run summary JSON.
pub fn summary_of(output: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "last stdout line is not JSON ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

// ------------------------------------------------------------------ S3 and DynamoDB

/// The bucket `scripts/services.sh` creates for the tests; each test works under a prefix
/// of its own.
pub const TEST_BUCKET: &str = "medallion-test";

/// Fails the test, saying how to get them, unless the S3 server and DynamoDB Local of
/// `scripts/services.sh` are running (scripts/test.sh starts them).
pub fn require_services() {
    assert!(
        std::env::var("MEDALLION_TEST_S3").is_ok()
            && std::env::var("MEDALLION_TEST_DYNAMODB").is_ok(),
        "this test needs the S3 server and DynamoDB Local that scripts/test.sh starts; to run \
         it alone: source scripts/services.sh, then cargo test"
    );
}

/// A fresh `s3://medallion-test/<name>-<unique>` location. Kept short: the test server
/// (s3s-fs) stores each object's metadata in a file named after the base64 of its whole key,
/// so a key beyond about 150 characters fails with a 500 there (real S3 allows 1,024).
pub fn s3_location(name: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let millis = chrono::Utc::now().timestamp_millis() % 1_000_000;
    format!(
        "s3://{TEST_BUCKET}/{name}{}-{millis}-{n}",
        std::process::id()
    )
}

/// Copies every file below `local` to the same relative keys below `dest` (`s3://…`).
pub async fn upload_tree(local: &Path, dest: &str) {
    let url = medallion_engine::location::parse_location(dest).expect("location");
    let (store, prefix) = medallion_engine::location::object_store_for(&url).expect("store");
    let mut stack = vec![local.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(local).expect("below root");
            let key = object_store::path::Path::from(format!(
                "{}/{}",
                prefix.as_ref(),
                rel.to_string_lossy()
            ));
            let bytes = std::fs::read(&path).expect("read file");
            object_store::ObjectStoreExt::put(store.as_ref(), &key, bytes.into())
                .await
                .expect("upload");
        }
    }
}

/// A new DynamoDB state table (created as `medallion init` does) and its name.
pub async fn dynamodb_state(name: &str) -> (Arc<dyn StateStore>, String) {
    let table = format!("{name}-{}", uuid_like());
    let store = medallion_connectors::dynamodb::DynamoDbStateStore::new(table.clone()).await;
    store.init().await.expect("create the state table");
    (Arc::new(store), table)
}

/// Runs `layers` of commerce from `landing` into `lake` (any locations) with `state`.
pub async fn run_commerce_at(
    landing: &str,
    lake: &str,
    state: Arc<dyn StateStore>,
    layers: &[Layer],
) -> (RunSummary, Result<(), JobError>) {
    let pipeline = commerce_at(landing, lake);
    let options = RunOptions {
        layers: layers.to_vec(),
        run_id: format!("test-{}", uuid_like()),
        state,
        progress: false,
        session: medallion_engine::session::SessionOptions {
            target_partitions: Some(2),
            ..Default::default()
        },
        lease: Default::default(),
        gold: Default::default(),
    };
    run_pipeline(&pipeline, &options).await
}

/// Every table of commerce at `lake`, opened (so each one's log must load) and registered
/// in a session as `<layer>.<table>`.
pub async fn open_every_table(lake: &str) -> datafusion::prelude::SessionContext {
    let pipeline = commerce_at("landing", lake);
    let ctx = medallion_engine::session::new_session(&Default::default()).expect("session");
    medallion_jobs::run::register_lake(&ctx, &pipeline, None)
        .await
        .unwrap_or_else(|e| panic!("a table of {lake} does not open: {e}"));
    ctx
}

/// Generates a small commerce landing (`batches` batches) into `dir`.
pub fn generate_landing(dir: &Path, scale: f64, batches: u32, seed: u64) {
    medallion_jobs::generate::generate(&medallion_jobs::generate::GenerateOptions {
        scale,
        batches,
        seed,
        out: dir.to_path_buf(),
    })
    .expect("generate");
}
