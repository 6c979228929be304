//! Reads one JSON string per line on stdin and writes the findings for each as a JSON line:
//! `[{"entity": "email", "start": 5, "end": 21, "score": 0.9}, ...]` (byte offsets).
//!
//! `cargo run --release -p moat-redact --example scan [--names] < texts.jsonl`; the evaluation in
//! `eval/` drives it.

use std::io::{BufRead, BufWriter, Write};

use moat_redact::{Detector, Entity};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut entities = Entity::ALL.to_vec();
    if std::env::args().any(|a| a == "--names") {
        entities.push(Entity::Person);
    }
    let detector = Detector::new(&entities);
    let stdin = std::io::stdin().lock();
    let mut out = BufWriter::new(std::io::stdout().lock());
    for line in stdin.lines() {
        let text: String = serde_json::from_str(&line?)?;
        let findings: Vec<serde_json::Value> = detector
            .find(&text)
            .iter()
            .map(|f| {
                serde_json::json!({
                    "entity": f.entity.to_string(),
                    "start": f.start,
                    "end": f.end,
                    "score": f.score,
                })
            })
            .collect();
        serde_json::to_writer(&mut out, &findings)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}
