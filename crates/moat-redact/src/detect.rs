//! Finding entities in text: one pass of one automaton, then checksums, scores and lists.
//!
//! The enabled patterns (see `patterns`) are compiled into one lazy DFA over bytes, so the text
//! is read once whatever the number of entities, at hundreds of MB/s. Shapes that count only
//! after a context word (bare digit runs, dates) are left out of that pass: it matches their
//! context words instead, and they are looked for only in the short zone after one. Patterns
//! match ASCII (or whole UTF-8 characters): text around them may be any UTF-8, and a match never
//! splits a character. A candidate is then checked (checksums, ranges), scored (a context word
//! before it raises a weak match), and kept when its score reaches its entity's threshold and it
//! is not on the allow list. Terms on the deny list are always found, and names (opt-in) come
//! from a Unicode pattern of their own.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, AhoCorasickKind, MatchKind as AcMatchKind};
use regex_automata::meta::Regex;
use regex_automata::util::syntax;
use regex_automata::{Anchored, Input, MatchKind, PatternSet};

use crate::entity::Entity;
use crate::patterns::{context_words, Spec, CONTEXT_BOOST, CONTEXT_WINDOW, SPECS};

/// The longest value a context-only pattern matches (a grouped phone number with an
/// extension); a zone after a context word reaches this far past the context window.
const MAX_WEAK_VALUE: usize = 48;

/// The score a finding needs by default (Presidio's usual threshold).
pub const DEFAULT_THRESHOLD: f32 = 0.5;

/// One entity found in a text, by byte range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finding {
    /// What was found.
    pub entity: Entity,
    /// Where it starts, in bytes.
    pub start: usize,
    /// Where it ends, in bytes.
    pub end: usize,
    /// How sure the detector is, from 0 to 1: the pattern's score, raised by a context word.
    pub score: f32,
}

/// Finds the configured entities.
///
/// ```
/// use moat_redact::{Detector, Entity};
///
/// let detector = Detector::new(&Entity::ALL)
///     .with_allow_list(["example.com"])
///     .with_threshold(Entity::Phone, 0.7);
/// let text = "SIN 046 454 286, mail ops@example.com or jane@corp.io";
/// let found: Vec<_> = detector.find(text).iter().map(|f| &text[f.start..f.end]).collect();
/// // The SIN counts because "SIN" is written before it; example.com is allowed.
/// assert_eq!(found, ["046 454 286", "jane@corp.io"]);
/// ```
pub struct Detector {
    entities: Vec<Entity>,
    /// The patterns that can count on their own, and markers for the context words of the rest:
    /// the one pass over the whole text.
    strong: Option<Engine>,
    /// The patterns that count only after a context word, run only near one.
    weak: Option<Engine>,
    /// Every context word of the enabled entities, found in one pass over a window.
    context: ContextWords,
    thresholds: HashMap<Entity, f32>,
    default_threshold: f32,
    allow: HashSet<String>,
    deny: Option<AhoCorasick>,
    names: Option<regex::Regex>,
}

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detector")
            .field("entities", &self.entities)
            .field("thresholds", &self.thresholds)
            .field("default_threshold", &self.default_threshold)
            .field("allow", &self.allow.len())
            .field("deny", &self.deny.as_ref().map(AhoCorasick::patterns_len))
            .finish()
    }
}

/// One compiled set of patterns: `specs`, then (in the strong engine) one marker per
/// context-only entity that matches its context words.
struct Engine {
    specs: Vec<&'static Spec>,
    markers: Vec<Entity>,
    /// Leftmost-first: the scan.
    scan: Regex,
    /// Every pattern matching at a place, for when the first one fails its check.
    overlapping: Regex,
}

/// A regex source matching `byte` literally in bytes mode.
fn escape_byte(out: &mut String, byte: u8) {
    if byte.is_ascii_alphanumeric() || byte == b' ' {
        out.push(char::from(byte));
    } else {
        out.push_str(&format!("\\x{byte:02X}"));
    }
}

/// A pattern for the context words of `entity`: ASCII case-insensitive, whole words where they
/// start or end with an ASCII letter or digit.
fn marker(entity: Entity) -> String {
    let mut out = String::from("(?-u)(?i:");
    for (i, word) in context_words(entity).iter().enumerate() {
        if i > 0 {
            out.push('|');
        }
        let bytes = word.as_bytes();
        if bytes.first().is_some_and(u8::is_ascii_alphanumeric) {
            out.push_str("\\b");
        }
        bytes.iter().for_each(|&b| escape_byte(&mut out, b));
        if bytes.last().is_some_and(u8::is_ascii_alphanumeric) {
            out.push_str("\\b");
        }
    }
    out.push(')');
    out
}

impl Engine {
    fn new(specs: Vec<&'static Spec>, markers: Vec<Entity>) -> Option<Self> {
        if specs.is_empty() && markers.is_empty() {
            return None;
        }
        let marker_patterns: Vec<String> = markers.iter().map(|&e| marker(e)).collect();
        let patterns: Vec<&str> = specs
            .iter()
            .map(|s| s.pattern)
            .chain(marker_patterns.iter().map(String::as_str))
            .collect();
        let build = |kind| {
            Regex::builder()
                .syntax(syntax::Config::new().utf8(false))
                .configure(Regex::config().match_kind(kind))
                .build_many(&patterns)
                .expect("the built-in patterns compile")
        };
        Some(Self {
            scan: build(MatchKind::LeftmostFirst),
            overlapping: build(MatchKind::All),
            specs,
            markers,
        })
    }
}

/// What an allow-list entry and a found value are compared as: lowercase, without whitespace,
/// dashes or parentheses (so `4111-1111-1111-1111` matches `4111111111111111`).
fn normalized(value: &str) -> String {
    value
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '(' | ')') && !c.is_whitespace())
        .flat_map(char::to_lowercase)
        .collect()
}

/// Whether `hay[start..end]` is a whole word: no ASCII letter or digit touches it.
fn is_whole_word(hay: &[u8], start: usize, end: usize) -> bool {
    !hay[..start].last().is_some_and(u8::is_ascii_alphanumeric)
        && !hay.get(end).is_some_and(u8::is_ascii_alphanumeric)
}

/// Whether `word` occurs in `window` as a whole word, ignoring ASCII case.
fn has_word(window: &[u8], word: &str) -> bool {
    let word = word.as_bytes();
    if word.len() > window.len() {
        return false;
    }
    (0..=window.len() - word.len()).any(|i| {
        window[i..i + word.len()].eq_ignore_ascii_case(word)
            && is_whole_word(window, i, i + word.len())
    })
}

/// What the patterns cannot see (no lookaround): a number is not one piece of a longer chain
/// (`978-0-03-067394-8`, a UUID, `1.2.3.4.5`); an IP address does not touch a word and is not a
/// version number.
fn boundaries_ok(entity: Entity, text: &[u8], start: usize, end: usize) -> bool {
    let joined = |sep: Option<&u8>, next: Option<&u8>| {
        sep.is_some_and(|c| matches!(c, b'-' | b'.' | b'/' | b':'))
            && next.is_some_and(u8::is_ascii_alphanumeric)
    };
    let numeric = |c: Option<&u8>| c.is_some_and(|c| c.is_ascii_digit());
    if numeric(text.get(start)) && numeric(text.get(end.wrapping_sub(1))) {
        let before = start
            .checked_sub(2)
            .is_some_and(|i| joined(text.get(i + 1), text.get(i)));
        if before || joined(text.get(end), text.get(end + 1)) {
            return false;
        }
    }
    if entity != Entity::IpAddress {
        return true;
    }
    // An address must not touch a word, nor (IPv6) another colon: `a:b:2001:db8::1` is not one.
    let v6 = text[start..end].contains(&b':');
    let word = |c: Option<&u8>| c.is_some_and(|c| c.is_ascii_alphanumeric() || (v6 && *c == b':'));
    let version = ["version", "ver", "release", "build", "firmware"]
        .iter()
        .any(|w| has_word(&text[start.saturating_sub(16)..start], w));
    !word(start.checked_sub(1).and_then(|i| text.get(i))) && !word(text.get(end)) && !version
}

/// The context words of a set of entities in one automaton (ASCII case-insensitive).
struct ContextWords {
    words: Option<AhoCorasick>,
    /// The entity each word belongs to, by pattern index.
    entities: Vec<Entity>,
}

impl ContextWords {
    fn new(entities: &[Entity]) -> Self {
        let pairs: Vec<(Entity, &str)> = entities
            .iter()
            .flat_map(|&e| context_words(e).iter().map(move |&w| (e, w)))
            .collect();
        let words = (!pairs.is_empty()).then(|| {
            // A DFA: it runs over a short window for every weak candidate.
            AhoCorasickBuilder::new()
                .ascii_case_insensitive(true)
                .kind(Some(AhoCorasickKind::DFA))
                .build(pairs.iter().map(|(_, w)| w))
                .expect("context words build an automaton")
        });
        Self {
            words,
            entities: pairs.into_iter().map(|(e, _)| e).collect(),
        }
    }

    /// Whether a context word of `entity` (of any entity, for `None`) occurs in `window` as a
    /// whole word.
    fn any(&self, entity: Option<Entity>, window: &[u8]) -> bool {
        let Some(words) = &self.words else {
            return false;
        };
        words.find_overlapping_iter(window).any(|m| {
            entity.is_none_or(|e| self.entities[m.pattern().as_usize()] == e)
                && is_whole_word(window, m.start(), m.end())
        })
    }
}

/// Names after an introduction or a title, or a common first name followed by a surname.
const NAMES: &str = r"(?x)
    (?:
        (?:\b(?:[Mm]y\ name\ is|[Mm]y\ name's|[Nn]ame:|[Cc]ontact\ person:?|[Dd]ear|[Ss]incerely,?|
           [Rr]egards,?|[Ss]igned,?|[Jj]e\ m'appelle|[Jj]e\ suis|[Ii]ch\ heiße|[Ii]ch\ heisse|
           [Mm]ein\ Name\ ist|[Mm]i\ chiamo|[Mm]e\ llamo|[Mm]i\ nombre\ es|[Mm]eu\ nome\ é|
           [Nn]azywam\ się|[Mm]ijn\ naam\ is|[Ii]k\ ben)\s*|我叫|我的名字是|私の名前は|私は)
        (?:(?:[Mm]r|[Mm]rs|[Mm]s|[Dd]r|[Pp]rof|[Hh]err|[Ff]rau|[Pp]an|[Pp]ani|[Ss]r|[Ss]ra|[Dd]hr|[Mm]evr)\.?\s+)?
      | \b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sir|Dame|Herr|Frau|Mme|Mlle|Sig|Sra|Srta|Sr|Pan|Pani|Dhr|Mevr)\.?\s+
      | \b(?P<first>James|John|Robert|Michael|William|David|Richard|Joseph|Thomas|Charles|Mary|
           Patricia|Jennifer|Linda|Elizabeth|Barbara|Susan|Jessica|Sarah|Karen|Emma|Olivia|Sophie|
           Oliver|Jack|Harry|George|Amelia|Isla|Lucas|Louis|Gabriel|Léa|Chloé|Camille|Manon|
           Hugo|Jules|Maximilian|Alexander|Paul|Leon|Ben|Lukas|Anna|Lena|Hannah|Lea|Marie|
           Giulia|Francesca|Alessandro|Lorenzo|Matteo|Marco|Giuseppe|Maria|Sofia|Lucía|Martina|
           Daniel|Pablo|Alejandro|Javier|Carmen|Jakub|Jan|Piotr|Krzysztof|Katarzyna|Agnieszka|
           João|Pedro|Ana|Beatriz|Mariana|Rahul|Priya|Amit|Anjali|Arjun|Wei|Li|Ming|Hiroshi|Yuki|
           Haruto|Sakura|Mohammed|Ahmed|Fatima|Ali|Omar|Aisha|Emily|Michelle|Andrew|Peter|
           Jane|Alice|Bob|Eve|Laura|Julia|Nina|Ivan|Olga|Dmitri)\s+
    )
    (?P<name>\p{Lu}[\p{Ll}'’]+(?:[\ -]\p{Lu}[\p{Ll}'’]+){0,2}
      |[\p{Han}\p{Hiragana}\p{Katakana}]{1,4}(?:[\ \x{3000}]?[\p{Han}\p{Hiragana}\p{Katakana}]{1,4})?)";

impl Detector {
    /// A detector for these entities, each kept at [`DEFAULT_THRESHOLD`].
    pub fn new(entities: &[Entity]) -> Self {
        let mut entities = entities.to_vec();
        entities.sort_unstable();
        entities.dedup();
        let names = entities
            .contains(&Entity::Person)
            .then(|| regex::Regex::new(NAMES).expect("the name pattern compiles"));
        let detector = Self {
            strong: None,
            weak: None,
            context: ContextWords::new(&entities),
            entities,
            thresholds: HashMap::new(),
            default_threshold: DEFAULT_THRESHOLD,
            allow: HashSet::new(),
            deny: None,
            names,
        };
        detector.compiled()
    }

    /// Compiles the enabled patterns in two sets. Those that can reach their threshold without a
    /// context word are scanned for everywhere, together with markers for the context words of
    /// the entities whose patterns cannot; those (bare digit runs, dates) are then looked for
    /// only just after such a word. Number-heavy text without context words never runs them.
    fn compiled(mut self) -> Self {
        let (strong, weak): (Vec<&'static Spec>, Vec<&'static Spec>) = SPECS
            .iter()
            .filter(|s| self.entities.contains(&s.entity))
            .partition(|s| s.best >= self.threshold(s.entity));
        let weak: Vec<&'static Spec> = weak
            .into_iter()
            .filter(|s| s.best + CONTEXT_BOOST >= self.threshold(s.entity))
            .filter(|s| !context_words(s.entity).is_empty())
            .collect();
        let mut markers: Vec<Entity> = weak.iter().map(|s| s.entity).collect();
        markers.dedup();
        self.strong = Engine::new(strong, markers);
        self.weak = Engine::new(weak, Vec::new());
        self
    }

    /// The entities it finds.
    pub fn entities(&self) -> &[Entity] {
        &self.entities
    }

    /// The score `entity` needs to count (default [`DEFAULT_THRESHOLD`]). Lower it to catch
    /// weak shapes without context words (more false positives), raise it for fewer.
    #[must_use]
    pub fn with_threshold(mut self, entity: Entity, score: f32) -> Self {
        self.thresholds.insert(entity, score);
        self.compiled()
    }

    /// The score every entity without a threshold of its own needs.
    #[must_use]
    pub fn with_default_threshold(mut self, score: f32) -> Self {
        self.default_threshold = score;
        self.compiled()
    }

    /// Values never reported: exact values (compared without case, spaces or dashes, so a test
    /// card matches however it is grouped) and, for emails and URLs, domains (`example.com`
    /// allows `jane@example.com` and `a@mail.example.com`).
    #[must_use]
    pub fn with_allow_list<I, S>(mut self, values: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.allow
            .extend(values.into_iter().map(|v| normalized(v.as_ref())));
        self
    }

    /// Terms always reported as [`Entity::Custom`] (whole words, any case): project code names,
    /// customer names, internal hosts.
    #[must_use]
    pub fn with_deny_list<I, S>(mut self, terms: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let terms: Vec<String> = terms
            .into_iter()
            .map(|t| t.as_ref().to_owned())
            .filter(|t| !t.is_empty())
            .collect();
        self.deny = (!terms.is_empty()).then(|| {
            AhoCorasickBuilder::new()
                .ascii_case_insensitive(true)
                .match_kind(AcMatchKind::LeftmostLongest)
                .build(&terms)
                .expect("deny-list terms build an automaton")
        });
        self
    }

    fn threshold(&self, entity: Entity) -> f32 {
        self.thresholds
            .get(&entity)
            .copied()
            .unwrap_or(self.default_threshold)
    }

    fn allowed(&self, entity: Entity, value: &str) -> bool {
        if self.allow.is_empty() {
            return false;
        }
        let value = normalized(value);
        if self.allow.contains(&value) {
            return true;
        }
        if matches!(entity, Entity::Email | Entity::UrlCredentials) {
            // The host: after the last `@`, up to a path.
            let host = value.rsplit('@').next().unwrap_or("");
            let host = host.split(['/', ':']).next().unwrap_or("");
            let mut domain = host;
            loop {
                if self.allow.contains(domain) {
                    return true;
                }
                match domain.split_once('.') {
                    Some((_, parent)) if parent.contains('.') => domain = parent,
                    _ => return false,
                }
            }
        }
        false
    }

    /// Scores one candidate the scan found: the finding and whether it needed a context word, or
    /// `None` when it does not count.
    fn judge(&self, text: &str, spec: &Spec, start: usize, end: usize) -> Option<(Finding, bool)> {
        let bytes = text.as_bytes();
        let matched = &bytes[start..end];
        let mut score = (spec.score)(matched)?;
        // `best` is written by hand next to each pattern; the engines are split on it.
        debug_assert!(
            score <= spec.best,
            "{}: {score} > {}",
            spec.pattern,
            spec.best
        );
        if !boundaries_ok(spec.entity, bytes, start, end) {
            return None;
        }
        let threshold = self.threshold(spec.entity);
        let boosted = score < threshold;
        if boosted {
            let window = &bytes[start.saturating_sub(CONTEXT_WINDOW)..start];
            if score + CONTEXT_BOOST < threshold || !self.context.any(Some(spec.entity), window) {
                return None;
            }
            score = (score + CONTEXT_BOOST).min(1.0);
        }
        let (from, to) = (spec.value)(matched);
        let (start, end) = (start + from, start + to);
        if self.allowed(spec.entity, &text[start..end]) {
            return None;
        }
        let finding = Finding {
            entity: spec.entity,
            start,
            end,
            score,
        };
        Some((finding, boosted))
    }

    /// Every entity found in `text`, in order, without overlaps (the earlier, then the longer,
    /// wins).
    ///
    /// Full-width forms (`０９０－１２３４－５６７８`, `ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ`, common in
    /// Japanese and Chinese text) are found too: such text is folded to ASCII first and the
    /// findings mapped back to the original bytes.
    pub fn find(&self, text: &str) -> Vec<Finding> {
        match fold_width(text) {
            Some((folded, original)) => {
                let mut found = self.find_folded(&folded);
                for f in &mut found {
                    f.start = original[f.start];
                    f.end = original[f.end];
                }
                found
            }
            None => self.find_folded(text),
        }
    }

    fn find_folded(&self, text: &str) -> Vec<Finding> {
        // Each finding with whether it needed a context word.
        let mut found: Vec<(Finding, bool)> = Vec::new();
        let mut zones = Vec::new();
        if let Some(strong) = &self.strong {
            self.scan(text, strong, 0..text.len(), &mut found, &mut zones);
        }
        let mut extra = false;
        if let (Some(weak), false) = (&self.weak, zones.is_empty()) {
            let before = found.len();
            // What strong findings cover is settled: the zones are only the gaps between them.
            let covered: Vec<Range<usize>> = found.iter().map(|(f, _)| f.start..f.end).collect();
            for zone in uncovered(merged(zones), &covered) {
                self.scan(text, weak, zone, &mut found, &mut Vec::new());
            }
            extra = found.len() > before;
        }
        extra |= self.deny.is_some() || self.names.is_some();
        if let Some(deny) = &self.deny {
            for m in deny.find_iter(text) {
                if is_whole_word(text.as_bytes(), m.start(), m.end()) {
                    let finding = Finding {
                        entity: Entity::Custom,
                        start: m.start(),
                        end: m.end(),
                        score: 1.0,
                    };
                    found.push((finding, false));
                }
            }
        }
        if let Some(names) = &self.names {
            let threshold = self.threshold(Entity::Person);
            for caps in names.captures_iter(text) {
                let (Some(name), first) = (caps.name("name"), caps.name("first")) else {
                    continue;
                };
                let (start, score) = match first {
                    Some(first) => (first.start(), 0.6),
                    None => (name.start(), 0.85),
                };
                if score >= threshold && !self.allowed(Entity::Person, &text[start..name.end()]) {
                    let finding = Finding {
                        entity: Entity::Person,
                        start,
                        end: name.end(),
                        score,
                    };
                    found.push((finding, false));
                }
            }
        }
        if extra {
            // The earlier wins; at one place, one that counts on its own, then the higher
            // score, then the longer.
            found.sort_by(|(a, a_boosted), (b, b_boosted)| {
                a.start
                    .cmp(&b.start)
                    .then(a_boosted.cmp(b_boosted))
                    .then(b.score.total_cmp(&a.score))
                    .then(b.end.cmp(&a.end))
            });
            let mut kept: Vec<Finding> = Vec::with_capacity(found.len());
            for (f, _) in found {
                if kept.last().is_none_or(|last| f.start >= last.end) {
                    kept.push(f);
                }
            }
            return kept;
        }
        found.into_iter().map(|(f, _)| f).collect()
    }

    /// A value after a keyword (`token: eyJ…`, `API_KEY=sk-…`) that is itself a more specific
    /// kind (a JWT, a provider key) is reported as that kind, with where its match ends.
    fn more_specific(
        &self,
        text: &str,
        engine: &Engine,
        found: &Finding,
        limit: usize,
    ) -> Option<(Finding, usize)> {
        if !matches!(found.entity, Entity::Secret | Entity::Password) {
            return None;
        }
        let input = Input::new(text.as_bytes())
            .range(found.start..limit)
            .anchored(Anchored::Yes);
        let inner = engine.scan.search(&input)?;
        let spec = engine.specs.get(inner.pattern().as_usize())?;
        if matches!(spec.entity, Entity::Secret | Entity::Password) {
            return None;
        }
        let (f, _) = self.judge(text, spec, inner.start(), inner.end())?;
        Some((f, inner.end()))
    }

    /// One pass of `engine` over `range`: the leftmost candidate of any pattern. When it fails
    /// its check, or counts only thanks to a context word, the other patterns matching at the
    /// same place are judged too and the highest score (then the longest match) wins; then on
    /// from there. A marker (a context word) opens a zone for the weak patterns in `zones`.
    fn scan(
        &self,
        text: &str,
        engine: &Engine,
        range: Range<usize>,
        found: &mut Vec<(Finding, bool)>,
        zones: &mut Vec<Range<usize>>,
    ) {
        let bytes = text.as_bytes();
        let mut at = range.start;
        let mut others = PatternSet::new(engine.specs.len() + engine.markers.len());
        while at < range.end {
            let Some(m) = engine.scan.search(&Input::new(bytes).range(at..range.end)) else {
                break;
            };
            let start = m.start();
            let Some(&spec) = engine.specs.get(m.pattern().as_usize()) else {
                // A context word: a value it names starts within the window after it.
                let end = (start + CONTEXT_WINDOW + MAX_WEAK_VALUE).min(bytes.len());
                zones.push(m.end()..end);
                at = start + 1;
                continue;
            };
            let first = self.judge(text, spec, start, m.end());
            if let Some((f, false)) = first {
                let (f, end) = self
                    .more_specific(text, engine, &f, range.end)
                    .unwrap_or((f, m.end()));
                found.push((f, false));
                at = end;
                continue;
            }
            if first.is_none()
                && spec.best < self.threshold(spec.entity)
                && !self
                    .context
                    .any(None, &bytes[start.saturating_sub(CONTEXT_WINDOW)..start])
            {
                // A weak pattern first means only weak ones match here, and no context word is
                // near: nothing here can count.
                at = start + 1;
                continue;
            }
            let mut best = first.map(|f| (f, m.end()));
            others.clear();
            engine.overlapping.which_overlapping_matches(
                &Input::new(bytes)
                    .range(start..range.end)
                    .anchored(Anchored::Yes),
                &mut others,
            );
            for pid in others.iter().filter(|&p| p != m.pattern()) {
                let Some(&alt_spec) = engine.specs.get(pid.as_usize()) else {
                    continue;
                };
                let input = Input::new(bytes)
                    .range(start..range.end)
                    .anchored(Anchored::Pattern(pid));
                let Some(alt) = engine.scan.search(&input) else {
                    continue;
                };
                if let Some(f) = self.judge(text, alt_spec, start, alt.end()) {
                    let better = best.is_none_or(|((b, _), end)| {
                        f.0.score > b.score || (f.0.score == b.score && alt.end() > end)
                    });
                    if better {
                        best = Some((f, alt.end()));
                    }
                }
            }
            match best {
                Some((f, end)) => {
                    found.push(f);
                    at = end;
                }
                None => at = start + 1,
            }
        }
    }
}

/// `text` with full-width ASCII forms (U+FF01..U+FF5E) and the ideographic space folded to ASCII,
/// and for every byte position of the folded text the position in `text`; `None` when there is
/// nothing to fold (the common case).
fn fold_width(text: &str) -> Option<(String, Vec<usize>)> {
    let bytes = text.as_bytes();
    // U+FF01..U+FF5E are EF BC 81..EF BD 9E; U+3000 is E3 80 80. Three vectorised searches: the
    // lead bytes alone are common in CJK text.
    let needs = [&b"\xEF\xBC"[..], b"\xEF\xBD", b"\xE3\x80\x80"]
        .iter()
        .any(|needle| memchr::memmem::find(bytes, needle).is_some());
    if !needs {
        return None;
    }
    let mut folded = String::with_capacity(text.len());
    let mut original = Vec::with_capacity(text.len() + 1);
    for (i, c) in text.char_indices() {
        let ascii = match c {
            '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0),
            '\u{3000}' => Some(' '),
            _ => None,
        };
        let c = ascii.unwrap_or(c);
        for _ in 0..c.len_utf8() {
            original.push(i);
        }
        folded.push(c);
    }
    original.push(text.len());
    Some((folded, original))
}

/// The parts of `zones` outside `covered` (both in order, `covered` without overlaps).
fn uncovered(zones: Vec<Range<usize>>, covered: &[Range<usize>]) -> Vec<Range<usize>> {
    let mut out = Vec::with_capacity(zones.len());
    for zone in zones {
        let mut from = zone.start;
        for c in covered
            .iter()
            .filter(|c| c.end > zone.start && c.start < zone.end)
        {
            if c.start > from {
                out.push(from..c.start);
            }
            from = from.max(c.end);
        }
        if from < zone.end {
            out.push(from..zone.end);
        }
    }
    out
}

/// Overlapping zones joined, in order.
fn merged(mut zones: Vec<Range<usize>>) -> Vec<Range<usize>> {
    zones.sort_unstable_by_key(|z| z.start);
    let mut out: Vec<Range<usize>> = Vec::with_capacity(zones.len());
    for z in zones {
        match out.last_mut() {
            Some(last) if z.start <= last.end => last.end = last.end.max(z.end),
            _ => out.push(z),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<(Entity, &str)> {
        Detector::new(&Entity::ALL)
            .find(text)
            .into_iter()
            .map(|f| (f.entity, &text[f.start..f.end]))
            .collect()
    }

    #[test]
    fn finds_valid_values_and_skips_lookalikes() {
        assert_eq!(
            kinds("mail jane.doe+x@example.co.uk now"),
            vec![(Entity::Email, "jane.doe+x@example.co.uk")]
        );
        assert_eq!(
            kinds("card 4111 1111 1111 1111."),
            vec![(Entity::CreditCard, "4111 1111 1111 1111")]
        );
        assert!(kinds("order 4111 1111 1111 1112").is_empty(), "fails Luhn");
        assert!(kinds("id 1234567890123456").is_empty(), "no brand, no Luhn");
        assert_eq!(
            kinds("IBAN GB82 WEST 1234 5698 7654 32 ok"),
            vec![(Entity::Iban, "GB82 WEST 1234 5698 7654 32")]
        );
        assert!(
            kinds("IBAN GB82 WEST 1234 5698 7654 33").is_empty(),
            "fails mod 97"
        );
        assert_eq!(
            kinds("ssn 123-45-6789"),
            vec![(Entity::UsSsn, "123-45-6789")]
        );
        assert!(
            kinds("ssn 666-45-6789 or 123-00-6789").is_empty(),
            "never issued"
        );
        assert_eq!(
            kinds("from 192.168.10.254!"),
            vec![(Entity::IpAddress, "192.168.10.254")]
        );
        assert!(kinds("version 1.2.3.4.5 or 300.1.1.1").is_empty());
        assert_eq!(
            kinds("call +44 20 7946 0958 today"),
            vec![(Entity::Phone, "+44 20 7946 0958")]
        );
        assert_eq!(
            kinds("key sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD"),
            vec![(
                Entity::ApiKey,
                "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD"
            )]
        );
        assert_eq!(
            kinds("aws AKIAIOSFODNN7EXAMPLE"),
            vec![(Entity::ApiKey, "AKIAIOSFODNN7EXAMPLE")]
        );
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        assert_eq!(kinds(&format!("t {jwt} x")), vec![(Entity::Jwt, jwt)]);
        assert_eq!(
            kinds("db postgres://app:hunter2@db.internal/x"),
            vec![(Entity::UrlCredentials, "postgres://app:hunter2@db.internal")]
        );
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nAKCA\n-----END RSA PRIVATE KEY-----";
        assert_eq!(
            kinds(&format!("key:\n{pem}\n")),
            vec![(Entity::PrivateKey, pem)]
        );
    }

    #[test]
    fn national_ids_with_their_checksums() {
        let only = |e: Entity, text: &str| {
            Detector::new(&[e])
                .find(text)
                .into_iter()
                .map(|f| text[f.start..f.end].to_owned())
                .collect::<Vec<_>>()
        };
        let cases: [(Entity, &str, &str); 10] = [
            (Entity::UkNino, "NI AB 12 34 56 C.", "NI BG 12 34 56 C."),
            (
                Entity::ItFiscalCode,
                "CF RSSMRA85T10A562S",
                "CF RSSMRA85T10A562T",
            ),
            (Entity::PlPesel, "PESEL 44051401359", "PESEL 44051401358"),
            (Entity::EsDni, "DNI 12345678Z", "DNI 12345678A"),
            (
                Entity::FrNir,
                "NIR 2 55 08 14 168 025 38",
                "NIR 2 55 08 14 168 025 39",
            ),
            (
                Entity::InAadhaar,
                "UID 2341 2341 2346",
                "UID 2341 2341 2347",
            ),
            (Entity::BrCpf, "CPF 529.982.247-25", "CPF 529.982.247-26"),
            (Entity::CaSin, "SIN 046 454 286", "SIN 046 454 287"),
            (
                Entity::CnResidentId,
                "ID 11010519491231002X",
                "ID 110105194912310021",
            ),
            (Entity::DeTaxId, "IdNr 86095742719", "IdNr 86095742718"),
        ];
        for (entity, valid, invalid) in cases {
            assert_eq!(only(entity, valid).len(), 1, "{entity}: {valid}");
            assert!(only(entity, invalid).is_empty(), "{entity}: {invalid}");
        }
        assert_eq!(only(Entity::EsDni, "NIE X1234567L"), vec!["X1234567L"]);
        assert!(
            only(Entity::BrCpf, "111.111.111-11").is_empty(),
            "repeated digits are not issued"
        );
    }

    #[test]
    fn non_ascii_text_around_values_is_fine() {
        assert_eq!(
            kinds("écrivez à zoe@exemple.fr — merci"),
            vec![(Entity::Email, "zoe@exemple.fr")]
        );
        assert_eq!(
            kinds("日本語 4111-1111-1111-1111 です"),
            vec![(Entity::CreditCard, "4111-1111-1111-1111")]
        );
    }

    #[test]
    fn overlaps_keep_one() {
        // An email inside a URL with credentials: the URL starts earlier and wins.
        let found = kinds("https://bob:pw@mail.example.com");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, Entity::UrlCredentials);
    }

    fn found(detector: &Detector, text: &str) -> Vec<(Entity, String)> {
        detector
            .find(text)
            .into_iter()
            .map(|f| (f.entity, text[f.start..f.end].to_owned()))
            .collect()
    }

    /// Built once: compiling is the slow part of a debug-build test.
    fn detector() -> &'static Detector {
        static DETECTOR: std::sync::LazyLock<Detector> = std::sync::LazyLock::new(|| {
            Detector::new(&Entity::ALL)
                .with_deny_list(["Falcon"])
                .with_threshold(Entity::CaSin, 0.3)
        });
        &DETECTOR
    }

    fn all(text: &str) -> Vec<(Entity, String)> {
        found(&Detector::new(&Entity::ALL), text)
    }

    fn one(entity: Entity, value: &str) -> Vec<(Entity, String)> {
        vec![(entity, value.to_owned())]
    }

    #[test]
    fn network_wallets_and_dates_of_birth() {
        assert_eq!(
            all("host 2001:db8:85a3::8a2e:370:7334 up"),
            one(Entity::IpAddress, "2001:db8:85a3::8a2e:370:7334")
        );
        assert_eq!(all("lo ::1 and fe80::1"), one(Entity::IpAddress, "fe80::1"));
        assert!(all("use std::net::Ipv6Addr; at 10:32:11 or a::b").is_empty());
        assert_eq!(
            all("nic 00:1A:2B:3C:4D:5E"),
            one(Entity::MacAddress, "00:1A:2B:3C:4D:5E")
        );
        assert!(all("mixed 00:1A-2B:3C:4D:5E").is_empty());
        assert_eq!(
            all("send to 1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2 now"),
            one(Entity::CryptoWallet, "1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2")
        );
        assert!(all("send to 1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN3").is_empty());
        assert_eq!(
            all("bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq"),
            one(
                Entity::CryptoWallet,
                "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq"
            )
        );
        assert!(all("bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdp").is_empty());
        // A date alone is not personal data; after "born" it is.
        assert!(all("released on 12/03/1985").is_empty());
        assert_eq!(
            all("I was born on 12/03/1985 in Leeds"),
            one(Entity::DateOfBirth, "12/03/1985")
        );
        assert_eq!(
            all("DOB: March 12, 1985"),
            one(Entity::DateOfBirth, "March 12, 1985")
        );
        assert!(all("born 31/31/1985").is_empty(), "not a date");
    }

    #[test]
    fn secrets_keep_their_keyword() {
        assert_eq!(
            all("Server=db;User Id=app;Password=Tr0ub4dor&3x;"),
            one(Entity::Password, "Tr0ub4dor")
        );
        assert_eq!(
            all("my password is hunter2!"),
            one(Entity::Password, "hunter2!")
        );
        assert!(all("password: ******** and password=[PASSWORD_1]").is_empty());
        assert_eq!(
            all("export CLIENT_SECRET=\"q8Zr3TnV0xY7pLk2Wm9s\""),
            one(Entity::Secret, "q8Zr3TnV0xY7pLk2Wm9s")
        );
        assert_eq!(
            all("Authorization: Bearer abcDEF123ghiJKL456mno"),
            one(Entity::Secret, "abcDEF123ghiJKL456mno")
        );
        assert!(
            all("token = aaaaaaaaaaaaaaaaaaaaaaaa1").is_empty(),
            "low entropy"
        );
        assert!(all("the token limit is 4096 tokens").is_empty());
        assert_eq!(
            all("hf_abcdefghijklmnopqrstuvwxyzABCDEFGH"),
            one(Entity::ApiKey, "hf_abcdefghijklmnopqrstuvwxyzABCDEFGH")
        );
    }

    #[test]
    fn phones_in_national_formats() {
        for phone in [
            "(555) 123-4567",
            "555-123-4567",
            "555.123.4567 x1234",
            "020 7946 0958",
            "01 23 45 67 89",
            "(0151) 1234 5678",
            "03-1234-5678",
            "+33 1 23 45 67 89",
            "0044 20 7946 0958",
            "+44(0)2079460958",
        ] {
            assert_eq!(all(&format!("at {phone}.")), one(Entity::Phone, phone));
        }
        // Weak shapes need a word that says phone.
        assert!(all("ref 912 345 678").is_empty());
        assert_eq!(
            all("teléfono 912 345 678"),
            one(Entity::Phone, "912 345 678")
        );
        assert_eq!(all("mobile: 9876543210"), one(Entity::Phone, "9876543210"));
    }

    #[test]
    fn context_thresholds_allow_and_deny() {
        // Nine digits passing Luhn: a SIN only when the text says so.
        assert!(all("order 046454286 shipped").is_empty());
        assert_eq!(all("my SIN is 046454286"), one(Entity::CaSin, "046454286"));
        assert!(
            all("single 046454286").is_empty(),
            "a context word must be a whole word"
        );
        let lenient = Detector::new(&[Entity::CaSin]).with_threshold(Entity::CaSin, 0.3);
        assert_eq!(
            found(&lenient, "order 046454286"),
            one(Entity::CaSin, "046454286")
        );
        let strict = Detector::new(&[Entity::Email]).with_default_threshold(0.95);
        assert!(found(&strict, "jane@example.com").is_empty());

        let allowing =
            Detector::new(&Entity::ALL).with_allow_list(["example.com", "4111111111111111"]);
        assert_eq!(
            found(
                &allowing,
                "a@example.com b@mail.example.com c@example.org 4111-1111-1111-1111"
            ),
            one(Entity::Email, "c@example.org")
        );
        let denying = Detector::new(&Entity::ALL).with_deny_list(["Project Falcon", "acme"]);
        assert_eq!(
            found(&denying, "project falcon for ACME, not acmex"),
            vec![
                (Entity::Custom, "project falcon".to_owned()),
                (Entity::Custom, "ACME".to_owned())
            ]
        );
        let f = Detector::new(&Entity::ALL).find("jane@example.com")[0];
        assert!((f.score - 0.9).abs() < f32::EPSILON);
    }

    #[test]
    fn names_are_opt_in() {
        let text = "Hello, my name is Zoë Müller-Lüdenscheidt. Dr. Okafor and James Smith agree.";
        assert!(all(text).is_empty());
        let names = Detector::new(&[Entity::Person]);
        assert_eq!(
            found(&names, text),
            vec![
                (Entity::Person, "Zoë Müller-Lüdenscheidt".to_owned()),
                (Entity::Person, "Okafor".to_owned()),
                (Entity::Person, "James Smith".to_owned()),
            ]
        );
        assert_eq!(
            found(&names, "Dear pani Anastazja Mularz, 我叫王秀英。"),
            vec![
                (Entity::Person, "Anastazja Mularz".to_owned()),
                (Entity::Person, "王秀英".to_owned()),
            ]
        );
    }

    /// Bugs the Faker evaluation (`eval/`) found, kept fixed.
    #[test]
    fn evaluation_regressions() {
        // Corsica: 2A counts as 19 and 2B as 18 in the NIR key.
        for nir in ["185052B03312386", "285052A03312309"] {
            assert_eq!(all(&format!("NIR {nir}")), one(Entity::FrNir, nir));
        }
        assert!(all("NIR 185052B03312387").is_empty());
        // A capital letter after an IBAN is not part of it.
        assert_eq!(
            all("IBAN: GB82WEST12345698765432 B is for bank"),
            one(Entity::Iban, "GB82WEST12345698765432")
        );
        // Extensions, and a leading 1 without a plus.
        assert_eq!(
            all("call 206.269.0743x9150 or 1-917-652-3604."),
            vec![
                (Entity::Phone, "206.269.0743x9150".to_owned()),
                (Entity::Phone, "1-917-652-3604".to_owned())
            ]
        );
        // Pieces of ISBNs and UUIDs are not phone numbers.
        assert!(all("ISBN 978-0-03-067394-8, id becc1b64-0692-4983-9c5c-425b8cf8a063").is_empty());
        // A 13-digit Maestro or Visa number is also an EAN: it needs a word like "card" or "pay".
        assert!(all("EAN 6759934265781").is_empty());
        assert_eq!(
            all("please charge 6759934265781"),
            one(Entity::CreditCard, "6759934265781")
        );
        // "(028)9018716" is a number, not the 28th of a month.
        assert_eq!(all("Tel: (028)9018716"), one(Entity::Phone, "(028)9018716"));
        // Where a phone and an ID both fit, the one the text names wins.
        assert_eq!(
            all("Mój numer PESEL to 00311247132."),
            one(Entity::PlPesel, "00311247132")
        );
        assert_eq!(
            all("ID 621100196505181089"),
            one(Entity::CnResidentId, "621100196505181089")
        );
        // A value after a keyword that is itself a JWT or a provider key is reported as one.
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        assert_eq!(
            all(&format!("Authorization token: {jwt}")),
            one(Entity::Jwt, jwt)
        );
        let key = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD";
        assert_eq!(
            all(&format!("OPENAI_API_KEY={key}")),
            one(Entity::ApiKey, key)
        );
        // Random letters of both cases are a secret too, not only letters with digits.
        assert_eq!(
            all("export API_KEY=RyTjTWmqOYiIenGBaavfUwIwI"),
            one(Entity::Secret, "RyTjTWmqOYiIenGBaavfUwIwI")
        );
    }

    #[test]
    fn internationalised_emails_are_found_whole() {
        assert_eq!(
            all("schreib jürgen.müller@bücher.de bitte"),
            one(Entity::Email, "jürgen.müller@bücher.de")
        );
        assert_eq!(
            all("mail 李雷@例子.xn--fiqs8s now"),
            one(Entity::Email, "李雷@例子.xn--fiqs8s")
        );
        assert_eq!(
            all("邮箱 李雷@例子.中国 谢谢"),
            one(Entity::Email, "李雷@例子.中国")
        );
    }

    #[test]
    fn full_width_forms_are_found_in_the_original_text() {
        let text =
            "電話：０９０－１２３４－５６７８、メール　ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ です";
        assert_eq!(
            all(text),
            vec![
                (Entity::Phone, "０９０－１２３４－５６７８".to_owned()),
                (Entity::Email, "ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ".to_owned()),
            ]
        );
        let r = crate::Redactor::new(&Entity::ALL);
        let mut vault = crate::Vault::new();
        let out = r.redact_str(text, &mut vault);
        assert_eq!(out.text, "電話：[PHONE_1]、メール　[EMAIL_1] です");
        assert_eq!(r.restore_str(&out.text, &vault), text);
    }

    #[test]
    fn values_with_any_character_keep_whole_characters() {
        assert_eq!(
            all("password: pässwörd€1 ok"),
            one(Entity::Password, "pässwörd€1")
        );
        // A length limit counts characters, so it never ends inside one.
        let long = format!("x{}", "é".repeat(100));
        assert_eq!(
            all(&format!("password: {long} ok")),
            one(Entity::Password, &long)
        );
        assert_eq!(
            all("db postgres://jürgen:pä55wörd@db.internal/x"),
            one(
                Entity::UrlCredentials,
                "postgres://jürgen:pä55wörd@db.internal"
            )
        );
    }

    proptest::proptest! {
        /// Whatever the text, finding never panics and every finding is whole characters, in
        /// order, without overlaps.
        #[test]
        fn any_text_gives_sound_findings(text in "([a-zA-Z0-9 .:@/=_+()-]|é|€|日|０|１|＠|－|　|\\n|password=|\\+44 |4111 |sk-){0,60}") {
            let found = detector().find(&text);
            let mut last_end = 0;
            for f in found {
                proptest::prop_assert!(f.start >= last_end && f.start < f.end && f.end <= text.len());
                proptest::prop_assert!(text.is_char_boundary(f.start) && text.is_char_boundary(f.end));
                last_end = f.end;
            }
        }
    }

    #[test]
    fn context_only_shapes_count_just_after_their_words() {
        // A strong finding keeps its kind even with another entity's context word near.
        assert_eq!(
            all("call the server at 215.86.84.150"),
            one(Entity::IpAddress, "215.86.84.150")
        );
        // The word must come at most 64 bytes before the value.
        let near = "phone: see below, 912 345 678";
        assert_eq!(all(near), one(Entity::Phone, "912 345 678"));
        let far = format!("phone: {} 912 345 678", "x ".repeat(40));
        assert!(all(&far).is_empty(), "{far}");
        // Several values after one word.
        assert_eq!(
            all("Phone: 912 345 678 or 913 456 789"),
            vec![
                (Entity::Phone, "912 345 678".to_owned()),
                (Entity::Phone, "913 456 789".to_owned())
            ]
        );
        // A lowered threshold makes the shape count anywhere (it is then scanned everywhere).
        let lenient = Detector::new(&[Entity::Phone]).with_threshold(Entity::Phone, 0.3);
        assert_eq!(
            found(&lenient, "ref 912 345 678"),
            one(Entity::Phone, "912 345 678")
        );
    }

    #[test]
    fn number_heavy_benign_text_is_left_alone() {
        let text = "Release 1.2.3 (build 4521) fixed order #100234 and #58812345. \
            At 2024-05-01T10:32:11Z and 2024-05-01 10:32:11 the job took 12.5s; \
            total $1,234.56 or €2.345,67 for 3 items, 12% off. \
            Commit 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b, \
            request 123e4567-e89b-12d3-a456-426614174000, version 10.0.19045.1, \
            port 8080, 1024x768, ISBN 978-3-16-148410-0, Rust 1.85.0, \
            invoice 2024-000123, 15:30-17:45, tel. ext. lines 3 and 4.";
        assert_eq!(all(text), vec![]);
    }
}
