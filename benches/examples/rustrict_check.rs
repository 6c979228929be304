//! Prints, per input line (a JSON string), whether rustrict flags it at its moderate level
//! (`{"flagged": bool}`): the peer `eval/moderate/evaluate.py` compares moat-moderate with.

use std::io::{BufRead, BufWriter, Write};

use rustrict::{CensorStr, Type};

fn main() -> std::io::Result<()> {
    let stdin = std::io::stdin();
    let mut out = BufWriter::new(std::io::stdout().lock());
    for line in stdin.lock().lines() {
        let line = line?;
        let text: String = serde_json::from_str(&line).unwrap_or(line);
        let flagged = text.is(Type::INAPPROPRIATE & Type::MODERATE_OR_HIGHER);
        writeln!(out, "{{\"flagged\": {flagged}}}")?;
    }
    out.flush()
}
