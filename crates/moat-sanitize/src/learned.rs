//! The learned scorer: logistic regression over hashed word unigrams and bigrams and character
//! 3- to 5-grams of the screen text, trained offline by `eval/sanitize/prototype.py` on the
//! public training splits and shipped as int8 weights (`model/weights.i8.bin`, 256 KiB).
//!
//! Long texts are also scored in windows of 96 tokens (stride 48), and the text scores the
//! highest of them, so a jailbreak buried in a long document still fires and a long benign
//! document is judged on the same footing as the short rows the model learned from.

use std::sync::LazyLock;

/// The shipped weights: `MSW2`, u32 bits, f32 scale, f32 bias, f32 threshold alone, f32
/// threshold beside the rules (either flags), f32 alpha and f32 threshold of the weighted sum
/// (logit + alpha * rule score), then 2^bits int8 weights (little-endian).
const WEIGHTS: &[u8] = include_bytes!("../model/weights.i8.bin");

/// The shipped gate: `MSG1`, u32 bits, f32 scale, f32 bias, f32 threshold, then 2^bits int8
/// weights over the model's word unigram and bigram keys (the low bits of the same hashes).
const GATE: &[u8] = include_bytes!("../model/gate.i8.bin");

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
    alpha: f64,
    threshold_sum: f64,
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
        if bytes.len() < 32 || &bytes[..4] != b"MSW2" {
            return None;
        }
        let bits = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let weights = &bytes[32..];
        (bits < 32 && weights.len() == 1 << bits).then(|| Self {
            bits,
            scale: f32_at(bytes, 8),
            bias: f32_at(bytes, 12),
            threshold_alone: f32_at(bytes, 16),
            threshold_with_rules: f32_at(bytes, 20),
            alpha: f32_at(bytes, 24),
            threshold_sum: f32_at(bytes, 28),
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

    /// The weight of the rule score in the weighted sum `logit + alpha * rules`.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The weighted sum's threshold, tuned with the rules for the same share of benign
    /// prompts flagged.
    pub fn threshold_sum(&self) -> f64 {
        self.threshold_sum
    }

    /// The probability that a screen text is an attack: the highest over the whole text and
    /// its windows.
    pub fn probability(&self, screen: &str) -> f64 {
        1.0 / (1.0 + (-self.logit(screen)).exp())
    }

    /// The log-odds that a screen text is an attack (the highest over the text and its windows).
    pub fn logit(&self, screen: &str) -> f64 {
        self.logit_after(screen, None).unwrap_or(f64::NEG_INFINITY)
    }

    /// The log-odds, unless `gate` clears the text first (`None`): the gate reads only the
    /// word unigrams and bigrams the model hashes anyway, and the character n-grams (most of
    /// the work) are only hashed and counted for a text it does not clear.
    pub fn logit_after(&self, screen: &str, gate: Option<&Gate>) -> Option<f64> {
        self.read(screen, gate).0
    }

    /// [`logit_after`](Self::logit_after), and how many tokens the text has.
    pub(crate) fn read(&self, screen: &str, gate: Option<&Gate>) -> (Option<f64>, usize) {
        let mut hashed = Hashed::new(screen, self.bits);
        let count = hashed.tokens.len();
        let spans: Vec<(usize, usize)> =
            std::iter::once((0, count)).chain(windows(count)).collect();
        if let Some(gate) = gate {
            let cleared = spans.iter().all(|&(start, end)| {
                hashed.z(
                    start,
                    end,
                    gate.weights,
                    gate.scale,
                    gate.bias,
                    gate.mask(),
                    false,
                ) < gate.threshold
            });
            if cleared {
                return (None, count);
            }
        }
        hashed.hash_grams();
        let mask = (1u32 << self.bits) - 1;
        let logit = spans
            .iter()
            .map(|&(start, end)| {
                hashed.z(start, end, self.weights, self.scale, self.bias, mask, true)
            })
            .fold(f64::NEG_INFINITY, f64::max);
        (Some(logit), count)
    }
}

/// A word-level linear model that clears benign text before the n-gram [`Model`]: trained
/// beside it by `eval/sanitize/prototype.py`, its threshold set under every text of the
/// evaluation sets that a policy threshold of 0.5 or more would flag through the model.
#[derive(Debug)]
pub struct Gate {
    bits: u32,
    scale: f64,
    bias: f64,
    threshold: f64,
    weights: &'static [u8],
}

impl Gate {
    fn parse(bytes: &'static [u8]) -> Option<Self> {
        if bytes.len() < 20 || &bytes[..4] != b"MSG1" {
            return None;
        }
        let bits = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let weights = &bytes[20..];
        (bits <= 18 && weights.len() == 1 << bits).then(|| Self {
            bits,
            scale: f32_at(bytes, 8),
            bias: f32_at(bytes, 12),
            threshold: f32_at(bytes, 16),
            weights,
        })
    }

    /// The gate shipped with the crate.
    pub fn shipped() -> &'static Self {
        static SHIPPED: LazyLock<Gate> =
            LazyLock::new(|| Gate::parse(GATE).expect("the shipped gate is well formed"));
        &SHIPPED
    }

    /// The gate logit under which a text skips the model.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// The gate's log-odds for a screen text: the highest over the text and its windows.
    pub fn logit(&self, screen: &str) -> f64 {
        // The gate's buckets are the low bits of the model's 18-bit ones.
        let hashed = Hashed::new(screen, 18);
        std::iter::once((0, hashed.tokens.len()))
            .chain(windows(hashed.tokens.len()))
            .map(|(start, end)| {
                hashed.z(
                    start,
                    end,
                    self.weights,
                    self.scale,
                    self.bias,
                    self.mask(),
                    false,
                )
            })
            .fold(f64::NEG_INFINITY, f64::max)
    }

    fn mask(&self) -> u32 {
        (1u32 << self.bits) - 1
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

/// Whether an ASCII byte belongs to a token (a lower-case letter or a digit): one load rather
/// than two range tests per byte.
static WORD_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_lowercase() || (b as u8).is_ascii_digit();
        b += 1;
    }
    table
};

fn tokens(screen: &str) -> Vec<&str> {
    if !screen.is_ascii() {
        return screen
            .split(is_separator)
            .filter(|t| !t.is_empty())
            .collect();
    }
    // ASCII: the same tokens, cut at bytes without decoding characters.
    let bytes = screen.as_bytes();
    let mut out = Vec::with_capacity(bytes.len() / 5);
    let mut start = None;
    for (at, &b) in bytes.iter().enumerate() {
        let word = WORD_BYTE[usize::from(b)];
        match (word, start) {
            (true, None) => start = Some(at),
            (false, Some(from)) => {
                out.push(&screen[from..at]);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(from) = start {
        out.push(&screen[from..]);
    }
    out
}

/// Token windows of a long text, as `(start, end)`: none up to `WINDOW` tokens (the whole text
/// is scored).
fn windows(tokens: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    if tokens <= WINDOW {
        return out;
    }
    let mut start = 0;
    loop {
        out.push((start, (start + WINDOW).min(tokens)));
        if start + WINDOW >= tokens {
            return out;
        }
        start += STRIDE;
    }
}

/// One step of FNV-1a (64 bits): `h` with byte `b` mixed in.
const fn fnv_step(h: u64, b: u8) -> u64 {
    (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
}

/// FNV-1a of the one byte `prefix`: where every key of a kind starts.
const fn fnv_start(prefix: u8) -> u64 {
    fnv_step(0xcbf2_9ce4_8422_2325, prefix)
}

/// Every key of a token sequence hashed once, so the whole text and each of its windows (whose
/// keys are the ones inside its span) are scored without hashing again.
///
/// Keys: `w` + token, `b` + token + ` ` + next token, `c` + every 3-, 4- and 5-gram of
/// characters of ` ` + tokens joined by ` ` + ` `; hashed with FNV-1a, the low `bits` kept.
struct Hashed<'a> {
    tokens: Vec<&'a str>,
    words: Vec<u32>,
    pairs: Vec<u32>,
    /// Per n (3, 4, 5): the bucket of the n-gram starting at each character (once hashed).
    grams: [Vec<u32>; 3],
    /// The byte offset of each character of the joined text (` ` + the tokens joined by ` ` +
    /// ` `), and its length last; built with the n-grams, and left empty when the text is
    /// ASCII (each character a byte).
    starts: Vec<usize>,
    /// The byte offset of each token in the joined text, and the text's length last; built
    /// with the n-grams.
    offsets: Vec<usize>,
    bits: u32,
}

impl<'a> Hashed<'a> {
    fn new(screen: &'a str, bits: u32) -> Self {
        let tokens = tokens(screen);
        let mask = (1u64 << bits) - 1;
        let bucket = |h: u64| (h & mask) as u32;
        // `w` + token, and `b` + previous token + ` ` + token, hashed in one pass over each
        // token: the pair's hash goes on from the previous token's `b` + token + ` `, and the
        // three independent chains of multiplications overlap in the processor.
        let mut words = Vec::with_capacity(tokens.len());
        let mut pairs = Vec::with_capacity(tokens.len().saturating_sub(1));
        let mut pair_head: Option<u64> = None;
        for token in &tokens {
            let (mut word, mut pair, mut next) =
                (fnv_start(b'w'), pair_head.unwrap_or(0), fnv_start(b'b'));
            for b in token.bytes() {
                word = fnv_step(word, b);
                pair = fnv_step(pair, b);
                next = fnv_step(next, b);
            }
            words.push(bucket(word));
            if pair_head.is_some() {
                pairs.push(bucket(pair));
            }
            pair_head = Some(fnv_step(next, b' '));
        }
        Self {
            tokens,
            words,
            pairs,
            grams: [Vec::new(), Vec::new(), Vec::new()],
            starts: Vec::new(),
            offsets: Vec::new(),
            bits,
        }
    }

    /// Hashes the character n-grams (what the gate spares a text it clears).
    fn hash_grams(&mut self) {
        let mask = (1u64 << self.bits) - 1;
        let mut text: Vec<u8> =
            Vec::with_capacity(self.tokens.iter().map(|t| t.len() + 1).sum::<usize>() + 1);
        let mut offsets = Vec::with_capacity(self.tokens.len() + 1);
        text.push(b' ');
        for token in &self.tokens {
            offsets.push(text.len());
            text.extend_from_slice(token.as_bytes());
            text.push(b' ');
        }
        offsets.push(text.len());
        let (grams, starts) = match text.is_ascii() {
            true => (ascii_grams(&text, mask), Vec::new()),
            false => char_grams(&text, mask),
        };
        self.grams = grams;
        self.starts = starts;
        self.offsets = offsets;
    }

    /// The model's logit over tokens `start..end`: each bucket's value is `1 + ln(count)`, the
    /// values scaled to unit length, so z = bias + scale * (sum of value * weight) / norm.
    #[allow(clippy::too_many_arguments)] // one linear model's parts, and what it reads
    fn z(
        &self,
        start: usize,
        end: usize,
        weights: &[u8],
        scale: f64,
        bias: f64,
        mask: u32,
        grams: bool,
    ) -> f64 {
        let mut slices: [&[u32]; 5] = [&[]; 5];
        if start < end {
            slices[0] = &self.words[start..end];
            slices[1] = &self.pairs[start..end - 1];
        }
        if grams {
            // The span ` tok_start ... tok_end-1 ` in the joined text, in characters: from the
            // space before the first token to just after the space after the last (the next
            // token's offset, or the text's length).
            let first_byte = self.offsets[start] - 1;
            let last_byte = self.offsets[end];
            let (first, last) = match self.starts.is_empty() {
                // ASCII: characters are bytes.
                true => (first_byte, last_byte),
                false => (
                    self.starts.partition_point(|&b| b < first_byte),
                    self.starts.partition_point(|&b| b < last_byte),
                ),
            };
            let chars = last - first;
            for (i, n) in [3usize, 4, 5].into_iter().enumerate() {
                if chars >= n {
                    slices[2 + i] = &self.grams[i][first..=last - n];
                }
            }
        }
        let features: usize = slices.iter().map(|s| s.len()).sum();
        let buckets = slices.iter().flat_map(|s| s.iter()).map(|&b| b & mask);
        let (mut dot, norm) = COUNTS.with(|tables| {
            let tables = &mut *tables.borrow_mut();
            // A short span counts in a small table of its own (in the first-level cache even
            // when the request before it left none of this crate's tables cached); a longer one
            // in a table with an entry per bucket, 16-bit counts keeping it (512 KiB) and the
            // weights in the second-level cache, or 32-bit ones past what they can count.
            if features <= SMALL_SPAN {
                return tally_small(
                    &mut tables.slots,
                    &mut tables.touched,
                    buckets,
                    features,
                    weights,
                );
            }
            match u16::try_from(features) {
                Ok(_) => tally(
                    &mut tables.small,
                    &mut tables.touched,
                    self.bits,
                    buckets,
                    features,
                    weights,
                ),
                Err(_) => tally(
                    &mut tables.large,
                    &mut tables.touched,
                    self.bits,
                    buckets,
                    features,
                    weights,
                ),
            }
        });
        if norm > 0.0 {
            dot /= norm.sqrt();
        }
        dot * scale + bias
    }
}

/// Counts `buckets` (`features` of them, each under `2^bits`) in `counts`, a table with an
/// entry per bucket (all zero between calls), then sums each distinct bucket's value
/// (`1 + ln(count)`) times its weight, and the squared values: `(dot, norm²)`. No sorting, and
/// only the entries touched are cleared.
fn tally<C>(
    counts: &mut Vec<C>,
    touched: &mut Vec<u32>,
    bits: u32,
    buckets: impl Iterator<Item = u32>,
    features: usize,
    weights: &[u8],
) -> (f64, f64)
where
    C: Copy + Default + PartialEq + Into<u32> + std::ops::Add<Output = C> + From<u8>,
{
    if counts.len() != 1 << bits {
        *counts = vec![C::default(); 1 << bits];
    }
    // Without a branch on the count read: a branch waits for each read (many miss the
    // first-level cache), while this lets the processor read many buckets at once.
    touched.clear();
    touched.resize(features, 0);
    let mut seen = 0;
    for bucket in buckets {
        let count = &mut counts[bucket as usize];
        touched[seen] = bucket;
        seen += usize::from(*count == C::default());
        *count = *count + C::from(1);
    }
    sums(
        touched[..seen]
            .iter()
            .map(|&bucket| (bucket, std::mem::take(&mut counts[bucket as usize]).into())),
        weights,
    )
}

/// Each distinct bucket's value (`1 + ln(count)`) times its weight, summed, and the squared
/// values summed: `(dot, norm²)`. Four running sums of each, in registers, so an add need not
/// wait for the one before (one sum through a closure's captured reference went through
/// memory: a store and a reload on every bucket).
fn sums(mut counted: impl Iterator<Item = (u32, u32)>, weights: &[u8]) -> (f64, f64) {
    let log_values = &*LOG_VALUES;
    let term = |(bucket, count): (u32, u32)| {
        let value = match log_values.get(count as usize) {
            Some(&value) => value,
            None => 1.0 + f64::from(count).ln(),
        };
        (
            value * f64::from(weights[bucket as usize] as i8),
            value * value,
        )
    };
    let (mut d0, mut d1, mut d2, mut d3) = (0.0, 0.0, 0.0, 0.0);
    let (mut n0, mut n1, mut n2, mut n3) = (0.0, 0.0, 0.0, 0.0);
    while let Some((d, n)) = counted.next().map(term) {
        (d0, n0) = (d0 + d, n0 + n);
        let Some((d, n)) = counted.next().map(term) else {
            break;
        };
        (d1, n1) = (d1 + d, n1 + n);
        let Some((d, n)) = counted.next().map(term) else {
            break;
        };
        (d2, n2) = (d2 + d, n2 + n);
        let Some((d, n)) = counted.next().map(term) else {
            break;
        };
        (d3, n3) = (d3 + d, n3 + n);
    }
    ((d0 + d1) + (d2 + d3), (n0 + n1) + (n2 + n3))
}

/// The most features a span counts in [`tally_small`]'s table (past that, probing costs more
/// than the misses it saves: 2,048 and 16,384 were slower on a 2 KB text).
const SMALL_SPAN: usize = 1 << 10;

/// [`tally`] for a span of at most [`SMALL_SPAN`] features, in an open-addressing table of
/// twice as many slots as the span has features, rounded up to a power of two (each slot the
/// bucket plus one above 32 bits, its count below; 0 is empty), cleared as it is read: 16 KiB
/// for a 1,000-feature window, in the first-level cache, where the table with an entry per
/// bucket spreads the same counts over 512 KiB.
fn tally_small(
    slots: &mut Vec<u64>,
    touched: &mut Vec<u32>,
    buckets: impl Iterator<Item = u32>,
    features: usize,
    weights: &[u8],
) -> (f64, f64) {
    let size = (2 * features).next_power_of_two().max(64);
    if slots.len() < size {
        *slots = vec![0; size];
    }
    let slots = &mut slots[..size];
    let mask = size - 1;
    let shift = 64 - size.trailing_zeros();
    touched.clear();
    for bucket in buckets {
        let key = u64::from(bucket) + 1;
        // Fibonacci hashing: the top bits of the product.
        let mut at = (u64::from(bucket).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> shift) as usize;
        loop {
            let slot = &mut slots[at];
            if *slot == 0 {
                *slot = key << 32 | 1;
                touched.push(at as u32);
                break;
            }
            if *slot >> 32 == key {
                *slot += 1;
                break;
            }
            at = (at + 1) & mask;
        }
    }
    sums(
        touched.iter().map(|&at| {
            let slot = std::mem::take(&mut slots[at as usize]);
            ((slot >> 32) as u32 - 1, slot as u32)
        }),
        weights,
    )
}

/// Where a character n-gram's key (`c` + the n-gram) starts.
const GRAM_HASH: u64 = fnv_start(b'c');

/// The bucket (the low bits in `mask`) of the 3-, 4- and 5-gram of characters starting at each
/// character of `text`, and where each character starts in bytes (with the length last).
fn char_grams(text: &[u8], mask: u64) -> ([Vec<u32>; 3], Vec<usize>) {
    let starts: Vec<usize> = (0..text.len())
        .filter(|&i| (text[i] as i8) >= -0x40) // not a UTF-8 continuation byte
        .chain(std::iter::once(text.len()))
        .collect();
    // The 3-, 4- and 5-gram starting at a character share their first bytes: one FNV pass per
    // start gives all three, each written in its place (as in `ascii_grams`).
    let chars = starts.len() - 1;
    let mut grams = [3, 4, 5].map(|n| vec![0; (chars + 1).saturating_sub(n)]);
    for i in 0..chars {
        let mut h = GRAM_HASH;
        let mut at = starts[i];
        // `n` characters from `i` end at `starts[i + n]`: there are such grams while i + n
        // <= chars, which is where the zip stops.
        for (n, &end) in (1..=5).zip(&starts[i + 1..]) {
            h = text[at..end].iter().copied().fold(h, fnv_step);
            at = end;
            if n >= 3 {
                grams[n - 3][i] = (h & mask) as u32;
            }
        }
    }
    (grams, starts)
}

/// [`char_grams`] for ASCII text, a character per byte: no table of character starts. Each
/// n-gram is written in its place (pushes would make every step wait on the vectors' lengths).
fn ascii_grams(text: &[u8], mask: u64) -> [Vec<u32>; 3] {
    let bucket = |h: u64| (h & mask) as u32;
    let n = text.len();
    let mut grams = [3, 4, 5].map(|k| vec![0; (n + 1).saturating_sub(k)]);
    let [threes, fours, fives] = &mut grams;
    for (i, w) in text.windows(5).enumerate() {
        let three = fnv_step(fnv_step(fnv_step(GRAM_HASH, w[0]), w[1]), w[2]);
        let four = fnv_step(three, w[3]);
        threes[i] = bucket(three);
        fours[i] = bucket(four);
        fives[i] = bucket(fnv_step(four, w[4]));
    }
    // The last four starts, which have no 5-gram (or fewer).
    for i in n.saturating_sub(4)..n {
        let mut h = GRAM_HASH;
        for (k, &b) in text[i..].iter().enumerate() {
            h = fnv_step(h, b);
            if let Some(slot) = k.checked_sub(2).and_then(|g| grams[g].get_mut(i)) {
                *slot = bucket(h);
            }
        }
    }
    grams
}

/// `1 + ln(count)` for the small counts nearly every bucket has, worked out once.
static LOG_VALUES: LazyLock<[f64; 256]> = LazyLock::new(|| {
    let mut values = [0.0; 256];
    for (count, value) in values.iter_mut().enumerate().skip(1) {
        *value = 1.0 + (count as f64).ln();
    }
    values
});

/// A thread's counting tables (see [`tally`]).
#[derive(Default)]
struct Tables {
    slots: Vec<u64>,
    small: Vec<u16>,
    large: Vec<u32>,
    touched: Vec<u32>,
}

thread_local! {
    /// Per-bucket counts while a text's features are gathered (all zero between calls), and
    /// the buckets touched.
    static COUNTS: std::cell::RefCell<Tables> = std::cell::RefCell::new(Tables::default());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FNV-1a over `prefix`, then `parts` joined by single spaces, without building the key.
    fn fnv_key(prefix: u8, parts: &[&str]) -> u64 {
        let mut h = fnv_start(prefix);
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                h = fnv_step(h, b' ');
            }
            h = part.bytes().fold(h, fnv_step);
        }
        h
    }

    /// FNV-1a, 64 bits, as the prototype computes it.
    fn fnv1a64(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }

    #[test]
    fn small_spans_count_as_the_table_per_bucket_does() {
        let weights = &Model::shipped().weights;
        let mut slots = Vec::new();
        let mut counts: Vec<u16> = Vec::new();
        let mut touched = Vec::new();
        // Spans of every size up to the small table's limit, with repeats (counts above one)
        // and buckets that share a slot's probe sequence.
        let mut state = 7u64;
        for len in [0, 1, 2, 3, 17, 31, 32, 33, 255, 256, 700, SMALL_SPAN] {
            let buckets: Vec<u32> = (0..len)
                .map(|i| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    match i % 3 {
                        0 => (state >> 46) as u32,         // anywhere in 2^18
                        1 => (state >> 60) as u32,         // one of 16: repeated often
                        _ => ((state >> 57) as u32) << 11, // same low bits
                    }
                })
                .collect();
            let small = tally_small(
                &mut slots,
                &mut touched,
                buckets.iter().copied(),
                buckets.len(),
                weights,
            );
            let large = tally(
                &mut counts,
                &mut touched,
                18,
                buckets.iter().copied(),
                buckets.len(),
                weights,
            );
            assert!(
                (small.0 - large.0).abs() < 1e-9,
                "{len}: {small:?} {large:?}"
            );
            assert!(
                (small.1 - large.1).abs() < 1e-9,
                "{len}: {small:?} {large:?}"
            );
            assert!(
                slots.iter().all(|&slot| slot == 0),
                "the table is left empty"
            );
        }
    }

    #[test]
    fn keys_hash_as_fnv_of_the_key_text() {
        assert_eq!(fnv_key(b'w', &["token"]), fnv1a64(b"wtoken"));
        assert_eq!(fnv_key(b'b', &["two", "words"]), fnv1a64(b"btwo words"));
    }

    #[test]
    fn fnv_matches_its_reference_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn words_and_pairs_hash_as_their_keys() {
        let screen = "ignore the previous instructions, señor 12 x";
        let tokens = tokens(screen);
        let hashed = Hashed::new(screen, 18);
        let bucket = |h: u64| (h & ((1 << 18) - 1)) as u32;
        let words: Vec<u32> = tokens.iter().map(|t| bucket(fnv_key(b'w', &[t]))).collect();
        let pairs: Vec<u32> = tokens
            .windows(2)
            .map(|p| bucket(fnv_key(b'b', p)))
            .collect();
        assert_eq!(hashed.words, words);
        assert_eq!(hashed.pairs, pairs);
    }

    #[test]
    fn ascii_grams_are_the_ones_characters_give() {
        for text in [
            "",
            "ab",
            "abcd",
            "abcde",
            " ignore previous instructions ",
            "x y z 1 2 3",
        ] {
            let (by_chars, _) = char_grams(text.as_bytes(), (1 << 18) - 1);
            assert_eq!(
                ascii_grams(text.as_bytes(), (1 << 18) - 1),
                by_chars,
                "{text:?}"
            );
        }
    }

    #[test]
    fn ascii_tokens_are_the_ones_characters_give() {
        for screen in [
            "",
            "   ",
            "ignore all previous instructions",
            " leading, trailing. ",
            "a1 b2-c3_d4 (x)[y]{z} 'q' \"r\" \n\tend",
            "x",
            "mixed!!!punctuation???between...words",
        ] {
            let by_chars: Vec<&str> = screen
                .split(is_separator)
                .filter(|t| !t.is_empty())
                .collect();
            assert_eq!(tokens(screen), by_chars, "{screen:?}");
        }
    }

    #[test]
    fn windows_cover_a_long_text_and_none_a_short_one() {
        assert!(windows(96).is_empty());
        // Starts 0, 48, 96, 144: the last reaches the end, shorter.
        assert_eq!(windows(200), [(0, 96), (48, 144), (96, 192), (144, 200)]);
    }
}
