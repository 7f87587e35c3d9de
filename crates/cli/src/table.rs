//! A plain text table: columns padded to their widest cell, or to fixed widths when rows are
//! printed as they come.

use std::fmt::Write;

use micro_framework::logging::{bounded, escape_wire_text};

/// Render `rows` under `header`, columns separated by two spaces, no trailing spaces. The
/// cells are escaped (a name a service declares can hold anything: it may come from its
/// configuration), so that none can forge a row or drive the terminal.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| escape_wire_text(cell).into_owned()).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|cell| cell.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|cell| (*cell).to_owned()).collect();
    std::iter::once(&header).chain(&rows).map(|row| line(row, &widths)).collect()
}

/// One line of a table: each cell padded to its column's width (a longer cell pushes the
/// next ones right), two spaces between columns, no trailing spaces, a line end.
pub fn line(cells: &[String], widths: &[usize]) -> String {
    let mut line = String::new();
    for (cell, width) in cells.iter().zip(widths) {
        let _ = write!(line, "{cell:<width$}  ");
    }
    let mut line = line.trim_end().to_owned();
    line.push('\n');
    line
}

/// A text from the wire as a table cell: on one line (whitespace runs become one space), cut
/// to `max` bytes with its full size stated, and escaped, so that it can neither forge a row
/// nor drive the terminal.
pub fn cell(text: &str, max: usize) -> String {
    let cut = bounded(text, max);
    let flat = cut.split_whitespace().collect::<Vec<_>>().join(" ");
    escape_wire_text(&flat).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_columns_and_cuts_long_cells() {
        let rows = vec![vec!["1".to_owned(), "long value".to_owned()]];
        assert_eq!(render(&["INDEX", "V"], &rows), "INDEX  V\n1      long value\n");
        assert_eq!(line(&["1".to_owned(), "v".to_owned()], &[3, 3]), "1    v\n");
        assert_eq!(cell("a\nb  c", 10), "a b c");
        assert_eq!(cell("abcdef", 4), "abcd… (truncated: 6 bytes in all)");
    }

    #[test]
    fn cells_cannot_forge_rows_or_drive_the_terminal() {
        let hostile = "boom\u{1b}[2J\r\n7  forged\u{85}\u{202e}row";
        assert_eq!(cell(hostile, 100), "boom\\u{1b}[2J 7 forged \\u{202e}row");
        let rows = vec![vec!["q\u{1b}[2J\n7  forged".to_owned()]];
        assert_eq!(render(&["NAME"], &rows), "NAME\nq\\u{1b}[2J\\n7  forged\n");
    }
}
