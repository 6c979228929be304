//! Lexicons: words and phrases with a category and a severity, matched on whole folded words.

use std::collections::{HashMap as StdHashMap, HashSet as StdHashSet};

/// Lookups happen for every word of every reply: a fast hash, randomly seeded.
type HashMap<K, V> = StdHashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = StdHashSet<K, foldhash::fast::RandomState>;
use std::fmt;

use crate::category::{Category, UnknownCategory};
use crate::words::{cut_repeats, Word};

/// The built-in English lexicon (see the file's header for its format and sources).
const BUILT_IN: &str = include_str!("../lexicon/en.txt");

/// Stems match words that start with them (`stem~`); a stem is at least this long, and words
/// are looked up by their first this many bytes.
const STEM_KEY: usize = 4;

/// How severe an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Severity {
    /// Mild: alone it stays under the default threshold (0.35).
    Mild,
    /// Strong: flags at the default threshold (0.7).
    Strong,
    /// Severe (0.95).
    Severe,
}

impl Severity {
    /// The category score an entry of this severity gives.
    pub fn score(self) -> f32 {
        match self {
            Self::Mild => 0.35,
            Self::Strong => 0.7,
            Self::Severe => 0.95,
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "1" | "mild" => Some(Self::Mild),
            "2" | "strong" => Some(Self::Strong),
            "3" | "severe" => Some(Self::Severe),
            _ => None,
        }
    }
}

/// What an entry says when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// Its category.
    pub category: Category,
    /// Its severity.
    pub severity: Severity,
}

/// A line of a lexicon that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LexiconError {
    /// The category is not one of OpenAI's.
    Category {
        /// The line, counted from 1.
        line: usize,
        /// Why.
        error: UnknownCategory,
    },
    /// The line is not `category severity phrase`.
    Line {
        /// The line, counted from 1.
        line: usize,
        /// What is wrong.
        why: &'static str,
    },
}

impl fmt::Display for LexiconError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Category { line, error } => write!(f, "lexicon line {line}: {error}"),
            Self::Line { line, why } => write!(f, "lexicon line {line}: {why}"),
        }
    }
}

impl std::error::Error for LexiconError {}

/// A multi-word phrase: the words allowed at each position (empty: any one word).
#[derive(Debug, Clone)]
pub(crate) struct Phrase {
    pub(crate) words: Vec<Vec<String>>,
    pub(crate) hit: Hit,
}

impl Phrase {
    pub(crate) fn accepts(&self, position: usize, word: &str) -> bool {
        let allowed = &self.words[position];
        allowed.is_empty() || allowed.iter().any(|w| w == word)
    }
}

/// Words and phrases, each with a [`Hit`], matched on whole folded words so "Scunthorpe",
/// "assassin" and "cocktail" never match what they contain.
///
/// The text format, one entry per line (`#` starts a comment):
///
/// ```text
/// harassment   2  idiot                 # a word
/// harassment   2  fuck~                 # a word starting with this stem ("fucking")
/// harassment/threatening 3 i|we will|gonna kill|hurt you   # a phrase, with alternatives
/// self-harm/intent 3 i want to * myself                    # `*`: any one word
/// ```
///
/// Severity is `1`/`mild`, `2`/`strong` or `3`/`severe`. Words are written folded: lower case,
/// no leetspeak (the scanner undoes it). There are no suffix stems: any word being written could
/// still end with one, so every word would have to be held back; list compounds ("bullshit")
/// as words.
#[derive(Clone, Default)]
pub struct Lexicon {
    words: HashMap<String, Hit>,
    /// Words with every repeated letter cut to one, for elongated words ("fuuuuck").
    collapsed: HashMap<String, Hit>,
    prefixes: HashMap<String, Vec<(String, Hit)>>,
    /// Words and stems by their first letter, for censored words ("f**k", "b**ch"); a stem's
    /// flag is `true`.
    by_first: HashMap<char, Vec<(String, bool, Hit)>>,
    phrases: Vec<Phrase>,
    /// Phrases by a word their first position accepts (wildcard starts are not indexed).
    phrase_starts: HashMap<String, Vec<usize>>,
    /// Every beginning of a word, of a word with repeats cut to one, of a prefix stem and of a
    /// phrase's first word: a word being written that is one of these may still match.
    beginnings: HashSet<String>,
    /// Your regular expressions, each matched against whole folded words.
    rules: Vec<(regex::Regex, Hit)>,
    rule_set: Option<regex::RegexSet>,
}

impl fmt::Debug for Lexicon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lexicon")
            .field("words", &self.words.len())
            .field("stems", &self.prefixes.len())
            .field("phrases", &self.phrases.len())
            .field("rules", &self.rules.len())
            .finish()
    }
}

impl Lexicon {
    /// An empty lexicon.
    pub fn new() -> Self {
        Self::default()
    }

    /// The built-in English lexicon.
    pub fn built_in() -> Self {
        let mut lexicon = Self::new();
        lexicon
            .add_text(BUILT_IN)
            .expect("the built-in lexicon is well formed");
        lexicon
    }

    /// Adds every entry of a lexicon in the text format.
    pub fn add_text(&mut self, text: &str) -> Result<(), LexiconError> {
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let line_no = n + 1;
            let mut fields = line.split_whitespace();
            let (Some(category), Some(severity)) = (fields.next(), fields.next()) else {
                return Err(LexiconError::Line {
                    line: line_no,
                    why: "expected: category severity phrase",
                });
            };
            let category = category.parse().map_err(|error| LexiconError::Category {
                line: line_no,
                error,
            })?;
            let severity = Severity::parse(severity).ok_or(LexiconError::Line {
                line: line_no,
                why: "severity must be 1, 2, 3, mild, strong or severe",
            })?;
            let words: Vec<&str> = fields.collect();
            if words.is_empty() {
                return Err(LexiconError::Line {
                    line: line_no,
                    why: "no phrase",
                });
            }
            self.add(&words.join(" "), Hit { category, severity })
                .map_err(|why| LexiconError::Line { line: line_no, why })?;
        }
        Ok(())
    }

    /// Adds one word, stem or phrase (in the text format's syntax) for `hit`.
    pub fn add(&mut self, phrase: &str, hit: Hit) -> Result<(), &'static str> {
        let parts: Vec<&str> = phrase.split_whitespace().collect();
        match parts.as_slice() {
            [] => Err("no phrase"),
            [word] if !word.contains(['|', '*']) && word.len() > 1 && word.ends_with('~') => {
                let stem = word.trim_end_matches('~');
                self.add_stem(stem, hit)
            }
            [word] if word.starts_with('~') => {
                Err("suffix stems (~stem) are not supported: list the words")
            }
            [word] if !word.contains(['|', '*', '~']) => {
                let word = word.to_lowercase();
                let collapsed = cut_repeats(&word, 1).0.into_owned();
                add_beginnings(&mut self.beginnings, &word);
                add_beginnings(&mut self.beginnings, &collapsed);
                keep_worst(&mut self.collapsed, collapsed, hit);
                self.add_censorable(&word, false, hit);
                keep_worst(&mut self.words, word, hit);
                Ok(())
            }
            _ => {
                let words: Vec<Vec<String>> = parts
                    .iter()
                    .map(|p| match *p {
                        "*" => Vec::new(),
                        p => p.split('|').map(str::to_lowercase).collect(),
                    })
                    .collect();
                if words[0].is_empty() {
                    return Err("a phrase cannot start with *");
                }
                let index = self.phrases.len();
                for first in &words[0] {
                    add_beginnings(&mut self.beginnings, first);
                    self.phrase_starts
                        .entry(first.clone())
                        .or_default()
                        .push(index);
                }
                self.phrases.push(Phrase { words, hit });
                Ok(())
            }
        }
    }

    fn add_stem(&mut self, stem: &str, hit: Hit) -> Result<(), &'static str> {
        if stem.len() < STEM_KEY || !stem.is_ascii() {
            return Err("a stem is at least 4 ASCII letters");
        }
        let stem = stem.to_ascii_lowercase();
        add_beginnings(&mut self.beginnings, &stem);
        self.add_censorable(&stem, true, hit);
        self.prefixes
            .entry(stem[..STEM_KEY].to_owned())
            .or_default()
            .push((stem, hit));
        Ok(())
    }

    fn add_censorable(&mut self, entry: &str, stem: bool, hit: Hit) {
        if let Some(first) = entry.chars().next() {
            self.by_first
                .entry(first)
                .or_default()
                .push((entry.to_owned(), stem, hit));
        }
    }

    /// Adds a rule: a regular expression matched against each whole folded word (lower case,
    /// leetspeak undone), e.g. `^k+i+l+l+s?$`. With rules, every word being written is held
    /// until it is whole (a rule could match any word).
    pub fn add_rule(&mut self, pattern: &str, hit: Hit) -> Result<(), regex::Error> {
        let regex = regex::Regex::new(pattern)?;
        self.rules.push((regex, hit));
        self.rule_set = Some(regex::RegexSet::new(
            self.rules.iter().map(|(r, _)| r.as_str()),
        )?);
        Ok(())
    }

    /// The entry a single word matches, if any (the most severe when several do).
    pub fn word(&self, word: &Word) -> Option<Hit> {
        let found = self.lookup(&word.text);
        let found = match &self.rule_set {
            Some(set) => set
                .matches(&word.text)
                .iter()
                .map(|i| self.rules[i].1)
                .chain(found)
                .max_by_key(|h| h.severity),
            None => found,
        };
        if found.is_some() || !(word.elongated || word.starred) {
            return found;
        }
        if word.elongated {
            let (collapsed, _) = cut_repeats(&word.text, 1);
            if let Some(hit) = self
                .collapsed
                .get(collapsed.as_ref())
                .copied()
                .or_else(|| self.lookup(&collapsed))
            {
                return Some(hit);
            }
        }
        if word.starred {
            // "f*u*c*k": the stars dropped; "f*ck", "f**king", "b**ch": each star a letter.
            let unstarred: String = word.text.chars().filter(|&c| c != '*').collect();
            return self
                .lookup(&unstarred)
                .or_else(|| self.censored(&word.text));
        }
        None
    }

    /// The most severe word or stem that `text` spells with some letters starred, each star
    /// standing for one letter; of equally severe ones, the first listed ("f***": the
    /// profanity, not a slur further down). The first letter must be written: "****" could be
    /// anything.
    fn censored(&self, text: &str) -> Option<Hit> {
        let first = text.chars().next().filter(|c| c.is_alphabetic())?;
        let spells = |entry: &str, stem: bool| {
            let mut written = text.chars();
            for letter in entry.chars() {
                match written.next() {
                    Some(c) if c == letter || c == '*' => {}
                    _ => return false,
                }
            }
            // A stem may go on ("f**king"); a word must end here.
            stem || written.next().is_none()
        };
        self.by_first
            .get(&first)?
            .iter()
            .filter(|(entry, stem, _)| spells(entry, *stem))
            .map(|&(_, _, hit)| hit)
            .rev() // `max_by_key` keeps the last of equals
            .max_by_key(|h| h.severity)
    }

    fn lookup(&self, text: &str) -> Option<Hit> {
        if let Some(hit) = self.words.get(text) {
            return Some(*hit);
        }
        if text.len() < STEM_KEY || !text.is_char_boundary(STEM_KEY) {
            return None;
        }
        self.prefixes.get(&text[..STEM_KEY]).and_then(|stems| {
            stems
                .iter()
                .filter(|(stem, _)| text.starts_with(stem.as_str()))
                .map(|(_, hit)| *hit)
                .max_by_key(|h| h.severity)
        })
    }

    /// Whether a word still being written (`partial`, folded) could become an entry, or the
    /// first word of a phrase, once it is whole.
    pub fn could_complete(&self, partial: &Word) -> bool {
        if partial.starred || self.rule_set.is_some() {
            return true;
        }
        let (collapsed, cut) = cut_repeats(&partial.text, 1);
        let forms = [
            Some(partial.text.as_str()),
            cut.then_some(collapsed.as_ref()),
        ];
        let could = forms.into_iter().flatten().any(|text| {
            self.beginnings.contains(text)
                || (text.len() >= STEM_KEY
                    && text.is_char_boundary(STEM_KEY)
                    && self.prefixes.get(&text[..STEM_KEY]).is_some_and(|stems| {
                        stems
                            .iter()
                            .any(|(stem, _)| text.starts_with(stem.as_str()))
                    }))
        });
        could
    }

    pub(crate) fn phrases(&self) -> &[Phrase] {
        &self.phrases
    }

    /// The phrases that may start with `word`.
    pub(crate) fn phrases_starting(&self, word: &str) -> &[usize] {
        self.phrase_starts.get(word).map_or(&[], Vec::as_slice)
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.words.len() + self.prefixes.values().map(Vec::len).sum::<usize>() + self.phrases.len()
    }

    /// Whether it has no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn add_beginnings(set: &mut HashSet<String>, word: &str) {
    for (at, c) in word.char_indices() {
        set.insert(word[..at + c.len_utf8()].to_owned());
    }
}

fn keep_worst(map: &mut HashMap<String, Hit>, key: String, hit: Hit) {
    let slot = map.entry(key).or_insert(hit);
    if hit.severity > slot.severity {
        *slot = hit;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::words::fold;

    fn lexicon() -> Lexicon {
        let mut l = Lexicon::new();
        l.add_text(
            "harassment 2 idiot\nharassment 2 fuck~\nharassment 2 bullshit\nsexual 1 nude # mild\n\
             harassment/threatening 3 i|we will kill you",
        )
        .unwrap();
        l
    }

    #[test]
    fn whole_words_stems_and_evasions() {
        let l = lexicon();
        let hit = |w: &str| l.word(&fold(w)).map(|h| h.category);
        assert_eq!(hit("IDIOT"), Some(Category::Harassment));
        assert_eq!(hit("idiots"), None, "whole words only");
        assert_eq!(hit("fucking"), Some(Category::Harassment));
        assert_eq!(hit("bullshit"), Some(Category::Harassment));
        assert_eq!(hit("shitake"), None);
        assert_eq!(hit("fuuuuck"), Some(Category::Harassment));
        assert_eq!(hit("f*ck"), Some(Category::Harassment));
        assert_eq!(
            hit("f**king"),
            Some(Category::Harassment),
            "a star per letter"
        );
        assert_eq!(hit("f***"), Some(Category::Harassment));
        assert_eq!(
            hit("f*u*c*k"),
            Some(Category::Harassment),
            "stars between letters"
        );
        assert_eq!(hit("id**t"), Some(Category::Harassment));
        assert_eq!(hit("id**ts"), None, "a word ends where it ends");
        assert_eq!(
            hit("i**"),
            None,
            "a star is one letter: too short for idiot"
        );
        assert_eq!(hit("****"), None);
        assert_eq!(hit("x**2"), None);
        assert_eq!(hit("1d10t"), Some(Category::Harassment));
        assert_eq!(l.word(&fold("nude")).unwrap().severity, Severity::Mild);
        assert_eq!(l.phrases().len(), 1);
        assert_eq!(l.phrases_starting("we"), [0]);
    }

    #[test]
    fn words_being_written_are_held_only_when_they_could_still_match() {
        let l = lexicon();
        let could = |w: &str| l.could_complete(&fold(w));
        assert!(could("idi") && could("fu") && could("fuckin") && could("w"));
        assert!(could("bulls"), "may become bullshit");
        assert!(!could("bulb"));
        assert!(could("fuuu"), "elongated");
        assert!(!could("hello") && !could("wonder"));
    }

    #[test]
    fn rules_match_whole_folded_words() {
        let mut l = lexicon();
        let hit = Hit {
            category: Category::Violence,
            severity: Severity::Strong,
        };
        l.add_rule("^k+i+l+s?$", hit).unwrap();
        assert_eq!(l.word(&fold("KIIIILS")), Some(hit));
        assert_eq!(l.word(&fold("skill")), None);
        assert!(
            l.could_complete(&fold("hello")),
            "any word may match a rule"
        );
        assert!(l.add_rule("(", hit).is_err());
    }

    #[test]
    fn bad_lines_say_which_and_why() {
        let mut l = Lexicon::new();
        let e = l.add_text("# ok\nviolence 2 x\ngore 2 blood").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("lexicon line 3: unknown moderation category"),
            "{e}"
        );
        let e = l.add_text("hate 7 word").unwrap_err();
        assert_eq!(
            e.to_string(),
            "lexicon line 1: severity must be 1, 2, 3, mild, strong or severe"
        );
        assert!(l.add_text("hate 2 ab~").is_err());
        assert!(l.add_text("hate 2 * you").is_err());
        assert!(l.add_text("hate 2 ~shit").is_err());
    }

    #[test]
    fn the_built_in_lexicon_loads() {
        assert!(!Lexicon::built_in().is_empty());
    }
}
