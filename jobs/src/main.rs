//! The `medallion` command line.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use medallion_jobs::pipeline::{Pipeline, parse_var};
use medallion_jobs::run::{Layer, RunOptions, run_pipeline};
use medallion_jobs::{JobError, exit_code};

/// A native lakehouse ETL engine: bronze → silver → gold on Delta tables.
#[derive(Debug, Parser)]
#[command(name = "medallion", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a pipeline: one layer, or all three in order.
    Run {
        /// A pipeline folder, its pipeline.toml, or a built-in pipeline's name (commerce).
        pipeline: String,
        /// Run only this layer (repeatable); default: bronze, silver, gold.
        #[arg(long, value_enum)]
        layer: Vec<Layer>,
        /// Set a pipeline variable: --var lake=s3://bucket/lake
        #[arg(long = "var", value_parser = parse_var)]
        vars: Vec<(String, String)>,
        /// Identifies the run in tables, state and summary; default: a new UUID.
        #[arg(long)]
        run_id: Option<String>,
        /// State store folder; default: <lake>/_medallion_state for a local lake.
        #[arg(long, env = "MEDALLION_STATE")]
        state: Option<String>,
        /// Also write the run summary (JSON) to this file.
        #[arg(long)]
        summary: Option<PathBuf>,
        /// DataFusion target partitions; default: the number of cores.
        #[arg(long)]
        target_partitions: Option<usize>,
        /// Memory budget of query execution (`2GiB`, `512MiB`): sorts, aggregations and
        /// silver's dedup by key spill to local disk beyond it. A hash join's table cannot:
        /// when one needs more than the limit leaves it, the run stops with exit code 6.
        #[arg(long, env = "MEDALLION_MEMORY_LIMIT", value_parser = parse_size)]
        memory_limit: Option<usize>,
        /// A hash join whose smaller side has at most this many rows broadcasts it instead of
        /// shuffling both sides on the join keys, so a hot key cannot load one partition
        /// (Spark's autoBroadcastJoinThreshold, in rows); 0 turns it off. Under
        /// `--memory-limit`, at most the limit over 2 KiB rows, since a broadcast side cannot
        /// spill.
        #[arg(long, env = "MEDALLION_BROADCAST_MAX_ROWS", default_value_t = medallion_engine::skew::DEFAULT_BROADCAST_MAX_ROWS)]
        broadcast_max_rows: usize,
        /// Hash aggregations sample their group keys before they shuffle, and merge the rows
        /// of a key that would load one partition into one row per input partition
        /// (`false` turns it off).
        #[arg(long, env = "MEDALLION_COMBINE_HOT_GROUPS", default_value_t = true, action = clap::ArgAction::Set)]
        combine_hot_groups: bool,
        /// A gold model rebuilt by partition is built a slice of partitions at a time, each
        /// reading at most about this many rows of its `rebuild_by` inputs, so its joins and
        /// aggregations hold one slice's groups instead of the whole table's; default:
        /// 2097152 (2 Mi), or the memory limit over 2 KiB when that is fewer (1 Mi at 2 GiB).
        #[arg(long, env = "MEDALLION_SLICE_ROWS")]
        slice_rows: Option<u64>,
        /// How long a layer's lease lives unrenewed (`60s`, `2m`): a killed run's lease is
        /// free again after it.
        #[arg(long, env = "MEDALLION_LEASE_TTL", value_parser = parse_duration, default_value = "60s")]
        lease_ttl: std::time::Duration,
        /// Wait this long for a layer another run holds (`0s`: exit at once with code 5).
        #[arg(long, env = "MEDALLION_LEASE_WAIT", value_parser = parse_duration, default_value = "0s")]
        lease_wait: std::time::Duration,
    },
    /// Create the state store: the DynamoDB table (on-demand capacity) or the local folder.
    Init {
        /// `dynamodb://TABLE` or a folder.
        #[arg(long, env = "MEDALLION_STATE")]
        state: String,
    },
    /// Check a pipeline without reading or writing any data.
    Validate {
        pipeline: String,
        #[arg(long = "var", value_parser = parse_var)]
        vars: Vec<(String, String)>,
    },
    /// Run SQL over the tables of a pipeline's lake (`<layer>.<table>`).
    Query {
        pipeline: String,
        /// The SQL, e.g. "SELECT * FROM gold.daily_sales".
        sql: String,
        #[arg(long = "var", value_parser = parse_var)]
        vars: Vec<(String, String)>,
        #[arg(long, value_enum, default_value = "table")]
        format: medallion_jobs::query::QueryFormat,
    },
    /// Write the commerce landing data (reference pipeline, section 1).
    Generate {
        /// Scale factor: 1 is 1,000,000 orders and 3,000,000 events.
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        #[arg(long, default_value_t = 1)]
        batches: u32,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate a small landing and run the commerce pipeline on it, on local disk.
    Demo {
        /// Where to put landing and lake; default: a new temporary folder (kept).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 0.01)]
        scale: f64,
        #[arg(long, default_value_t = 3)]
        batches: u32,
    },
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    // The Delta kernel logs a missing table as an error; its real failures reach us as errors.
    let filter = EnvFilter::try_from_env("MEDALLION_LOG").unwrap_or_else(|_| EnvFilter::new("warn,buoyant_kernel=off,medallion=info,medallion_jobs=info,medallion_engine=info,medallion_connectors=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.compact().init();
    } else {
        builder.json().flatten_event(true).init();
    }
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's option enum (v2 and v3 alike).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Allocator settings for a short-lived process that allocates and frees batches of hundreds
/// of MB. Each applies only when mimalloc's own variable (`MIMALLOC_PURGE_DELAY`,
/// `MIMALLOC_ALLOW_THP`) is unset, so that it still decides.
fn tune_allocator() {
    // Returning freed pages to the kernel after mimalloc's default delay (1 s in v3, 10 ms in
    // v2) made it zero them again on a later batch (a quarter of silver's CPU under v2): keep
    // what was taken until exit.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain integer option of the allocator; no memory is touched.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    // Fresh memory costs its first touch, and on this kind of VM a 2 MiB transparent huge page
    // faults in at 0.4-0.8 GB/s against 1-2.3 GB/s for 4 KiB pages (the kernel's
    // `clear_page_erms` was 16% of an SF 1 run). mimalloc asks for huge pages on the arena it
    // reserves before `main` runs, so its own option comes too late: the process opts out.
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: prctl with integer arguments; it changes how the kernel backs later faults.
        // A kernel without the option refuses it, and huge pages stay as they were.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

/// How long an idle blocking thread (file parsing, delta-rs's Parquet encoding) lives. Pages
/// that one thread allocated and others freed go back to the allocator's free lists only when
/// their owner allocates again or exits. Under tokio's default of 10 s, the threads that parsed
/// bronze sat idle through silver holding their freed pages, and silver took fresh ones
/// (SF 1 peak: 1.83-1.97 GiB, 1.47-1.53 GiB with this, and no slower).
const BLOCKING_THREAD_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_millis(50);

fn main() -> ExitCode {
    tune_allocator();
    init_logging();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_keep_alive(BLOCKING_THREAD_KEEP_ALIVE)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit_code::FAILURE as u8);
        }
    };
    let code = runtime.block_on(dispatch(cli.command));
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// `12.5GiB` as `(12.5, "GiB")`; `None` when no number leads.
fn number_and_unit(text: &str) -> Option<(f64, &str)> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    Some((number.parse().ok()?, unit.trim()))
}

/// `500ms`, `30s`, `2m`, `1h`; a bare number is seconds.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let (value, unit) = number_and_unit(text)
        .ok_or_else(|| format!("'{text}' is not a duration such as 30s or 2m"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1e3,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit '{other}' in '{text}' (use ms, s, m, h)"
            ));
        }
    };
    std::time::Duration::try_from_secs_f64(seconds).map_err(|e| format!("'{text}': {e}"))
}

/// `2GiB`, `512MiB`, `1.5GB`, `100000000`: binary units for `Ki`/`Mi`/`Gi`, decimal otherwise.
fn parse_size(text: &str) -> Result<usize, String> {
    let (value, unit) = number_and_unit(text)
        .ok_or_else(|| format!("'{text}' is not a size such as 2GiB or 512MiB"))?;
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown size unit '{other}' in '{text}' (use KiB, MiB, GiB)"
            ));
        }
    };
    Ok((value * scale) as usize)
}

async fn dispatch(command: Command) -> i32 {
    let progress = std::io::stderr().is_terminal();
    match command {
        Command::Run {
            pipeline,
            layer,
            vars,
            run_id,
            state,
            summary,
            target_partitions,
            memory_limit,
            broadcast_max_rows,
            combine_hot_groups,
            slice_rows,
            lease_ttl,
            lease_wait,
        } => {
            let loaded = match Pipeline::load(&pipeline, &vars) {
                Ok(p) => medallion_jobs::state_store(state.as_deref(), Some(&p))
                    .await
                    .map(|store| (p, store)),
                Err(e) => Err(e),
            };
            let (pipeline, store) = match loaded {
                Ok(v) => v,
                Err(e) => return report_error(&e),
            };
            let options = RunOptions {
                layers: if layer.is_empty() {
                    Layer::ALL.to_vec()
                } else {
                    layer
                },
                run_id: run_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                state: store,
                progress,
                session: medallion_engine::session::SessionOptions {
                    target_partitions,
                    memory_limit,
                    skew: medallion_engine::skew::SkewOptions {
                        broadcast_max_rows,
                        combine_hot_groups,
                    },
                    ..Default::default()
                },
                lease: medallion_jobs::run::LeaseOptions {
                    ttl: lease_ttl,
                    wait: lease_wait,
                },
                gold: medallion_jobs::run::GoldOptions { slice_rows },
            };
            let (run_summary, result) = run_pipeline(&pipeline, &options).await;
            if let Err(e) = &result {
                eprintln!("error: {e}");
                if let (exit_code::MEMORY, Some(limit)) = (run_summary.exit_code, memory_limit) {
                    eprintln!(
                        "hint: an operator that cannot spill needed more than --memory-limit \
                         ({:.1} MiB) left it, and that table was not written: rerun with a \
                         larger limit",
                        limit as f64 / f64::from(1 << 20)
                    );
                }
            }
            if progress {
                eprint!("{}", run_summary.to_table());
            }
            let line = run_summary.to_json_line();
            if let Some(Err(e)) = summary.as_ref().map(|path| std::fs::write(path, &line)) {
                eprintln!("error: cannot write the summary: {e}");
            }
            println!("{line}");
            run_summary.exit_code
        }
        Command::Init { state } => {
            let result = match medallion_jobs::state_store(Some(&state), None).await {
                Ok(store) => store
                    .init()
                    .await
                    .map(|()| store.describe())
                    .map_err(JobError::from),
                Err(e) => Err(e),
            };
            match result {
                Ok(described) => {
                    println!("state store ready: {described}");
                    exit_code::SUCCESS
                }
                Err(e) => report_error(&e),
            }
        }
        Command::Validate { pipeline, vars } => {
            let result = match Pipeline::load(&pipeline, &vars) {
                Ok(p) => medallion_jobs::validate::validate(&p).await.map(|v| (p, v)),
                Err(e) => Err(e),
            };
            match result {
                Ok((p, v)) => {
                    println!("{}: valid ({} tables)", p.file_label, v.tables.len());
                    for (layer, name, schema) in &v.tables {
                        let cols: Vec<String> = schema
                            .fields()
                            .iter()
                            .map(|f| format!("{} {}", f.name(), f.data_type()))
                            .collect();
                        println!("  {layer}.{name}: {}", cols.join(", "));
                    }
                    exit_code::SUCCESS
                }
                Err(e) => report_error(&e),
            }
        }
        Command::Query {
            pipeline,
            sql,
            vars,
            format,
        } => {
            let result = match Pipeline::load(&pipeline, &vars) {
                Ok(p) => medallion_jobs::query::query(&p, &sql)
                    .await
                    .and_then(|b| medallion_jobs::query::render(&b, format)),
                Err(e) => Err(e),
            };
            match result {
                Ok(text) => {
                    print!("{text}");
                    exit_code::SUCCESS
                }
                Err(e) => report_error(&e),
            }
        }
        Command::Generate {
            scale,
            batches,
            seed,
            out,
        } => {
            let started = std::time::Instant::now();
            let options = medallion_jobs::generate::GenerateOptions {
                scale,
                batches,
                seed,
                out,
            };
            match tokio::task::spawn_blocking(move || medallion_jobs::generate::generate(&options))
                .await
            {
                Ok(Ok(report)) => {
                    let mut value = serde_json::to_value(&report).unwrap_or_default();
                    value["duration_ms"] = serde_json::json!(started.elapsed().as_millis() as u64);
                    println!("{value}");
                    exit_code::SUCCESS
                }
                Ok(Err(e)) => report_error(&e),
                Err(e) => {
                    eprintln!("error: generator crashed: {e}");
                    exit_code::FAILURE
                }
            }
        }
        Command::Demo {
            dir,
            scale,
            batches,
        } => {
            let dir = match dir {
                Some(d) => d,
                None => match tempfile::Builder::new().prefix("medallion-demo-").tempdir() {
                    Ok(t) => t.keep(),
                    Err(e) => {
                        eprintln!("error: cannot make a temporary folder: {e}");
                        return exit_code::FAILURE;
                    }
                },
            };
            match medallion_jobs::demo::demo(dir, scale, batches, progress).await {
                Ok(outcome) => {
                    println!(
                        "medallion demo: commerce pipeline, landing and lake under {}",
                        outcome.dir.display()
                    );
                    print!("{}", outcome.summary.to_table());
                    println!(
                        "gold.daily_sales, top countries by revenue:\n{}",
                        outcome.gold_preview
                    );
                    println!("{}", outcome.summary.to_json_line());
                    exit_code::SUCCESS
                }
                Err(e) => report_error(&e),
            }
        }
    }
}

fn report_error(e: &JobError) -> i32 {
    eprintln!("error: {e}");
    e.exit_code()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option number is mimalloc's enum, which the crate does not export: an upgrade that
    /// moved it would set some other option. Unset, it reads as its default in mimalloc v3
    /// (`options.c`: 1000 ms), the version the crate builds by default.
    #[test]
    fn the_allocator_options_set_are_the_ones_meant() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // SAFETY: reads an option.
            assert_eq!(
                unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) },
                1000
            );
        }
    }
}
