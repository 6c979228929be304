//! The port against the prototype: vectors computed by `eval/sanitize/vectors.py` from
//! sentences written for it (regenerate with `.venv/bin/python eval/sanitize/vectors.py`).

use moat_sanitize::{rule_hits, screen_text, Model};
use serde_json::Value;

fn vectors() -> Value {
    serde_json::from_str(include_str!("vectors.json")).unwrap()
}

#[test]
fn screen_text_rules_and_model_match_the_prototype() {
    let vectors = vectors();
    let model = Model::shipped();
    assert!(
        (model.threshold_with_rules() - vectors["threshold_or"].as_f64().unwrap()).abs() < 1e-6
    );
    assert!((model.alpha() - vectors["alpha"].as_f64().unwrap()).abs() < 1e-6);
    assert!((model.threshold_sum() - vectors["threshold_sum"].as_f64().unwrap()).abs() < 1e-6);
    assert!(
        (moat_sanitize::Gate::shipped().threshold() - vectors["gate_threshold"].as_f64().unwrap())
            .abs()
            < 1e-6
    );
    for sample in vectors["samples"].as_array().unwrap() {
        let text = sample["text"].as_str().unwrap();
        let screen = screen_text(text);
        assert_eq!(screen, sample["screen_text"].as_str().unwrap(), "{text}");
        let hits = rule_hits(&screen);
        let mut families: Vec<(String, f64)> = hits
            .families()
            .iter()
            .map(|(f, w)| ((*f).to_owned(), *w))
            .collect();
        families.sort_by(|a, b| a.0.cmp(&b.0));
        let expected: Vec<(String, f64)> = sample["rule_families"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(f, w)| (f.clone(), w.as_f64().unwrap()))
            .collect();
        assert_eq!(
            families.len(),
            expected.len(),
            "{text}: {families:?} vs {expected:?}"
        );
        for ((f, w), (ef, ew)) in families.iter().zip(&expected) {
            assert_eq!(f, ef, "{text}");
            assert!((w - ew).abs() < 1e-9, "{text}: {f} {w} vs {ew}");
        }
        let z_gate = moat_sanitize::Gate::shipped().logit(&screen);
        let expected_gate = sample["z_gate"].as_f64().unwrap();
        assert!(
            (z_gate - expected_gate).abs() < 1e-6,
            "{text}: gate {z_gate} vs {expected_gate}"
        );
        let p = model.probability(&screen);
        let expected_p = sample["p"].as_f64().unwrap();
        assert!(
            (p - expected_p).abs() < 1e-6,
            "{text}: p {p} vs {expected_p}"
        );
    }
}
