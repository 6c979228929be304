//! The learned scorer: logistic regression over hashed word unigrams and bigrams and character
//! 3- to 5-grams of the screen text, trained offline by `eval/sanitize/prototype.py` on the
//! public training splits and shipped as int8 weights (`model/weights.i8.bin`, 256 KiB).
//!
//! Long texts are also scored in windows of 96 tokens (stride 48), and the text scores the
//! highest of them, so a jailbreak buried in a long document still fires and a long benign
//! document is judged on the same footing as the short rows the model learned from.

use std::collections::HashMap;
use std::sync::LazyLock;

/// The shipped weights: `MSW1`, u32 bits, f32 scale, f32 bias, f32 threshold alone, f32
/// threshold beside the rules, then 2^bits int8 weights (little-endian).
const WEIGHTS: &[u8] = include_bytes!("../model/weights.i8.bin");

const WINDOW: usize = 96;
const STRIDE: usize = 48;

/// A linear model over hashed features.
#[derive(Debug)]
pub struct Model {
    bits: u32,
    scale: f64,
    bias: f64,
    threshold_alone: f64,
    threshold_with_rules: f64,
    weights: &'static [u8],
}

fn f32_at(bytes: &[u8], at: usize) -> f64 {
    f64::from(f32::from_le_bytes([
        bytes[at],
        bytes[at + 1],
        bytes[at + 2],
        bytes[at + 3],
    ]))
}

impl Model {
    fn parse(bytes: &'static [u8]) -> Option<Self> {
        if bytes.len() < 24 || &bytes[..4] != b"MSW1" {
            return None;
        }
        let bits = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let weights = &bytes[24..];
        (bits < 32 && weights.len() == 1 << bits).then(|| Self {
            bits,
            scale: f32_at(bytes, 8),
            bias: f32_at(bytes, 12),
            threshold_alone: f32_at(bytes, 16),
            threshold_with_rules: f32_at(bytes, 20),
            weights,
        })
    }

    /// The model shipped with the crate.
    pub fn shipped() -> &'static Self {
        static SHIPPED: LazyLock<Model> =
            LazyLock::new(|| Model::parse(WEIGHTS).expect("the shipped weights are well formed"));
        &SHIPPED
    }

    /// The probability threshold tuned for the model alone.
    pub fn threshold_alone(&self) -> f64 {
        self.threshold_alone
    }

    /// The probability threshold tuned for the model beside the rules (either flags).
    pub fn threshold_with_rules(&self) -> f64 {
        self.threshold_with_rules
    }

    fn z(&self, features: &HashMap<u32, f64>) -> f64 {
        features
            .iter()
            .map(|(&bucket, &value)| {
                value * f64::from(self.weights[bucket as usize] as i8) * self.scale
            })
            .sum::<f64>()
            + self.bias
    }

    /// The probability that a screen text is an attack: the highest over the whole text and
    /// its windows.
    pub fn probability(&self, screen: &str) -> f64 {
        let tokens = tokens(screen);
        let mut z = self.z(&features(&tokens, self.bits));
        for window in windows(&tokens) {
            z = z.max(self.z(&features(window, self.bits)));
        }
        1.0 / (1.0 + (-z).exp())
    }
}

/// Whether a character separates tokens (the screen text is lower case already).
fn is_separator(c: char) -> bool {
    let code = c as u32;
    if code < 0x80 {
        return !(c.is_ascii_lowercase() || c.is_ascii_digit());
    }
    code <= 0xbf
        || (0x2000..=0x2bff).contains(&code)
        || (0x3000..=0x303f).contains(&code)
        || (0xfe30..=0xfe4f).contains(&code)
        || (0xff00..=0xff0f).contains(&code)
        || (0xff1a..=0xff20).contains(&code)
}

pub(crate) fn tokens(screen: &str) -> Vec<&str> {
    screen
        .split(is_separator)
        .filter(|t| !t.is_empty())
        .collect()
}

/// Token windows of a long text: none up to `WINDOW` tokens (the whole text is scored).
fn windows<'a, 'b>(tokens: &'b [&'a str]) -> Vec<&'b [&'a str]> {
    let mut out = Vec::new();
    if tokens.len() <= WINDOW {
        return out;
    }
    let mut start = 0;
    loop {
        out.push(&tokens[start..(start + WINDOW).min(tokens.len())]);
        if start + WINDOW >= tokens.len() {
            return out;
        }
        start += STRIDE;
    }
}

/// FNV-1a, 64 bits.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Bucket -> value: `1 + ln(count)` per bucket, scaled to unit length.
pub(crate) fn features(tokens: &[&str], bits: u32) -> HashMap<u32, f64> {
    let mask = (1u64 << bits) - 1;
    let mut counts: HashMap<u32, u32> = HashMap::new();
    let mut key = Vec::with_capacity(64);
    let mut add = |prefix: u8, parts: &[&str], key: &mut Vec<u8>| {
        key.clear();
        key.push(prefix);
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                key.push(b' ');
            }
            key.extend_from_slice(part.as_bytes());
        }
        *counts.entry((fnv1a64(key) & mask) as u32).or_default() += 1;
    };
    for token in tokens {
        add(b'w', &[token], &mut key);
    }
    for pair in tokens.windows(2) {
        add(b'b', pair, &mut key);
    }
    let joined = format!(" {} ", tokens.join(" "));
    let chars: Vec<(usize, char)> = joined.char_indices().collect();
    for n in 3..=5 {
        for i in 0..chars.len().saturating_sub(n - 1) {
            let start = chars[i].0;
            let end = chars.get(i + n).map_or(joined.len(), |(at, _)| *at);
            add(b'c', &[&joined[start..end]], &mut key);
        }
    }
    let mut values: HashMap<u32, f64> = counts
        .into_iter()
        .map(|(bucket, count)| (bucket, 1.0 + f64::from(count).ln()))
        .collect();
    let norm = values.values().map(|v| v * v).sum::<f64>().sqrt();
    if norm > 0.0 {
        values.values_mut().for_each(|v| *v /= norm);
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_its_reference_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn windows_cover_a_long_text_and_none_a_short_one() {
        let short: Vec<&str> = vec!["a"; 96];
        assert!(windows(&short).is_empty());
        let long: Vec<&str> = vec!["a"; 200];
        let w = windows(&long);
        // Starts 0, 48, 96, 144: the last reaches the end, shorter.
        assert_eq!(w.len(), 4);
        assert_eq!(w[3].len(), 56);
    }
}
