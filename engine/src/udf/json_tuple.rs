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
    /// The wanted key that the n-th key of the previous object was (None: not wanted).
    /// Messages from one producer keep one key order, so this guess spares comparing each
    /// key with every wanted name before its own (`perf`, silver at SF 1: the key comparisons
    /// under `read_object` fell from 1.5% to 0.7% of the CPU).
    order: Vec<Option<usize>>,
}

impl RowSlots {
    /// Which wanted key `key`, the `nth` of its object, is; remembered for the next object.
    fn slot_of(&mut self, keys: &[String], nth: usize, key: &str) -> Option<usize> {
        let guess = self.order.get(nth).copied().flatten();
        if let Some(i) = guess.filter(|i| keys[*i] == key) {
            return Some(i);
        }
        let slot = keys.iter().position(|k| k == key);
        match self.order.get_mut(nth) {
            Some(seen) => *seen = slot,
            None => self.order.push(slot),
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
        order: Vec::new(),
    };
    for value in values {
        row.found.fill(false);
        if let Some(json) = value {
            // A syntax error ends the row: the fields found before it stay, as with json_as_text.
            let _ = read_object(json, keys, &mut row, &mut builders);
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
    let mut next = jiter.known_object()?.map(|key| row.slot_of(keys, nth, key));
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
        next = jiter.next_key()?.map(|key| row.slot_of(keys, nth, key));
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
