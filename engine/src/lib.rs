//! # medallion-engine
//!
//! The engine owns everything that touches data at rest and the query engine that moves it:
//! the DataFusion session ([`session::new_session`]), lake locations and object stores
//! ([`location`]), opening and registering Delta tables ([`table`]), and the write operations
//! that runs record ([`ops`]: staged append, upsert by key, overwrite). It knows nothing of
//! pipelines, layers' meaning or any table name: those are `jobs`' business. Callers above it
//! never touch `deltalake` operation builders directly, so the churn of that API stops here.
//!
//! ```text
//!   DataFrame ──► ops::UpsertBuilder ──► Delta MERGE (+ txn id) ──► CommitMetrics
//!   batches   ──► ops::AppendBuilder ──► staged files ──► commit (+ txn id)
//!   DataFrame ──► ops::OverwriteBuilder ──► Delta overwrite (+ txn id)
//! ```
//!
//! ```no_run
//! # async fn demo() -> medallion_engine::Result<()> {
//! use medallion_engine::{location, session, table};
//! let ctx = session::new_session(&session::SessionOptions::default())?;
//! let lake = location::parse_location("/tmp/lake")?;
//! let url = location::table_url(&lake, "silver", "orders")?;
//! if let Some(t) = table::open_table(&url).await? {
//!     table::register_table(&ctx, "silver", "orders", &t).await?;
//! }
//! let df = ctx.sql("SELECT count(*) FROM silver.orders").await?;
//! # let _ = df; Ok(()) }
//! ```

pub mod dedup;
pub mod error;
pub mod location;
pub mod ops;
pub mod session;
pub mod skew;
pub mod table;
pub mod udf;

pub use error::{EngineError, Result};

/// Re-exported so that every crate above uses the exact versions deltalake is built on.
pub use datafusion;
pub use deltalake;
