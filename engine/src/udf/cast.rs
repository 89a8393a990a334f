//! Two casts that silver runs on every row, planned onto kernels of our own: text to decimal,
//! and a UTC timestamp to its date.
//!
//! Arrow's text-to-decimal cast formats and re-parses every value through `String`s and
//! 256-bit integers, and its timestamp-to-date cast looks the time zone up per value (even
//! UTC). In an SF 10 silver run the two were 5.2% and 2.8% of the CPU. [`super::FastKernels`] rewrites
//! them in projections (where they are computed, not used for pruning) to [`text_to_decimal`]
//! and [`utc_date`], which give the same values and nulls and fail on the same values (the
//! message of a decimal too wide for its precision is the parse failure's): a text that is
//! not a plain `[+-]digits[.digits]` literal of at most 20 digits a side goes through
//! arrow's own parser.
//! Filters, joins and scans keep the casts, which pruning and pushdown understand.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Date32Array, Decimal128Array, PrimitiveArray,
};
use datafusion::arrow::datatypes::{
    ArrowPrimitiveType as _, ArrowTimestampType, DataType, Decimal128Type, DecimalType, TimeUnit,
    TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType,
};
use datafusion::arrow::error::ArrowError;
use datafusion::common::tree_node::Transformed;
use datafusion::common::{DFSchema, Result, exec_err};
use datafusion::logical_expr::expr::{Cast, ScalarFunction, TryCast};
use datafusion::logical_expr::{
    ColumnarValue, Expr, ExprSchemable, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    Volatility,
};

/// The kernel call for one cast expression, or the expression as it was.
pub(super) fn fast_cast(expr: Expr, schema: &DFSchema) -> Result<Transformed<Expr>> {
    let (inner, to, strict) = match &expr {
        Expr::Cast(Cast { expr, field }) => (expr, field.data_type(), true),
        Expr::TryCast(TryCast { expr, field }) => (expr, field.data_type(), false),
        _ => return Ok(Transformed::no(expr)),
    };
    let from = inner.get_type(schema)?;
    let udf = match (&from, to) {
        (DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View, DataType::Decimal128(p, s))
            if *s >= 0 =>
        {
            text_to_decimal(*p, *s, strict)
        }
        (DataType::Timestamp(_, zone), DataType::Date32)
            if strict && zone.as_deref().is_none_or(is_utc) =>
        {
            utc_date()
        }
        _ => return Ok(Transformed::no(expr)),
    };
    let arg = inner.as_ref().clone();
    Ok(Transformed::yes(Expr::ScalarFunction(
        ScalarFunction::new_udf(Arc::new(udf), vec![arg]),
    )))
}

/// Zone names whose offset is always zero, so a timestamp's date is its UTC date.
fn is_utc(zone: &str) -> bool {
    matches!(zone, "UTC" | "+00:00" | "Z" | "Etc/UTC")
}

/// `text_to_decimal(text)`: text as `DECIMAL(precision, scale)`, rounding half away from zero
/// beyond the scale; with `strict`, a value that is not a decimal (or does not fit) fails the
/// query as `CAST` does, else it is null as with `TRY_CAST`.
pub fn text_to_decimal(precision: u8, scale: i8, strict: bool) -> ScalarUDF {
    ScalarUDF::new_from_impl(TextToDecimal {
        signature: Signature::any(1, Volatility::Immutable),
        precision,
        scale,
        strict,
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct TextToDecimal {
    signature: Signature,
    precision: u8,
    scale: i8,
    strict: bool,
}

impl ScalarUDFImpl for TextToDecimal {
    fn name(&self) -> &str {
        if self.strict {
            "text_to_decimal"
        } else {
            "try_text_to_decimal"
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Decimal128(self.precision, self.scale))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let array = super::sole_argument(&args, self.name(), "text")?;
        let out = match array.data_type() {
            DataType::Utf8 => self.parse(array.as_string::<i32>().iter())?,
            DataType::LargeUtf8 => self.parse(array.as_string::<i64>().iter())?,
            DataType::Utf8View => self.parse(array.as_string_view().iter())?,
            other => return exec_err!("{} expects text, got {other}", self.name()),
        };
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

impl TextToDecimal {
    fn parse<'a>(&self, values: impl Iterator<Item = Option<&'a str>>) -> Result<Decimal128Array> {
        let scale = self.scale.unsigned_abs();
        let mut out = Vec::with_capacity(values.size_hint().0);
        for value in values {
            let Some(text) = value else {
                out.push(None);
                continue;
            };
            let parsed = match plain_decimal(text, u32::from(scale)) {
                Some(v) => Ok(v),
                None => {
                    datafusion::arrow::compute::kernels::cast::parse_string_to_decimal_native::<
                        Decimal128Type,
                    >(text, usize::from(scale))
                }
            };
            let fits = parsed.and_then(|v| {
                Decimal128Type::validate_decimal_precision(v, self.precision, self.scale)
                    .map(|()| v)
            });
            match (fits, self.strict) {
                (Ok(v), _) => out.push(Some(v)),
                (Err(_), false) => out.push(None),
                // Arrow's message for a failed cast, whether the text or the precision failed.
                (Err(_), true) => {
                    return Err(ArrowError::CastError(format!(
                        "Cannot cast string '{text}' to value of {} type",
                        Decimal128Type::DATA_TYPE
                    ))
                    .into());
                }
            }
        }
        Ok(Decimal128Array::from(out).with_precision_and_scale(self.precision, self.scale)?)
    }
}

/// Most digits on either side of the point that [`plain_decimal`] reads: the value then stays
/// below 10^(20 + 38), and every step is checked.
const PLAIN_DIGITS: usize = 20;

/// The scaled value of a plain decimal literal (`[+-]digits[.digits]`, spaces around), rounded
/// half away from zero to `scale` digits exactly as arrow's parser does; `None` for any other
/// text, or one too long or too large to be sure of, which arrow's parser then decides.
fn plain_decimal(text: &str, scale: u32) -> Option<i128> {
    let bytes = text.trim().as_bytes();
    let (negative, unsigned) = match bytes.first()? {
        b'-' => (true, &bytes[1..]),
        b'+' => (false, &bytes[1..]),
        _ => (false, bytes),
    };
    let (integer, fraction) = match unsigned.iter().position(|&b| b == b'.') {
        Some(dot) => (&unsigned[..dot], &unsigned[dot + 1..]),
        None => (unsigned, &unsigned[unsigned.len()..]),
    };
    if (integer.is_empty() && fraction.is_empty())
        || integer.len() > PLAIN_DIGITS
        || fraction.len() > PLAIN_DIGITS
    {
        return None;
    }
    let digits = |part: &[u8]| -> Option<i128> {
        part.iter().try_fold(0i128, |v, &b| {
            b.is_ascii_digit().then(|| v * 10 + i128::from(b - b'0'))
        })
    };
    let (integer, fraction_digits, fraction) =
        (digits(integer)?, fraction.len() as u32, digits(fraction)?);
    let scaled_fraction = if fraction_digits > scale {
        let divisor = 10i128.pow(fraction_digits - scale);
        let (quotient, remainder) = (fraction / divisor, fraction % divisor);
        quotient + i128::from(remainder >= divisor / 2)
    } else {
        fraction * 10i128.checked_pow(scale - fraction_digits)?
    };
    let value = integer
        .checked_mul(10i128.checked_pow(scale)?)?
        .checked_add(scaled_fraction)?;
    Some(if negative { -value } else { value })
}

/// `utc_date(timestamp)`: the UTC date of a timestamp that is in UTC or has no zone, as
/// `CAST(… AS DATE)` gives it; an instant outside the calendar fails the query as the cast does.
pub fn utc_date() -> ScalarUDF {
    ScalarUDF::new_from_impl(UtcDate {
        signature: Signature::any(1, Volatility::Immutable),
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct UtcDate {
    signature: Signature,
}

impl ScalarUDFImpl for UtcDate {
    fn name(&self) -> &str {
        "utc_date"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Date32)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let array = super::sole_argument(&args, self.name(), "timestamp")?;
        let dates = match array.data_type() {
            DataType::Timestamp(TimeUnit::Second, _) => {
                days_of::<TimestampSecondType>(array.as_primitive(), 1)
            }
            DataType::Timestamp(TimeUnit::Millisecond, _) => {
                days_of::<TimestampMillisecondType>(array.as_primitive(), 1_000)
            }
            DataType::Timestamp(TimeUnit::Microsecond, _) => {
                days_of::<TimestampMicrosecondType>(array.as_primitive(), 1_000_000)
            }
            DataType::Timestamp(TimeUnit::Nanosecond, _) => {
                days_of::<TimestampNanosecondType>(array.as_primitive(), 1_000_000_000)
            }
            other => return exec_err!("utc_date expects a timestamp, got {other}"),
        }?;
        Ok(ColumnarValue::Array(Arc::new(dates) as ArrayRef))
    }
}

/// Days since 1970-01-01 of each instant (`per_second` units a second), checked against the
/// calendar's range as arrow's cast checks it.
fn days_of<T: ArrowTimestampType>(
    array: &PrimitiveArray<T>,
    per_second: i64,
) -> Result<Date32Array> {
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
    let first = chrono::NaiveDate::MIN
        .signed_duration_since(epoch)
        .num_days();
    let last = chrono::NaiveDate::MAX
        .signed_duration_since(epoch)
        .num_days();
    let per_day = per_second * 86_400;
    Ok(array.try_unary(|v| {
        let day = v.div_euclid(per_day);
        if (first..=last).contains(&day) {
            // The calendar's range is far inside i32.
            Ok(day as i32)
        } else {
            Err(ArrowError::CastError(format!(
                "Cannot convert {} {v} to datetime",
                std::any::type_name::<T>()
            )))
        }
    })?)
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{StringArray, StringViewArray, TimestampMicrosecondArray};
    use datafusion::arrow::compute::kernels::cast::{CastOptions, cast_with_options};

    use super::*;

    /// `udf` over one array, as a projection would call it.
    fn invoke(udf: &ScalarUDF, input: &ArrayRef, to: &DataType) -> Result<ArrayRef> {
        udf.invoke_with_args(ScalarFunctionArgs {
            args: vec![ColumnarValue::Array(Arc::clone(input))],
            arg_fields: vec![],
            number_rows: input.len(),
            return_field: Arc::new(datafusion::arrow::datatypes::Field::new(
                "d",
                to.clone(),
                true,
            )),
            config_options: Arc::default(),
        })?
        .into_array(input.len())
    }

    /// Every text below, cast by arrow and by the kernel, safe and strict.
    #[test]
    fn text_to_decimal_equals_arrows_cast() {
        let mut texts: Vec<Option<String>> = [
            "0",
            "1",
            "-1",
            "+1",
            "19.99",
            "19.995",
            "19.994",
            "-19.995",
            "-19.994",
            " 7.5 ",
            "5.",
            ".5",
            "-.5",
            ".",
            "+",
            "-",
            "",
            "1.2.3",
            "1e3",
            "abc",
            "0.005",
            "0.004",
            "-0.005",
            "-0.00",
            "99999999999999999.99",
            "999999999999999999.99",
            "9999999999999999.995",
            "00012.3400",
            "١٢",
            "12a",
            "1 2",
            "+-1",
            "--1",
            "123456789012345678901",
            "0.123456789012345678901",
            "4.9999999999999999999",
        ]
        .iter()
        .map(|s| Some((*s).to_string()))
        .collect();
        texts.push(None);
        // Pseudo-random literals around the scale, with either sign and either rounding.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..5_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let int = x % 1_000_000;
            let frac_digits = (x >> 20) % 6;
            let frac = (x >> 24) % 10u64.pow(frac_digits as u32);
            let sign = ["", "-", "+"][((x >> 40) % 3) as usize];
            texts.push(Some(if frac_digits == 0 {
                format!("{sign}{int}")
            } else {
                format!("{sign}{int}.{frac:0width$}", width = frac_digits as usize)
            }));
        }
        let utf8: ArrayRef = Arc::new(StringArray::from(texts.clone()));
        let view: ArrayRef = Arc::new(StringViewArray::from(texts.clone()));
        for (precision, scale) in [(18u8, 2i8), (10, 0), (38, 10), (5, 3)] {
            let to = DataType::Decimal128(precision, scale);
            let safe = CastOptions {
                safe: true,
                ..Default::default()
            };
            let expected = cast_with_options(&utf8, &to, &safe).unwrap();
            for input in [&utf8, &view] {
                let got = invoke(&text_to_decimal(precision, scale, false), input, &to).unwrap();
                assert_eq!(got.as_ref(), expected.as_ref(), "({precision}, {scale})");
            }
            // Strict: each text alone succeeds or fails as arrow's cast does.
            let strict = CastOptions {
                safe: false,
                ..Default::default()
            };
            for text in &texts {
                let one: ArrayRef = Arc::new(StringArray::from(vec![text.clone()]));
                let arrow = cast_with_options(&one, &to, &strict);
                let ours = invoke(&text_to_decimal(precision, scale, true), &one, &to);
                match (arrow, ours) {
                    (Ok(a), Ok(o)) => assert_eq!(a.as_ref(), o.as_ref()),
                    (Err(_), Err(_)) => {}
                    (a, o) => panic!("{text:?} as {to}: arrow {a:?}, ours {o:?}"),
                }
            }
        }
    }

    #[test]
    fn utc_date_equals_arrows_cast() {
        let micros: Vec<Option<i64>> = vec![
            Some(0),
            Some(-1),
            Some(86_399_999_999),
            Some(86_400_000_000),
            Some(-86_400_000_000),
            Some(-86_400_000_001),
            Some(1_767_225_599_999_999),
            Some(1_767_225_600_000_000),
            Some(-62_135_596_800_000_000),
            None,
        ];
        for zone in [None, Some("UTC"), Some("+00:00")] {
            let input: ArrayRef =
                Arc::new(TimestampMicrosecondArray::from(micros.clone()).with_timezone_opt(zone));
            let expected =
                cast_with_options(&input, &DataType::Date32, &CastOptions::default()).unwrap();
            let got = days_of::<TimestampMicrosecondType>(input.as_primitive(), 1_000_000).unwrap();
            assert_eq!(expected.as_ref(), &got as &dyn Array, "{zone:?}");
        }
        let beyond: ArrayRef = Arc::new(TimestampMicrosecondArray::from(vec![i64::MAX]));
        assert!(cast_with_options(&beyond, &DataType::Date32, &CastOptions::default()).is_err());
        assert!(days_of::<TimestampMicrosecondType>(beyond.as_primitive(), 1_000_000).is_err());
    }

    /// The rule reaches the casts of a projection and keeps their column names.
    #[tokio::test]
    async fn projections_plan_the_casts_onto_the_kernels() {
        let ctx = crate::session::new_session(&Default::default()).unwrap();
        let sql = "SELECT CAST(p AS DECIMAL(18, 2)) AS price, TRY_CAST(q AS DECIMAL(10, 0)), \
                   CAST(parse_timestamp(t) AS DATE) AS day \
                   FROM (VALUES ('19.995', 'x', '2026-01-01T00:30:00+01:00')) AS v(p, q, t)";
        let df = ctx.sql(sql).await.unwrap();
        let plan = format!(
            "{}",
            df.clone().into_optimized_plan().unwrap().display_indent()
        );
        assert!(plan.contains("try_text_to_decimal("), "{plan}");
        assert!(plan.contains(" text_to_decimal("), "{plan}");
        assert!(plan.contains("utc_date("), "{plan}");
        let batches = df.collect().await.unwrap();
        let batch = &batches[0];
        assert_eq!(batch.schema().field(0).name(), "price");
        assert_eq!(batch.schema().field(2).name(), "day");
        let price = batch.column(0).as_primitive::<Decimal128Type>();
        assert_eq!(price.value(0), 2000);
        assert!(batch.column(1).is_null(0));
        let day = batch
            .column(2)
            .as_primitive::<datafusion::arrow::datatypes::Date32Type>();
        // 2025-12-31 in UTC.
        assert_eq!(day.value(0), 20453);
    }

    /// A date in another zone is that zone's calendar date: arrow's cast keeps it.
    #[test]
    fn other_zones_keep_arrows_cast() {
        use datafusion::arrow::datatypes::{Field, Schema};
        let zoned = |zone: &str| {
            let field = Field::new(
                "t",
                DataType::Timestamp(TimeUnit::Microsecond, Some(zone.into())),
                true,
            );
            DFSchema::try_from(Schema::new(vec![field])).unwrap()
        };
        let cast = Expr::Cast(Cast::new(
            Box::new(datafusion::prelude::col("t")),
            DataType::Date32,
        ));
        assert!(
            !fast_cast(cast.clone(), &zoned("Europe/Paris"))
                .unwrap()
                .transformed
        );
        assert!(fast_cast(cast, &zoned("UTC")).unwrap().transformed);
    }
}
