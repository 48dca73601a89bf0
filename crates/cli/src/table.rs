//! Plain aligned tables for a terminal (`--json` prints the portal's JSON instead).

/// `rows` under `header`, each column as wide as its widest cell, two spaces apart.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(widths.len()) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// Minor units as a decimal amount: 1250 → `12.50`.
pub fn money(minor: i64) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", minor.unsigned_abs() / 100, minor.unsigned_abs() % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_and_money_is_exact() {
        let out = render(&["ID", "GPU"], &[vec!["7".into(), "A100 80GB".into()], vec!["1234".into(), "L40S".into()]]);
        assert_eq!(out, "ID    GPU\n7     A100 80GB\n1234  L40S\n");
        assert_eq!(money(1250), "12.50");
        assert_eq!(money(-5), "-0.05");
        assert_eq!(money(0), "0.00");
    }
}
