//! What to do with what the classifier finds: thresholds and actions per category, and how
//! streamed replies are held.

use std::sync::Arc;

use crate::category::{Category, Scores};
use crate::lexicon::Lexicon;
use crate::model::Model;

/// What a flagged category does to the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum Action {
    /// Withheld: a streamed reply ends there with the client protocol's content-filter ending;
    /// a whole reply is replaced by the policy's message.
    #[default]
    Block,
    /// The offending words are masked (`*` per character) and the rest passes. A category
    /// flagged by the model alone has no words to mask: it blocks.
    Mask,
    /// Passes, recorded as a decision and counted.
    Flag,
    /// Passes, recorded as what would have been done (a dry run of [`Action::Block`]).
    Shadow,
}

impl Action {
    /// Its name in configuration and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Block => "block",
            Self::Mask => "mask",
            Self::Flag => "flag",
            Self::Shadow => "shadow",
        }
    }
}

/// How a streamed reply is held while it is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum StreamMode {
    /// Text goes out as soon as nothing could still complete a match: only the word being
    /// written, a run of spaced-out letters, or a phrase under way are held (a few bytes,
    /// at most [`MAX_HOLD`](crate::MAX_HOLD)). Nothing is scanned twice.
    #[default]
    HoldBack,
    /// The whole reply is held and checked before any of it goes out (up to
    /// [`MAX_BUFFERED`](crate::MAX_BUFFERED) bytes per text, then as
    /// [`HoldBack`](StreamMode::HoldBack)).
    Buffered,
    /// Text goes out as it comes and is checked as it goes: a block cuts the stream at the word
    /// that decided it, so up to that word (and a phrase under way) reaches the client; masks
    /// cannot be applied to what was sent, so they block.
    StreamFirst,
}

/// The local classifier: a [`Lexicon`] and an optional learned [`Model`].
#[derive(Debug, Clone)]
pub struct Classifier {
    pub(crate) lexicon: Arc<Lexicon>,
    pub(crate) model: Option<Arc<Model>>,
    pub(crate) model_category: Category,
}

impl Default for Classifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Classifier {
    /// The built-in lexicon and the shipped model, which scores `harassment`.
    pub fn new() -> Self {
        static BUILT_IN: std::sync::LazyLock<Arc<Lexicon>> =
            std::sync::LazyLock::new(|| Arc::new(Lexicon::built_in()));
        static SHIPPED: std::sync::LazyLock<Arc<Model>> =
            std::sync::LazyLock::new(|| Arc::new(Model::shipped().clone()));
        Self {
            lexicon: BUILT_IN.clone(),
            model: Some(SHIPPED.clone()),
            model_category: Category::Harassment,
        }
    }

    /// Uses `lexicon` instead (e.g. the built-in one with your words added).
    pub fn lexicon(mut self, lexicon: Lexicon) -> Self {
        self.lexicon = Arc::new(lexicon);
        self
    }

    /// Uses `model` (or none) instead of the shipped one, scoring `category` alone (past its
    /// [margin](Model::margin)) and confirming the mild lexicon words in its window (at its
    /// threshold).
    pub fn model(mut self, model: Option<Model>, category: Category) -> Self {
        self.model = model.map(Arc::new);
        self.model_category = category;
        self
    }

    /// The scores of a whole text.
    pub fn scores(&self, text: &str) -> Scores {
        let policy = Policy::new().classifier(self.clone()).action(Action::Flag);
        let mut scan = crate::scan::Scan::new(StreamMode::HoldBack);
        scan.push(text, &policy);
        scan.finish(&policy);
        scan.scores()
    }
}

/// Thresholds and actions per category, the stream mode, and the message a blocked reply is
/// replaced by.
#[derive(Debug, Clone)]
pub struct Policy {
    pub(crate) classifier: Classifier,
    thresholds: [f32; 13],
    actions: [Action; 13],
    pub(crate) stream_mode: StreamMode,
    pub(crate) message: String,
}

impl Default for Policy {
    fn default() -> Self {
        Self::new()
    }
}

/// The default threshold of every category.
pub const DEFAULT_THRESHOLD: f32 = 0.5;

/// The default message a blocked whole reply is replaced by.
pub const DEFAULT_MESSAGE: &str = "This reply was withheld by content moderation.";

impl Policy {
    /// Block at 0.5 in every category, hold back, the local [`Classifier`].
    pub fn new() -> Self {
        Self {
            classifier: Classifier::new(),
            thresholds: [DEFAULT_THRESHOLD; 13],
            actions: [Action::Block; 13],
            stream_mode: StreamMode::HoldBack,
            message: DEFAULT_MESSAGE.to_owned(),
        }
    }

    /// Uses `classifier`.
    pub fn classifier(mut self, classifier: Classifier) -> Self {
        self.classifier = classifier;
        self
    }

    /// The action of every category (per-category actions set later override it).
    pub fn action(mut self, action: Action) -> Self {
        self.actions = [action; 13];
        self
    }

    /// The action of one category.
    pub fn action_for(mut self, category: Category, action: Action) -> Self {
        self.actions[category.index()] = action;
        self
    }

    /// The threshold of every category, 0 to 1 (lower is stricter).
    pub fn threshold(mut self, threshold: f32) -> Self {
        self.thresholds = [threshold.clamp(0.0, 1.0); 13];
        self
    }

    /// The threshold of one category, e.g. `sexual/minors` at 0.1.
    pub fn threshold_for(mut self, category: Category, threshold: f32) -> Self {
        self.thresholds[category.index()] = threshold.clamp(0.0, 1.0);
        self
    }

    /// How streamed replies are held.
    pub fn stream_mode(mut self, mode: StreamMode) -> Self {
        self.stream_mode = mode;
        self
    }

    /// What a blocked whole reply says instead.
    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// The threshold of `category`.
    pub fn threshold_of(&self, category: Category) -> f32 {
        self.thresholds[category.index()]
    }

    /// The action of `category`.
    pub fn action_of(&self, category: Category) -> Action {
        self.actions[category.index()]
    }

    /// The categories `scores` flags.
    pub fn flagged<'a>(&'a self, scores: &'a Scores) -> impl Iterator<Item = Category> + 'a {
        scores
            .iter()
            .filter(|&(c, s)| s > 0.0 && s >= self.threshold_of(c))
            .map(|(c, _)| c)
    }
}
