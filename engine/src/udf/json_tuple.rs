//! `json_tuple(text, 'k1', 'k2', …)`: the named top-level fields of a JSON object, as a struct
//! of text fields, parsed once per row.
//!
//! Spark's `json_tuple` reads several fields in one pass; `json_as_text(value, 'k')` parses
//! the document again for every field, which made JSON the larger part of a silver run over
//! events. Each field reads as `json_as_text` would: a string decoded, any other value as its
//! raw JSON text, JSON `null`, a missing key, a row that is not an object, or the part of a
//! document after a syntax error as null. A key given twice in the document takes its first
//! value, as `json_as_text` does.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, StringBuilder, StructArray};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Fields};
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    Volatility,
};
use jiter::{Jiter, Peek};

#[derive(Debug, PartialEq, Eq, Hash)]
struct JsonTuple {
    signature: Signature,
}

/// `json_tuple(text, 'k1', …) -> struct<k1: utf8, …>`.
pub fn json_tuple_udf() -> ScalarUDF {
    ScalarUDF::new_from_impl(JsonTuple {
        signature: Signature::variadic_any(Volatility::Immutable),
    })
}

fn output_fields(keys: &[String]) -> Fields {
    keys.iter()
        .map(|k| Field::new(k, DataType::Utf8, true))
        .collect()
}

/// The key names, which must be text literals after the first argument.
fn literal_keys<'a>(args: impl Iterator<Item = Option<&'a ScalarValue>>) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    for arg in args {
        match arg {
            Some(ScalarValue::Utf8(Some(k)))
            | Some(ScalarValue::Utf8View(Some(k)))
            | Some(ScalarValue::LargeUtf8(Some(k))) => {
                if keys.contains(k) {
                    return plan_err!("json_tuple: the key '{k}' is named twice");
                }
                keys.push(k.clone());
            }
            _ => {
                return plan_err!(
                    "json_tuple: every argument after the first must be a text literal naming a key"
                );
            }
        }
    }
    if keys.is_empty() {
        return plan_err!("json_tuple: name at least one key, e.g. json_tuple(value, 'id')");
    }
    Ok(keys)
}

impl ScalarUDFImpl for JsonTuple {
    fn name(&self) -> &str {
        "json_tuple"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        // Only reached without the literal keys; `return_field_from_args` is the real answer.
        plan_err!("json_tuple needs its key arguments to know its type")
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        let Some(first) = args.arg_fields.first() else {
            return plan_err!("json_tuple(text, 'key', …) takes a JSON text and key names");
        };
        if !matches!(
            first.data_type(),
            DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 | DataType::Null
        ) {
            return plan_err!("json_tuple expects JSON text, got {}", first.data_type());
        }
        let keys = literal_keys(args.scalar_arguments.iter().skip(1).copied())?;
        Ok(Arc::new(Field::new(
            self.name(),
            DataType::Struct(output_fields(&keys)),
            true,
        )))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let keys = match args.return_field.data_type() {
            DataType::Struct(fields) => fields.iter().map(|f| f.name().clone()).collect::<Vec<_>>(),
            other => return exec_err!("json_tuple: unexpected return type {other}"),
        };
        let Some(first) = args.args.first() else {
            return exec_err!("json_tuple takes a JSON text and key names");
        };
        let array = first.to_array(args.number_rows)?;
        let out = match array.data_type() {
            DataType::Utf8 => extract(array.as_string::<i32>().iter(), &keys, array.len()),
            DataType::LargeUtf8 => extract(array.as_string::<i64>().iter(), &keys, array.len()),
            DataType::Utf8View => extract(array.as_string_view().iter(), &keys, array.len()),
            DataType::Null => extract(std::iter::repeat_n(None, array.len()), &keys, array.len()),
            other => return exec_err!("json_tuple expects JSON text, got {other}"),
        };
        Ok(ColumnarValue::Array(out))
    }
}

/// Per row: which wanted keys were read (their builders took a value or a null).
struct RowSlots {
    found: Vec<bool>,
    order: KeyOrder,
}

/// The wanted key that the n-th key of the previous object was (None: not wanted).
/// Messages from one producer keep one key order, so this guess spares comparing each key
/// with every wanted name before its own (`perf`, silver at SF 1: the key comparisons under
/// `read_object` fell from 1.5% to 0.7% of the CPU).
#[derive(Default)]
struct KeyOrder(Vec<Option<usize>>);

impl KeyOrder {
    /// Which wanted key `key`, the `nth` of its object, is; remembered for the next object.
    fn slot_of(&mut self, keys: &[String], nth: usize, key: &[u8]) -> Option<usize> {
        let guess = self.0.get(nth).copied().flatten();
        if let Some(i) = guess.filter(|i| keys[*i].as_bytes() == key) {
            return Some(i);
        }
        let slot = keys.iter().position(|k| k.as_bytes() == key);
        match self.0.get_mut(nth) {
            Some(seen) => *seen = slot,
            None => self.0.push(slot),
        }
        slot
    }
}

fn extract<'a>(
    values: impl Iterator<Item = Option<&'a str>>,
    keys: &[String],
    len: usize,
) -> ArrayRef {
    let mut builders: Vec<StringBuilder> = keys
        .iter()
        .map(|_| StringBuilder::with_capacity(len, len * 8))
        .collect();
    let mut row = RowSlots {
        found: vec![false; keys.len()],
        order: KeyOrder::default(),
    };
    let mut spans = vec![Span::Unread; keys.len()];
    for value in values {
        row.found.fill(false);
        if let Some(json) = value {
            if scan_plain_object(json.as_bytes(), keys, &mut row.order, &mut spans).is_some() {
                for ((builder, span), found) in builders.iter_mut().zip(&spans).zip(&mut row.found)
                {
                    if let Span::Text(from, to) = *span {
                        // On char boundaries: the span's ends are ASCII delimiters.
                        builder.append_value(&json[from..to]);
                        *found = true;
                    }
                }
            } else {
                // A syntax error ends the row: the fields found before it stay, as with
                // json_as_text.
                let _ = read_object(json, keys, &mut row, &mut builders);
            }
        }
        for (builder, found) in builders.iter_mut().zip(&row.found) {
            if !found {
                builder.append_null();
            }
        }
    }
    let columns: Vec<ArrayRef> = builders
        .into_iter()
        .map(|mut b| Arc::new(b.finish()) as ArrayRef)
        .collect();
    Arc::new(StructArray::new(output_fields(keys), columns, None))
}

/// Where the fast scan found a wanted field's value in the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Span {
    /// Not found (yet): the field reads as null.
    Unread,
    /// JSON `null`: the field reads as null, and a later copy of its key is skipped.
    Null,
    /// The field's text: a string's contents, or any other value's raw JSON text.
    Text(usize, usize),
}

/// The fast path of [`read_object`]: the wanted fields' spans of a document that is plain,
/// strict JSON up to the point where the scan stops, with no escape and no control character
/// in any string (so a string's contents are its text). `None` sends the row to jiter, which
/// reads it as before: anything else (an escape, a syntax error, a document that is not an
/// object) goes that way, so this path only ever accepts documents jiter reads without error
/// and gives the same fields.
///
/// Why: messages are nearly always plain, and jiter decodes every key and string into its
/// own buffer and checks each character as it goes; it was 30% of the CPU of silver over
/// events. Finding the quotes eight bytes at a time and handing out slices of the document,
/// a query parsing bronze's SF 10 events (30.9 M rows) took 13.3-15.0 user CPU seconds
/// against 21.7-23.2 (two alternating runs each). The tests check the two paths agree.
fn scan_plain_object(
    json: &[u8],
    keys: &[String],
    order: &mut KeyOrder,
    spans: &mut [Span],
) -> Option<()> {
    spans.fill(Span::Unread);
    let mut at = Cursor { json, at: 0 };
    at.skip_whitespace();
    at.eat(b'{')?;
    at.skip_whitespace();
    if at.eat(b'}').is_some() {
        return Some(());
    }
    let mut remaining = keys.len();
    let mut nth = 0;
    loop {
        let ((from, to), value) = at.entry(0)?;
        let slot = order
            .slot_of(keys, nth, &json[from..to])
            .filter(|i| spans[*i] == Span::Unread);
        if let Some(i) = slot {
            spans[i] = value;
            remaining -= 1;
            if remaining == 0 {
                break;
            }
        }
        nth += 1;
        at.skip_whitespace();
        match at.next()? {
            b',' => at.skip_whitespace(),
            b'}' => break,
            _ => return None,
        }
    }
    Some(())
}

/// Nested values deeper than this go to jiter, whose own limit is far higher.
const MAX_PLAIN_DEPTH: usize = 32;

/// A position in a document being scanned by [`scan_plain_object`].
struct Cursor<'a> {
    json: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.json.get(self.at) {
            self.at += 1;
        }
    }

    fn next(&mut self) -> Option<u8> {
        let b = *self.json.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    fn eat(&mut self, want: u8) -> Option<()> {
        (self.json.get(self.at) == Some(&want)).then(|| self.at += 1)
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.json
            .get(self.at..)?
            .starts_with(word)
            .then(|| self.at += word.len())
    }

    /// At an opening quote: the contents' range, if the string has no escape and no control
    /// character before its closing quote.
    fn plain_string(&mut self) -> Option<(usize, usize)> {
        self.eat(b'"')?;
        let from = self.at;
        let end = plain_string_end(self.json, from)?;
        self.at = end + 1;
        Some((from, end))
    }

    /// At a key: the key's contents and its value, as [`Cursor::value`] reads it.
    fn entry(&mut self, depth: usize) -> Option<((usize, usize), Span)> {
        let key = self.plain_string()?;
        self.skip_whitespace();
        self.eat(b':')?;
        self.skip_whitespace();
        Some((key, self.value(depth)?))
    }

    /// At an opening bracket: the comma-separated members up to `close`, each read by
    /// `member`.
    fn members(
        &mut self,
        close: u8,
        mut member: impl FnMut(&mut Self) -> Option<()>,
    ) -> Option<()> {
        self.at += 1;
        self.skip_whitespace();
        if self.eat(close).is_some() {
            return Some(());
        }
        loop {
            member(self)?;
            self.skip_whitespace();
            match self.next()? {
                b',' => self.skip_whitespace(),
                b if b == close => return Some(()),
                _ => return None,
            }
        }
    }

    /// Skips one value; a string gives its contents, `null` nothing, any other value its
    /// raw text.
    fn value(&mut self, depth: usize) -> Option<Span> {
        let from = self.at;
        match *self.json.get(self.at)? {
            b'"' => {
                let (from, to) = self.plain_string()?;
                return Some(Span::Text(from, to));
            }
            b'n' => {
                self.literal(b"null")?;
                return Some(Span::Null);
            }
            b't' => self.literal(b"true")?,
            b'f' => self.literal(b"false")?,
            b'{' if depth < MAX_PLAIN_DEPTH => {
                self.members(b'}', |at| at.entry(depth + 1).map(drop))?;
            }
            b'[' if depth < MAX_PLAIN_DEPTH => {
                self.members(b']', |at| at.value(depth + 1).map(drop))?;
            }
            b'-' | b'0'..=b'9' => self.number()?,
            _ => return None,
        }
        Some(Span::Text(from, self.at))
    }

    /// RFC 8259's number: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    fn number(&mut self) -> Option<()> {
        let _ = self.eat(b'-');
        match self.next()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.eat(b'.').is_some() {
            self.at_least_one_digit()?;
        }
        if let Some(b'e' | b'E') = self.json.get(self.at) {
            self.at += 1;
            if let Some(b'+' | b'-') = self.json.get(self.at) {
                self.at += 1;
            }
            self.at_least_one_digit()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.json.get(self.at) {
            self.at += 1;
        }
    }

    fn at_least_one_digit(&mut self) -> Option<()> {
        let from = self.at;
        self.digits();
        (self.at > from).then_some(())
    }
}

/// The index of the quote closing a string whose contents start at `from`, if no backslash
/// or control character comes before it. Eight bytes at a time: a byte equal to `"` or `\`,
/// or below 0x20, sets its high bit in the mask (the lowest set bit is exact; bits above it
/// may be borrow noise, and are not read).
fn plain_string_end(json: &[u8], from: usize) -> Option<usize> {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);
    const QUOTES: u64 = u64::from_le_bytes([b'"'; 8]);
    const BACKSLASHES: u64 = u64::from_le_bytes([b'\\'; 8]);
    let zero_bytes = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let mut at = from;
    while let Some(chunk) = json.get(at..at + 8) {
        let word = u64::from_le_bytes(chunk.try_into().ok()?);
        let hits = zero_bytes(word ^ QUOTES)
            | zero_bytes(word ^ BACKSLASHES)
            | (word.wrapping_sub(ONES * 0x20) & !word & HIGHS);
        if hits != 0 {
            let end = at + (hits.trailing_zeros() / 8) as usize;
            return (json[end] == b'"').then_some(end);
        }
        at += 8;
    }
    for (i, &b) in json.get(at..)?.iter().enumerate() {
        if b == b'"' {
            return Some(at + i);
        }
        if b == b'\\' || b < 0x20 {
            return None;
        }
    }
    None
}

/// Appends each wanted field of one object to its builder as it is read (values go straight
/// from the document, or jiter's unescaped copy, to the column); the caller appends a null to
/// the builders of the fields not found.
fn read_object(
    json: &str,
    keys: &[String],
    row: &mut RowSlots,
    builders: &mut [StringBuilder],
) -> jiter::JiterResult<()> {
    let mut jiter = Jiter::new(json.as_bytes());
    if jiter.peek()? != Peek::Object {
        return Ok(());
    }
    // The key is matched while jiter still lends it: no allocation per key.
    let mut nth = 0;
    let mut next = jiter
        .known_object()?
        .map(|key| row.order.slot_of(keys, nth, key.as_bytes()));
    let mut remaining = keys.len();
    while let Some(key) = next {
        let slot = key.filter(|i| !row.found[*i]);
        match slot {
            Some(i) => {
                match jiter.peek()? {
                    Peek::Null => {
                        jiter.known_null()?;
                        builders[i].append_null();
                    }
                    Peek::String => builders[i].append_value(jiter.known_str()?),
                    peek => {
                        let from = jiter.current_index();
                        jiter.known_skip(peek)?;
                        match json.get(from..jiter.current_index()) {
                            Some(raw) => builders[i].append_value(raw),
                            None => builders[i].append_null(),
                        }
                    }
                }
                row.found[i] = true;
                remaining -= 1;
                if remaining == 0 {
                    return Ok(());
                }
            }
            None => jiter.next_skip()?,
        }
        nth += 1;
        next = jiter
            .next_key()?
            .map(|key| row.order.slot_of(keys, nth, key.as_bytes()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::StringArray;

    use super::*;

    fn fields(json: Option<&str>, keys: &[&str]) -> Vec<Option<String>> {
        let keys: Vec<String> = keys.iter().map(|k| (*k).to_string()).collect();
        let out = extract(std::iter::once(json), &keys, 1);
        let out = out.as_struct();
        (0..keys.len())
            .map(|i| {
                let c = out
                    .column(i)
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .map(|a| a.is_valid(0).then(|| a.value(0).to_string()));
                c.flatten()
            })
            .collect()
    }

    /// Each wanted field as jiter alone reads it: what `extract` gave before its fast path.
    fn jiter_fields(json: &str, keys: &[String]) -> Vec<Option<String>> {
        let mut builders: Vec<StringBuilder> = keys.iter().map(|_| StringBuilder::new()).collect();
        let mut row = RowSlots {
            found: vec![false; keys.len()],
            order: KeyOrder::default(),
        };
        let _ = read_object(json, keys, &mut row, &mut builders);
        for (builder, found) in builders.iter_mut().zip(&row.found) {
            if !found {
                builder.append_null();
            }
        }
        builders
            .into_iter()
            .map(|mut b| {
                let a = b.finish();
                a.is_valid(0).then(|| a.value(0).to_string())
            })
            .collect()
    }

    #[test]
    fn the_fast_scan_reads_every_document_as_jiter_does() {
        let keys: Vec<String> = ["id", "ts", "props", "n", "flag", "missing"]
            .iter()
            .map(|k| (*k).to_string())
            .collect();
        let seeds = [
            r#"{"id":"E0001","ts":"2026-02-19T16:17:06Z","props":{"page":"/p/1","referrer":"ad"},"n":12}"#,
            r#" { "n" : -0.5e+3 , "id" : "é ü", "flag" : true, "props" : [1, {"a": [null, false]}, "x"] } "#,
            r#"{"id":null,"id":"second","ts":"","props":{},"n":0,"flag":false,"other":[]}"#,
            r#"{"props":[],"n":123456789012345678901234567890,"ts":"a long string value past eight bytes"}"#,
            r#"{}"#,
        ];
        let mut documents: Vec<String> = Vec::new();
        for seed in seeds {
            let chars: Vec<char> = seed.chars().collect();
            documents.push(seed.to_string());
            for cut in 0..=chars.len() {
                documents.push(chars[..cut].iter().collect());
                if cut < chars.len() {
                    let mut without = chars.clone();
                    without.remove(cut);
                    documents.push(without.into_iter().collect());
                }
                for extra in [
                    '"', '\\', '\n', '\u{1}', ' ', ',', ':', '{', '}', '[', ']', '0', '-', 'e',
                    '.', 'é',
                ] {
                    let mut with = chars.clone();
                    with.insert(cut, extra);
                    documents.push(with.into_iter().collect());
                }
            }
        }
        // One batch, so that the key-order guesses carry from row to row as they do in a scan.
        let out = extract(
            documents.iter().map(|d| Some(d.as_str())),
            &keys,
            documents.len(),
        );
        let out = out.as_struct();
        let mut fast = 0;
        for (r, document) in documents.iter().enumerate() {
            let got: Vec<Option<String>> = (0..keys.len())
                .map(|i| {
                    let column = out.column(i).as_string::<i32>();
                    column.is_valid(r).then(|| column.value(r).to_string())
                })
                .collect();
            assert_eq!(got, jiter_fields(document, &keys), "document {document:?}");
            let mut order = KeyOrder::default();
            let mut spans = vec![Span::Unread; keys.len()];
            fast += usize::from(
                scan_plain_object(document.as_bytes(), &keys, &mut order, &mut spans).is_some(),
            );
        }
        // Both paths were taken, many times each.
        assert!(
            fast > 1000 && documents.len() - fast > 1000,
            "{fast} of {}",
            documents.len()
        );
        for seed in seeds {
            let mut order = KeyOrder::default();
            let mut spans = vec![Span::Unread; keys.len()];
            assert!(scan_plain_object(seed.as_bytes(), &keys, &mut order, &mut spans).is_some());
        }
    }

    #[test]
    fn the_fast_scan_leaves_escapes_and_control_characters_to_jiter() {
        for (document, key) in [
            (r#"{"a":"x\ny"}"#, "a"),
            ("{\"a\":\"x\u{1}y\"}", "a"),
            (r#"{"a\u0062":"1"}"#, "ab"),
        ] {
            let keys = vec![key.to_string()];
            let mut order = KeyOrder::default();
            let mut spans = vec![Span::Unread];
            assert!(
                scan_plain_object(document.as_bytes(), &keys, &mut order, &mut spans).is_none()
            );
            assert_eq!(
                fields(Some(document), &[key]),
                jiter_fields(document, &keys),
                "{document}"
            );
        }
        assert_eq!(
            fields(Some(r#"{"a\u0062":"1"}"#), &["ab"]),
            vec![Some("1".into())]
        );
    }

    #[test]
    fn reads_each_field_as_json_as_text_would() {
        let got = fields(
            Some(r#"{"a":"x\ny","b":42,"c":{"k":[1,2]},"d":null,"a":"second","e":true}"#),
            &["a", "b", "c", "d", "e", "missing"],
        );
        assert_eq!(
            got,
            vec![
                Some("x\ny".into()),
                Some("42".into()),
                Some(r#"{"k":[1,2]}"#.into()),
                None,
                Some("true".into()),
                None
            ]
        );
    }

    #[test]
    fn objects_whose_keys_come_in_other_orders_read_the_same() {
        let keys: Vec<String> = ["a", "b", "c"].iter().map(|k| (*k).to_string()).collect();
        let rows = [
            r#"{"a":"1","b":"2","c":"3"}"#,
            r#"{"c":"3","x":"0","a":"1","b":"2"}"#,
            r#"{"b":"2","a":"1"}"#,
            r#"{"a":"1","b":"2","c":"3"}"#,
        ];
        let out = extract(rows.iter().map(|r| Some(*r)), &keys, rows.len());
        let out = out.as_struct();
        let column =
            |i: usize| -> Vec<Option<&str>> { out.column(i).as_string::<i32>().iter().collect() };
        assert_eq!(column(0), vec![Some("1"); 4]);
        assert_eq!(column(1), vec![Some("2"); 4]);
        assert_eq!(column(2), vec![Some("3"), Some("3"), None, Some("3")]);
    }

    #[test]
    fn keeps_fields_before_a_syntax_error_and_nulls_the_rest() {
        assert_eq!(
            fields(Some(r#"{"a":"1","b": oops, "c":"3"}"#), &["a", "c"]),
            vec![Some("1".into()), None]
        );
        assert_eq!(fields(Some("not json"), &["a"]), vec![None]);
        assert_eq!(fields(Some("[1,2]"), &["a"]), vec![None]);
        assert_eq!(fields(None, &["a"]), vec![None]);
    }
}
