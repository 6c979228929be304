//! Prints the folded words of each input line (a JSON string per line) as a JSON array per
//! line: what `eval/moderate/train.py` trains on, so training reads words exactly as the
//! scanner does.

use std::io::{BufRead, BufWriter, Write};

fn main() -> std::io::Result<()> {
    let stdin = std::io::stdin();
    let mut out = BufWriter::new(std::io::stdout().lock());
    for line in stdin.lock().lines() {
        let line = line?;
        let text: String = serde_json::from_str(&line).unwrap_or(line);
        let words = moat_moderate::words(&text);
        writeln!(out, "{}", serde_json::to_string(&words)?)?;
    }
    out.flush()
}
