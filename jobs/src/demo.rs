//! `medallion demo`: generate a small landing, run the built-in commerce pipeline on local
//! disk with the embedded defaults, and show what each layer did.

use std::path::PathBuf;
use std::sync::Arc;

use medallion_connectors::state::LocalFileStateStore;

use crate::error::JobError;
use crate::generate::{GenerateOptions, generate};
use crate::pipeline::Pipeline;
use crate::run::{Layer, RunOptions, run_pipeline};
use crate::summary::RunSummary;

/// What the demo did, for printing.
#[derive(Debug)]
pub struct DemoOutcome {
    pub dir: PathBuf,
    pub summary: RunSummary,
    pub gold_preview: String,
}

pub async fn demo(
    dir: PathBuf,
    scale: f64,
    batches: u32,
    progress: bool,
) -> Result<DemoOutcome, JobError> {
    let landing = dir.join("landing");
    let lake = dir.join("lake");
    let report = generate(&GenerateOptions {
        scale,
        batches,
        seed: 42,
        out: landing.clone(),
    })?;
    tracing::info!(
        orders = report.orders,
        events = report.events,
        files = report.files,
        "generated landing"
    );
    let vars = [
        ("landing".to_string(), landing.display().to_string()),
        ("lake".to_string(), lake.display().to_string()),
    ];
    let pipeline = Pipeline::load("commerce", &vars)?;
    let options = RunOptions {
        layers: Layer::ALL.to_vec(),
        run_id: format!("demo-{}", uuid::Uuid::new_v4()),
        state: Arc::new(LocalFileStateStore::new(lake.join("_medallion_state"))),
        progress,
        session: Default::default(),
        lease: Default::default(),
        gold: Default::default(),
    };
    let (summary, result) = run_pipeline(&pipeline, &options).await;
    result?;
    let ctx = medallion_engine::session::new_session(&Default::default())?;
    let mut preview = String::new();
    if let Some(t) =
        medallion_engine::table::open_table(&pipeline.table_url("gold", "daily_sales")?).await?
    {
        medallion_engine::table::register_table(&ctx, "gold", "daily_sales", &t).await?;
        let batches = ctx
            .sql("SELECT country, sum(orders) AS orders, sum(units) AS units, sum(revenue_usd) AS revenue_usd FROM gold.daily_sales GROUP BY country ORDER BY revenue_usd DESC LIMIT 5")
            .await?
            .collect()
            .await?;
        preview = datafusion::arrow::util::pretty::pretty_format_batches(&batches)
            .map(|d| d.to_string())
            .unwrap_or_default();
    }
    Ok(DemoOutcome {
        dir,
        summary,
        gold_preview: preview,
    })
}
