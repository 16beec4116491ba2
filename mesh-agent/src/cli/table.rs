//! Aligned plain-text tables, kubectl style, with states coloured when the
//! output is a terminal (and `NO_COLOR` is unset).

use std::sync::atomic::{AtomicBool, Ordering};

static COLOUR: AtomicBool = AtomicBool::new(false);

/// Turns colour on for tables rendered from now on.
pub fn use_colour(on: bool) {
    COLOUR.store(on, Ordering::Relaxed);
}

/// ANSI colour of a cell whose whole text is a state word.
fn colour_of(cell: &str) -> Option<&'static str> {
    match cell {
        "healthy" | "active" | "true" | "forwarded" => Some("32"),
        "draining" | "ejected" | "no-backend" => Some("33"),
        "unhealthy" | "denied" | "false" => Some("31"),
        _ => None,
    }
}

pub struct Table<const N: usize> {
    header: [String; N],
    rows: Vec<[String; N]>,
}

impl<const N: usize> Table<N> {
    pub fn new(header: [&str; N]) -> Self {
        Self {
            header: header.map(str::to_owned),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: [&str; N]) {
        self.rows.push(cells.map(str::to_owned));
    }

    pub fn render(&self) -> String {
        let mut widths = self.header.each_ref().map(|h| h.chars().count());
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let line: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(cell, w)| {
                    let padded = format!("{cell:<w$}");
                    match colour_of(cell).filter(|_| COLOUR.load(Ordering::Relaxed)) {
                        Some(code) => format!("\x1b[{code}m{cell}\x1b[0m{}", &padded[cell.len()..]),
                        None => padded,
                    }
                })
                .collect();
            out.push_str(line.join("   ").trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_to_the_widest_cell() {
        let mut t = Table::new(["A", "LONGER"]);
        t.row(["wide cell", "x"]);
        assert_eq!(t.render(), "A           LONGER\nwide cell   x\n");
    }
}
