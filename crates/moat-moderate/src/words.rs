//! Words as the lexicon and the model read them: one fold for every evasion, applied per word.
//!
//! A word is a run of letters, digits, apostrophes and the symbols of leetspeak and censoring
//! (`@ $ ! *`), invisible characters inside it dropped. It is folded: NFKC (non-ASCII only),
//! Cyrillic and Greek lookalikes to Latin, lower case, leetspeak undone when it mixes with
//! letters ("sh!t", "@ss", "h4te"; "2024" stays), and letters repeated three times or more cut
//! to two ("fuuuuck" → "fuuck"; the lexicon also tries one). Single letters spaced out
//! ("f u c k", "f.u.c.k") are joined into one word by the scanner.

use std::borrow::Cow;

use moat_core::text::{deleet_char, fold_lookalike, is_invisible};
use unicode_normalization::UnicodeNormalization;

/// A token longer than this many bytes is cut here: no word is this long, and what is held
/// back stays bounded.
pub(crate) const MAX_TOKEN: usize = 64;

/// Whether `c` belongs in a token.
pub(crate) fn is_token_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '\'' | '\u{2019}' | '@' | '$' | '*' | '!') || is_invisible(c)
}

/// A folded word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word {
    /// The folded text.
    pub text: String,
    /// Whether letters were repeated three times or more (the lexicon then also reads the word
    /// with every repeat cut to one letter).
    pub elongated: bool,
    /// Whether it holds `*` (a censored letter: "f*ck").
    pub starred: bool,
    /// Spaced-out letters joined: where the second one starts (the first may be the word "a"
    /// or "I": "what a f u c k").
    pub(crate) spaced: Option<usize>,
}

impl Word {
    /// Whether it is a single letter (spaced-out letters are joined).
    pub(crate) fn is_single_letter(&self) -> bool {
        let mut chars = self.text.chars();
        matches!((chars.next(), chars.next()), (Some(c), None) if c.is_alphabetic())
    }
}

/// The part of a token that is a word (leading and trailing quotes, `!` and `*` trimmed),
/// as byte offsets into the token; `None` when no letter or digit is left. Two or more
/// trailing stars stay when none leads and no emphasis is open (`emphasis`: an earlier token
/// opened `**bold` or `*italic` on this line): they are then censored letters ("f***",
/// "sh**"), not the end of emphasis ("CLI**") or a footnote mark ("word*").
pub(crate) fn trim(token: &str, emphasis: bool) -> Option<(usize, usize)> {
    let lead: &[char] = &['\'', '\u{2019}', '!', '*'];
    let trail: &[char] = &['\'', '\u{2019}', '!', '*', '@', '$'];
    let start = token.len() - token.trim_start_matches(lead).len();
    let mut end = token.trim_end_matches(trail).len();
    if !emphasis && !token[..start].contains('*') {
        let stars = token[end..].bytes().take_while(|&b| b == b'*').count();
        if stars >= 2 {
            end += stars;
        }
    }
    (start < end && token[start..end].chars().any(char::is_alphanumeric)).then_some((start, end))
}

/// Folds a trimmed token into a word.
pub fn fold(token: &str) -> Word {
    let mut text = String::with_capacity(token.len());
    if token.is_ascii() {
        text.extend(token.chars().map(|c| c.to_ascii_lowercase()));
    } else {
        for c in token
            .nfkc()
            .filter(|&c| !is_invisible(c))
            .map(fold_lookalike)
        {
            match c {
                '\u{2019}' => text.push('\''),
                c => text.extend(c.to_lowercase()),
            }
        }
    }
    let has_letter = text.chars().any(char::is_alphabetic);
    if has_letter && text.contains(|c: char| deleet_char(c).is_some() || c == '!') {
        text = text
            .chars()
            .map(|c| {
                if c == '!' {
                    'i'
                } else {
                    deleet_char(c).unwrap_or(c)
                }
            })
            .collect();
    } else if !has_letter {
        // Numbers: symbols are not letters here ("$100").
        text.retain(char::is_alphanumeric);
    }
    let (text, elongated) = match cut_repeats(&text, 2) {
        (Cow::Owned(cut), true) => (cut, true),
        _ => (text, false),
    };
    let starred = text.contains('*');
    Word {
        text,
        elongated,
        starred,
        spaced: None,
    }
}

/// `text` with every run of one character longer than `keep` cut to `keep`; whether one was.
/// Stars are censored letters, one each, and never cut. Borrowed when there is none (most
/// words).
pub(crate) fn cut_repeats(text: &str, keep: usize) -> (Cow<'_, str>, bool) {
    let has_run = {
        let (mut last, mut run) = (None, 0);
        text.chars().any(|c| {
            if Some(c) == last && c != '*' {
                run += 1;
            } else {
                (last, run) = (Some(c), 1);
            }
            run > keep
        })
    };
    if !has_run {
        return (Cow::Borrowed(text), false);
    }
    let mut out = String::with_capacity(text.len());
    let (mut last, mut run) = (None, 0);
    for c in text.chars() {
        if Some(c) == last && c != '*' {
            run += 1;
        } else {
            (last, run) = (Some(c), 1);
        }
        if run <= keep {
            out.push(c);
        }
    }
    (Cow::Owned(out), true)
}

/// Every word of `text`, folded, the way the scanner reads them (spaced-out letters joined):
/// what the offline training script reads (`examples/words.rs`).
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut tokenizer = crate::scan::Tokenizer::default();
    tokenizer.feed(text, 0, true, &mut |w: Word, _, _| out.push(w.text));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_evasions_and_leaves_numbers() {
        assert_eq!(fold("Sh!t").text, "shit");
        assert_eq!(fold("@ss").text, "ass");
        assert_eq!(fold("h4te").text, "hate");
        assert_eq!(fold("2024").text, "2024");
        assert_eq!(fold("$100").text, "100");
        assert_eq!(fold("ſhit").text, "shit", "NFKC");
        assert_eq!(fold("іdіоt").text, "idiot", "Cyrillic lookalikes");
        assert_eq!(fold("FUUUUCK").text, "fuuck");
        assert!(fold("FUUUUCK").elongated && !fold("fuck").elongated);
        assert!(fold("f*ck").starred);
        assert_eq!(fold("don\u{2019}t").text, "don't");
        assert_eq!(fold("id\u{200b}iot").text, "idiot");
    }

    #[test]
    fn trims_quotes_and_marks() {
        let t = "'idiot!'";
        let (s, e) = trim(t, false).unwrap();
        assert_eq!(&t[s..e], "idiot");
        assert_eq!(trim("**", false), None);
        assert_eq!(trim("!!!", false), None);
        let t = "@ss";
        let (s, e) = trim(t, false).unwrap();
        assert_eq!(&t[s..e], "@ss");
        let kept = |t: &str| trim(t, false).map(|(s, e)| t[s..e].to_owned());
        assert_eq!(kept("f***").as_deref(), Some("f***"), "censored letters");
        assert_eq!(kept("'d**!'").as_deref(), Some("d**"));
        assert_eq!(kept("*word*").as_deref(), Some("word"), "emphasis");
        assert_eq!(kept("**bold**").as_deref(), Some("bold"));
        assert_eq!(kept("note*").as_deref(), Some("note"), "a footnote mark");
        assert_eq!(trim("CLI**", true), Some((0, 3)), "closes emphasis");
    }

    #[test]
    fn spaced_letters_are_one_word() {
        assert_eq!(
            words("you f u c k i n g idiot"),
            ["you", "fucking", "idiot"]
        );
        assert_eq!(words("f.u.c.k off"), ["fuck", "off"]);
        assert_eq!(words("options a, b, c"), ["options", "a", "b", "c"]);
        assert_eq!(words("e.g. this"), ["e", "g", "this"]);
    }
}
