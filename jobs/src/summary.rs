//! The machine-readable record every run ends with: written to a file and printed as the
//! last line of stdout, so an orchestrator never has to parse logs.

use medallion_engine::skew::RepartitionImbalance;
use medallion_quality::RuleResult;
use serde::Serialize;

/// What one table did in a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TableSummary {
    pub layer: String,
    pub table: String,
    /// Rows read from the layer's input (landed rows, bronze rows, or the model's rows).
    pub rows_read: u64,
    /// Rows inserted (for silver: new keys; for gold: the table's rows).
    pub rows_written: u64,
    /// Rows that replaced a stored row of the same key.
    pub rows_updated: u64,
    pub rows_quarantined: u64,
    pub files_read: u64,
    pub bytes_read: u64,
    pub files_written: u64,
    /// Size of the table's data files after the run.
    pub table_bytes: u64,
    pub delta_version: Option<u64>,
    pub duration_ms: u64,
    /// Bytes written to local spill files because the memory limit was reached.
    #[serde(skip_serializing_if = "is_zero")]
    pub spilled_bytes: u64,
    /// Partitions a gold model rebuilt when it rebuilt only those its changed input touched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions_rebuilt: Option<u64>,
    /// Values of its `rebuild_by` key a gold model rebuilt when it rebuilt only the keys its
    /// changed inputs touched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys_rebuilt: Option<u64>,
    /// Keys whose rows a gold model with `incremental` updated from its inputs' changed rows
    /// (rows it replaced, added or removed), when it was updated so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys_updated: Option<u64>,
    /// Slices of partitions a gold model was built in, one after another, when more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition_slices: Option<u64>,
    /// Why nothing was written, when nothing was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleResult>,
    /// How evenly each hash repartition of the table's queries spread its rows.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub repartitions: Vec<RepartitionImbalance>,
}

/// The summary of a whole run.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub pipeline: String,
    pub run_id: String,
    pub status: RunStatus,
    pub exit_code: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub started_at: String,
    pub duration_ms: u64,
    pub layers: Vec<String>,
    pub tables: Vec<TableSummary>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Succeeded,
    Failed,
}

impl RunSummary {
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self)
            .unwrap_or_else(|e| format!("{{\"status\":\"failed\",\"error\":\"summary: {e}\"}}"))
    }

    /// A short human table of what each table did.
    pub fn to_table(&self) -> String {
        let mut out = format!(
            "{:<7} {:<24} {:>10} {:>10} {:>9} {:>11} {:>8} {:>9}\n",
            "layer", "table", "rows in", "written", "updated", "quarantined", "version", "ms"
        );
        for t in &self.tables {
            out.push_str(&format!(
                "{:<7} {:<24} {:>10} {:>10} {:>9} {:>11} {:>8} {:>9}{}\n",
                t.layer,
                t.table,
                t.rows_read,
                t.rows_written,
                t.rows_updated,
                t.rows_quarantined,
                t.delta_version.map_or("-".to_string(), |v| v.to_string()),
                t.duration_ms,
                t.skipped
                    .as_ref()
                    .map_or(String::new(), |s| format!("  ({s})")),
            ));
        }
        out.push_str(&format!(
            "{:?} in {} ms (run {})\n",
            self.status, self.duration_ms, self.run_id
        ));
        out
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
