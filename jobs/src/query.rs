//! `medallion query`: SQL over the tables of a pipeline's lake, for a look at the data or an
//! export to compare with another engine.

use datafusion::arrow::record_batch::RecordBatch;

use crate::error::JobError;
use crate::pipeline::Pipeline;
use crate::run::register_lake;

/// Output formats of a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueryFormat {
    /// An aligned text table.
    Table,
    /// CSV with a header row.
    Csv,
    /// One JSON object per line.
    Json,
}

/// Runs `sql` with every table of the lake registered as `<layer>.<table>`.
pub async fn query(pipeline: &Pipeline, sql: &str) -> Result<Vec<RecordBatch>, JobError> {
    let ctx = medallion_engine::session::new_session(&Default::default())?;
    register_lake(&ctx, pipeline, None).await?;
    Ok(ctx.sql(sql).await?.collect().await?)
}

/// Renders `batches` in `format`.
pub fn render(batches: &[RecordBatch], format: QueryFormat) -> Result<String, JobError> {
    let arrow_err = |e: datafusion::arrow::error::ArrowError| {
        JobError::from(datafusion::error::DataFusionError::from(e))
    };
    Ok(match format {
        QueryFormat::Table => datafusion::arrow::util::pretty::pretty_format_batches(batches)
            .map_err(arrow_err)?
            .to_string(),
        QueryFormat::Csv => {
            let mut out = Vec::new();
            let mut writer = datafusion::arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            for b in batches {
                writer.write(b).map_err(arrow_err)?;
            }
            drop(writer);
            String::from_utf8_lossy(&out).into_owned()
        }
        QueryFormat::Json => {
            let mut writer = datafusion::arrow::json::LineDelimitedWriter::new(Vec::new());
            for b in batches {
                writer.write(b).map_err(arrow_err)?;
            }
            writer.finish().map_err(arrow_err)?;
            String::from_utf8_lossy(&writer.into_inner()).into_owned()
        }
    })
}
