//! The commerce data generator: the landed input of the reference pipeline, every kind of
//! dirt included, deterministic in the seed.
//!
//! Every attribute of every row is a pure function of `(seed, entity, row, field)`, so any
//! batch or part file can be written on its own thread in any order and the output is the
//! same byte for byte. This is the one place besides the benchmarks that knows the
//! commerce entities.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use rayon::prelude::*;

use crate::error::JobError;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub scale: f64,
    pub batches: u32,
    pub seed: u64,
    pub out: PathBuf,
}

/// Rows written per entity.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GenerateReport {
    pub orders: u64,
    pub customers: u64,
    pub products: u64,
    pub events: u64,
    pub fx_documents: u64,
    pub files: u64,
    pub bytes: u64,
}

const START: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z
const DAYS: i64 = 90;
const HOURS: u64 = (DAYS * 24) as u64;
const CURRENCIES: [(&str, f64); 10] = [
    ("USD", 1.0),
    ("EUR", 0.92),
    ("GBP", 0.79),
    ("JPY", 150.0),
    ("INR", 83.0),
    ("CAD", 1.35),
    ("AUD", 1.52),
    ("BRL", 4.95),
    ("CHF", 0.88),
    ("CNY", 7.2),
];
const STATUSES: [&str; 4] = ["PLACED", "SHIPPED", "CANCELLED", "RETURNED"];
const COUNTRIES: [&str; 12] = [
    "US", "GB", "DE", "FR", "IN", "JP", "BR", "CA", "AU", "CN", "ES", "MX",
];
const SEGMENTS: [&str; 3] = ["consumer", "smb", "enterprise"];
const CATEGORIES: [&str; 8] = [
    "electronics",
    "books",
    "home",
    "garden",
    "toys",
    "fashion",
    "sports",
    "beauty",
];
const EVENT_TYPES: [&str; 3] = ["page_view", "add_to_cart", "checkout"];
// Names that exercise RFC 4180: commas, quotes, line breaks, non-ASCII.
const NAMES: [&str; 8] = [
    "Ana Silva",
    "Li Wei",
    "O'Brien, Pat",
    "Zoë \"Z\" Müller",
    "Jean-Luc\r\nPicard",
    "Smith, John",
    "Ngozi Okafor",
    "Åsa Berg",
];
const ORDERS_PER_PART: u64 = 250_000;
const EVENTS_PER_PART: u64 = 500_000;
/// The skewed customer: a quarter of all orders and events.
const HOT_CUSTOMER: u64 = 1;

#[derive(Clone, Copy)]
struct Hash(u64);

impl Hash {
    fn u(self, entity: u64, row: u64, field: u64) -> u64 {
        let mut z = self.0
            ^ entity.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ row.wrapping_mul(0xBF58_476D_1CE4_E5B9)
            ^ field.wrapping_mul(0x94D0_49BB_1331_11EB);
        // SplitMix64 finaliser.
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn f(self, entity: u64, row: u64, field: u64) -> f64 {
        (self.u(entity, row, field) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick<T: Copy>(self, entity: u64, row: u64, field: u64, items: &[T]) -> T {
        items[(self.u(entity, row, field) % items.len() as u64) as usize]
    }
}

const ORDERS: u64 = 1;
const CUSTOMERS: u64 = 2;
const PRODUCTS: u64 = 3;
const EVENTS: u64 = 4;
const FX: u64 = 5;

struct Plan {
    h: Hash,
    batches: u64,
    orders: u64,
    customers: u64,
    products: u64,
    events: u64,
}

impl Plan {
    /// The batch a row of `n` rows is first landed in.
    fn home(&self, row: u64, n: u64) -> u64 {
        (row * self.batches / n.max(1)).min(self.batches - 1)
    }

    /// Rows `[lo, hi)` whose home is `batch`.
    fn rows_of(&self, batch: u64, n: u64) -> (u64, u64) {
        let lo = (batch * n).div_ceil(self.batches);
        let hi = ((batch + 1) * n).div_ceil(self.batches).min(n);
        (lo, hi)
    }

    /// Seconds of the time slice of a batch.
    fn slice(&self, batch: u64) -> (i64, i64) {
        let span = DAYS * 86_400;
        let lo = START + span * batch as i64 / self.batches as i64;
        let hi = START + span * (batch as i64 + 1) / self.batches as i64;
        (lo, hi)
    }

    fn time_in(&self, batch: u64, entity: u64, row: u64, field: u64) -> i64 {
        let (lo, hi) = self.slice(batch);
        lo + (self.h.f(entity, row, field) * (hi - lo) as f64) as i64
    }

    fn customer_of(&self, entity: u64, row: u64) -> u64 {
        if self.h.f(entity, row, 20) < 0.25 {
            HOT_CUSTOMER
        } else {
            1 + self.h.u(entity, row, 21) % self.customers
        }
    }
}

/// One of the three valid spellings of an instant.
fn spell_ts(out: &mut String, h: Hash, entity: u64, row: u64, field: u64, secs: i64) {
    let kind = h.u(entity, row, field) % 10;
    let (offset_min, fmt_kind) = match kind {
        0..=5 => (0, 0),
        6 | 7 => (
            [120i64, -300, 330, 540][(h.u(entity, row, field + 1) % 4) as usize],
            1,
        ),
        _ => (0, 2),
    };
    let Some(t) = DateTime::<Utc>::from_timestamp(secs + offset_min * 60, 0) else {
        return;
    };
    let _ = match fmt_kind {
        0 => write!(out, "{}", t.format("%Y-%m-%dT%H:%M:%SZ")),
        1 => write!(
            out,
            "{}{}{:02}:{:02}",
            t.format("%Y-%m-%dT%H:%M:%S"),
            if offset_min < 0 { '-' } else { '+' },
            offset_min.abs() / 60,
            offset_min.abs() % 60
        ),
        _ => write!(out, "{}", t.format("%Y-%m-%d %H:%M:%S")),
    };
}

fn mixed_case(h: Hash, entity: u64, row: u64, field: u64, s: &str) -> String {
    match h.u(entity, row, field) % 4 {
        0 => s.to_lowercase(),
        1 => s.to_uppercase(),
        2 => {
            let mut c = s.chars();
            c.next().map_or_else(String::new, |f| {
                f.to_uppercase()
                    .chain(c.flat_map(char::to_lowercase))
                    .collect()
            })
        }
        _ => s.to_string(),
    }
}

fn stray_spaces(h: Hash, entity: u64, row: u64, field: u64, s: &str) -> String {
    match h.u(entity, row, field) % 5 {
        0 => format!(" {s}"),
        1 => format!("{s}  "),
        _ => s.to_string(),
    }
}

fn csv_field(out: &mut String, s: &str) {
    if s.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&s.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(s);
    }
}

fn csv_line(out: &mut String, fields: &[&str]) {
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        csv_field(out, f);
    }
    out.push_str("\r\n");
}

fn ts_string(h: Hash, entity: u64, row: u64, field: u64, secs: i64) -> String {
    let mut s = String::with_capacity(25);
    spell_ts(&mut s, h, entity, row, field, secs);
    s
}

impl Plan {
    /// One order row as CSV fields; `version` 0 is the original, 1 a re-send.
    fn order_fields(&self, row: u64, version: u64) -> Vec<String> {
        let h = self.h;
        let home = self.home(row, self.orders);
        let ts = self.time_in(home, ORDERS, row, 1);
        let order_ts = if h.f(ORDERS, row, 2) < 0.002 {
            h.pick(
                ORDERS,
                row,
                3,
                &["31/02/2026", "not-a-date", "2026-02-30T10:00:00Z"],
            )
            .to_string()
        } else {
            ts_string(h, ORDERS, row, 4, ts)
        };
        let customer = if h.f(ORDERS, row, 5) < 0.005 {
            String::new()
        } else {
            format!("C{:08}", self.customer_of(ORDERS, row))
        };
        let product = format!("P{:06}", 1 + h.u(ORDERS, row, 6) % self.products);
        let quantity = if h.f(ORDERS, row, 7) < 0.003 {
            h.pick(ORDERS, row, 8, &["0", "-1", "-3"]).to_string()
        } else {
            (1 + h.u(ORDERS, row, 9) % 5).to_string()
        };
        let price = format!(
            "{}.{:02}",
            1 + h.u(ORDERS, row, 10) % 500,
            h.u(ORDERS, row, 11) % 100
        );
        let currency = if h.f(ORDERS, row, 12) < 0.002 {
            "XXX"
        } else {
            h.pick(ORDERS, row, 13, &CURRENCIES).0
        };
        let status_field = 14 + version * 100;
        let status = stray_spaces(
            h,
            ORDERS,
            row,
            status_field + 1,
            &mixed_case(
                h,
                ORDERS,
                row,
                status_field + 2,
                h.pick(ORDERS, row, status_field, &STATUSES),
            ),
        );
        let updated = ts
            + 60
            + (h.u(ORDERS, row, 15) % 3600) as i64
            + version as i64 * (3600 + (h.u(ORDERS, row, 16) % 86_400) as i64);
        let updated_at = ts_string(h, ORDERS, row, 17 + version * 100, updated);
        vec![
            format!("O{:010}", row + 1),
            customer,
            product,
            order_ts,
            quantity,
            price,
            currency.to_string(),
            status,
            updated_at,
        ]
    }

    /// The batch a re-sent order lands in, if the order is re-sent.
    fn order_resend_batch(&self, row: u64) -> Option<u64> {
        if self.h.f(ORDERS, row, 30) >= 0.05 {
            return None;
        }
        let home = self.home(row, self.orders);
        let later = self.batches - 1 - home;
        if later > 0 && self.h.f(ORDERS, row, 31) < 0.5 {
            Some(home + 1 + self.h.u(ORDERS, row, 32) % later)
        } else {
            Some(home)
        }
    }

    fn orders_part(&self, batch: u64, lo: u64, hi: u64) -> String {
        let mut out = String::with_capacity(((hi - lo) * 110) as usize);
        out.push_str("order_id,customer_id,product_id,order_ts,quantity,unit_price,currency,status,updated_at\r\n");
        for row in lo..hi {
            let home = self.home(row, self.orders);
            if home == batch {
                let fields = self.order_fields(row, 0);
                let refs: Vec<&str> = fields.iter().map(String::as_str).collect();
                csv_line(&mut out, &refs);
                if self.h.f(ORDERS, row, 33) < 0.02 {
                    csv_line(&mut out, &refs);
                }
            }
            if self.order_resend_batch(row) == Some(batch) {
                let fields = self.order_fields(row, 1);
                let refs: Vec<&str> = fields.iter().map(String::as_str).collect();
                csv_line(&mut out, &refs);
            }
        }
        out
    }

    fn customer_fields(&self, row: u64, version: u64) -> Vec<String> {
        let h = self.h;
        let v = version * 100;
        let home = self.home(row, self.customers);
        let name = stray_spaces(
            h,
            CUSTOMERS,
            row,
            1 + v,
            h.pick(CUSTOMERS, row, 2 + v, &NAMES),
        );
        let email = mixed_case(
            h,
            CUSTOMERS,
            row,
            3 + v,
            &format!(
                "user{}.{}@example.com",
                row + 1,
                h.pick(CUSTOMERS, row, 4 + v, &["shop", "mail", "inbox"])
            ),
        );
        let country = stray_spaces(
            h,
            CUSTOMERS,
            row,
            5 + v,
            &mixed_case(
                h,
                CUSTOMERS,
                row,
                6 + v,
                h.pick(CUSTOMERS, row, 7 + v, &COUNTRIES),
            ),
        );
        let segment = mixed_case(
            h,
            CUSTOMERS,
            row,
            8 + v,
            h.pick(CUSTOMERS, row, 9 + v, &SEGMENTS),
        );
        let created = START - 86_400 * (1 + (h.u(CUSTOMERS, row, 10) % 700) as i64);
        let updated = self.time_in(home, CUSTOMERS, row, 11)
            + version as i64 * (3600 + (h.u(CUSTOMERS, row, 12) % 86_400) as i64);
        vec![
            format!("C{:08}", row + 1),
            name,
            email,
            country,
            segment,
            ts_string(h, CUSTOMERS, row, 13, created),
            ts_string(h, CUSTOMERS, row, 14 + v, updated),
        ]
    }

    fn customers_part(&self, batch: u64) -> String {
        let mut out = String::new();
        out.push_str("customer_id,name,email,country,segment,created_at,updated_at\r\n");
        let (lo, hi) = self.rows_of(batch, self.customers);
        for row in lo..hi {
            let f = self.customer_fields(row, 0);
            csv_line(&mut out, &f.iter().map(String::as_str).collect::<Vec<_>>());
        }
        // Re-sends of customers first landed in this or an earlier batch.
        for row in 0..hi {
            if self.h.f(CUSTOMERS, row, 40) < 0.10 {
                let home = self.home(row, self.customers);
                let dest = home + self.h.u(CUSTOMERS, row, 41) % (self.batches - home);
                if dest == batch {
                    let f = self.customer_fields(row, 1);
                    csv_line(&mut out, &f.iter().map(String::as_str).collect::<Vec<_>>());
                }
            }
        }
        out
    }

    fn products_part(&self, batch: u64) -> String {
        let mut out = String::new();
        out.push_str("product_id,name,category,list_price,currency\r\n");
        let (lo, hi) = self.rows_of(batch, self.products);
        for row in lo..hi {
            let h = self.h;
            let fields = [
                format!("P{:06}", row + 1),
                format!(
                    "Product {} {}",
                    row + 1,
                    h.pick(PRODUCTS, row, 1, &["Deluxe", "Basic", "Pro, v2", "\"Max\""])
                ),
                h.pick(PRODUCTS, row, 2, &CATEGORIES).to_string(),
                format!(
                    "{}.{:02}",
                    1 + h.u(PRODUCTS, row, 3) % 500,
                    h.u(PRODUCTS, row, 4) % 100
                ),
                "USD".to_string(),
            ];
            csv_line(
                &mut out,
                &fields.iter().map(String::as_str).collect::<Vec<_>>(),
            );
        }
        out
    }

    fn event_line(&self, out: &mut String, row: u64) {
        let h = self.h;
        let home = self.home(row, self.events);
        let ts = self.time_in(home, EVENTS, row, 1);
        let customer = self.customer_of(EVENTS, row);
        let _ = write!(out, "{{\"event_id\":\"E{:011}\",", row + 1);
        match (h.f(EVENTS, row, 2) < 0.01, h.u(EVENTS, row, 3) % 2) {
            (true, 0) => {}
            (true, _) => out.push_str("\"customer_id\":null,"),
            (false, _) => {
                let _ = write!(out, "\"customer_id\":\"C{customer:08}\",");
            }
        }
        let etype = mixed_case(h, EVENTS, row, 4, h.pick(EVENTS, row, 5, &EVENT_TYPES));
        let _ = write!(out, "\"event_type\":\"{etype}\",\"event_ts\":\"");
        spell_ts(out, h, EVENTS, row, 6, ts);
        let session = customer * 1000 + (ts - START) as u64 / 86_400;
        let _ = writeln!(
            out,
            "\",\"session_id\":\"S{session:012}\",\"properties\":{{\"page\":\"/p/{}\",\"referrer\":\"{}\"}}}}",
            h.u(EVENTS, row, 7) % self.products,
            h.pick(EVENTS, row, 8, &["search", "ad", "email", "direct"])
        );
    }

    /// The batch an event lands in: its home, or one later for the 2% that arrive late.
    fn event_batch(&self, row: u64) -> u64 {
        let home = self.home(row, self.events);
        if home + 1 < self.batches && self.h.f(EVENTS, row, 30) < 0.02 {
            home + 1
        } else {
            home
        }
    }

    fn events_part(&self, batch: u64, lo: u64, hi: u64) -> String {
        let mut out = String::with_capacity(((hi - lo) * 210) as usize);
        for row in lo..hi {
            if self.event_batch(row) != batch {
                continue;
            }
            let start = out.len();
            self.event_line(&mut out, row);
            if self.h.f(EVENTS, row, 31) < 0.03 {
                let line = out[start..].to_string();
                out.push_str(&line);
            }
        }
        out
    }

    fn fx_document(&self, hour: u64) -> Option<String> {
        if self.h.f(FX, hour, 1) < 0.01 {
            return None;
        }
        let t = DateTime::<Utc>::from_timestamp(START + hour as i64 * 3600, 0)?;
        let mut out = format!(
            "{{\"base\": \"USD\", \"timestamp\": \"{}\", \"rates\": {{",
            t.format("%Y-%m-%dT%H:%M:%SZ")
        );
        for (i, (c, base)) in CURRENCIES.iter().skip(1).enumerate() {
            let drift = 1.0 + (self.h.f(FX, hour, 10 + i as u64) - 0.5) * 0.02;
            let _ = write!(
                out,
                "{}\"{c}\": {:.4}",
                if i > 0 { ", " } else { "" },
                base * drift
            );
        }
        out.push_str("}}\n");
        Some(out)
    }
}

enum Job {
    Orders {
        batch: u64,
        lo: u64,
        hi: u64,
        part: u64,
    },
    Customers {
        batch: u64,
    },
    Products {
        batch: u64,
    },
    Events {
        batch: u64,
        lo: u64,
        hi: u64,
        part: u64,
    },
    Fx {
        hour: u64,
    },
}

fn write_file(path: &Path, text: &str) -> Result<u64, JobError> {
    let io = |source| JobError::Io {
        context: format!("writing {}", path.display()),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    std::fs::write(path, text).map_err(io)?;
    Ok(text.len() as u64)
}

fn part_jobs(
    plan: &Plan,
    n: u64,
    per_part: u64,
    make: impl Fn(u64, u64, u64, u64) -> Job,
) -> Vec<Job> {
    let mut jobs = Vec::new();
    for batch in 0..plan.batches {
        // Rows that can land in `batch`: its own, and late ones of the batches before it.
        let (own_lo, hi) = plan.rows_of(batch, n);
        let lo = if batch == 0 { own_lo } else { 0 };
        let parts = (hi - own_lo).div_ceil(per_part).max(1);
        let step = (hi - lo).div_ceil(parts).max(1);
        for part in 0..parts {
            let a = lo + part * step;
            let b = (a + step).min(hi);
            jobs.push(make(batch, a, b, part));
        }
    }
    jobs
}

/// Writes the landed input into `options.out`.
pub fn generate(options: &GenerateOptions) -> Result<GenerateReport, JobError> {
    if options.batches == 0 || options.scale.is_nan() || options.scale <= 0.0 {
        return Err(JobError::config(
            "generate",
            None,
            "--batches must be at least 1 and --scale above 0",
        ));
    }
    let scaled = |n: f64, min: u64| ((n * options.scale).round() as u64).max(min);
    let plan = Plan {
        h: Hash(options.seed),
        batches: u64::from(options.batches),
        orders: scaled(1_000_000.0, 10),
        customers: scaled(100_000.0, 10),
        products: scaled(2_000.0, 5),
        events: scaled(3_000_000.0, 10),
    };
    let mut jobs = part_jobs(
        &plan,
        plan.orders,
        ORDERS_PER_PART,
        |batch, lo, hi, part| Job::Orders {
            batch,
            lo,
            hi,
            part,
        },
    );
    jobs.extend(part_jobs(
        &plan,
        plan.events,
        EVENTS_PER_PART,
        |batch, lo, hi, part| Job::Events {
            batch,
            lo,
            hi,
            part,
        },
    ));
    jobs.extend(
        (0..plan.batches).flat_map(|batch| [Job::Customers { batch }, Job::Products { batch }]),
    );
    jobs.extend((0..HOURS).map(|hour| Job::Fx { hour }));
    let out = &options.out;
    let dir = |entity: &str, batch: u64| out.join(entity).join(format!("batch-{:04}", batch + 1));
    let results: Vec<Result<(u64, u64, &'static str), JobError>> = jobs
        .par_iter()
        .map(|job| {
            Ok(match job {
                Job::Orders {
                    batch,
                    lo,
                    hi,
                    part,
                } => {
                    let text = plan.orders_part(*batch, *lo, *hi);
                    (
                        write_file(
                            &dir("orders", *batch).join(format!("part-{part:05}.csv")),
                            &text,
                        )?,
                        text.matches("\r\n").count() as u64 - 1,
                        "orders",
                    )
                }
                Job::Events {
                    batch,
                    lo,
                    hi,
                    part,
                } => {
                    let text = plan.events_part(*batch, *lo, *hi);
                    (
                        write_file(
                            &dir("events", *batch).join(format!("part-{part:05}.jsonl")),
                            &text,
                        )?,
                        text.matches('\n').count() as u64,
                        "events",
                    )
                }
                Job::Customers { batch } => {
                    let text = plan.customers_part(*batch);
                    (
                        write_file(&dir("customers", *batch).join("part-00000.csv"), &text)?,
                        0,
                        "customers",
                    )
                }
                Job::Products { batch } => {
                    let text = plan.products_part(*batch);
                    (
                        write_file(&dir("products", *batch).join("part-00000.csv"), &text)?,
                        0,
                        "products",
                    )
                }
                Job::Fx { hour } => match plan.fx_document(*hour) {
                    None => (0, 0, "fx_missing"),
                    Some(text) => {
                        let batch = plan.home(*hour, HOURS);
                        let name = DateTime::<Utc>::from_timestamp(START + *hour as i64 * 3600, 0)
                            .map_or_else(String::new, |t| {
                                t.format("fx-%Y-%m-%dT%H.json").to_string()
                            });
                        (
                            write_file(&dir("fx_rates", batch).join(name), &text)?,
                            1,
                            "fx",
                        )
                    }
                },
            })
        })
        .collect();
    let mut report = GenerateReport::default();
    for r in results {
        let (bytes, rows, kind) = r?;
        match kind {
            "orders" => report.orders += rows,
            "events" => report.events += rows,
            "fx" => report.fx_documents += rows,
            _ => {}
        }
        if kind != "fx_missing" {
            report.files += 1;
            report.bytes += bytes;
        }
    }
    report.customers = plan.customers;
    report.products = plan.products;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_deterministic_in_the_seed() -> Result<(), JobError> {
        let a = tempfile::tempdir().map_err(|e| JobError::Io {
            context: "tmp".into(),
            source: e,
        })?;
        let b = tempfile::tempdir().map_err(|e| JobError::Io {
            context: "tmp".into(),
            source: e,
        })?;
        let opts = |out: &Path, seed| GenerateOptions {
            scale: 0.001,
            batches: 2,
            seed,
            out: out.to_path_buf(),
        };
        let ra = generate(&opts(a.path(), 7))?;
        generate(&opts(b.path(), 7))?;
        let read = |d: &Path| {
            std::fs::read(d.join("orders/batch-0002/part-00000.csv")).unwrap_or_default()
        };
        assert!(!read(a.path()).is_empty());
        assert_eq!(read(a.path()), read(b.path()));
        assert!(ra.orders >= 1000, "{ra:?}");
        Ok(())
    }
}
