//! What the layer checks in a request, and what it does about each finding.
//!
//! Findings are of two kinds. **Screened** ones are judgements: an injection or jailbreak score
//! over the threshold, hidden characters, an exfiltration URL. **Rules you set** are not: a
//! deny or allow pattern, a client-sent system message the policy does not accept, a cap. The
//! [`Action`] says what happens to screened findings; rules you set are enforced under every
//! action but [`Action::Shadow`].

use std::fmt;

use moat_core::llm::{LlmRequest, Role, Segment, Source, UnknownPolicy};
use regex::RegexSet;
use serde_json::Value;

use crate::classifier::{capped, ShieldInput, ShieldVerdict, MAX_CHARS};
use crate::hidden::{find_hidden, strip_hidden, HiddenKind};
use crate::{exfil, Screener, DEFAULT_THRESHOLD};

/// What the layer does with what the screening finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum Action {
    /// Refuse the request: 400 with code `prompt_rejected` and the reasons, never the prompt
    /// (gRPC: `INVALID_ARGUMENT`).
    #[default]
    Block,
    /// Remove hidden characters and pass the request on; block the rest as [`Block`](Self::Block)
    /// does.
    Strip,
    /// Refuse nothing screened: the highest score goes in an `x-moat-prompt-score` header on
    /// the request handed on and on the response.
    Annotate,
    /// Change nothing and refuse nothing: findings are only recorded (decisions, metrics, logs),
    /// to measure a policy before turning it on.
    Shadow,
}

impl Action {
    /// Its name in configuration and metrics: `block`, `strip`, `annotate`, `shadow`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Block => "block",
            Self::Strip => "strip",
            Self::Annotate => "annotate",
            Self::Shadow => "shadow",
        }
    }
}

/// Where a piece of text came from, for thresholds that differ by how far it is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Provenance {
    /// Written by the client: user and (client-sent) assistant turns, prompts, names, tool-call
    /// arguments and definitions, text in parts the parser does not know.
    User,
    /// System and developer instructions.
    System,
    /// Third-party content the model will read: tool results and retrieved documents (where
    /// indirect injection hides).
    Document,
}

impl Provenance {
    /// The provenance of a segment; `None` for text the model does not read as its prompt
    /// (metadata, attachment URLs), which is not screened.
    pub fn of(segment: &Segment) -> Option<Self> {
        match segment.source {
            Source::Metadata | Source::Attachment => None,
            Source::Instructions => Some(Self::System),
            Source::ToolResult | Source::Document => Some(Self::Document),
            _ if segment.role == Role::Tool => Some(Self::Document),
            _ => Some(Self::User),
        }
    }

    fn index(self) -> usize {
        match self {
            Self::User => 0,
            Self::System => 1,
            Self::Document => 2,
        }
    }
}

/// What a finding is.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum FindingKind {
    /// An injection or jailbreak score at or over the threshold.
    Injection {
        /// The [`Verdict::score`](crate::Verdict::score).
        score: f64,
        /// The rule families that fired (empty when the learned scorer alone reached it).
        families: Vec<&'static str>,
        /// The encoding the attack was read through (`hex`, `rot13`), if any.
        encoding: Option<&'static str>,
    },
    /// Hidden characters of one kind.
    Hidden {
        /// Which kind.
        kind: HiddenKind,
        /// How many.
        count: usize,
    },
    /// An image or link URL with a slot for data (see the crate docs).
    Exfiltration,
    /// The external classifier found an attack.
    External,
    /// Text matching a deny pattern (by its index in the list).
    Denied {
        /// The pattern's index.
        pattern: usize,
    },
    /// The last user message matches none of the allow patterns.
    NotAllowed,
    /// A system or developer message sent by the client, which the policy does not accept.
    ClientInstructions,
    /// Over a cap.
    TooLarge {
        /// `bytes`, `messages` or `tokens`.
        what: &'static str,
        /// The cap.
        limit: u64,
        /// What the request holds.
        got: u64,
    },
}

impl FindingKind {
    /// A short name for metrics and decisions: `injection`, `hidden`, `exfiltration`,
    /// `denied`, `not_allowed`, `client_instructions`, `too_large`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Injection { .. } => "injection",
            Self::Hidden { .. } => "hidden",
            Self::Exfiltration => "exfiltration",
            Self::External => "external",
            Self::Denied { .. } => "denied",
            Self::NotAllowed => "not_allowed",
            Self::ClientInstructions => "client_instructions",
            Self::TooLarge { .. } => "too_large",
        }
    }

    /// Whether it is a screened finding (governed by the [`Action`]) rather than a rule the
    /// operator set.
    pub fn is_screened(&self) -> bool {
        matches!(
            self,
            Self::Injection { .. } | Self::Hidden { .. } | Self::Exfiltration | Self::External
        )
    }

    /// Whether, under [`Action::Block`], it refuses the request: everything but stray
    /// zero-width characters (which evade nothing the screen text does not already see through,
    /// and turn up in text pasted from the web).
    fn refuses(&self) -> bool {
        !matches!(
            self,
            Self::Hidden {
                kind: HiddenKind::ZeroWidth,
                ..
            }
        )
    }
}

/// Something the policy found, and where.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Finding {
    /// What.
    pub kind: FindingKind,
    /// Where, as a JSON pointer into the request (none for request-wide caps).
    pub pointer: Option<String>,
}

fn family_name(family: &str) -> &str {
    match family {
        "override" => "instruction override",
        "persona" => "persona jailbreak",
        "policy" => "policy bypass",
        "lexicon" => "jailbreak wording",
        "norules" => "a claim that no rules apply",
        "refusal" => "refusal suppression",
        "extract" => "system prompt extraction",
        "bypass" => "filter bypass",
        "template" => "chat-template tokens or a fake turn",
        "authority" => "a claim of authority",
        other => other,
    }
}

impl fmt::Display for Finding {
    /// The reason given to the client: what and where, never the text itself.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            FindingKind::Injection {
                score,
                families,
                encoding,
            } => {
                f.write_str("prompt injection or jailbreak")?;
                if !families.is_empty() {
                    let names: Vec<&str> = families.iter().map(|n| family_name(n)).collect();
                    write!(f, " ({})", names.join(", "))?;
                }
                if let Some(encoding) = encoding {
                    write!(f, " hidden in {encoding}")?;
                }
                write!(f, ", score {score:.2}")?;
            }
            FindingKind::Hidden { kind, count } => {
                let what = match kind {
                    HiddenKind::Tag => "invisible Unicode tag characters",
                    HiddenKind::Bidi => "bidirectional override characters",
                    _ => "zero-width characters",
                };
                write!(f, "{count} {what}")?;
            }
            FindingKind::Exfiltration => {
                f.write_str("an image or link URL with a slot for data (exfiltration)")?
            }
            FindingKind::External => f.write_str("an attack, by the external classifier")?,
            FindingKind::Denied { pattern } => {
                write!(f, "text matching deny pattern {}", pattern + 1)?
            }
            FindingKind::NotAllowed => {
                f.write_str("the last user message matches none of the allowed patterns")?
            }
            FindingKind::ClientInstructions => f.write_str(
                "a system or developer message from the client, which this service does not accept",
            )?,
            FindingKind::TooLarge { what, limit, got } => write!(
                f,
                "the prompt holds {got} {what}, over the limit of {limit}"
            )?,
        }
        if let Some(pointer) = &self.pointer {
            write!(f, " at {pointer}")?;
        }
        Ok(())
    }
}

/// What [`Policy::inspect`] found in one request.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Report {
    /// Every finding, in request order (caps last).
    pub findings: Vec<Finding>,
    /// The highest injection score of any screened segment (0 when none was screened).
    pub score: f64,
    /// Hidden characters removed under [`Action::Strip`].
    pub stripped: usize,
}

impl Report {
    /// The findings that refuse the request under `action`.
    pub fn refusals(&self, action: Action) -> impl Iterator<Item = &Finding> + '_ {
        self.findings.iter().filter(move |f| match action {
            Action::Shadow => false,
            _ if !f.kind.is_screened() => true,
            Action::Block => f.kind.refuses(),
            // Hidden characters are gone; what remains refuses as under Block.
            Action::Strip => f.kind.refuses() && !matches!(f.kind, FindingKind::Hidden { .. }),
            Action::Annotate => false,
        })
    }
}

/// Regular expressions, compiled into one set, with their sources kept for `Debug`.
#[derive(Clone)]
struct Patterns(Option<RegexSet>);

impl fmt::Debug for Patterns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().flat_map(|set| set.patterns()))
            .finish()
    }
}

impl Patterns {
    fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(patterns: I) -> Result<Self, regex::Error> {
        let patterns: Vec<String> = patterns
            .into_iter()
            .map(|p| p.as_ref().to_owned())
            .collect();
        if patterns.is_empty() {
            return Ok(Self(None));
        }
        regex::RegexSetBuilder::new(patterns)
            .size_limit(16 << 20)
            .build()
            .map(|set| Self(Some(set)))
    }
}

/// What the layer checks and what it does: built once, shared by every request.
///
/// ```
/// use moat_sanitize::{Action, Policy, Provenance};
///
/// let policy = Policy::new()
///     .action(Action::Block)
///     .threshold(0.8)
///     .threshold_for(Provenance::Document, Some(0.6))
///     .deny([r"(?i)reveal .* system prompt"])
///     .unwrap()
///     .max_prompt_bytes(200_000);
/// # let _ = policy;
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct Policy {
    screener: Screener,
    action: Action,
    thresholds: [Option<f64>; 3],
    allow_client_instructions: bool,
    deny: Patterns,
    allow: Patterns,
    max_prompt_bytes: Option<u64>,
    max_messages: Option<u64>,
    max_prompt_tokens: Option<u64>,
}

impl Default for Policy {
    fn default() -> Self {
        Self::new()
    }
}

impl Policy {
    /// Block at [`DEFAULT_THRESHOLD`] for user text and documents; system text not screened
    /// (it is the operator's), but a client may not send it; no patterns, no caps.
    pub fn new() -> Self {
        Self {
            screener: Screener::new(),
            action: Action::Block,
            thresholds: [Some(DEFAULT_THRESHOLD), None, Some(DEFAULT_THRESHOLD)],
            allow_client_instructions: false,
            deny: Patterns(None),
            allow: Patterns(None),
            max_prompt_bytes: None,
            max_messages: None,
            max_prompt_tokens: None,
        }
    }

    /// What to do with screened findings (default [`Action::Block`]).
    pub fn action(mut self, action: Action) -> Self {
        self.action = action;
        self
    }

    /// The score (0 to 1) at which user text and documents are flagged; see
    /// [`Verdict::score`](crate::Verdict::score).
    pub fn threshold(mut self, threshold: f64) -> Self {
        self.thresholds[Provenance::User.index()] = Some(threshold);
        self.thresholds[Provenance::Document.index()] = Some(threshold);
        self
    }

    /// The threshold for text of one provenance, or `None` to not screen it (hidden characters
    /// and patterns are still checked).
    pub fn threshold_for(mut self, provenance: Provenance, threshold: Option<f64>) -> Self {
        self.thresholds[provenance.index()] = threshold;
        self
    }

    /// Whether a client may send system and developer messages (default no: a client-sent
    /// system message is how a user promotes their text over the operator's). Enable it where
    /// the client is your own backend and writes the system prompt.
    pub fn allow_system_from_client(mut self, allow: bool) -> Self {
        self.allow_client_instructions = allow;
        self
    }

    /// Regular expressions (Rust `regex` syntax) that refuse any screened text they match,
    /// checked on the text as sent and with hidden characters removed.
    pub fn deny<I: IntoIterator<Item = S>, S: AsRef<str>>(
        mut self,
        patterns: I,
    ) -> Result<Self, regex::Error> {
        self.deny = Patterns::new(patterns)?;
        Ok(self)
    }

    /// Regular expressions of which the last user message must match one (as Kong's
    /// `allow_patterns`); none set, anything is allowed.
    pub fn allow<I: IntoIterator<Item = S>, S: AsRef<str>>(
        mut self,
        patterns: I,
    ) -> Result<Self, regex::Error> {
        self.allow = Patterns::new(patterns)?;
        Ok(self)
    }

    /// The most bytes of prompt text (every text the model reads, summed).
    pub fn max_prompt_bytes(mut self, bytes: u64) -> Self {
        self.max_prompt_bytes = Some(bytes);
        self
    }

    /// The most messages (chat and Anthropic `messages`, Responses `input` items).
    pub fn max_messages(mut self, messages: u64) -> Self {
        self.max_messages = Some(messages);
        self
    }

    /// The most prompt tokens, as moat-core counts them (exactly for OpenAI models, else the
    /// byte-length upper bound).
    pub fn max_prompt_tokens(mut self, tokens: u64) -> Self {
        self.max_prompt_tokens = Some(tokens);
        self
    }

    /// Screens with `screener` instead of the default one.
    pub fn screener(mut self, screener: Screener) -> Self {
        self.screener = screener;
        self
    }

    /// The action.
    pub fn current_action(&self) -> Action {
        self.action
    }

    /// Adds a [`FindingKind::TooLarge`] finding when the prompt's tokens (counted only if
    /// there is a cap) are over it.
    pub fn check_tokens(&self, report: &mut Report, count: impl FnOnce() -> u64) {
        let Some(limit) = self.max_prompt_tokens else {
            return;
        };
        let got = count();
        if got > limit {
            report.findings.push(Finding {
                kind: FindingKind::TooLarge {
                    what: "tokens",
                    limit,
                    got,
                },
                pointer: None,
            });
        }
    }

    /// Checks one text of a given provenance, outside any request (a protobuf field, a
    /// document before it is stored): screening, hidden characters, exfiltration URLs, deny and
    /// allow patterns and the byte cap.
    pub fn inspect_text(&self, provenance: Provenance, text: &str) -> Report {
        let mut report = Report::default();
        self.inspect_one(provenance, text, None, &mut report);
        if let Some(allow) = &self.allow.0 {
            if provenance == Provenance::User && !allow.is_match(text) {
                report.findings.push(Finding {
                    kind: FindingKind::NotAllowed,
                    pointer: None,
                });
            }
        }
        self.check_caps(&mut report, text.len() as u64, 0);
        report
    }

    /// What one text holds, added to `report`; the text without its hidden characters when
    /// the action strips them and there were some.
    fn inspect_one(
        &self,
        provenance: Provenance,
        text: &str,
        pointer: Option<String>,
        report: &mut Report,
    ) -> Option<String> {
        let mut found = |kind: FindingKind| {
            report.findings.push(Finding {
                kind,
                pointer: pointer.clone(),
            });
        };
        let hidden = find_hidden(text);
        for kind in [HiddenKind::Tag, HiddenKind::Bidi, HiddenKind::ZeroWidth] {
            let count = hidden.iter().filter(|h| h.kind == kind).count();
            if count > 0 {
                found(FindingKind::Hidden { kind, count });
            }
        }
        let mut score = 0.0;
        if let Some(threshold) = self.thresholds[provenance.index()] {
            let verdict = self.screener.screen_for(text, threshold);
            score = verdict.score();
            if score >= threshold {
                found(FindingKind::Injection {
                    score,
                    families: verdict.rules().families().iter().map(|(f, _)| *f).collect(),
                    encoding: verdict.encoding(),
                });
            }
        }
        if provenance != Provenance::System && exfil::exfiltration(text) {
            found(FindingKind::Exfiltration);
        }
        // The text without its hidden characters, when it has some: what deny patterns also
        // read (so hidden characters cannot split a match), and what `strip` sends on.
        let stripped = (!hidden.is_empty()).then(|| strip_hidden(text).into_owned());
        if let Some(deny) = &self.deny.0 {
            let first = deny
                .matches(text)
                .into_iter()
                .chain(stripped.iter().flat_map(|s| deny.matches(s).into_iter()))
                .min();
            if let Some(pattern) = first {
                found(FindingKind::Denied { pattern });
            }
        }
        report.score = report.score.max(score);
        if self.action == Action::Strip && stripped.is_some() {
            report.stripped += hidden.len();
            return stripped;
        }
        None
    }

    /// Adds a finding for each cap the prompt is over.
    fn check_caps(&self, report: &mut Report, bytes: u64, messages: u64) {
        for (what, limit, got) in [
            ("bytes", self.max_prompt_bytes, bytes),
            ("messages", self.max_messages, messages),
        ] {
            if let Some(limit) = limit.filter(|&limit| got > limit) {
                report.findings.push(Finding {
                    kind: FindingKind::TooLarge { what, limit, got },
                    pointer: None,
                });
            }
        }
    }

    /// Checks every segment `unknown` lets it scan; under [`Action::Strip`], removes hidden
    /// characters from the request.
    pub fn inspect(&self, request: &mut LlmRequest, unknown: UnknownPolicy) -> Report {
        let mut report = Report::default();
        let mut prompt_bytes = 0u64;
        let mut last_user: Option<usize> = None;
        for i in 0..request.segment_count() {
            let Some(segment) = request.segment(i) else {
                continue;
            };
            let Some(provenance) = Provenance::of(segment) else {
                continue;
            };
            if !unknown.scans(segment) {
                continue;
            }
            if provenance == Provenance::System
                && !self.allow_client_instructions
                && matches!(segment.role, Role::System | Role::Developer)
                && !report
                    .findings
                    .iter()
                    .any(|f| f.kind == FindingKind::ClientInstructions)
            {
                report.findings.push(Finding {
                    kind: FindingKind::ClientInstructions,
                    pointer: Some(segment.pointer(request)),
                });
            }
            if segment.role == Role::User
                && matches!(segment.source, Source::Message | Source::Prompt)
            {
                last_user = Some(i);
            }
            let Some(text) = request.text(i) else {
                continue;
            };
            prompt_bytes += text.len() as u64;
            let pointer = segment.pointer(request);
            if let Some(stripped) = self.inspect_one(provenance, text, Some(pointer), &mut report) {
                request.set_text(i, stripped);
            }
        }
        if let Some(allow) = &self.allow.0 {
            let allowed = last_user
                .and_then(|i| request.text(i))
                .is_some_and(|text| allow.is_match(text));
            if !allowed {
                report.findings.push(Finding {
                    kind: FindingKind::NotAllowed,
                    pointer: last_user
                        .and_then(|i| request.segment(i))
                        .map(|s| s.pointer(request)),
                });
            }
        }
        self.check_caps(&mut report, prompt_bytes, message_count(request.json()));
        report
    }
}

/// What an external classifier is asked about a request: the user's text (joined) and each
/// document, with where each sits, to point findings at.
pub(crate) struct ShieldQuestion {
    pub(crate) input: ShieldInput,
    pub(crate) user: Option<String>,
    pub(crate) documents: Vec<String>,
}

impl ShieldQuestion {
    pub(crate) fn of(request: &LlmRequest, unknown: UnknownPolicy) -> Self {
        let mut question = Self {
            input: ShieldInput::default(),
            user: None,
            documents: Vec::new(),
        };
        for (segment, text) in request.texts() {
            if !unknown.scans(segment) {
                continue;
            }
            match Provenance::of(segment) {
                Some(Provenance::User) => {
                    let prompt = &mut question.input.user_prompt;
                    if !prompt.is_empty() {
                        prompt.push('\n');
                    }
                    prompt.push_str(text);
                    question.user = Some(segment.pointer(request));
                }
                Some(Provenance::Document) => {
                    question.input.documents.push(capped(text).to_owned());
                    question.documents.push(segment.pointer(request));
                }
                _ => {}
            }
        }
        // The end of a long conversation is what the model acts on: keep its last characters.
        let prompt = &question.input.user_prompt;
        let chars = prompt.chars().count();
        if chars > MAX_CHARS {
            let (at, _) = prompt
                .char_indices()
                .nth(chars - MAX_CHARS)
                .unwrap_or((0, ' '));
            question.input.user_prompt = prompt[at..].to_owned();
        }
        question
    }

    /// The findings of a verdict.
    pub(crate) fn findings(self, verdict: &ShieldVerdict) -> Vec<Finding> {
        let mut findings = Vec::new();
        if verdict.user_prompt {
            findings.push(Finding {
                kind: FindingKind::External,
                pointer: self.user,
            });
        }
        for (pointer, attack) in self.documents.into_iter().zip(&verdict.documents) {
            if *attack {
                findings.push(Finding {
                    kind: FindingKind::External,
                    pointer: Some(pointer),
                });
            }
        }
        findings
    }
}

/// The messages of a conversation: `messages` (chat, Anthropic) or `input` items (Responses).
fn message_count(json: &Value) -> u64 {
    ["messages", "input"]
        .iter()
        .find_map(|key| json.get(key).and_then(Value::as_array))
        .map_or(0, |items| items.len() as u64)
}
