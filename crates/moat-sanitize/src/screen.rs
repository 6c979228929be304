//! The screen text: what rules and the model read. Base64 runs decoded (one level), NFKC,
//! invisible characters removed, Cyrillic and Greek lookalikes folded to Latin, lower case; then
//! two more views appended when they differ: spaced-out letters joined ("i g n o r e") and
//! leetspeak undone ("1gn0r3").

use std::sync::LazyLock;

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use moat_core::text::{deleet_char, fold_lookalike, is_invisible};
use regex::Regex;
use unicode_normalization::{is_nfkc_quick, IsNormalized, UnicodeNormalization};

/// NFKC, invisible characters removed, lookalikes folded, lower case.
pub(crate) fn normalise(text: &str) -> String {
    // ASCII is its own NFKC, has no invisible or lookalike characters: only the case changes.
    if text.is_ascii() {
        return text.to_ascii_lowercase();
    }
    fn fold(chars: impl Iterator<Item = char>) -> String {
        chars
            .filter(|&c| !is_invisible(c))
            .map(fold_lookalike)
            .collect()
    }
    // Most text is in NFKC already (precomposed accents, no compatibility forms), which the
    // quick check tells in one pass without normalising.
    let folded = match is_nfkc_quick(text.chars()) {
        IsNormalized::Yes => fold(text.chars()),
        _ => fold(text.nfkc()),
    };
    folded.to_lowercase()
}

static BASE64_RUN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[A-Za-z0-9+/]{24,}={0,2}").expect("valid"));
static SPACED: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?:[a-z0-9] ){3,}[a-z0-9]").expect("valid"));
static LEET_TOKEN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[a-z0-9@$]*[a-z][a-z0-9@$]*").expect("valid"));

/// Standard base64 that, like Python's decoder, ignores the unused bits of the last character.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::RequireCanonical),
);

/// The text of one base64 run: at least 12 characters of UTF-8 with few control characters.
fn decode_run(run: &str) -> Option<String> {
    let mut s = run.trim_end_matches('=').to_owned();
    if s.len() % 4 == 1 {
        s.pop();
    }
    while s.len() % 4 != 0 {
        s.push('=');
    }
    let text = String::from_utf8(LENIENT.decode(&s).ok()?).ok()?;
    let chars = text.chars().count();
    let controls = text
        .chars()
        .filter(|&c| {
            let code = c as u32;
            (code < 0x20 && !matches!(c, '\t' | '\n' | '\r')) || (0x7f..=0x9f).contains(&code)
        })
        .count();
    (chars >= 12 && controls as f64 <= 0.05 * chars as f64).then_some(text)
}

/// Whether `bytes` holds a run of at least `min` bytes of `class`: far cheaper than a regex,
/// to skip one that cannot match.
///
/// It reads the byte where a run starting at the earliest possible start would end: when that
/// byte is outside the class, no run can start before the byte after it, so most bytes of
/// ordinary text (words far shorter than `min`) are never read. Each byte is read at most twice.
pub(crate) fn has_run(bytes: &[u8], min: usize, class: impl Fn(u8) -> bool) -> bool {
    let min = min.max(1);
    // The earliest start a run could still have.
    let mut from = 0;
    while from + min <= bytes.len() {
        let end = from + min - 1;
        if !class(bytes[end]) {
            from = end + 1;
            continue;
        }
        // Back from `end`: the last byte outside the class moves the earliest start past it.
        match bytes[from..end].iter().rposition(|&b| !class(b)) {
            None => return true,
            Some(miss) => from += miss + 1,
        }
    }
    false
}

/// Every decodable base64 run replaced by its text (one level, no recursion).
fn unbase64(raw: &str) -> std::borrow::Cow<'_, str> {
    let base64 = |b: u8| b.is_ascii_alphanumeric() || b == b'+' || b == b'/';
    if !has_run(raw.as_bytes(), 24, base64) {
        return std::borrow::Cow::Borrowed(raw);
    }
    BASE64_RUN.replace_all(raw, |caps: &regex::Captures<'_>| {
        let run = &caps[0];
        match decode_run(run) {
            Some(text) => format!(" {text} "),
            None => run.to_owned(),
        }
    })
}

/// Single letters or digits spaced out ("i g n o r e", four or more) joined up, where neither
/// end touches another letter or digit.
fn despace(text: &str) -> std::borrow::Cow<'_, str> {
    // Four letters or digits with single spaces between them, or nothing to join.
    let letter = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = text.as_bytes();
    if bytes.len() < 7 {
        return std::borrow::Cow::Borrowed(text);
    }
    // Windows of 7 bytes starting at `0..n`: spaces at 1, 3 and 5 are looked for in blocks
    // without an early exit (the compiler turns them into vector compares), letters only
    // where a block has such spaces.
    let n = bytes.len() - 6;
    let (first, second, third) = (&bytes[1..n + 1], &bytes[3..n + 3], &bytes[5..n + 5]);
    let spaced = (0..n).step_by(64).any(|from| {
        let block = from..(from + 64).min(n);
        let spaces = first[block.clone()]
            .iter()
            .zip(&second[block.clone()])
            .zip(&third[block.clone()])
            .fold(false, |any, ((&a, &b), &c)| {
                any | ((a == b' ') & (b == b' ') & (c == b' '))
            });
        spaces
            && block.into_iter().any(|i| {
                first[i] == b' '
                    && second[i] == b' '
                    && third[i] == b' '
                    && letter(bytes[i])
                    && letter(bytes[i + 2])
                    && letter(bytes[i + 4])
                    && letter(bytes[i + 6])
            })
    });
    if !spaced {
        return std::borrow::Cow::Borrowed(text);
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut from = 0;
    while let Some(m) = SPACED.find_at(text, from) {
        let (start, mut end) = (m.start(), m.end());
        if alnum(text[..start].chars().next_back()) {
            // Not at the start of a word: try from the next character.
            from = start + 1;
            continue;
        }
        if alnum(text[end..].chars().next()) {
            // The last letter runs on into a word: end one letter earlier, if three spaced
            // letters and a last one remain.
            end -= 2;
            if end - start < 7 {
                from = start + 1;
                continue;
            }
        }
        out.push_str(&text[copied..start]);
        out.extend(text[start..end].chars().filter(|&c| c != ' '));
        copied = end;
        from = end;
    }
    out.push_str(&text[copied..]);
    std::borrow::Cow::Owned(out)
}

/// The digits and symbols leetspeak uses for letters.
fn is_leet_byte(b: u8) -> bool {
    matches!(
        b,
        b'0' | b'1' | b'3' | b'4' | b'5' | b'7' | b'9' | b'@' | b'$'
    )
}

/// Words that mix letters with the digits and symbols of leetspeak, read as letters.
fn deleet(text: &str) -> std::borrow::Cow<'_, str> {
    // In blocks without an early exit inside, which the compiler turns into vector compares.
    let leet = text
        .as_bytes()
        .chunks(64)
        .any(|block| block.iter().fold(false, |any, &b| any | is_leet_byte(b)));
    if !leet {
        return std::borrow::Cow::Borrowed(text);
    }
    LEET_TOKEN.replace_all(text, |caps: &regex::Captures<'_>| {
        let word = &caps[0];
        if word.bytes().any(is_leet_byte) {
            word.chars().map(|c| deleet_char(c).unwrap_or(c)).collect()
        } else {
            word.to_owned()
        }
    })
}

/// What the rules and the model read: the normalised text, then its despaced and deleeted
/// views on lines of their own when they differ from it.
pub fn screen_text(text: &str) -> String {
    let base = normalise(&unbase64(text));
    let mut out = base.clone();
    let despaced = despace(&base);
    if despaced != base {
        out.push('\n');
        out.push_str(&despaced);
    }
    let deleeted = deleet(&base);
    if deleeted != base {
        out.push('\n');
        out.push_str(&deleeted);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn has_run_agrees_with_counting_every_byte() {
        let naive = |bytes: &[u8], min: usize| {
            let mut run = 0;
            bytes.iter().any(|&b| {
                run = if b == b'x' { run + 1 } else { 0 };
                run >= min
            })
        };
        // Every string of up to 12 bytes of `x` (in the class) and `.` (not), every length.
        for len in 0..=12 {
            for bits in 0u32..1 << len {
                let bytes: Vec<u8> = (0..len)
                    .map(|i| if bits >> i & 1 == 1 { b'x' } else { b'.' })
                    .collect();
                for min in 1..=7 {
                    assert_eq!(
                        has_run(&bytes, min, |b| b == b'x'),
                        naive(&bytes, min),
                        "{:?} {min}",
                        String::from_utf8_lossy(&bytes)
                    );
                }
            }
        }
    }

    #[test]
    fn views_are_appended_only_when_they_differ() {
        assert_eq!(screen_text("Hello World"), "hello world");
        assert_eq!(despace("x i g n o r e y"), "xignorey");
        assert_eq!(despace("word i g n o r e word"), "word ignore word");
        assert_eq!(despace("ab c d e f"), "ab cdef");
        assert_eq!(despace("a b c d ef"), "abcd ef");
        assert_eq!(despace("a b c"), "a b c");
        assert_eq!(
            deleet("1gn0r3 the c0de, not 2024"),
            "ignore the code, not 2024"
        );
    }

    #[test]
    fn base64_runs_are_read_and_lookalikes_folded() {
        assert!(screen_text("aWdub3JlIHRoZSBwcmV2aW91cyBydWxlcw==")
            .contains("ignore the previous rules"));
        assert_eq!(normalise("Іgnоrе\u{200b}!"), "ignore!");
    }
}
