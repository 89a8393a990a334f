//! # medallion-connectors
//!
//! Where data comes from and where a pipeline remembers how far it got. This crate owns the
//! sources ([`files::FilesSource`]: landed CSV, JSON lines and JSON documents on any object
//! store), the state store ([`state::StateStore`], with [`state::LocalFileStateStore`] as
//! the embedded default and [`dynamodb::DynamoDbStateStore`] on AWS) and the leases built on
//! it ([`lease`]: one run at a time per layer). Sources turn bytes into Arrow record batches of text columns plus
//! provenance (`_source_file`, `_source_line`, and `_corrupt_record` for input that does not
//! parse, as Spark's PERMISSIVE mode does); they never type, clean or write data, and they
//! know no pipeline or table names.
//!
//! ```no_run
//! # async fn demo() -> Result<(), medallion_connectors::ConnectorError> {
//! use medallion_connectors::files::{FileFormat, FilesSource};
//! let root = medallion_engine::location::parse_location("/data/landing/orders")?;
//! let source = FilesSource::new(root, FileFormat::Csv, vec!["order_id".into()]);
//! for file in source.list().await? {
//!     let batches = source.read(&file).await?;
//!     println!("{}: {} batches", file.location, batches.len());
//! }
//! # Ok(()) }
//! ```

pub mod dynamodb;
pub mod error;
pub mod files;
pub mod lease;
pub mod state;

pub use error::ConnectorError;
