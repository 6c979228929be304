//! Moderates each input line (a JSON string per line) with the default policy and prints one
//! JSON object per line: `{"flagged": bool, "categories": [...], "scores": {...}}`. What
//! `eval/moderate/evaluate.py` measures.

use std::io::{BufRead, BufWriter, Write};

use moat_moderate::{check_text, Policy};

fn main() -> std::io::Result<()> {
    // For tuning: MOAT_MODEL_MARGIN overrides the shipped model's margin.
    let mut policy = Policy::new();
    if let Some(margin) = std::env::var("MOAT_MODEL_MARGIN")
        .ok()
        .and_then(|m| m.parse().ok())
    {
        let model = moat_moderate::Model::shipped().clone().with_margin(margin);
        let classifier = moat_moderate::Classifier::new()
            .model(Some(model), moat_moderate::Category::Harassment);
        policy = policy.classifier(classifier);
    }
    let stdin = std::io::stdin();
    let mut out = BufWriter::new(std::io::stdout().lock());
    for line in stdin.lock().lines() {
        let line = line?;
        let text: String = serde_json::from_str(&line).unwrap_or(line);
        let (_, scan) = check_text(&text, &policy);
        let scores = scan.scores();
        let categories: Vec<&str> = policy.flagged(&scores).map(|c| c.as_str()).collect();
        let scores: serde_json::Map<String, serde_json::Value> = scores
            .iter()
            .filter(|(_, s)| *s > 0.0)
            .map(|(c, s)| {
                (
                    c.as_str().to_owned(),
                    serde_json::json!((s * 1000.0).round() / 1000.0),
                )
            })
            .collect();
        let row = serde_json::json!({"flagged": !categories.is_empty(), "categories": categories, "scores": scores});
        writeln!(out, "{row}")?;
    }
    out.flush()
}
