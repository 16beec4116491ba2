//! Aligned plain-text tables, kubectl style.

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
                .map(|(cell, w)| format!("{cell:<w$}"))
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
