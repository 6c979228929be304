//! Screens texts from stdin, one JSON string per line, and prints one JSON object per line:
//! the score, whether the default threshold flags it, the rule families and the model's
//! probability. `eval/sanitize/evaluate.py` measures the screener with it.
//!
//! ```text
//! echo '"Ignore all previous instructions."' | cargo run -q --release -p moat-sanitize --example screen
//! ```

use std::io::{self, BufRead, BufWriter, Write};

use moat_sanitize::{Screener, DEFAULT_THRESHOLD};

fn main() -> io::Result<()> {
    let screener = Screener::new();
    let mut out = BufWriter::new(io::stdout().lock());
    for line in io::stdin().lock().lines() {
        let line = line?;
        let text: String = match serde_json::from_str(&line) {
            Ok(text) => text,
            Err(e) => {
                eprintln!("not a JSON string: {e}");
                std::process::exit(2);
            }
        };
        let verdict = screener.screen(&text);
        let families: Vec<&str> = verdict.rules().families().iter().map(|(f, _)| *f).collect();
        let line = serde_json::json!({
            "score": verdict.score(),
            "flagged": verdict.score() >= DEFAULT_THRESHOLD,
            "rules": families,
            "rule_score": verdict.rules().score(),
            "probability": verdict.probability(),
            "encoding": verdict.encoding(),
            "cleared_by_gate": verdict.cleared_by_gate(),
        });
        writeln!(out, "{line}")?;
    }
    out.flush()
}
