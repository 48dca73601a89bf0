//! The search language of `suanli search`: terms such as `gpu=A100 vram>=80 price<2.5
//! region=shenzhen class=B`, each a field, a comparison and a value, separated by spaces (a
//! value with spaces is quoted: `vendor="Super Micro"`). Parsed into the portal's catalogue
//! query; a mistake is reported with the column it is at.
//!
//! ```text
//! query  = term { " " term }
//! term   = field op value
//! op     = "=" | ">=" | ">" | "<=" | "<"
//! value  = word | '"' { any character but '"' } '"'
//! ```
//!
//! | field | ops | catalogue parameter |
//! |---|---|---|
//! | `gpu` | `=` (substring, any case) | `gpu_model` |
//! | `vram`, `cards`, `idle`, `memory`, `vcpus`, `storage` | `>=`, `>` | `min_vram_gib`, `min_cards`, `min_idle_cards`, `min_memory_gib`, `min_vcpus`, `min_storage_gb` |
//! | `vendor`, `region` | `=` | `vendor`, `region` |
//! | `class` | `=` `A` or `B` | `class` |
//! | `mode` | `=` hourly, daily, monthly, yearly | `billing_mode` |
//! | `price` | `<=`, `<` (yuan per card per period, two decimals at most; per hour unless `mode` names another period) | `max_price_minor` (fen) |
//! | `currency` | `=` | `currency` |

use std::fmt;

use suanli_types::{BillingMode, ClusterClass};

/// A mistake in a query, at a column (1-based, in characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryError {
    pub query: String,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for QueryError {
    /// The query, a caret under the column, and what is wrong there.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  {}", self.query)?;
        writeln!(f, "  {}^", " ".repeat(self.column.saturating_sub(1)))?;
        write!(f, "column {}: {}", self.column, self.message)
    }
}

impl std::error::Error for QueryError {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Eq,
    Ge,
    Gt,
    Le,
    Lt,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ge => ">=",
            Op::Gt => ">",
            Op::Le => "<=",
            Op::Lt => "<",
        }
    }
}

/// The catalogue query a search names: `(parameter, value)` pairs for `GET /api/v1/catalogue`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Search {
    pub params: Vec<(&'static str, String)>,
}

impl Search {
    fn set(&mut self, name: &'static str, value: String) {
        self.params.retain(|(n, _)| *n != name);
        self.params.push((name, value));
    }

    /// The value given for a parameter, if any.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }
}

/// One term as written: where it starts, and its three parts.
struct Term<'a> {
    column: usize,
    field: &'a str,
    op: Op,
    op_column: usize,
    value: String,
    value_column: usize,
}

/// Parses `query` (an empty query searches everything).
pub fn parse(query: &str) -> Result<Search, QueryError> {
    let fail = |column: usize, message: String| QueryError { query: query.to_owned(), column, message };
    let mut search = Search::default();
    for term in terms(query).map_err(|(column, message)| fail(column, message))? {
        apply(&mut search, &term).map_err(|(column, message)| fail(column, message))?;
    }
    // A price is per card per period: per hour unless `mode=` names another period.
    if search.get("max_price_minor").is_some() && search.get("billing_mode").is_none() {
        search.set("billing_mode", BillingMode::Hourly.as_str().to_owned());
    }
    Ok(search)
}

/// Splits a query into terms, each `field op value`.
fn terms(query: &str) -> Result<Vec<Term<'_>>, (usize, String)> {
    let chars: Vec<(usize, char)> = query.char_indices().collect();
    let column_of = |i: usize| i + 1;
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].1.is_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && (chars[i].1.is_ascii_alphanumeric() || chars[i].1 == '_') {
            i += 1;
        }
        if i == start {
            return Err((column_of(start), format!("expected a field name (gpu, vram, price, …), found {:?}", chars[i].1)));
        }
        let field = &query[chars[start].0..chars.get(i).map_or(query.len(), |c| c.0)];
        let op_start = i;
        let op = match (chars.get(i).map(|c| c.1), chars.get(i + 1).map(|c| c.1)) {
            (Some('>'), Some('=')) => Op::Ge,
            (Some('<'), Some('=')) => Op::Le,
            (Some('>'), _) => Op::Gt,
            (Some('<'), _) => Op::Lt,
            (Some('='), _) => Op::Eq,
            (Some(c), _) => return Err((column_of(op_start), format!("expected =, >=, >, <= or < after {field:?}, found {c:?}"))),
            (None, _) => return Err((column_of(op_start), format!("{field:?} needs a comparison and a value, such as {field}=…"))),
        };
        i += op.as_str().chars().count();
        let value_start = i;
        let value = if chars.get(i).map(|c| c.1) == Some('"') {
            i += 1;
            let from = i;
            while i < chars.len() && chars[i].1 != '"' {
                i += 1;
            }
            if i == chars.len() {
                return Err((column_of(value_start), "a quoted value is not closed".into()));
            }
            let text: String = chars[from..i].iter().map(|c| c.1).collect();
            i += 1;
            text
        } else {
            let from = i;
            while i < chars.len() && !chars[i].1.is_whitespace() {
                i += 1;
            }
            chars[from..i].iter().map(|c| c.1).collect()
        };
        if value.is_empty() {
            return Err((column_of(value_start), format!("{field}{} needs a value", op.as_str())));
        }
        out.push(Term { column: column_of(start), field, op, op_column: column_of(op_start), value, value_column: column_of(value_start) });
    }
    Ok(out)
}

fn apply(search: &mut Search, t: &Term<'_>) -> Result<(), (usize, String)> {
    let only = |ops: &[Op]| -> Result<(), (usize, String)> {
        if ops.contains(&t.op) {
            Ok(())
        } else {
            let allowed: Vec<&str> = ops.iter().map(|o| o.as_str()).collect();
            Err((t.op_column, format!("{} takes {}, not {}", t.field, allowed.join(" or "), t.op.as_str())))
        }
    };
    let at_least = |name: &'static str, search: &mut Search| -> Result<(), (usize, String)> {
        only(&[Op::Ge, Op::Gt])?;
        let n: u64 = t.value.parse().map_err(|_| (t.value_column, format!("{} is compared with a whole number, not {:?}", t.field, t.value)))?;
        let n = if t.op == Op::Gt { n.checked_add(1).ok_or((t.value_column, "too large".to_owned()))? } else { n };
        search.set(name, n.to_string());
        Ok(())
    };
    match t.field.to_ascii_lowercase().as_str() {
        "gpu" | "model" => {
            only(&[Op::Eq])?;
            search.set("gpu_model", t.value.clone());
        }
        "vram" => at_least("min_vram_gib", search)?,
        "cards" => at_least("min_cards", search)?,
        "idle" => at_least("min_idle_cards", search)?,
        "memory" | "ram" => at_least("min_memory_gib", search)?,
        "vcpus" | "cpus" => at_least("min_vcpus", search)?,
        "storage" | "disk" => at_least("min_storage_gb", search)?,
        "vendor" => {
            only(&[Op::Eq])?;
            search.set("vendor", t.value.clone());
        }
        "region" => {
            only(&[Op::Eq])?;
            search.set("region", t.value.clone());
        }
        "class" => {
            only(&[Op::Eq])?;
            let class = ClusterClass::parse(&t.value).map_err(|_| (t.value_column, format!("class is A or B, not {:?}", t.value)))?;
            search.set("class", class.as_str().to_owned());
        }
        "mode" | "billing" => {
            only(&[Op::Eq])?;
            let mode = BillingMode::parse(&t.value.to_ascii_lowercase())
                .map_err(|_| (t.value_column, format!("mode is hourly, daily, monthly or yearly, not {:?}", t.value)))?;
            search.set("billing_mode", mode.as_str().to_owned());
        }
        "price" => {
            only(&[Op::Le, Op::Lt])?;
            let fen = fen(&t.value).ok_or((t.value_column, format!("price is in yuan with at most two decimals (2.5, 12.80), not {:?}", t.value)))?;
            let max = if t.op == Op::Lt { fen - 1 } else { fen };
            if max < 0 {
                return Err((t.value_column, "no price is below zero".into()));
            }
            search.set("max_price_minor", max.to_string());
        }
        "currency" => {
            only(&[Op::Eq])?;
            search.set("currency", t.value.to_ascii_uppercase());
        }
        other => {
            return Err((
                t.column,
                format!("unknown field {other:?}: gpu, vram, cards, idle, memory, vcpus, storage, vendor, region, class, mode, price, currency"),
            ))
        }
    }
    Ok(())
}

/// Yuan with at most two decimals, in fen: `2.5` → 250.
fn fen(text: &str) -> Option<i64> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, "0"));
    if whole.is_empty()
        || fraction.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || fraction.len() > 2
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let cents = format!("{fraction:0<2}").parse::<i64>().ok()?;
    whole.parse::<i64>().ok()?.checked_mul(100)?.checked_add(cents)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(query: &str) -> Vec<(&'static str, String)> {
        let mut p = parse(query).unwrap_or_else(|e| panic!("{e}")).params;
        p.sort();
        p
    }

    #[test]
    fn a_query_becomes_the_catalogue_parameters() {
        assert_eq!(
            params("gpu=A100 vram>=80 price<2.5 region=shenzhen class=b mode=hourly"),
            vec![
                ("billing_mode", "hourly".into()),
                ("class", "B".into()),
                ("gpu_model", "A100".into()),
                ("max_price_minor", "249".into()),
                ("min_vram_gib", "80".into()),
                ("region", "shenzhen".into()),
            ]
        );
        assert_eq!(params("vram>79 price<=2.50 cards>=8 vendor=\"Super Micro\""), {
            let mut v = vec![
                ("min_vram_gib", "80".to_owned()),
                ("max_price_minor", "250".into()),
                ("billing_mode", "hourly".into()),
                ("min_cards", "8".into()),
                ("vendor", "Super Micro".into()),
            ];
            v.sort();
            v
        });
        assert_eq!(params("  "), vec![]);
        assert_eq!(params("gpu=A10 gpu=L40S"), vec![("gpu_model", "L40S".into())], "the last word on a field wins");
    }

    #[test]
    fn every_mistake_names_its_column() {
        let cases = [
            ("gpu=A100 vram=80", 14, "vram takes >= or >, not ="),
            ("gpu=A100 speed>=3", 10, "unknown field \"speed\""),
            ("vram>=eighty", 7, "whole number"),
            ("price<2.555", 7, "two decimals"),
            ("price>1", 6, "price takes <= or <"),
            ("class=C", 7, "A or B"),
            ("mode=weekly", 6, "hourly, daily"),
            ("gpu", 4, "needs a comparison"),
            ("gpu=", 5, "needs a value"),
            ("vendor=\"Super", 8, "not closed"),
            ("=A100", 1, "expected a field name"),
            ("gpu~A100", 4, "expected =, >="),
            ("price<0", 7, "below zero"),
        ];
        for (query, column, says) in cases {
            let e = parse(query).expect_err(query);
            assert_eq!(e.column, column, "{query}: {e}");
            assert!(e.message.contains(says), "{query}: {e}");
        }
        let shown = parse("gpu=A100 vram=80").unwrap_err().to_string();
        assert_eq!(shown, "  gpu=A100 vram=80\n               ^\ncolumn 14: vram takes >= or >, not =");
    }

    #[test]
    fn prices_are_read_as_exact_fen() {
        assert_eq!(fen("2.5"), Some(250));
        assert_eq!(fen("12.80"), Some(1280));
        assert_eq!(fen("3"), Some(300));
        assert_eq!(fen("0.01"), Some(1));
        for bad in ["", ".5", "1.", "1.234", "-1", "1e3", "１"] {
            assert_eq!(fen(bad), None, "{bad}");
        }
    }
}
