//! A plain text table: columns padded to their widest cell.

use std::fmt::Write;

/// Render `rows` under `header`, columns separated by two spaces, no trailing spaces.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|cell| cell.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|cell| (*cell).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `text` on one line, cut to `max` characters with an ellipsis.
pub fn cell(text: &str, max: usize) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        return flat;
    }
    let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_columns_and_cuts_long_cells() {
        let rows = vec![vec!["1".to_owned(), "long value".to_owned()]];
        assert_eq!(render(&["INDEX", "V"], &rows), "INDEX  V\n1      long value\n");
        assert_eq!(cell("a\nb  c", 10), "a b c");
        assert_eq!(cell("abcdef", 4), "abc…");
    }
}
