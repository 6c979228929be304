//! The learned scorer: logistic regression over hashed word unigrams and bigrams of the folded
//! words, scored over a sliding window of words so it can run as text streams in, one word at a
//! time, in constant work per word. Trained offline by `eval/moderate/train.py` on the public
//! training splits and shipped as int8 weights (`model/toxicity.i8.bin`).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::sync::LazyLock;

/// `MMD3`, u32 bits, f32 scale, f32 bias, f32 threshold (log-odds), u32 window (words), f32
/// margin (log-odds), then 2^bits int8 weights, little-endian; a feature's weight is at its
/// FNV-1a hash mixed by [`mix`], masked to `bits`. (`MMD2`: the hash masked unmixed; `MMD1`:
/// that, without the margin, which is then 0.)
const SHIPPED: &[u8] = include_bytes!("../model/toxicity.i8.bin");

/// A model file that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelError(&'static str);

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "moderation model: {}", self.0)
    }
}

impl std::error::Error for ModelError {}

/// A linear model over hashed word features.
#[derive(Clone)]
pub struct Model {
    bits: u32,
    scale: f32,
    bias: f32,
    threshold: f32,
    window: usize,
    /// How far past the threshold a window must score for the model to flag it alone; at the
    /// threshold it only confirms a mild lexicon word in the window.
    margin: f32,
    /// Whether a hash is mixed before it is masked (`MMD3`).
    mixed: bool,
    header: usize,
    weights: Cow<'static, [u8]>,
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("bits", &self.bits)
            .field("window", &self.window)
            .field("threshold", &self.threshold)
            .finish()
    }
}

fn f32_at(bytes: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// FNV-1a, 64 bits: what the training script hashes with.
pub(crate) fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// MurmurHash3's 64-bit finalizer: every bit of the hash reaches the low bits a table is
/// indexed by. FNV-1a's low bits alone made "encoding" and "idiotic" share a weight.
fn mix(mut hash: u64) -> u64 {
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

impl Model {
    /// Reads a model file (the format `eval/moderate/train.py` writes).
    pub fn from_bytes(bytes: impl Into<Cow<'static, [u8]>>) -> Result<Self, ModelError> {
        let bytes = bytes.into();
        let header = match bytes.get(..4) {
            Some(b"MMD1") => 24,
            Some(b"MMD2" | b"MMD3") => 28,
            _ => return Err(ModelError("not an MMD1, MMD2 or MMD3 file")),
        };
        if bytes.len() < header {
            return Err(ModelError("the header is cut short"));
        }
        let bits = u32_at(&bytes, 4);
        let window = u32_at(&bytes, 20) as usize;
        if !(8..=24).contains(&bits) || bytes.len() != header + (1 << bits) {
            return Err(ModelError("the weights do not match the header"));
        }
        if window == 0 || window > 4096 {
            return Err(ModelError("the window must be 1 to 4096 words"));
        }
        Ok(Self {
            bits,
            scale: f32_at(&bytes, 8),
            bias: f32_at(&bytes, 12),
            threshold: f32_at(&bytes, 16),
            window,
            margin: if header == 28 {
                f32_at(&bytes, 24)
            } else {
                0.0
            },
            mixed: bytes.starts_with(b"MMD3"),
            header,
            weights: bytes,
        })
    }

    /// The model shipped with the crate.
    pub fn shipped() -> &'static Self {
        static MODEL: LazyLock<Model> =
            LazyLock::new(|| Model::from_bytes(SHIPPED).expect("the shipped model is well formed"));
        &MODEL
    }

    /// The window, in words.
    pub fn window(&self) -> usize {
        self.window
    }

    fn weight(&self, hash: u64) -> f32 {
        let mask = (1u64 << self.bits) - 1;
        let hash = if self.mixed { mix(hash) } else { hash };
        // Masked to fewer than 2^bits, which the header check made the weights' length.
        let at = self.header + (hash & mask) as usize;
        f32::from(self.weights[at] as i8) * self.scale
    }

    /// The margin past the threshold at which the model flags alone.
    pub fn margin(&self) -> f32 {
        self.margin
    }

    /// The same model with another margin.
    #[must_use]
    pub fn with_margin(mut self, margin: f32) -> Self {
        self.margin = margin;
        self
    }

    /// The score of the text in `window`, from 0 to 1, 0.5 at the tuned threshold: what
    /// confirms a mild word.
    pub(crate) fn score(&self, window: &Window) -> f32 {
        let logit = self.bias + window.sum - self.threshold;
        1.0 / (1.0 + (-logit).exp())
    }

    /// The score of the model alone: 0.5 at the threshold plus the margin.
    pub(crate) fn score_alone(&self, window: &Window) -> f32 {
        let logit = self.bias + window.sum - self.threshold - self.margin;
        1.0 / (1.0 + (-logit).exp())
    }

    /// The highest score of the model alone over every window of `text` (as streamed, one
    /// word at a time).
    pub fn score_text(&self, text: &str) -> f32 {
        let mut window = Window::default();
        crate::words::words(text)
            .iter()
            .map(|w| {
                window.push(self, w);
                self.score_alone(&window)
            })
            .fold(0.0, f32::max)
    }
}

/// The last words of a text, with their weights summed: each word's unigram, and its bigram
/// with the word before it when that is in the window too.
#[derive(Debug, Clone, Default)]
pub(crate) struct Window {
    /// Per word: its unigram weight, its bigram weight with the word before.
    words: VecDeque<(f32, f32)>,
    sum: f32,
    last: String,
    pushed: usize,
}

impl Window {
    pub(crate) fn push(&mut self, model: &Model, word: &str) {
        let unigram = model.weight(fnv1a(&[word.as_bytes()]));
        let bigram = if self.words.is_empty() {
            0.0
        } else {
            model.weight(fnv1a(&[self.last.as_bytes(), b" ", word.as_bytes()]))
        };
        self.words.push_back((unigram, bigram));
        self.sum += unigram + bigram;
        if self.words.len() > model.window {
            if let Some((old, _)) = self.words.pop_front() {
                self.sum -= old;
            }
            // The new first word's bigram reaches outside the window.
            if let Some(first) = self.words.front_mut() {
                self.sum -= std::mem::take(&mut first.1);
            }
        }
        // Summed in f32 over a long text: recomputed once a window so rounding cannot drift.
        self.pushed += 1;
        if self.pushed % model.window == 0 {
            self.sum = self.words.iter().map(|(u, b)| u + b).sum();
        }
        self.last.clear();
        self.last.push_str(word);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_the_reference_values() {
        assert_eq!(fnv1a(&[b""]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(&[b"a"]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(&[b"foo", b" ", b"bar"]), fnv1a(&[b"foo bar"]));
    }

    #[test]
    fn the_window_sum_equals_a_fresh_sum() {
        let model = Model::shipped();
        let text = "the quick brown fox jumps over the lazy dog ".repeat(20);
        let words = crate::words::words(&text);
        let mut window = Window::default();
        for (i, w) in words.iter().enumerate() {
            window.push(model, w);
            let start = (i + 1).saturating_sub(model.window());
            let mut fresh = Window::default();
            let big = Model {
                window: 1 << 20,
                ..model.clone()
            };
            for w in &words[start..=i] {
                fresh.push(&big, w);
            }
            assert!(
                (window.sum - fresh.sum).abs() < 1e-3,
                "{i}: {} vs {}",
                window.sum,
                fresh.sum
            );
        }
    }

    #[test]
    fn technical_words_keep_weights_of_their_own() {
        // Indexed by FNV-1a's low bits, "encoding" read "idiotic"'s weight, and "Base64
        // encoding and URL encoding" was harassment.
        let model = Model::shipped();
        let mask = (1u64 << model.bits) - 1;
        let at = |word: &str| mix(fnv1a(&[word.as_bytes()])) & mask;
        assert_eq!(
            fnv1a(&[b"encoding"]) & mask,
            fnv1a(&[b"idiotic"]) & mask,
            "the collision"
        );
        assert_ne!(at("encoding"), at("idiotic"));
        for text in [
            "Base64 encoding and URL encoding are different.",
            "Set the encoding to UTF-8: the default encoding differs, so pass the encoding.",
        ] {
            assert!(model.score_text(text) < 0.5, "{text}");
        }
    }

    #[test]
    fn gender_and_family_words_weigh_alike() {
        // They are left out of training: RealToxicityPrompts' labels would teach the model that
        // a sentence about women is more toxic than one about men.
        let model = Model::shipped();
        let log_odds = |text: &str| {
            let mut window = Window::default();
            crate::words::words(text)
                .iter()
                .map(|w| {
                    window.push(model, w);
                    window.sum
                })
                .fold(f32::MIN, f32::max)
        };
        for (a, b) in [
            (
                "My wife said the women at work were brilliant.",
                "My husband said the men at work were brilliant.",
            ),
            (
                "The girl and her mother fixed the bike.",
                "The boy and his father fixed the bike.",
            ),
        ] {
            let (la, lb) = (log_odds(a), log_odds(b));
            assert!((la - lb).abs() < 0.25, "{a}: {la} vs {b}: {lb}");
        }
    }

    #[test]
    fn bad_files_are_refused() {
        assert!(Model::from_bytes(&b"nope"[..]).is_err());
        let mut bytes = SHIPPED.to_vec();
        bytes.pop();
        assert!(Model::from_bytes(bytes.clone()).is_err());
        bytes[..4].copy_from_slice(b"MMD9");
        assert!(Model::from_bytes(bytes).is_err());
    }
}
