//! `medallion validate`: everything that can be checked without reading data, reported all
//! at once with file and line. Every SQL text is planned against the declared schemas (bronze
//! from its source, silver and gold from the plans before them), so a typo in a column name
//! fails here and not half-way through a run.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::common::TableReference;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use medallion_engine::{session, table};
use medallion_quality::{QualityError, RuleSet};

use crate::error::{ConfigIssue, JobError};
use crate::pipeline::{
    CHANGED_ROWS, CHANGED_SCHEMA, DELETED, FormatSpec, GoldKind, GoldSpec, Incremental,
    JoinedScript, Keep, Pipeline, SourceSpec,
};
use crate::run::bronze::bronze_schema;
use crate::run::silver::{INGEST_RUN_ID, INPUT_RELATION, tie_break, with_derived};

/// What a valid pipeline looks like once planned.
#[derive(Debug, Clone)]
pub struct Validated {
    pub tables: Vec<(String, String, SchemaRef)>,
}

struct Checker<'a> {
    pipeline: &'a Pipeline,
    issues: Vec<ConfigIssue>,
}

impl Checker<'_> {
    fn at(&mut self, offset: usize, message: impl Into<String>) {
        let line = self.pipeline.line_of(offset);
        self.issues.push(ConfigIssue {
            file: self.pipeline.file_label.clone(),
            line: Some(line),
            message: message.into(),
        });
    }

    fn sql_issue(&mut self, sql_name: &str, error: &datafusion::error::DataFusionError) {
        let message = error.to_string();
        self.issues.push(ConfigIssue {
            file: self.pipeline.sql_label(sql_name),
            line: error_line(error, &message),
            message,
        });
    }

    /// [`Self::sql_issue`] for a script of several files: the line names its file.
    fn script_issue(&mut self, script: &JoinedScript, error: &datafusion::error::DataFusionError) {
        let message = error.to_string();
        let at = error_line(error, &message).and_then(|line| script.file_line(line));
        match at {
            Some((name, line)) => self.issues.push(ConfigIssue {
                file: self.pipeline.sql_label(name),
                line: Some(line),
                message,
            }),
            // Without a line, the error is named by the file that states the script's query.
            None => self.issues.push(ConfigIssue {
                file: self.pipeline.sql_label(script.query_file()),
                line: None,
                message,
            }),
        }
    }
}

/// The line of SQL an error points at: planning errors carry a span; parser errors name the
/// line in their text.
fn error_line(error: &datafusion::error::DataFusionError, message: &str) -> Option<usize> {
    error
        .diagnostic()
        .and_then(|d| d.span)
        .and_then(|span| usize::try_from(span.start.line).ok())
        .filter(|line| *line > 0)
        .or_else(|| sql_error_line(message))
}

/// Finds `Line: N` in a DataFusion/sqlparser message.
fn sql_error_line(message: &str) -> Option<usize> {
    let rest = &message[message.find("Line: ")? + 6..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn register_empty(
    ctx: &SessionContext,
    layer: &str,
    name: &str,
    schema: SchemaRef,
) -> Result<(), JobError> {
    let reference = TableReference::partial(layer, name);
    ctx.deregister_table(reference.clone())?;
    ctx.register_table(
        reference,
        Arc::new(MemTable::try_new(schema, vec![vec![]])?),
    )?;
    Ok(())
}

/// Checks `pipeline` and returns every table's planned schema, or every problem found.
pub async fn validate(pipeline: &Pipeline) -> Result<Validated, JobError> {
    let ctx = session::new_session(&session::SessionOptions::default())?;
    let mut c = Checker {
        pipeline,
        issues: Vec::new(),
    };
    let mut tables = Vec::new();
    let spec = &pipeline.spec;

    let mut seen = HashSet::new();
    for b in &spec.bronze {
        let name = b.table.get_ref();
        if !seen.insert(("bronze", name.clone())) {
            c.at(
                b.table.span().start,
                format!("bronze table '{name}' is declared twice"),
            );
        }
        let SourceSpec::Files(files) = &b.source;
        match (files.format, files.columns.is_empty(), files.explode.is_some()) {
            (FormatSpec::Csv, true, _) => c.at(b.table.span().start, format!("bronze table '{name}': a csv source needs `columns`")),
            (FormatSpec::Jsonl, false, _) => c.at(b.table.span().start, format!("bronze table '{name}': a jsonl source has the one column `value`; remove `columns`")),
            (FormatSpec::Csv | FormatSpec::Jsonl, _, true) => c.at(b.table.span().start, format!("bronze table '{name}': `explode` applies to json documents only")),
            _ => {}
        }
        match pipeline.files_source(b) {
            Ok(source) => {
                let schema = bronze_schema(&source);
                register_empty(&ctx, "bronze", name, Arc::clone(&schema))?;
                tables.push(("bronze".to_string(), name.clone(), schema));
            }
            Err(e) => c.at(b.table.span().start, format!("bronze table '{name}': {e}")),
        }
    }

    for s in &spec.silver {
        let name = s.table.get_ref().clone();
        let at = s.table.span().start;
        for table in [name.clone(), s.quarantine_table()] {
            if !seen.insert(("silver", table.clone())) {
                c.at(at, format!("silver table '{table}' is declared twice"));
            }
        }
        if s.keep == Keep::Any && !s.keep_latest_by.is_empty() {
            c.at(
                at,
                format!(
                    "silver table '{name}': `keep = \"any\"` keeps any copy of a key, so it takes no `keep_latest_by`"
                ),
            );
        }
        let Some((_, _, bronze)) = tables
            .iter()
            .find(|(l, n, _)| l == "bronze" && *n == s.from)
            .cloned()
        else {
            c.at(
                at,
                format!(
                    "silver table '{name}' reads bronze table '{}', which is not declared",
                    s.from
                ),
            );
            continue;
        };
        let bronze_rows = ctx.read_table(Arc::new(MemTable::try_new(
            Arc::clone(&bronze),
            vec![vec![]],
        )?))?;
        let input = match with_derived(&ctx, bronze_rows, s).await {
            Ok(df) => df,
            Err(e) => {
                let offset = s.derive.first().map_or(at, |d| d.span().start);
                c.at(
                    offset,
                    format!("silver table '{name}': derived column: {e}"),
                );
                continue;
            }
        };
        let input_schema: SchemaRef = Arc::new(input.schema().as_arrow().clone());
        match RuleSet::new(s.rules()) {
            Err(QualityError::DuplicateRule { rule }) => {
                let offset = s
                    .rules
                    .iter()
                    .filter(|r| r.get_ref().name == rule)
                    .nth(1)
                    .map_or(at, |r| r.span().start);
                c.at(
                    offset,
                    format!("silver table '{name}': rule name '{rule}' is used twice"),
                );
            }
            Err(e) => c.at(at, format!("silver table '{name}': {e}")),
            Ok(rules) => {
                if let Err(e) = rules.check_plans(&ctx, &input).await {
                    let offset = match &e {
                        QualityError::InvalidRule { rule, .. } => s
                            .rules
                            .iter()
                            .find(|r| r.get_ref().name == *rule)
                            .map_or(at, |r| r.span().start),
                        _ => at,
                    };
                    c.at(offset, format!("silver table '{name}': {e}"));
                }
            }
        }
        let sql = match pipeline.sql(&s.sql) {
            Ok(sql) => sql,
            Err(_) => {
                c.at(
                    at,
                    format!(
                        "silver table '{name}': SQL file '{}' not found",
                        pipeline.sql_label(&s.sql)
                    ),
                );
                continue;
            }
        };
        ctx.deregister_table(INPUT_RELATION)?;
        ctx.register_table(
            INPUT_RELATION,
            Arc::new(MemTable::try_new(Arc::clone(&input_schema), vec![vec![]])?),
        )?;
        let planned = ctx.sql(sql).await;
        ctx.deregister_table(INPUT_RELATION)?;
        let df = match planned {
            Ok(df) => df,
            Err(e) => {
                c.sql_issue(&s.sql, &e);
                continue;
            }
        };
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let has = |col: &str| schema.field_with_name(col).is_ok();
        for (what, cols) in [
            ("key column", &s.key),
            ("keep_latest_by column", &s.keep_latest_by),
            ("partition column", &s.partition_by),
            (
                "stats column",
                s.stats_columns.as_ref().unwrap_or(&Vec::new()),
            ),
        ] {
            if what == "key column" && cols.is_empty() {
                c.at(at, format!("silver table '{name}': `key` names no column"));
            }
            for col in cols.iter().filter(|col| !has(col)) {
                c.at(
                    at,
                    format!(
                        "silver table '{name}': {what} '{col}' is not produced by {}",
                        pipeline.sql_label(&s.sql)
                    ),
                );
            }
        }
        for col in tie_break(s).iter().filter(|col| !has(col)) {
            c.at(
                at,
                format!(
                    "silver table '{name}': {} must select '{col}' (the keep rule's tie-break)",
                    pipeline.sql_label(&s.sql)
                ),
            );
        }
        register_empty(&ctx, "silver", &name, Arc::clone(&schema))?;
        tables.push(("silver".to_string(), name.clone(), schema));
        let mut q_fields: Vec<_> = bronze.fields().iter().map(|f| f.as_ref().clone()).collect();
        q_fields.push(arrow::datatypes::Field::new(
            medallion_quality::DQ_RULE_COLUMN,
            arrow::datatypes::DataType::Utf8,
            true,
        ));
        q_fields.push(arrow::datatypes::Field::new(
            INGEST_RUN_ID,
            arrow::datatypes::DataType::Utf8,
            false,
        ));
        let q_schema = Arc::new(arrow::datatypes::Schema::new(q_fields));
        register_empty(&ctx, "silver", &s.quarantine_table(), Arc::clone(&q_schema))?;
        tables.push(("silver".to_string(), s.quarantine_table(), q_schema));
    }

    // The lake tables each model with `incremental` reads, for its check below.
    let mut read_by_model = BTreeMap::new();
    for g in &spec.gold {
        let name = g.table.get_ref().clone();
        let at = g.table.span().start;
        if !seen.insert(("gold", name.clone())) {
            c.at(at, format!("gold table '{name}' is declared twice"));
        }
        let sql = match pipeline.sql(&g.sql) {
            Ok(sql) => sql,
            Err(_) => {
                c.at(
                    at,
                    format!(
                        "gold table '{name}': SQL file '{}' not found",
                        pipeline.sql_label(&g.sql)
                    ),
                );
                continue;
            }
        };
        let df = match ctx.sql(sql).await {
            Ok(df) => df,
            Err(e) => {
                c.sql_issue(&g.sql, &e);
                continue;
            }
        };
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        if g.incremental.is_some() {
            read_by_model.insert(name.clone(), crate::run::tables_read(df.logical_plan()));
        }
        for (what, col) in g
            .partition_by
            .iter()
            .map(|col| ("partition column", col))
            .chain(
                g.stats_columns
                    .iter()
                    .flatten()
                    .map(|col| ("stats column", col)),
            )
            .filter(|(_, col)| schema.field_with_name(col).is_err())
        {
            c.at(
                at,
                format!(
                    "gold table '{name}': {what} '{col}' is not produced by {}",
                    pipeline.sql_label(&g.sql)
                ),
            );
        }
        if let Some(r) = &g.rebuild_by {
            let column = &r.column;
            // By partition when the table is partitioned by the column, else by key.
            let by_partition = g.partition_by.contains(column);
            if g.kind != GoldKind::Table {
                c.at(
                    at,
                    format!("gold view '{name}': rebuild_by applies to tables, and a view is never written"),
                );
            } else if !by_partition && schema.field_with_name(column).is_err() {
                c.at(
                    at,
                    format!(
                        "gold table '{name}': rebuild_by column '{column}' is neither one of its partition_by columns nor produced by {}",
                        pipeline.sql_label(&g.sql)
                    ),
                );
            }
            for from in &r.from {
                let silver = from
                    .strip_prefix("silver.")
                    .and_then(|t| tables.iter().find(|(l, n, _)| l == "silver" && n == t))
                    .and_then(|(_, t, schema)| {
                        let spec = spec.silver.iter().find(|s| s.table.get_ref() == t)?;
                        Some((spec, schema))
                    });
                let problem = match silver {
                    None => Some("must name a silver table (silver.<table>)".to_string()),
                    Some((s, _)) if by_partition && !s.partition_by.contains(column) => Some(
                        format!("must be partitioned by '{column}', as the table is"),
                    ),
                    // Partition values are not stored in the data files the changed keys
                    // are read from.
                    Some((s, schema))
                        if !by_partition
                            && (s.partition_by.contains(column)
                                || schema.field_with_name(column).is_err()) =>
                    {
                        Some(format!(
                            "must have '{column}' as a column that is not a partition column"
                        ))
                    }
                    _ => None,
                };
                if let Some(problem) = problem {
                    c.at(
                        at,
                        format!("gold table '{name}': rebuild_by from '{from}' {problem}"),
                    );
                }
            }
            for through in &r.through {
                let t = &through.table;
                let read = tables
                    .iter()
                    .find(|(l, n, _)| format!("{l}.{n}") == *t && l == "silver")
                    .map(|(_, _, schema)| Arc::clone(schema));
                let problem = match (&read, pipeline.sql(&through.sql)) {
                    _ if by_partition => Some(format!(
                        "applies to a rebuild by key, and '{column}' is a partition column"
                    )),
                    (None, _) => Some("must name a silver table (silver.<table>)".to_string()),
                    _ if r.from.contains(t) => Some("is listed in from as well".to_string()),
                    (_, Err(_)) => Some(format!(
                        "names SQL file '{}', which is not found",
                        pipeline.sql_label(&through.sql)
                    )),
                    (Some(schema), Ok(sql)) => {
                        // The query reads the changed rows as a table of their own.
                        let changed = vec![(
                            TableReference::bare(CHANGED_ROWS),
                            table::no_rows_changed(&ctx, schema)?,
                        )];
                        let planned =
                            session::with_tables(&ctx, changed, async || Ok(ctx.sql(sql).await))
                                .await?;
                        match planned {
                            Err(e) => {
                                c.sql_issue(&through.sql, &e);
                                None
                            }
                            Ok(keys) if keys.schema().fields().len() != 1 => Some(format!(
                                "has a query ({}) that returns {} columns, not one: the values of '{column}'",
                                pipeline.sql_label(&through.sql),
                                keys.schema().fields().len()
                            )),
                            Ok(_) => None,
                        }
                    }
                };
                if let Some(problem) = problem {
                    c.at(
                        at,
                        format!("gold table '{name}': rebuild_by through '{t}' {problem}"),
                    );
                }
            }
        }
        match g.kind {
            GoldKind::View => {
                let reference = TableReference::partial("gold", name.as_str());
                ctx.deregister_table(reference.clone())?;
                ctx.register_table(reference, df.into_view())?;
            }
            GoldKind::Table => {
                register_empty(&ctx, "gold", &name, Arc::clone(&schema))?;
                tables.push(("gold".to_string(), name, schema));
            }
        }
    }

    for g in &pipeline.spec.gold {
        if let (Some(incremental), Some(read)) =
            (&g.incremental, read_by_model.get(g.table.get_ref()))
        {
            check_incremental(&ctx, &mut c, g, incremental, read, &tables).await?;
        }
    }

    if c.issues.is_empty() {
        Ok(Validated { tables })
    } else {
        Err(JobError::Config { issues: c.issues })
    }
}

/// Checks a gold model's `incremental` update, once every table is registered: its key
/// columns are the model's, the model reads silver tables alone (their changed rows are what
/// the query reads), and the query plans over no changed rows and returns the model's
/// columns and a boolean `_deleted`.
async fn check_incremental(
    ctx: &SessionContext,
    c: &mut Checker<'_>,
    g: &GoldSpec,
    incremental: &Incremental,
    read: &BTreeSet<String>,
    tables: &[(String, String, SchemaRef)],
) -> Result<(), JobError> {
    let pipeline = c.pipeline;
    let name = g.table.get_ref();
    let at = g.table.span().start;
    let mut problems = Vec::new();
    let Some((_, _, schema)) = tables.iter().find(|(l, n, _)| l == "gold" && n == name) else {
        // Every planned model but a view has its table's schema there.
        c.at(
            at,
            format!(
                "gold view '{name}': incremental applies to tables, and a view is never written"
            ),
        );
        return Ok(());
    };
    for key in incremental
        .key
        .iter()
        .filter(|k| schema.field_with_name(k).is_err())
    {
        problems.push(format!(
            "key '{key}' is not produced by {}",
            pipeline.sql_label(&g.sql)
        ));
    }
    if incremental.key.is_empty() {
        problems.push("key names no column".to_string());
    }
    let mut changed = Vec::new();
    for t in read {
        match t
            .strip_prefix("silver.")
            .and_then(|n| tables.iter().find(|(l, m, _)| l == "silver" && m == n))
        {
            Some((_, n, schema)) => changed.push((
                TableReference::partial(CHANGED_SCHEMA, n.as_str()),
                table::no_rows_changed(ctx, schema)?,
            )),
            None => problems.push(format!(
                "reads changes of silver tables alone, and {} reads {t}",
                pipeline.sql_label(&g.sql)
            )),
        }
    }
    let missing: Vec<&String> = incremental
        .sql_files()
        .filter(|f| pipeline.sql(f).is_err())
        .collect();
    match pipeline.incremental_script(incremental) {
        Err(_) => problems.extend(missing.into_iter().map(|f| {
            format!(
                "names SQL file '{}', which is not found",
                pipeline.sql_label(f)
            )
        })),
        Ok(script) => {
            let planned = session::with_tables(ctx, changed, async || {
                Ok(session::sql_script(ctx, &script.text).await)
            })
            .await?;
            match planned {
                Err(e) => c.script_issue(&script, &e),
                Ok(rows) => {
                    let returned = rows.schema();
                    let missing: Vec<&str> = schema
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .filter(|f| returned.field_with_unqualified_name(f).is_err())
                        .collect();
                    if !missing.is_empty() {
                        problems.push(format!(
                            "has a query ({}) that does not return the columns {}",
                            pipeline.sql_label(&incremental.sql),
                            missing.join(", ")
                        ));
                    }
                    if !returned
                        .field_with_unqualified_name(DELETED)
                        .is_ok_and(|f| f.data_type() == &arrow::datatypes::DataType::Boolean)
                    {
                        problems.push(format!(
                            "has a query ({}) that does not return a boolean column {DELETED}",
                            pipeline.sql_label(&incremental.sql)
                        ));
                    }
                }
            }
        }
    }
    for problem in problems {
        c.at(at, format!("gold table '{name}': incremental {problem}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_line_in_a_parser_message() {
        assert_eq!(
            super::sql_error_line(
                "SQL error: ParserError(\"Expected: end of statement, found: x at Line: 3, Column: 5\")"
            ),
            Some(3)
        );
        assert_eq!(super::sql_error_line("no line"), None);
    }
}
