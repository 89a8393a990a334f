//! The files source: every `*.csv`, `*.jsonl` or `*.json` below a landing folder, at any
//! depth, read as text columns with the file and line each row came from.
//!
//! Parsing is lenient by design: a record that does not parse (a CSV line with the wrong
//! number of fields, bytes that are not UTF-8, a JSON document that is not one) becomes a
//! row whose data columns are null and whose `_corrupt_record` holds the raw text, so that a
//! quality rule quarantines it with its file instead of the run failing or dropping it.
//! Only a file that cannot be fetched at all is an error.

use std::sync::Arc;

use arrow::array::{Array as _, ArrayRef, Int64Builder, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _};
use url::Url;

use crate::error::ConnectorError;

/// Column holding the location of the file a row came from.
pub const SOURCE_FILE: &str = "_source_file";
/// Column holding the 1-based line where a row starts in its file (for JSON documents, the
/// ordinal of the exploded entry).
pub const SOURCE_LINE: &str = "_source_line";
/// Column holding the raw text of a record that did not parse; null for good records.
pub const CORRUPT_RECORD: &str = "_corrupt_record";
/// Data column of a JSON-lines source: the message text as received.
pub const JSON_LINE_VALUE: &str = "value";

const BATCH_ROWS: usize = 64 * 1024;

/// How landed files are laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileFormat {
    /// RFC 4180 CSV with a header row; columns are matched to the header by name.
    Csv,
    /// One message per line; blank lines are not messages.
    JsonLines,
    /// One JSON document per file, optionally exploded to one row per entry of an object.
    JsonDocument { explode: Option<Explode> },
}

impl FileFormat {
    /// File name endings read by default.
    pub fn default_extensions(&self) -> &'static [&'static str] {
        match self {
            FileFormat::Csv => &["csv"],
            FileFormat::JsonLines => &["jsonl"],
            FileFormat::JsonDocument { .. } => &["json"],
        }
    }
}

/// Explodes the object at `field` of a JSON document into rows of (`key`, `value`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explode {
    pub field: String,
    pub key_column: String,
    pub value_column: String,
}

/// One landed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LandedFile {
    /// Full location (`file:///…`, `s3://…`); also what `_source_file` holds.
    pub location: String,
    pub path: Path,
    pub size: u64,
}

/// A folder of landed files of one format.
#[derive(Debug, Clone)]
pub struct FilesSource {
    root: Url,
    format: FileFormat,
    columns: Vec<String>,
    extensions: Vec<String>,
}

impl FilesSource {
    /// `columns` are the data columns to read: CSV header names, or a JSON document's
    /// top-level fields kept beside an exploded object. A JSON-lines source always yields the
    /// single column `value`.
    pub fn new(root: Url, format: FileFormat, columns: Vec<String>) -> Self {
        let extensions = format
            .default_extensions()
            .iter()
            .map(|s| (*s).to_string())
            .collect();
        Self {
            root,
            format,
            columns,
            extensions,
        }
    }

    pub fn with_extensions(mut self, extensions: Vec<String>) -> Self {
        if !extensions.is_empty() {
            self.extensions = extensions;
        }
        self
    }

    pub fn root(&self) -> &Url {
        &self.root
    }

    /// Data column names, in output order.
    pub fn data_columns(&self) -> Vec<String> {
        match &self.format {
            FileFormat::Csv => self.columns.clone(),
            FileFormat::JsonLines => vec![JSON_LINE_VALUE.to_string()],
            FileFormat::JsonDocument { explode } => {
                let mut cols = self.columns.clone();
                if let Some(e) = explode {
                    cols.push(e.key_column.clone());
                    cols.push(e.value_column.clone());
                }
                cols
            }
        }
    }

    /// The schema of every batch [`FilesSource::read`] returns.
    pub fn schema(&self) -> SchemaRef {
        let mut fields: Vec<Field> = self
            .data_columns()
            .into_iter()
            .map(|c| Field::new(c, DataType::Utf8, true))
            .collect();
        fields.push(Field::new(CORRUPT_RECORD, DataType::Utf8, true));
        fields.push(Field::new(SOURCE_FILE, DataType::Utf8, false));
        fields.push(Field::new(SOURCE_LINE, DataType::Int64, false));
        Arc::new(Schema::new(fields))
    }

    fn store(&self) -> Result<(Arc<dyn ObjectStore>, Path), ConnectorError> {
        Ok(medallion_engine::location::object_store_for(&self.root)?)
    }

    /// Every matching file below the root, in order of location. A root that does not exist
    /// yet holds no files.
    pub async fn list(&self) -> Result<Vec<LandedFile>, ConnectorError> {
        let (store, prefix) = self.store()?;
        let listed: Vec<_> = match store.list(Some(&prefix)).try_collect().await {
            Ok(v) => v,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(source) => {
                return Err(ConnectorError::ListFailed {
                    location: self.root.to_string(),
                    source: Box::new(source),
                });
            }
        };
        let prefix_str = prefix.as_ref();
        let mut files: Vec<LandedFile> = listed
            .into_iter()
            .filter(|m| {
                m.location
                    .extension()
                    .is_some_and(|ext| self.extensions.iter().any(|e| e == ext))
            })
            .filter_map(|m| {
                let rel = m
                    .location
                    .as_ref()
                    .strip_prefix(prefix_str)?
                    .trim_start_matches('/')
                    .to_string();
                let location = self.root.join(&rel).ok()?.to_string();
                Some(LandedFile {
                    location,
                    path: m.location,
                    size: m.size,
                })
            })
            .collect();
        files.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(files)
    }

    /// Reads and parses one file. Parsing runs on a blocking thread.
    pub async fn read(&self, file: &LandedFile) -> Result<Vec<RecordBatch>, ConnectorError> {
        self.read_batches(file).try_collect().await
    }

    /// Reads one file and parses it on a blocking thread, yielding each batch as it is cut.
    /// The file is never held parsed whole: its bytes and at most [`BATCHES_AHEAD`] parsed
    /// batches wait for the consumer. Fetching and parsing start at once, so a caller that
    /// opens the next file's stream before draining this one reads ahead by that much.
    pub fn read_batches(
        &self,
        file: &LandedFile,
    ) -> impl futures::Stream<Item = Result<RecordBatch, ConnectorError>> + Send + use<> {
        let (tx, rx) = tokio::sync::mpsc::channel(BATCHES_AHEAD);
        let (this, file) = (self.clone(), file.clone());
        tokio::spawn(async move {
            let fetched = async {
                let (store, _) = this.store()?;
                let unreadable = |source| ConnectorError::Unreadable {
                    file: file.location.clone(),
                    source: Box::new(source),
                };
                store
                    .get(&file.path)
                    .await
                    .map_err(unreadable)?
                    .bytes()
                    .await
                    .map_err(unreadable)
            };
            let bytes = match fetched.await {
                Ok(bytes) => bytes,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let sink = tx.clone();
            let parsed = tokio::task::spawn_blocking(move || {
                let mut rows =
                    RowsBuilder::new(this.schema(), &file.location, bytes.len()).with_sink(sink);
                this.parse_into(&bytes, &mut rows)?;
                rows.cut()
            })
            .await;
            let failed = match parsed {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e,
                Err(join) => ConnectorError::StateStore {
                    store: "parser".into(),
                    reason: join.to_string(),
                },
            };
            // A consumer that went away needs no error.
            let _ = tx.send(Err(failed)).await;
        });
        futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })
    }

    /// Parses the bytes of one file located at `location`.
    pub fn parse(&self, bytes: &[u8], location: &str) -> Result<Vec<RecordBatch>, ConnectorError> {
        let mut rows = RowsBuilder::new(self.schema(), location, bytes.len());
        self.parse_into(bytes, &mut rows)?;
        rows.finish()
    }

    fn parse_into(&self, bytes: &[u8], rows: &mut RowsBuilder) -> Result<(), ConnectorError> {
        match &self.format {
            FileFormat::Csv => parse_csv(bytes, &self.columns, rows),
            FileFormat::JsonLines => parse_json_lines(bytes, rows),
            FileFormat::JsonDocument { explode } => {
                parse_json_document(bytes, &self.columns, explode.as_ref(), rows)
            }
        }
    }
}

/// Parsed batches of one file that may wait for their consumer.
const BATCHES_AHEAD: usize = 2;

/// Bytes of text the first batch of a file reserves, at most, shared by its text columns:
/// 64 Ki JSON messages of 256 bytes.
const FIRST_BATCH_MAX_BYTES: usize = BATCH_ROWS * 256;

/// Accumulates rows of text columns plus provenance, cutting a batch every `BATCH_ROWS`.
struct RowsBuilder {
    schema: SchemaRef,
    location: String,
    data: Vec<StringBuilder>,
    corrupt: StringBuilder,
    lines: Int64Builder,
    len: usize,
    done: Vec<RecordBatch>,
    /// Where cut batches go when they are consumed while the file is parsed.
    sink: Option<tokio::sync::mpsc::Sender<Result<RecordBatch, ConnectorError>>>,
}

impl RowsBuilder {
    /// Rows of a file of `file_bytes` bytes. Its first batch is sized from the file, later
    /// ones from the batch before (`cut`): a builder left to grow from empty copies what it
    /// holds at every doubling, and at SF 10 the first batches' copies were 1.9% of bronze's
    /// CPU (`perf`), its 60 event files of 100 MB each growing a 12 MB batch from nothing.
    fn new(schema: SchemaRef, location: &str, file_bytes: usize) -> Self {
        let n = schema.fields().len() - 3;
        let bytes = file_bytes.min(FIRST_BATCH_MAX_BYTES) / n.max(1);
        // A row of text takes a few bytes at the least; a small file reserves a few rows.
        let rows = BATCH_ROWS.min(file_bytes / 8 + 1);
        Self {
            schema,
            location: location.to_string(),
            data: (0..n)
                .map(|_| StringBuilder::with_capacity(rows, bytes))
                .collect(),
            corrupt: StringBuilder::new(),
            lines: Int64Builder::new(),
            len: 0,
            done: Vec::new(),
            sink: None,
        }
    }

    fn with_sink(
        mut self,
        sink: tokio::sync::mpsc::Sender<Result<RecordBatch, ConnectorError>>,
    ) -> Self {
        self.sink = Some(sink);
        self
    }

    fn push<'a>(
        &mut self,
        values: impl IntoIterator<Item = Option<&'a str>>,
        line: u64,
    ) -> Result<(), ConnectorError> {
        for (builder, value) in self.data.iter_mut().zip(values) {
            builder.append_option(value);
        }
        self.corrupt.append_null();
        self.end_row(line)
    }

    fn push_corrupt(&mut self, raw: &[u8], line: u64) -> Result<(), ConnectorError> {
        for builder in &mut self.data {
            builder.append_null();
        }
        self.corrupt.append_value(String::from_utf8_lossy(raw));
        self.end_row(line)
    }

    fn end_row(&mut self, line: u64) -> Result<(), ConnectorError> {
        self.lines
            .append_value(i64::try_from(line).unwrap_or(i64::MAX));
        self.len += 1;
        if self.len >= BATCH_ROWS {
            self.cut()?;
        }
        Ok(())
    }

    fn cut(&mut self) -> Result<(), ConnectorError> {
        if self.len == 0 {
            return Ok(());
        }
        let mut columns: Vec<ArrayRef> = self
            .data
            .iter_mut()
            .map(|b| {
                let column = b.finish();
                // The next batch of a file is shaped like this one. A builder left to grow
                // from empty copies what it holds at every doubling (`perf`, bronze at SF 1:
                // these copies fell from 1.4% to 0.6% of its CPU; the first batch still grows).
                *b = StringBuilder::with_capacity(column.len(), column.value_data().len());
                Arc::new(column) as ArrayRef
            })
            .collect();
        columns.push(Arc::new(self.corrupt.finish()));
        let mut files = StringBuilder::with_capacity(self.len, self.len * self.location.len());
        for _ in 0..self.len {
            files.append_value(&self.location);
        }
        columns.push(Arc::new(files.finish()));
        columns.push(Arc::new(self.lines.finish()));
        let batch = RecordBatch::try_new(Arc::clone(&self.schema), columns)?;
        self.len = 0;
        match &self.sink {
            Some(sink) => sink
                .blocking_send(Ok(batch))
                .map_err(|_| ConnectorError::Unreadable {
                    file: self.location.clone(),
                    source: Box::new(object_store::Error::Generic {
                        store: "parser",
                        source: "the consumer of the parsed rows stopped".into(),
                    }),
                }),
            None => {
                self.done.push(batch);
                Ok(())
            }
        }
    }

    fn finish(mut self) -> Result<Vec<RecordBatch>, ConnectorError> {
        self.cut()?;
        Ok(self.done)
    }
}

fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
}

/// A record's raw bytes without the line terminators around it (csv-core counts the `\n` of
/// a CRLF as the start of the next record).
fn trim_line_end(mut raw: &[u8]) -> &[u8] {
    while let [rest @ .., b'\n' | b'\r'] = raw {
        raw = rest;
    }
    while let [b'\n' | b'\r', rest @ ..] = raw {
        raw = rest;
    }
    raw
}

/// Counts lines up to byte offsets visited in increasing order.
struct LineCounter<'a> {
    bytes: &'a [u8],
    offset: usize,
    newlines: u64,
}

impl LineCounter<'_> {
    /// The 1-based line of the first byte at or after `offset` that is not a line break.
    fn line_at(&mut self, mut offset: usize) -> u64 {
        while matches!(self.bytes.get(offset), Some(b'\r' | b'\n')) {
            offset += 1;
        }
        let offset = offset.min(self.bytes.len()).max(self.offset);
        self.newlines += self.bytes[self.offset..offset]
            .iter()
            .filter(|&&b| b == b'\n')
            .count() as u64;
        self.offset = offset;
        self.newlines + 1
    }
}

fn parse_csv(
    bytes: &[u8],
    columns: &[String],
    rows: &mut RowsBuilder,
) -> Result<(), ConnectorError> {
    let bytes = strip_bom(bytes);
    // flexible: a record with the wrong field count must reach us to become a corrupt row.
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(bytes);
    let mut lines = LineCounter {
        bytes,
        offset: 0,
        newlines: 0,
    };
    let mut record = csv::ByteRecord::new();
    let mut header: Option<Vec<Option<usize>>> = None;
    let mut header_len = 0usize;
    loop {
        let begin = usize::try_from(reader.position().byte())
            .unwrap_or(bytes.len())
            .min(bytes.len());
        let more = reader.read_byte_record(&mut record);
        let end = usize::try_from(reader.position().byte())
            .unwrap_or(bytes.len())
            .min(bytes.len());
        let raw = trim_line_end(&bytes[begin.min(end)..end]);
        let more = match more {
            Ok(more) => more,
            Err(_) => {
                // Only possible on checks we do not ask for; keep the bytes.
                let line = lines.line_at(begin);
                rows.push_corrupt(raw, line)?;
                if end <= begin {
                    break;
                }
                continue;
            }
        };
        if !more {
            break;
        }
        let line = lines.line_at(begin);
        let Some(mapping) = &header else {
            let names: Vec<String> = record
                .iter()
                .map(|f| String::from_utf8_lossy(f).trim().to_string())
                .collect();
            header_len = names.len();
            header = Some(
                columns
                    .iter()
                    .map(|c| names.iter().position(|n| n == c))
                    .collect(),
            );
            continue;
        };
        if record.len() != header_len {
            rows.push_corrupt(raw, line)?;
            continue;
        }
        let fields: Option<Vec<Option<&str>>> = mapping
            .iter()
            .map(|idx| match idx.and_then(|i| record.get(i)) {
                None | Some(b"") => Some(None),
                Some(f) => std::str::from_utf8(f).ok().map(Some),
            })
            .collect();
        match fields {
            Some(values) => rows.push(values, line)?,
            None => rows.push_corrupt(raw, line)?,
        }
    }
    Ok(())
}

fn parse_json_lines(bytes: &[u8], rows: &mut RowsBuilder) -> Result<(), ConnectorError> {
    // The whole file is checked as UTF-8 once (vectorised), not line by line: lines cut from
    // valid text at ASCII line breaks are valid text. Only a file that fails is checked per
    // line, to find the lines to keep as corrupt. Per line, the check and a byte-at-a-time
    // split were a tenth of bronze's CPU at SF 10 (`perf`).
    let text = simdutf8::basic::from_utf8(bytes).ok();
    let ends = memchr::memchr_iter(b'\n', bytes).chain(std::iter::once(bytes.len()));
    let mut start = 0;
    for (i, end) in ends.enumerate() {
        let raw = &bytes[start..end];
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let range = start..start + raw.len();
        start = end + 1;
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let line = i as u64 + 1;
        let valid = match text {
            Some(text) => text.get(range),
            None => std::str::from_utf8(raw).ok(),
        };
        match valid {
            Some(text) => rows.push([Some(text)], line)?,
            None => rows.push_corrupt(raw, line)?,
        }
    }
    Ok(())
}

/// A JSON value as text, as Spark's `get_json_object` gives it: strings unquoted, anything
/// else in its JSON spelling, null as null.
fn json_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn parse_json_document(
    bytes: &[u8],
    columns: &[String],
    explode: Option<&Explode>,
    rows: &mut RowsBuilder,
) -> Result<(), ConnectorError> {
    let bytes = strip_bom(bytes);
    let doc: serde_json::Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(_) => return rows.push_corrupt(bytes, 1),
    };
    let Some(object) = doc.as_object() else {
        return rows.push_corrupt(bytes, 1);
    };
    let top: Vec<Option<String>> = columns
        .iter()
        .map(|c| object.get(c).and_then(json_text))
        .collect();
    let Some(explode) = explode else {
        return rows.push(top.iter().map(Option::as_deref), 1);
    };
    let Some(entries) = object
        .get(&explode.field)
        .and_then(serde_json::Value::as_object)
    else {
        return rows.push_corrupt(bytes, 1);
    };
    for (i, (key, value)) in entries.iter().enumerate() {
        let value = json_text(value);
        let values = top
            .iter()
            .map(Option::as_deref)
            .chain([Some(key.as_str()), value.as_deref()]);
        rows.push(values, i as u64 + 1)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, Int64Array};

    fn csv_source() -> FilesSource {
        let root = Url::parse("file:///landing/orders/").unwrap_or_else(|_| unreachable!());
        FilesSource::new(root, FileFormat::Csv, vec!["a".into(), "b".into()])
    }

    fn column(batch: &RecordBatch, name: &str) -> Vec<Option<String>> {
        let idx = batch
            .schema()
            .index_of(name)
            .unwrap_or_else(|_| unreachable!());
        batch
            .column(idx)
            .as_string::<i32>()
            .iter()
            .map(|v| v.map(str::to_string))
            .collect()
    }

    #[test]
    fn csv_keeps_quoted_line_breaks_and_quarantines_bad_field_counts() -> Result<(), ConnectorError>
    {
        let text = b"\xEF\xBB\xBFb,a\r\n1,\"x\r\ny, \"\"q\"\"\"\r\n2\r\n,3\r\n";
        let batches = csv_source().parse(text, "file:///f.csv")?;
        let batch = &batches[0];
        assert_eq!(
            column(batch, "a"),
            vec![Some("x\r\ny, \"q\"".into()), None, Some("3".into())]
        );
        assert_eq!(column(batch, "b"), vec![Some("1".into()), None, None]);
        assert_eq!(
            column(batch, CORRUPT_RECORD),
            vec![None, Some("2".into()), None]
        );
        let lines = batch
            .column(batch.num_columns() - 1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .map(|a| a.values().to_vec());
        assert_eq!(lines, Some(vec![2, 4, 5]));
        Ok(())
    }

    #[test]
    fn json_lines_skip_blank_lines_and_keep_non_objects() -> Result<(), ConnectorError> {
        let root = Url::parse("file:///landing/events/").unwrap_or_else(|_| unreachable!());
        let source = FilesSource::new(root, FileFormat::JsonLines, vec![]);
        let batches = source.parse(b"{\"a\":1}\r\n\n  \nnot json\n", "file:///e.jsonl")?;
        assert_eq!(
            column(&batches[0], JSON_LINE_VALUE),
            vec![Some("{\"a\":1}".into()), Some("not json".into())]
        );
        Ok(())
    }

    #[test]
    fn json_lines_keep_lines_that_are_not_utf8_as_corrupt() -> Result<(), ConnectorError> {
        let root = Url::parse("file:///landing/events/").unwrap_or_else(|_| unreachable!());
        let source = FilesSource::new(root, FileFormat::JsonLines, vec![]);
        // Line 2 is not UTF-8, so the file is checked line by line; the last has no newline.
        let bytes = b"{\"a\":\"\xC3\xA9\"}\n{\"b\":\"\xC3\x28\"}\r\n\n{\"c\":3}";
        let batches = source.parse(bytes, "file:///e.jsonl")?;
        assert_eq!(
            column(&batches[0], JSON_LINE_VALUE),
            vec![
                Some("{\"a\":\"\u{e9}\"}".into()),
                None,
                Some("{\"c\":3}".into())
            ]
        );
        assert_eq!(
            column(&batches[0], CORRUPT_RECORD),
            vec![None, Some("{\"b\":\"\u{fffd}(\"}".into()), None]
        );
        let lines = batches[0]
            .column_by_name(SOURCE_LINE)
            .and_then(|c| c.as_any().downcast_ref::<arrow::array::Int64Array>())
            .map(|c| c.values().to_vec());
        assert_eq!(lines, Some(vec![1, 2, 4]));
        Ok(())
    }

    #[test]
    fn json_documents_explode_to_one_row_per_entry() -> Result<(), ConnectorError> {
        let root = Url::parse("file:///landing/fx/").unwrap_or_else(|_| unreachable!());
        let explode = Explode {
            field: "rates".into(),
            key_column: "currency".into(),
            value_column: "rate".into(),
        };
        let source = FilesSource::new(
            root,
            FileFormat::JsonDocument {
                explode: Some(explode),
            },
            vec!["base".into()],
        );
        let batches = source.parse(
            br#"{"base":"USD","rates":{"EUR":0.92,"JPY":150}}"#,
            "file:///fx.json",
        )?;
        assert_eq!(
            column(&batches[0], "currency"),
            vec![Some("EUR".into()), Some("JPY".into())]
        );
        assert_eq!(
            column(&batches[0], "rate"),
            vec![Some("0.92".into()), Some("150".into())]
        );
        assert_eq!(
            column(&batches[0], "base"),
            vec![Some("USD".into()), Some("USD".into())]
        );
        let bad = source.parse(b"{not json", "file:///fx2.json")?;
        assert_eq!(
            column(&bad[0], CORRUPT_RECORD),
            vec![Some("{not json".into())]
        );
        Ok(())
    }
}
