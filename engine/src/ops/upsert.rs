//! Upsert by key: MERGE a deduplicated batch into a table, where a matched row is replaced
//! only when the incoming row wins the table's keep rule. Because the rule compares stored
//! columns, merging the same batch twice, or batches in any order, gives the same table.

use std::sync::Arc;

use datafusion::logical_expr::{Operator, binary_expr};
use datafusion::prelude::{DataFrame, Expr, col};
use deltalake::DeltaTable;
use deltalake::protocol::SaveMode;
use url::Url;

use super::overwrite::write_dataframe;
use super::{AppTransaction, CommitMetrics, FileLayout};
use crate::error::{EngineError, Result};
use crate::table;

/// Builds a MERGE of `source` (at most one row per key) into the table at a URL.
#[derive(Debug)]
pub struct UpsertBuilder {
    url: Url,
    source: DataFrame,
    keys: Vec<String>,
    winner_order: Vec<String>,
    partition_columns: Vec<String>,
    stats_columns: Option<Vec<String>>,
    txn: Option<AppTransaction>,
    source_key_nulls: Option<bool>,
    target: Option<DeltaTable>,
}

impl UpsertBuilder {
    pub fn new(url: Url, source: DataFrame, keys: Vec<String>) -> Self {
        Self {
            url,
            source,
            keys,
            winner_order: Vec::new(),
            partition_columns: Vec::new(),
            stats_columns: None,
            txn: None,
            source_key_nulls: None,
            target: None,
        }
    }

    /// Columns compared, most significant first, to decide whether an incoming row replaces
    /// the stored one: the greater tuple wins and a null is smaller than any value. Equal
    /// tuples keep the stored row.
    pub fn with_winner_order(mut self, columns: Vec<String>) -> Self {
        self.winner_order = columns;
        self
    }

    pub fn with_partition_columns(mut self, columns: Vec<String>) -> Self {
        self.partition_columns = columns;
        self
    }

    /// Only these columns and the key columns carry min/max statistics (all of them when
    /// never called): MERGE skips files by their key ranges, so the keys always keep theirs.
    pub fn with_stats_columns(mut self, columns: Vec<String>) -> Self {
        let mut with_keys = self.keys.clone();
        with_keys.extend(columns.into_iter().filter(|c| !self.keys.contains(c)));
        self.stats_columns = Some(with_keys);
        self
    }

    pub fn with_transaction(mut self, txn: AppTransaction) -> Self {
        self.txn = Some(txn);
        self
    }

    /// Whether some source row has a null key, when the caller already knows; otherwise the
    /// source is read once more to find out.
    pub fn with_source_key_nulls(mut self, any_null: bool) -> Self {
        self.source_key_nulls = Some(any_null);
        self
    }

    /// The table at the URL, when the caller has it open already; otherwise it is opened
    /// (loading its log) here.
    pub fn with_target(mut self, table: DeltaTable) -> Self {
        self.target = Some(table);
        self
    }

    pub async fn execute(mut self) -> Result<CommitMetrics> {
        let target = match self.target.take() {
            Some(opened) => Some(opened),
            None => table::open_table(&self.url).await?,
        };
        let Some(target) = target else {
            // First write: every row is an insert, and a plain write is far cheaper than a MERGE.
            return write_dataframe(
                &self.url,
                None,
                self.source,
                SaveMode::Append,
                FileLayout {
                    partition_columns: &self.partition_columns,
                    stats_columns: self.stats_columns.as_deref(),
                },
                None,
                self.txn.as_ref(),
            )
            .await;
        };
        if let Some(done) = AppTransaction::already_committed(self.txn.as_ref(), &target).await? {
            return Ok(done);
        }
        let columns: Vec<String> = self
            .source
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        // `=` rather than `IS NOT DISTINCT FROM` when no incoming key is null: delta-rs turns an
        // equality on a column into `target.k BETWEEN min(source.k) AND max(source.k)` and
        // skips every file whose statistics fall outside, so a small batch whose keys are
        // close together (new events, say) rewrites a few files instead of the whole table.
        let any_null = match self.source_key_nulls {
            Some(known) => known,
            None => source_has_null_key(&self.source, &self.keys).await?,
        };
        let key_op = if any_null {
            Operator::IsNotDistinctFrom
        } else {
            Operator::Eq
        };
        let on = self
            .keys
            .iter()
            .map(|k| binary_expr(side("target", k), key_op, side("source", k)))
            .reduce(Expr::and)
            .ok_or_else(|| EngineError::InvalidWrite {
                table: self.url.to_string(),
                reason: "an upsert needs at least one key column".into(),
            })?;
        let wins = source_wins(&self.winner_order);
        let session = Arc::new(self.source.clone().into_parts().0);
        let url = self.url.clone();
        let (table, metrics) = target
            .merge(self.source, on)
            .with_source_alias("source")
            .with_target_alias("target")
            .with_session_state(session)
            .with_writer_properties(super::writer_properties(
                self.stats_columns.as_deref(),
                super::DataPageVersion::V1,
            ))
            .with_commit_properties(AppTransaction::commit_properties(self.txn.as_ref()))
            .when_matched_update(|update| {
                columns.iter().fold(update.predicate(wins), |u, c| {
                    u.update(c.as_str(), side("source", c))
                })
            })
            .and_then(|m| {
                m.when_not_matched_insert(|insert| {
                    columns
                        .iter()
                        .fold(insert, |i, c| i.set(c.as_str(), side("source", c)))
                })
            })
            .map_err(|e| EngineError::delta(&url, e))?
            .await
            .map_err(|e| EngineError::delta(&url, e))?;
        Ok(CommitMetrics {
            version: table.version(),
            rows_inserted: metrics.num_target_rows_inserted as u64,
            rows_updated: metrics.num_target_rows_updated as u64,
            files_added: metrics.num_target_files_added as u64,
            // MERGE metrics carry no byte count; run summaries report the table's size.
            bytes_added: 0,
            already_committed: false,
        })
    }
}

async fn source_has_null_key(source: &DataFrame, keys: &[String]) -> Result<bool> {
    let Some(any_null) = keys
        .iter()
        .map(|k| col(datafusion::common::Column::from_name(k.as_str())).is_null())
        .reduce(Expr::or)
    else {
        return Ok(false);
    };
    Ok(source
        .clone()
        .filter(any_null)?
        .limit(0, Some(1))?
        .count()
        .await?
        > 0)
}

fn side(alias: &str, column: &str) -> Expr {
    col(datafusion::common::Column::new(Some(alias), column))
}

/// `source` beats `target` on the lexicographic order of `order`, nulls smallest.
fn source_wins(order: &[String]) -> Expr {
    use datafusion::prelude::lit;
    order.iter().rev().fold(lit(false), |rest, c| {
        let (s, t) = (side("source", c), side("target", c));
        let greater = s
            .clone()
            .is_not_null()
            .and(t.clone().is_null().or(s.clone().gt(t.clone())));
        let equal = binary_expr(s, Operator::IsNotDistinctFrom, t);
        greater.or(equal.and(rest))
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::UpsertBuilder;

    fn batch(keys: &[&str], ts: &[i64], value: &[&str]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("ts", DataType::Int64, false),
            Field::new("v", DataType::Utf8, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(keys.to_vec())),
                Arc::new(Int64Array::from(ts.to_vec())),
                Arc::new(StringArray::from(value.to_vec())),
            ],
        )
        .unwrap()
    }

    /// Merges `first`, then `second`, into a new table; returns its `k=v` rows, sorted.
    async fn merged(order: &[&str], first: RecordBatch, second: RecordBatch) -> Vec<String> {
        let dir = std::env::temp_dir().join(format!(
            "medallion-upsert-{}-{}",
            std::process::id(),
            order.join("-")
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let url = url::Url::from_directory_path(&dir).unwrap();
        let ctx = crate::session::new_session(&Default::default()).unwrap();
        for rows in [first, second] {
            UpsertBuilder::new(url.clone(), ctx.read_batch(rows).unwrap(), vec!["k".into()])
                .with_winner_order(order.iter().map(|c| (*c).to_string()).collect())
                .execute()
                .await
                .unwrap();
        }
        let table = crate::table::open_table(&url).await.unwrap().unwrap();
        crate::table::register_table(&ctx, "silver", "t", &table)
            .await
            .unwrap();
        let out = ctx
            .sql("SELECT k || '=' || v AS kv FROM silver.t ORDER BY kv")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        out.iter()
            .flat_map(|b| {
                let kv = datafusion::arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
                let kv = kv.as_any().downcast_ref::<StringArray>().unwrap();
                kv.iter()
                    .map(|s| s.unwrap().to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[tokio::test]
    async fn an_incoming_row_replaces_a_stored_one_only_when_it_wins_the_order() {
        let first = || batch(&["a", "b"], &[5, 5], &["old", "old"]);
        let second = || batch(&["a", "b", "c"], &[4, 6, 1], &["new", "new", "new"]);
        assert_eq!(
            merged(&["ts"], first(), second()).await,
            ["a=old", "b=new", "c=new"]
        );
        // No order (`keep = "any"`: the copies of a key are alike): the stored row stays.
        assert_eq!(
            merged(&[], first(), second()).await,
            ["a=old", "b=old", "c=new"]
        );
    }
}
