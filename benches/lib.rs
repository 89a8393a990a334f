//! # medallion-benches
//!
//! Criterion micro-benchmarks of the hot paths (`cargo bench -p medallion-benches`): landed
//! CSV and JSON lines to Arrow, timestamp parsing of the three spellings, rule evaluation,
//! dedup by key and MERGE into a large table. The end-to-end comparison with Spark, Sail and
//! DuckDB is `run.py` beside this file. Benchmarks read generated commerce data and touch no
//! lake but their own temporary folders.
