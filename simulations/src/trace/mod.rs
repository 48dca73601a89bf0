//! Loaders for the GPU-cluster traces in `../shared/traces/` (formats in its README).
//!
//! Every loader parses text it is given together with the name of its source (so the unit
//! tests need no files) and refuses a malformed line with a [`TraceError`] naming
//! `file:line`. Columns are found by the header's names, so a reordered file still loads.

pub mod alibaba;
pub mod gavel;
pub mod philly;
pub mod pollux;
pub mod tiresias;

use std::path::Path;

/// A trace that cannot be used, with where.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{file}:{line}: {reason}")]
    Line { file: String, line: usize, reason: String },
    #[error("{file}: {reason}")]
    File { file: String, reason: String },
    #[error("reading {file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
}

/// Reads a whole trace file.
pub fn read(path: &Path) -> Result<String, TraceError> {
    std::fs::read_to_string(path).map_err(|source| TraceError::Io { file: path.display().to_string(), source })
}

/// A comma-separated file with a header row and no quoting (none of the traces quote).
pub(crate) struct Csv<'t> {
    file: &'t str,
    columns: Vec<&'t str>,
    rows: Vec<(usize, &'t str)>,
}

/// One data row: its 1-based line number and fields.
pub(crate) struct Row<'t> {
    pub file: &'t str,
    pub line: usize,
    fields: Vec<&'t str>,
}

impl<'t> Csv<'t> {
    /// Splits `text` into a header and rows; blank lines are skipped.
    pub fn parse(file: &'t str, text: &'t str) -> Result<Self, TraceError> {
        let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
        let Some((_, header)) = lines.next() else {
            return Err(TraceError::File { file: file.to_owned(), reason: "empty: no header row".into() });
        };
        let columns = header.trim_start_matches('\u{feff}').split(',').map(str::trim).collect();
        Ok(Csv { file, columns, rows: lines.map(|(i, l)| (i + 1, l)).collect() })
    }

    /// The positions of `names` in the header, or an error naming the first one missing.
    pub fn columns(&self, names: &[&str]) -> Result<Vec<usize>, TraceError> {
        names
            .iter()
            .map(|name| {
                self.columns.iter().position(|c| c == name).ok_or_else(|| TraceError::Line {
                    file: self.file.to_owned(),
                    line: 1,
                    reason: format!("header has no column {name:?} (has {})", self.columns.join(",")),
                })
            })
            .collect()
    }

    /// Each row, checked to have as many fields as the header.
    pub fn rows(&self) -> impl Iterator<Item = Result<Row<'t>, TraceError>> + '_ {
        self.rows.iter().map(|&(line, text)| {
            let fields: Vec<&str> = text.split(',').map(str::trim).collect();
            let row = Row { file: self.file, line, fields };
            if row.fields.len() != self.columns.len() {
                return Err(row.error(format!("expected {} comma-separated fields, got {}", self.columns.len(), row.fields.len())));
            }
            Ok(row)
        })
    }
}

impl Row<'_> {
    pub fn error(&self, reason: impl Into<String>) -> TraceError {
        TraceError::Line { file: self.file.to_owned(), line: self.line, reason: reason.into() }
    }

    pub fn fields_empty(&self, col: usize) -> bool {
        self.fields[col].is_empty()
    }

    pub fn text(&self, col: usize, what: &str) -> Result<&str, TraceError> {
        let v = self.fields[col];
        if v.is_empty() {
            return Err(self.error(format!("{what} is empty")));
        }
        Ok(v)
    }

    /// A finite number that is at least 0.
    pub fn number(&self, col: usize, what: &str) -> Result<f64, TraceError> {
        let raw = self.fields[col];
        raw.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0).ok_or_else(|| self.error(format!("{what}: {raw:?} is not a non-negative number")))
    }

    /// A whole number that is at least 1.
    pub fn count(&self, col: usize, what: &str) -> Result<u32, TraceError> {
        let raw = self.fields[col];
        raw.parse::<u32>().ok().filter(|v| *v >= 1).ok_or_else(|| self.error(format!("{what}: {raw:?} is not a whole number of at least 1")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_need_as_many_fields_as_the_header() {
        let csv = Csv::parse("t.csv", "a,b\n1,2\n\n3\n").expect("a header");
        let rows: Vec<_> = csv.rows().collect();
        assert!(rows[0].is_ok());
        let err = rows[1].as_ref().err().expect("short row").to_string();
        assert!(err.starts_with("t.csv:4: "), "{err}");
        assert!(csv.columns(&["b", "c"]).is_err());
        assert!(Csv::parse("e.csv", "\n").is_err());
    }
}
