//! Hidden text: characters that render as nothing or reorder what is shown, used to smuggle
//! instructions past a human reader (Unicode tag characters spell out ASCII invisibly; bidi
//! overrides show one order and feed another; zero-width characters split words past filters).
//!
//! Tag characters are always reported. Zero-width joiners and non-joiners are left alone where
//! writing needs them: a ZWJ inside an emoji sequence (👨‍👩‍👧), a ZWNJ or ZWJ after a letter of a
//! script that shapes with them (Persian "می‌خواهم", Devanagari conjuncts). A byte-order mark
//! is allowed at the very start.

use std::borrow::Cow;

/// What kind of hidden character.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HiddenKind {
    /// A Unicode tag character (U+E0000 to U+E007F): invisible ASCII.
    Tag,
    /// A bidirectional embedding, override or isolate (U+202A to U+202E, U+2066 to U+2069).
    Bidi,
    /// A zero-width or invisible formatting character where no script or emoji needs it.
    ZeroWidth,
}

impl HiddenKind {
    /// Its name in findings.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tag => "tag_characters",
            Self::Bidi => "bidi_override",
            Self::ZeroWidth => "zero_width",
        }
    }
}

/// One hidden character, by byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hidden {
    /// What it is.
    pub kind: HiddenKind,
    /// Where it starts, in bytes.
    pub start: usize,
    /// Where it ends, in bytes.
    pub end: usize,
}

/// Letters of scripts whose shaping uses ZWNJ and ZWJ: Arabic and Persian, Syriac, the Indic
/// scripts, Sinhala, Mongolian.
fn joins(c: char) -> bool {
    matches!(c as u32,
        0x0600..=0x06FF | 0x0700..=0x074F | 0x0750..=0x077F | 0x08A0..=0x08FF
        | 0x0900..=0x0DFF | 0x1800..=0x18AF | 0xFB50..=0xFDFF | 0xFE70..=0xFEFF)
}

/// Emoji and what continues an emoji sequence (variation selector 16, skin tones).
fn emoji(c: char) -> bool {
    matches!(c as u32,
        0x1F000..=0x1FAFF | 0x2190..=0x21FF | 0x2300..=0x23FF | 0x2460..=0x24FF
        | 0x25A0..=0x27BF | 0x2900..=0x297F | 0x2B00..=0x2BFF | 0x3030 | 0x303D | 0x3297 | 0x3299
        | 0xFE0F | 0x20E3)
}

fn kind(text: &str, at: usize, c: char) -> Option<HiddenKind> {
    let before = || text[..at].chars().next_back();
    let after = || text[at + c.len_utf8()..].chars().next();
    match c {
        '\u{E0000}'..='\u{E007F}' => Some(HiddenKind::Tag),
        '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' => Some(HiddenKind::Bidi),
        '\u{200D}' => {
            let emoji_sequence = before().is_some_and(emoji) && after().is_some_and(emoji);
            (!emoji_sequence && !before().is_some_and(joins)).then_some(HiddenKind::ZeroWidth)
        }
        '\u{200C}' => (!before().is_some_and(joins)).then_some(HiddenKind::ZeroWidth),
        '\u{FEFF}' if at == 0 => None,
        '\u{200B}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}' | '\u{180E}' | '\u{034F}' => {
            Some(HiddenKind::ZeroWidth)
        }
        _ => None,
    }
}

/// Every hidden character in `text`.
pub fn find_hidden(text: &str) -> Vec<Hidden> {
    // Every hidden character is outside ASCII: plain ASCII text costs one scan.
    if text.is_ascii() {
        return Vec::new();
    }
    text.char_indices()
        .filter(|&(_, c)| !c.is_ascii())
        .filter_map(|(at, c)| {
            kind(text, at, c).map(|kind| Hidden {
                kind,
                start: at,
                end: at + c.len_utf8(),
            })
        })
        .collect()
}

/// `text` without its hidden characters (emoji and script joiners kept).
pub fn strip_hidden(text: &str) -> Cow<'_, str> {
    let found = find_hidden(text);
    if found.is_empty() {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for hidden in found {
        out.push_str(&text[at..hidden.start]);
        at = hidden.end;
    }
    out.push_str(&text[at..]);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<HiddenKind> {
        find_hidden(text).into_iter().map(|h| h.kind).collect()
    }

    #[test]
    fn tag_characters_bidi_and_stray_zero_width_are_found() {
        // "hi" spelled in tag characters after visible text.
        assert_eq!(
            kinds("hello\u{E0068}\u{E0069}"),
            [HiddenKind::Tag, HiddenKind::Tag]
        );
        assert_eq!(kinds("abc\u{202E}fed"), [HiddenKind::Bidi]);
        assert_eq!(
            kinds("ig\u{200B}nore pre\u{200D}vious"),
            [HiddenKind::ZeroWidth; 2]
        );
        assert_eq!(kinds("word\u{200C}word"), [HiddenKind::ZeroWidth]);
        assert_eq!(strip_hidden("ig\u{200B}no\u{E0041}re"), "ignore");
    }

    #[test]
    fn emoji_sequences_and_scripts_that_need_joiners_pass() {
        // A family emoji, a rainbow flag, a profession with a skin tone.
        for text in [
            "👨\u{200D}👩\u{200D}👧",
            "🏳\u{FE0F}\u{200D}🌈",
            "👩🏽\u{200D}💻",
        ] {
            assert!(find_hidden(text).is_empty(), "{text}");
        }
        // Persian "I want" with its ZWNJ, a Devanagari conjunct with ZWJ, a leading BOM.
        for text in ["می\u{200C}خواهم", "क्\u{200D}ष", "\u{FEFF}hello"] {
            assert!(find_hidden(text).is_empty(), "{text}");
            assert_eq!(strip_hidden(text), text);
        }
        assert!(find_hidden("plain ASCII, nothing to see").is_empty());
    }
}
