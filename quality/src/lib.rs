//! # medallion-quality
//!
//! Declarative data-quality rules: a rule is a name, a SQL boolean expression that holds for
//! good rows, and an action (quarantine, warn, fail). This crate compiles a [`RuleSet`] into
//! DataFusion expressions over a batch of rows and counts what each rule caught; it never
//! reads or writes tables itself and knows no table names.
//!
//! ```text
//!   rows ──► RuleSet::apply ──► rows + _dq_rule (first quarantine/fail rule that failed)
//!                └──► RuleSet::results ──► RuleResult per rule (failed rows, action)
//! ```
//!
//! A row whose `_corrupt_record` is set (input that did not parse) fails the built-in rule
//! [`MALFORMED_RULE`] before any declared rule.
//!
//! ```no_run
//! # async fn demo(ctx: datafusion::prelude::SessionContext, df: datafusion::prelude::DataFrame) -> Result<(), medallion_quality::QualityError> {
//! use medallion_quality::{Action, Rule, RuleSet};
//! let rules = RuleSet::new(vec![Rule::new("id_present", "id IS NOT NULL AND trim(id) <> ''", Action::Quarantine)])?;
//! let checked = rules.apply(&ctx, df, Some("_corrupt_record")).await?;
//! let results = rules.results(&ctx, &checked).await?;
//! # let _ = results; Ok(()) }
//! ```

use datafusion::common::ScalarValue;
use datafusion::error::DataFusionError;
use datafusion::prelude::{DataFrame, SessionContext};
use medallion_engine::EngineError;
use medallion_engine::session::sql_with_table;
use serde::{Deserialize, Serialize};

/// Column naming the rule a row failed; null for rows that passed.
pub const DQ_RULE_COLUMN: &str = "_dq_rule";
/// Name of the built-in rule failed by rows whose input did not parse.
pub const MALFORMED_RULE: &str = "malformed_record";

/// What happens to a row that fails a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The row goes to the quarantine table with the rule's name.
    Quarantine,
    /// The row is counted and logged, and continues.
    Warn,
    /// Any failing row fails the run before the table is written.
    Fail,
}

/// One declared rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique within its table; recorded in `_dq_rule`.
    pub name: String,
    /// SQL boolean expression over the incoming columns; a row passes when it is true
    /// (null counts as a failure).
    pub check: String,
    /// Defaults to quarantine.
    #[serde(default = "default_action")]
    pub action: Action,
}

fn default_action() -> Action {
    Action::Quarantine
}

impl Rule {
    pub fn new(name: impl Into<String>, check: impl Into<String>, action: Action) -> Self {
        Self {
            name: name.into(),
            check: check.into(),
            action,
        }
    }
}

/// Errors of rule compilation and evaluation.
#[derive(Debug, thiserror::Error)]
pub enum QualityError {
    #[error("rule '{rule}' is declared twice")]
    DuplicateRule { rule: String },

    #[error("rule '{rule}': {source}")]
    InvalidRule {
        rule: String,
        #[source]
        source: EngineError,
    },

    #[error(transparent)]
    Engine(#[from] EngineError),

    #[error(transparent)]
    DataFusion(Box<DataFusionError>),
}

/// How many rows a rule caught in one batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleResult {
    pub rule: String,
    pub action: Action,
    pub failed_rows: u64,
}

/// Rows counted per `_dq_rule` value while a checked batch streams past.
#[derive(Debug, Clone, Default)]
pub struct RuleTally {
    rows: u64,
    failed: std::collections::HashMap<String, u64>,
}

impl RuleTally {
    /// Counts one checked batch and returns which of its rows failed a rule.
    pub fn add(
        &mut self,
        batch: &datafusion::arrow::record_batch::RecordBatch,
    ) -> Result<datafusion::arrow::array::BooleanArray, QualityError> {
        use datafusion::arrow::array::AsArray;
        let column = batch.column_by_name(DQ_RULE_COLUMN).ok_or_else(|| {
            DataFusionError::Internal(format!("a checked batch has no {DQ_RULE_COLUMN} column"))
        })?;
        let column =
            datafusion::arrow::compute::cast(column, &datafusion::arrow::datatypes::DataType::Utf8)
                .map_err(|e| DataFusionError::ArrowError(Box::new(e), None))?;
        let names = column.as_string::<i32>();
        self.rows += batch.num_rows() as u64;
        for name in names.iter().flatten() {
            match self.failed.get_mut(name) {
                Some(n) => *n += 1,
                None => {
                    self.failed.insert(name.to_string(), 1);
                }
            }
        }
        Ok(datafusion::arrow::compute::is_not_null(&column)
            .map_err(|e| DataFusionError::ArrowError(Box::new(e), None))?)
    }

    /// Rows counted.
    pub fn rows(&self) -> u64 {
        self.rows
    }
}

/// The ordered rules of one table.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    /// Rule names must be unique (the built-in name included).
    pub fn new(rules: Vec<Rule>) -> Result<Self, QualityError> {
        let mut seen = std::collections::HashSet::from([MALFORMED_RULE.to_string()]);
        for rule in &rules {
            if !seen.insert(rule.name.clone()) {
                return Err(QualityError::DuplicateRule {
                    rule: rule.name.clone(),
                });
            }
        }
        Ok(Self { rules })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether some rule only warns: its count needs [`RuleSet::results`], since a warning
    /// leaves no mark in `_dq_rule`.
    pub fn has_warnings(&self) -> bool {
        self.rules.iter().any(|r| r.action == Action::Warn)
    }

    /// Results of the built-in rule and of every quarantine and fail rule, from a tally of
    /// the checked rows; warn rules count 0 here.
    pub fn results_from_tally(&self, tally: &RuleTally) -> Vec<RuleResult> {
        let count = |name: &str| tally.failed.get(name).copied().unwrap_or(0);
        std::iter::once(RuleResult {
            rule: MALFORMED_RULE.to_string(),
            action: Action::Quarantine,
            failed_rows: count(MALFORMED_RULE),
        })
        .chain(self.rules.iter().map(|r| RuleResult {
            rule: r.name.clone(),
            action: r.action,
            failed_rows: if r.action == Action::Warn {
                0
            } else {
                count(&r.name)
            },
        }))
        .collect()
    }

    /// `NOT coalesce((check), false)`: true for rows that fail `rule`.
    fn failed_sql(rule: &Rule) -> String {
        format!("NOT coalesce(({}), false)", rule.check)
    }

    /// Plans every rule against `df`'s columns (and the tables of `ctx`, which a rule may
    /// read in a subquery) without running anything.
    pub async fn check_plans(
        &self,
        ctx: &SessionContext,
        df: &DataFrame,
    ) -> Result<(), QualityError> {
        for rule in &self.rules {
            let sql = format!(
                "SELECT {} AS failed FROM {RULES_INPUT}",
                Self::failed_sql(rule)
            );
            sql_with_table(ctx, RULES_INPUT, df.clone(), &sql)
                .await
                .map_err(|source| QualityError::InvalidRule {
                    rule: rule.name.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Adds [`DQ_RULE_COLUMN`]: the first quarantine or fail rule the row fails, in declared
    /// order, after the built-in malformed-input rule on `corrupt_column`. Rules are SQL over
    /// the columns of `df` and may read any table of `ctx`.
    ///
    /// Every rule is evaluated on every row, as Spark's and Delta Live Tables' expectations
    /// are, not only on the rows that passed the rules before it: a rule must not fail on a
    /// value that an earlier rule rejects (`try_cast`, not `cast`). A `CASE` over the rules
    /// alone would evaluate each on the rows left by the ones before, but it copies those rows
    /// (the JSON of every event, say) once per rule that catches any: a third of the cost of
    /// checking events. Here the rules are tested together first, and only the few rows that
    /// fail one are copied, to find which.
    pub async fn apply(
        &self,
        ctx: &SessionContext,
        df: DataFrame,
        corrupt_column: Option<&str>,
    ) -> Result<DataFrame, QualityError> {
        self.check_plans(ctx, &df).await?;
        let mut failures: Vec<(String, String)> = Vec::new();
        if let Some(c) = corrupt_column {
            failures.push((
                format!("{} IS NOT NULL", quote_ident(c)),
                quote_literal(MALFORMED_RULE),
            ));
        }
        for rule in self.rules.iter().filter(|r| r.action != Action::Warn) {
            failures.push((Self::failed_sql(rule), quote_literal(&rule.name)));
        }
        let dq = if failures.is_empty() {
            "CAST(NULL AS VARCHAR)".to_string()
        } else {
            let any = failures
                .iter()
                .map(|(failed, _)| format!("({failed})"))
                .collect::<Vec<_>>()
                .join(" OR ");
            let which = failures
                .iter()
                .map(|(failed, name)| format!("WHEN {failed} THEN {name}"))
                .collect::<Vec<_>>()
                .join(" ");
            // No ELSE: DataFusion would copy the passing rows to evaluate it on them.
            format!("CASE WHEN {any} THEN CASE {which} END END")
        };
        let sql = format!("SELECT *, {dq} AS {DQ_RULE_COLUMN} FROM {RULES_INPUT}");
        Ok(sql_with_table(ctx, RULES_INPUT, df, &sql).await?)
    }

    /// Counts, in one pass over `checked` (the output of [`RuleSet::apply`]), the rows each
    /// rule caught. Warn rules count every failing row, quarantined or not.
    pub async fn results(
        &self,
        ctx: &SessionContext,
        checked: &DataFrame,
    ) -> Result<Vec<RuleResult>, QualityError> {
        let mut names: Vec<(String, Action)> =
            vec![(MALFORMED_RULE.to_string(), Action::Quarantine)];
        names.extend(self.rules.iter().map(|r| (r.name.clone(), r.action)));
        let mut sums = Vec::new();
        for (i, (name, action)) in names.iter().enumerate() {
            let failed = match (i, action) {
                (0, _) | (_, Action::Quarantine | Action::Fail) => {
                    format!("{DQ_RULE_COLUMN} = {}", quote_literal(name))
                }
                (_, Action::Warn) => Self::failed_sql(&self.rules[i - 1]),
            };
            sums.push(format!(
                "CAST(coalesce(sum(CASE WHEN {failed} THEN 1 ELSE 0 END), 0) AS BIGINT) AS r{i}"
            ));
        }
        let sql = format!("SELECT {} FROM {RULES_INPUT}", sums.join(", "));
        let batches = sql_with_table(ctx, RULES_INPUT, checked.clone(), &sql)
            .await?
            .collect()
            .await?;
        let mut results = Vec::with_capacity(names.len());
        for (i, (rule, action)) in names.into_iter().enumerate() {
            let failed_rows = batches
                .first()
                .map(|b| ScalarValue::try_from_array(b.column(i), 0))
                .transpose()?
                .and_then(|v| match v {
                    ScalarValue::Int64(Some(n)) => u64::try_from(n).ok(),
                    _ => None,
                })
                .unwrap_or(0);
            results.push(RuleResult {
                rule,
                action,
                failed_rows,
            });
        }
        Ok(results)
    }
}

/// The name the rows being checked are registered under while rules are planned.
const RULES_INPUT: &str = "__medallion_rules_input";

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

impl From<DataFusionError> for QualityError {
    fn from(e: DataFusionError) -> Self {
        QualityError::DataFusion(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Array, AsArray, Int64Array, RecordBatch, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    use super::*;

    fn rule(name: &str, check: &str, action: Action) -> Rule {
        Rule {
            name: name.into(),
            check: check.into(),
            action,
        }
    }

    /// Each row is charged to the first rule it fails, in declared order after the malformed
    /// rule; a warn rule charges no row; a row that fails nothing has no rule.
    #[tokio::test]
    async fn a_row_is_charged_to_the_first_rule_it_fails() -> Result<(), Box<dyn std::error::Error>>
    {
        let ctx = medallion_engine::session::new_session(&Default::default())?;
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("x", DataType::Utf8, true),
            Field::new("_corrupt", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3, 4, 5, 6])),
                Arc::new(StringArray::from(vec![
                    Some("7"),
                    None,
                    Some("-3"),
                    Some("abc"),
                    Some("12"),
                    Some("1"),
                ])),
                Arc::new(StringArray::from(vec![
                    None,
                    None,
                    None,
                    None,
                    None,
                    Some("{not json"),
                ])),
            ],
        )?;
        let rules = RuleSet::new(vec![
            rule("x_present", "x IS NOT NULL", Action::Quarantine),
            rule("x_short", "length(x) < 3", Action::Warn),
            rule(
                "x_integer",
                "try_cast(x AS BIGINT) IS NOT NULL",
                Action::Quarantine,
            ),
            rule(
                "x_positive",
                "try_cast(x AS BIGINT) > 0",
                Action::Quarantine,
            ),
            rule("x_small", "try_cast(x AS BIGINT) < 10", Action::Quarantine),
        ])?;
        let checked = rules
            .apply(&ctx, ctx.read_batch(batch)?, Some("_corrupt"))
            .await?;
        let mut charged: Vec<(i64, Option<String>)> = Vec::new();
        for b in checked.clone().collect().await? {
            let ids = b
                .column(0)
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
            let dq = datafusion::arrow::compute::cast(
                b.column_by_name(DQ_RULE_COLUMN).ok_or("no _dq_rule")?,
                &DataType::Utf8,
            )?;
            let dq = dq.as_string::<i32>();
            for i in 0..b.num_rows() {
                charged.push((
                    ids.value(i),
                    dq.is_valid(i).then(|| dq.value(i).to_string()),
                ));
            }
        }
        charged.sort();
        let named = |s: &str| Some(s.to_string());
        assert_eq!(
            charged,
            vec![
                (1, None),
                (2, named("x_present")),
                (3, named("x_positive")),
                // Fails x_integer, x_positive and x_small: the first is charged.
                (4, named("x_integer")),
                (5, named("x_small")),
                (6, named(MALFORMED_RULE)),
            ]
        );
        let warned = rules.results(&ctx, &checked).await?;
        let short = warned
            .iter()
            .find(|r| r.rule == "x_short")
            .ok_or("no x_short")?;
        assert_eq!(short.failed_rows, 2, "the null and the 3-long 'abc'");
        Ok(())
    }
}
