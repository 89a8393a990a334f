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
//! # async fn demo(df: datafusion::prelude::DataFrame) -> Result<(), medallion_quality::QualityError> {
//! use medallion_quality::{Action, Rule, RuleSet};
//! let rules = RuleSet::new(vec![Rule::new("id_present", "id IS NOT NULL AND trim(id) <> ''", Action::Quarantine)])?;
//! let checked = rules.apply(df, Some("_corrupt_record"))?;
//! let results = rules.results(&checked).await?;
//! # let _ = results; Ok(()) }
//! ```

use datafusion::common::ScalarValue;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{Expr, lit, when};
use datafusion::prelude::{DataFrame, coalesce, col};
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
        source: DataFusionError,
    },

    #[error(transparent)]
    DataFusion(#[from] DataFusionError),
}

/// How many rows a rule caught in one batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleResult {
    pub rule: String,
    pub action: Action,
    pub failed_rows: u64,
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
                return Err(QualityError::DuplicateRule { rule: rule.name.clone() });
            }
        }
        Ok(Self { rules })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    fn check_expr(df: &DataFrame, rule: &Rule) -> Result<Expr, QualityError> {
        let expr = df.parse_sql_expr(&rule.check).map_err(|source| QualityError::InvalidRule {
            rule: rule.name.clone(),
            source,
        })?;
        Ok(expr)
    }

    fn failed(df: &DataFrame, rule: &Rule) -> Result<Expr, QualityError> {
        Ok(!coalesce(vec![Self::check_expr(df, rule)?, lit(false)]))
    }

    /// Plans every rule against `df`'s columns without running anything.
    pub fn check_plans(&self, df: &DataFrame) -> Result<(), QualityError> {
        self.apply(df.clone(), None).map(|_| ())
    }

    /// Adds [`DQ_RULE_COLUMN`]: the first quarantine or fail rule the row fails, in declared
    /// order, after the built-in malformed-input rule on `corrupt_column`.
    pub fn apply(&self, df: DataFrame, corrupt_column: Option<&str>) -> Result<DataFrame, QualityError> {
        let mut branches: Vec<(Expr, Expr)> = Vec::new();
        if let Some(c) = corrupt_column {
            branches.push((col(c).is_not_null(), lit(MALFORMED_RULE)));
        }
        for rule in self.rules.iter().filter(|r| r.action != Action::Warn) {
            branches.push((Self::failed(&df, rule)?, lit(rule.name.as_str())));
        }
        // Also plan warn rules, so a broken one fails here rather than mid-run.
        for rule in self.rules.iter().filter(|r| r.action == Action::Warn) {
            Self::check_expr(&df, rule)?;
        }
        let dq = match branches.split_first() {
            None => lit(ScalarValue::Utf8(None)),
            Some(((first_when, first_then), rest)) => {
                let mut builder = when(first_when.clone(), first_then.clone());
                for (w, t) in rest {
                    builder = builder.when(w.clone(), t.clone());
                }
                builder.otherwise(lit(ScalarValue::Utf8(None)))?
            }
        };
        Ok(df.with_column(DQ_RULE_COLUMN, dq)?)
    }

    /// Counts, in one pass over `checked` (the output of [`RuleSet::apply`]), the rows each
    /// rule caught. Warn rules count every failing row, quarantined or not.
    pub async fn results(&self, checked: &DataFrame) -> Result<Vec<RuleResult>, QualityError> {
        let mut names: Vec<(String, Action)> = vec![(MALFORMED_RULE.to_string(), Action::Quarantine)];
        names.extend(self.rules.iter().map(|r| (r.name.clone(), r.action)));
        let mut aggregates = Vec::new();
        for (i, (name, action)) in names.iter().enumerate() {
            let failed = match (i, action) {
                (0, _) | (_, Action::Quarantine | Action::Fail) => col(DQ_RULE_COLUMN).eq(lit(name.as_str())),
                (_, Action::Warn) => Self::failed(checked, &self.rules[i - 1])?,
            };
            let as_int = when(failed, lit(1i64)).otherwise(lit(0i64))?;
            aggregates.push(datafusion::functions_aggregate::expr_fn::sum(as_int).alias(format!("r{i}")));
        }
        let batches = checked.clone().aggregate(vec![], aggregates)?.collect().await?;
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
            results.push(RuleResult { rule, action, failed_rows });
        }
        Ok(results)
    }
}
