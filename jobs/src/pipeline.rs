//! The pipeline definition: a folder holding `pipeline.toml` and the `.sql` files it names.
//!
//! One typed tree of serde structs with `deny_unknown_fields`: a misspelt key is an error
//! with its line, not a silently ignored setting. Locations are filled from variables
//! (`${lake}`), whose defaults the file declares and `--var name=value` overrides, so the
//! same pipeline runs on a laptop path or an `s3://` URI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use medallion_connectors::files::{Explode, FileFormat, FilesSource};
use medallion_engine::ops::Compression;
use medallion_quality::Rule;
use serde::Deserialize;
use toml::Spanned;
use url::Url;

use crate::error::{ConfigIssue, JobError};

/// The name of the declarative file inside a pipeline folder.
pub const PIPELINE_FILE: &str = "pipeline.toml";

/// The pipelines compiled into the binary, so `medallion demo` and `medallion run commerce`
/// work from any directory: `(name, [(relative path, text)])`.
const BUILTIN: &[(&str, &[(&str, &str)])] = &[(
    "commerce",
    &[
        (
            "pipeline.toml",
            include_str!("../../pipelines/commerce/pipeline.toml"),
        ),
        (
            "silver/fx_rates.sql",
            include_str!("../../pipelines/commerce/silver/fx_rates.sql"),
        ),
        (
            "silver/products.sql",
            include_str!("../../pipelines/commerce/silver/products.sql"),
        ),
        (
            "silver/customers.sql",
            include_str!("../../pipelines/commerce/silver/customers.sql"),
        ),
        (
            "silver/orders.sql",
            include_str!("../../pipelines/commerce/silver/orders.sql"),
        ),
        (
            "silver/events.sql",
            include_str!("../../pipelines/commerce/silver/events.sql"),
        ),
        (
            "gold/rate_by_hour.sql",
            include_str!("../../pipelines/commerce/gold/rate_by_hour.sql"),
        ),
        (
            "gold/orders_priced.sql",
            include_str!("../../pipelines/commerce/gold/orders_priced.sql"),
        ),
        (
            "gold/daily_sales.sql",
            include_str!("../../pipelines/commerce/gold/daily_sales.sql"),
        ),
        (
            "gold/customer_360.sql",
            include_str!("../../pipelines/commerce/gold/customer_360.sql"),
        ),
        (
            "gold/customer_360_repriced.sql",
            include_str!("../../pipelines/commerce/gold/customer_360_repriced.sql"),
        ),
        (
            "gold/events_of_changes.sql",
            include_str!("../../pipelines/commerce/gold/events_of_changes.sql"),
        ),
        (
            "gold/customer_360_incremental.sql",
            include_str!("../../pipelines/commerce/gold/customer_360_incremental.sql"),
        ),
        (
            "gold/daily_engagement.sql",
            include_str!("../../pipelines/commerce/gold/daily_engagement.sql"),
        ),
        (
            "gold/daily_engagement_incremental.sql",
            include_str!("../../pipelines/commerce/gold/daily_engagement_incremental.sql"),
        ),
    ],
)];

/// Names of the pipelines built into the binary.
pub fn builtin_names() -> Vec<&'static str> {
    BUILTIN.iter().map(|(n, _)| *n).collect()
}

/// `pipeline.toml` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    /// Names the pipeline in state keys, transaction ids and summaries.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Variable defaults; `--var` overrides them.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    pub lake: LakeSpec,
    #[serde(default)]
    pub bronze: Vec<BronzeSpec>,
    #[serde(default)]
    pub silver: Vec<SilverSpec>,
    #[serde(default)]
    pub gold: Vec<GoldSpec>,
}

/// Where the tables live: `<root>/<layer>/<table>/`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LakeSpec {
    pub root: String,
    /// Data files are cut at this size (MiB); defaults to 128.
    #[serde(default)]
    pub target_file_size_mb: Option<u64>,
    /// How data files' pages are compressed, in Parquet's spelling (`snappy`, `lz4_raw`,
    /// `zstd(3)`, `uncompressed`); defaults to Snappy, as Spark and Delta write them.
    #[serde(default, deserialize_with = "parquet_compression")]
    pub compression: Option<Compression>,
}

/// A Parquet codec as `Compression` parses it; an unknown one is a configuration error at its
/// line, before anything is written.
fn parquet_compression<'de, D: serde::Deserializer<'de>>(
    text: D,
) -> Result<Option<Compression>, D::Error> {
    let text = String::deserialize(text)?;
    let unknown = |why: String| {
        serde::de::Error::custom(format!(
            "compression '{text}' is not a Parquet codec the writer has (snappy, lz4_raw, zstd(LEVEL), gzip(LEVEL), brotli(LEVEL), uncompressed): {why}"
        ))
    };
    match text.parse() {
        // Parquet names LZO, but its Rust writer has no LZO codec: a write would fail.
        Ok(Compression::LZO) => Err(unknown("no LZO codec".into())),
        Ok(codec) => Ok(Some(codec)),
        Err(e) => Err(unknown(e.to_string())),
    }
}

/// A bronze table: one source, appended as received.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BronzeSpec {
    pub table: Spanned<String>,
    pub source: SourceSpec,
}

/// A source of a bronze table.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceSpec {
    /// Files landed below a folder.
    Files(FilesSpec),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesSpec {
    pub path: String,
    pub format: FormatSpec,
    /// CSV header names to read, or a JSON document's top-level fields.
    #[serde(default)]
    pub columns: Vec<String>,
    /// For JSON documents: the object exploded to one row per entry.
    #[serde(default)]
    pub explode: Option<ExplodeSpec>,
    /// File name endings to read; by default the format's own (`csv`, `jsonl`, `json`).
    #[serde(default)]
    pub extensions: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FormatSpec {
    Csv,
    Jsonl,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplodeSpec {
    pub field: String,
    pub key_column: String,
    pub value_column: String,
}

/// A silver table: the rules, the shaping SQL and the keep rule of one bronze table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SilverSpec {
    pub table: Spanned<String>,
    /// The bronze table read.
    pub from: String,
    /// Columns of the SQL's output that identify a row.
    pub key: Vec<String>,
    /// Among rows of one key the greatest of these wins (nulls lose); ties go to the row
    /// seen last (greatest `_source_file`, then `_source_line`). Empty: the last seen wins.
    #[serde(default)]
    pub keep_latest_by: Vec<String>,
    /// Which row of a key stays; see [`Keep`].
    #[serde(default)]
    pub keep: Keep,
    #[serde(default)]
    pub partition_by: Vec<String>,
    /// Only these columns of the table's data files carry min/max statistics (Delta's
    /// `delta.dataSkippingStatsColumns`), and the `key` columns, by which a MERGE skips files;
    /// unset, all of them do. Statistics let readers skip files, but the writer compares every
    /// value with them: leave out long text that no query filters on.
    #[serde(default)]
    pub stats_columns: Option<Vec<String>>,
    /// Columns computed from each bronze row before the rules, visible to the rules and to
    /// `sql` but not kept in quarantine: a JSON message parsed once with `json_tuple` instead
    /// of once per rule and per column.
    #[serde(default)]
    pub derive: Vec<Spanned<DerivedColumn>>,
    /// SQL over the relation `input` (the valid rows) that types and normalises them.
    pub sql: String,
    /// Checked in order against the bronze columns; the first failing quarantine rule sends
    /// the row to the quarantine table.
    #[serde(default)]
    pub rules: Vec<Spanned<Rule>>,
    /// Defaults to `<table>_quarantine`, in silver.
    #[serde(default)]
    pub quarantine_table: Option<String>,
}

impl SilverSpec {
    pub fn quarantine_table(&self) -> String {
        self.quarantine_table
            .clone()
            .unwrap_or_else(|| format!("{}_quarantine", self.table.get_ref()))
    }

    pub fn rules(&self) -> Vec<Rule> {
        self.rules.iter().map(|r| r.get_ref().clone()).collect()
    }
}

/// Which row of a key a silver table keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    /// The greatest on `keep_latest_by`, then the row seen last.
    #[default]
    Latest,
    /// The rows of a key are copies of each other (re-delivered events, Spark's
    /// `dropDuplicates`), so any one may stay, and the SQL need not select the tie-break
    /// columns. A first load keeps the first to arrive and writes rows as they come, holding
    /// only the keys seen instead of the whole batch, when the run has no memory limit and the
    /// table no `fail` rule (which must pass before anything is written); otherwise, and for
    /// later loads, rows are held and reduced to one per key, and a key already in the table
    /// keeps its row.
    Any,
}

/// A column computed from the bronze columns (and earlier derived columns) of a silver table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DerivedColumn {
    pub name: String,
    /// SQL expression over the bronze columns.
    pub expr: String,
}

/// A gold model: SQL over silver (and earlier gold models).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldSpec {
    pub table: Spanned<String>,
    pub sql: String,
    #[serde(default)]
    pub kind: GoldKind,
    #[serde(default)]
    pub partition_by: Vec<String>,
    /// Only these columns of the table's data files carry min/max statistics (Delta's
    /// `delta.dataSkippingStatsColumns`); unset, all of them do. Statistics let readers skip
    /// files, but the writer compares every value with them: leave out long text that no
    /// query filters on.
    #[serde(default)]
    pub stats_columns: Option<Vec<String>>,
    /// Rebuild only the rows that a change of some silver tables can touch.
    #[serde(default)]
    pub rebuild_by: Option<RebuildBy>,
    /// Update the rows that its inputs' changed rows touch, from those rows alone.
    #[serde(default)]
    pub incremental: Option<Incremental>,
}

/// A gold table kept up to date from the rows of its inputs that changed, rather than
/// rebuilt: when its silver inputs changed since its last build by at most a quarter of
/// their rows, `sql` computes the new rows of the keys those changes touch, and the table
/// keeps its rows of every other key. With `rebuild_by` too, the cheaper applies: a rebuild
/// by partition (a batch of one date's events rebuilds that date), else this, else a rebuild
/// by key (which reads every row of its `from` tables).
///
/// The query reads the lake's tables (this one as last built, under its own name), and the
/// rows of each silver table the model reads that differ since that build as
/// `changed.<table>`: those of the new version the old lacked and the other way round, told
/// apart by `_change_type` (`insert`, `delete`). It returns the model's columns and a
/// boolean `_deleted`: one row per `key` whose row may have changed, its new row, or
/// `_deleted` true where the key has no row any more. A key it leaves out keeps its row.
///
/// `steps` are SQL files of steps (`CREATE TABLE … AS …;`) that the script runs first, in
/// order: steps several models' scripts share are written once, and a step of the same
/// statement over the same changed rows runs once a run (`session::StepReuse`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Incremental {
    /// The model's columns that name a row.
    pub key: Vec<String>,
    #[serde(default)]
    pub steps: Vec<String>,
    pub sql: String,
}

impl Incremental {
    /// The SQL files of the script, in the order it runs them: `steps`, then `sql`.
    pub fn sql_files(&self) -> impl Iterator<Item = &String> {
        self.steps.iter().chain([&self.sql])
    }
}

/// A script made of several SQL files, one after another: its text, and the line of the
/// text each file starts on (1-based), so that a line of the script names its file's line.
#[derive(Debug, Clone)]
pub struct JoinedScript {
    pub text: String,
    starts: Vec<(String, usize)>,
}

impl JoinedScript {
    /// The name of the last file, whose last statement is the script's query.
    pub fn query_file(&self) -> &str {
        self.starts.last().map_or("", |(name, _)| name.as_str())
    }

    /// The file (by name) and line of that file that `line` of the script is on.
    pub fn file_line(&self, line: usize) -> Option<(&str, usize)> {
        self.starts
            .iter()
            .rev()
            .find(|(_, start)| *start <= line)
            .map(|(name, start)| (name.as_str(), line - start + 1))
    }
}

/// The schema an [`Incremental`] query reads the changed rows of each table from.
pub const CHANGED_SCHEMA: &str = "changed";
/// The column by which an [`Incremental`] query removes a key's row.
pub const DELETED: &str = "_deleted";

/// A gold table whose rows with `column = v` are computed from the rows of the `from` tables
/// with `column = v` alone (and from other tables read whole). When only `from` tables
/// changed since the last build, only the values of `column` they changed are recomputed:
/// - a partition column of the gold table (and of each `from`): the partitions of the files
///   they added or removed are replaced (Delta `replaceWhere`);
/// - any other column (a key such as a customer id): the values held by the rows that
///   differ in the files they rewrote; the model runs over the `from` rows with those
///   values alone, and the table keeps its rows of every other value.
///
/// By key, a table read whole may also be listed in `through`, with a query that names the
/// values of `column` its changed rows can touch.
///
/// Any other change rebuilds the table whole, as does one that touches more than half of it,
/// or (by key) whose changed rows to read are more than a quarter of the `from` tables' rows.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebuildBy {
    pub column: String,
    /// The silver tables, as `silver.<table>`: one, or a list.
    #[serde(deserialize_with = "one_or_many")]
    pub from: Vec<String>,
    #[serde(default)]
    pub through: Vec<RebuildThrough>,
}

/// A table a keyed rebuild reads whole, and how its changes map to keys: a SQL file whose
/// query reads the table's rows that changed (their old and their new versions, told apart
/// by `_change_type`: `delete`, `insert`) as `changed`, and returns one column, the values of `column` whose rows those rows can
/// change. It may read the other tables as the model does; the values it leaves out are
/// not rebuilt, so it must name every one (more does no harm).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebuildThrough {
    /// `silver.<table>`.
    pub table: String,
    pub sql: String,
}

/// The name a [`RebuildThrough`] query reads the changed rows by.
pub const CHANGED_ROWS: &str = "changed";

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GoldKind {
    /// Written as a Delta table, replaced whenever its inputs changed.
    #[default]
    Table,
    /// Planned and shared with later models, never written.
    View,
}

/// A loaded pipeline with its variables resolved and its SQL read.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub spec: PipelineSpec,
    /// What names the pipeline's file in messages.
    pub file_label: String,
    /// The text of `pipeline.toml`, for line numbers.
    pub text: String,
    /// The lake root, resolved.
    pub lake: Url,
    vars: BTreeMap<String, String>,
    sql: BTreeMap<String, String>,
    dir_label: String,
}

impl Pipeline {
    /// Loads a pipeline folder, a `pipeline.toml` path, or the name of a built-in pipeline.
    pub fn load(spec: &str, overrides: &[(String, String)]) -> Result<Self, JobError> {
        let path = Path::new(spec);
        if path.is_dir() || path.is_file() {
            let (dir, file) = if path.is_dir() {
                (path.to_path_buf(), path.join(PIPELINE_FILE))
            } else {
                (
                    path.parent().map(Path::to_path_buf).unwrap_or_default(),
                    path.to_path_buf(),
                )
            };
            let text = std::fs::read_to_string(&file)
                .map_err(|e| JobError::config(file.display().to_string(), None, e.to_string()))?;
            let mut sql = BTreeMap::new();
            let spec = parse_spec(&text, &file.display().to_string())?;
            for name in spec.sql_files() {
                let p: PathBuf = dir.join(&name);
                if let Ok(body) = std::fs::read_to_string(&p) {
                    sql.insert(name, body);
                }
            }
            return Self::resolve(
                spec,
                text,
                file.display().to_string(),
                dir.display().to_string(),
                sql,
                overrides,
            );
        }
        if let Some((name, files)) = BUILTIN.iter().find(|(n, _)| *n == spec) {
            let text = files
                .iter()
                .find(|(p, _)| *p == PIPELINE_FILE)
                .map(|(_, t)| (*t).to_string())
                .unwrap_or_default();
            let label = format!("<built-in {name}>/{PIPELINE_FILE}");
            let parsed = parse_spec(&text, &label)?;
            let sql = files
                .iter()
                .filter(|(p, _)| p.ends_with(".sql"))
                .map(|(p, t)| ((*p).to_string(), (*t).to_string()))
                .collect();
            return Self::resolve(
                parsed,
                text,
                label,
                format!("<built-in {name}>"),
                sql,
                overrides,
            );
        }
        Err(JobError::config(
            spec,
            None,
            format!(
                "no pipeline folder here and no built-in pipeline of that name (built in: {})",
                builtin_names().join(", ")
            ),
        ))
    }

    fn resolve(
        spec: PipelineSpec,
        text: String,
        file_label: String,
        dir_label: String,
        sql: BTreeMap<String, String>,
        overrides: &[(String, String)],
    ) -> Result<Self, JobError> {
        let mut vars = spec.vars.clone();
        for (k, v) in overrides {
            vars.insert(k.clone(), v.clone());
        }
        let mut issues = Vec::new();
        for (k, _) in overrides {
            if !spec.vars.contains_key(k) {
                issues.push(ConfigIssue {
                    file: file_label.clone(),
                    line: None,
                    message: format!(
                        "--var {k}: the pipeline declares no such variable (declared: {})",
                        spec.vars.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                });
            }
        }
        let lake_text = substitute(&spec.lake.root, &vars)
            .map_err(|m| JobError::config(&file_label, None, m))?;
        let lake = medallion_engine::location::parse_location(&lake_text)
            .map_err(|e| JobError::config(&file_label, None, e.to_string()))?;
        if !issues.is_empty() {
            return Err(JobError::Config { issues });
        }
        Ok(Self {
            spec,
            file_label,
            text,
            lake,
            vars,
            sql,
            dir_label,
        })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The 1-based line of a byte offset of `pipeline.toml`.
    pub fn line_of(&self, offset: usize) -> usize {
        line_of(&self.text, offset)
    }

    /// The text of a SQL file named by the pipeline, or a config error naming it.
    pub fn sql(&self, name: &str) -> Result<&str, JobError> {
        self.sql
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| JobError::config(self.sql_label(name), None, "SQL file not found"))
    }

    /// The script of `incremental`: its files' SQL, one after another (see [`JoinedScript`]).
    pub fn incremental_script(&self, incremental: &Incremental) -> Result<JoinedScript, JobError> {
        let mut text = String::new();
        let mut starts = Vec::new();
        for name in incremental.sql_files() {
            starts.push((name.clone(), text.lines().count() + 1));
            let sql = self.sql(name)?;
            text.push_str(sql);
            if !sql.ends_with('\n') {
                text.push('\n');
            }
        }
        Ok(JoinedScript { text, starts })
    }

    /// How a SQL file is named in messages.
    pub fn sql_label(&self, name: &str) -> String {
        format!("{}/{}", self.dir_label, name)
    }

    /// The location of a table of a layer.
    pub fn table_url(&self, layer: &str, table: &str) -> Result<Url, JobError> {
        Ok(medallion_engine::location::table_url(
            &self.lake, layer, table,
        )?)
    }

    /// The files source of a bronze table, its location resolved.
    pub fn files_source(&self, bronze: &BronzeSpec) -> Result<FilesSource, JobError> {
        let SourceSpec::Files(files) = &bronze.source;
        let path = substitute(&files.path, &self.vars).map_err(|m| {
            JobError::config(
                &self.file_label,
                Some(self.line_of(bronze.table.span().start)),
                m,
            )
        })?;
        let root = medallion_engine::location::parse_location(&path)?;
        let format = match files.format {
            FormatSpec::Csv => FileFormat::Csv,
            FormatSpec::Jsonl => FileFormat::JsonLines,
            FormatSpec::Json => FileFormat::JsonDocument {
                explode: files.explode.as_ref().map(|e| Explode {
                    field: e.field.clone(),
                    key_column: e.key_column.clone(),
                    value_column: e.value_column.clone(),
                }),
            },
        };
        Ok(FilesSource::new(root, format, files.columns.clone())
            .with_extensions(files.extensions.clone()))
    }

    /// How data files' pages are compressed.
    pub fn compression(&self) -> Compression {
        self.spec
            .lake
            .compression
            .unwrap_or(medallion_engine::ops::DEFAULT_COMPRESSION)
    }

    /// Target size of data files, in bytes.
    pub fn target_file_size(&self) -> u64 {
        self.spec.lake.target_file_size_mb.map_or(
            medallion_engine::ops::DEFAULT_TARGET_FILE_SIZE.get(),
            |mb| mb.max(1) * 1024 * 1024,
        )
    }
}

impl PipelineSpec {
    fn sql_files(&self) -> Vec<String> {
        self.silver
            .iter()
            .map(|s| s.sql.clone())
            .chain(self.gold.iter().map(|g| g.sql.clone()))
            .chain(
                self.gold
                    .iter()
                    .flat_map(|g| g.rebuild_by.iter().flat_map(|r| &r.through))
                    .map(|t| t.sql.clone()),
            )
            .chain(
                self.gold
                    .iter()
                    .filter_map(|g| g.incremental.as_ref())
                    .flat_map(|i| i.sql_files().cloned()),
            )
            .collect()
    }
}

fn parse_spec(text: &str, label: &str) -> Result<PipelineSpec, JobError> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        JobError::config(label, line, e.message().to_string())
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(1, |t| t.matches('\n').count() + 1)
}

/// Replaces every `${name}` in `s` by its variable.
fn substitute(s: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unterminated variable in '{s}'"))?;
        let name = &after[..end];
        let value = vars
            .get(name)
            .ok_or_else(|| format!("'{s}' uses undeclared variable '{name}'"))?;
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Parses `name=value` as given to `--var`.
pub fn parse_var(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected name=value, got '{s}'"))?;
    if k.trim().is_empty() {
        return Err(format!("empty variable name in '{s}'"));
    }
    Ok((k.trim().to_string(), v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutes_declared_variables_only() {
        let vars = BTreeMap::from([("lake".to_string(), "s3://b/p".to_string())]);
        assert_eq!(substitute("${lake}/x", &vars).as_deref(), Ok("s3://b/p/x"));
        assert!(substitute("${nope}/x", &vars).is_err());
        assert!(substitute("${lake", &vars).is_err());
    }

    #[test]
    fn the_builtin_pipeline_parses() -> Result<(), JobError> {
        let p = Pipeline::load("commerce", &[("lake".into(), "/tmp/l".into())])?;
        assert_eq!(p.name(), "commerce");
        assert_eq!(p.lake.as_str(), "file:///tmp/l/");
        assert_eq!(p.compression(), Compression::LZ4_RAW);
        Ok(())
    }

    #[test]
    fn the_compression_is_a_parquet_codec_or_a_config_error_at_its_line() {
        let spec = |codec: &str| {
            format!("name = \"p\"\n[lake]\nroot = \"l\"\ncompression = \"{codec}\"\n")
        };
        let parsed = parse_spec(&spec("zstd(3)"), "p.toml").unwrap();
        assert_eq!(
            parsed.lake.compression,
            Some(Compression::ZSTD(
                datafusion::parquet::basic::ZstdLevel::try_new(3).unwrap()
            ))
        );
        let error = parse_spec(&spec("lz5"), "p.toml").unwrap_err().to_string();
        assert!(
            error.contains("compression 'lz5' is not a Parquet codec"),
            "{error}"
        );
        assert!(error.contains("p.toml") && error.contains('4'), "{error}");
        let error = parse_spec(&spec("lzo"), "p.toml").unwrap_err().to_string();
        assert!(error.contains("no LZO codec"), "{error}");
        let absent = parse_spec("name = \"p\"\n[lake]\nroot = \"l\"\n", "p.toml").unwrap();
        assert_eq!(absent.lake.compression, None);
    }
}
