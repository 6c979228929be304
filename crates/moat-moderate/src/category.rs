//! OpenAI's moderation categories, and per-category scores.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A moderation category, named as OpenAI's moderation API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Category {
    /// `harassment`: harassing language towards any target (insults, abuse, profanity at someone).
    Harassment,
    /// `harassment/threatening`: harassment that also threatens violence or serious harm.
    HarassmentThreatening,
    /// `hate`: hate based on race, gender, ethnicity, religion, nationality, sexual orientation,
    /// disability or caste (slurs included).
    Hate,
    /// `hate/threatening`: hate that also threatens violence or serious harm.
    HateThreatening,
    /// `illicit`: advice or instruction on committing illicit acts.
    Illicit,
    /// `illicit/violent`: illicit advice that involves violence or weapons.
    IllicitViolent,
    /// `self-harm`: promoting, encouraging or depicting self-harm.
    SelfHarm,
    /// `self-harm/intent`: saying one is engaging, or intends to engage, in self-harm.
    SelfHarmIntent,
    /// `self-harm/instructions`: instructions or advice on committing self-harm.
    SelfHarmInstructions,
    /// `sexual`: content meant to arouse sexual excitement.
    Sexual,
    /// `sexual/minors`: sexual content that involves anyone under 18.
    SexualMinors,
    /// `violence`: content depicting death, violence or physical injury.
    Violence,
    /// `violence/graphic`: such content in graphic detail.
    ViolenceGraphic,
}

impl Category {
    /// Every category, in OpenAI's order.
    pub const ALL: [Self; 13] = [
        Self::Harassment,
        Self::HarassmentThreatening,
        Self::Hate,
        Self::HateThreatening,
        Self::Illicit,
        Self::IllicitViolent,
        Self::SelfHarm,
        Self::SelfHarmIntent,
        Self::SelfHarmInstructions,
        Self::Sexual,
        Self::SexualMinors,
        Self::Violence,
        Self::ViolenceGraphic,
    ];

    /// Its name in OpenAI's API, e.g. `harassment/threatening`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Harassment => "harassment",
            Self::HarassmentThreatening => "harassment/threatening",
            Self::Hate => "hate",
            Self::HateThreatening => "hate/threatening",
            Self::Illicit => "illicit",
            Self::IllicitViolent => "illicit/violent",
            Self::SelfHarm => "self-harm",
            Self::SelfHarmIntent => "self-harm/intent",
            Self::SelfHarmInstructions => "self-harm/instructions",
            Self::Sexual => "sexual",
            Self::SexualMinors => "sexual/minors",
            Self::Violence => "violence",
            Self::ViolenceGraphic => "violence/graphic",
        }
    }

    /// Its position in [`Category::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The broader category it refines (`hate/threatening` → `hate`), if any.
    pub const fn parent(self) -> Option<Self> {
        match self {
            Self::HarassmentThreatening => Some(Self::Harassment),
            Self::HateThreatening => Some(Self::Hate),
            Self::IllicitViolent => Some(Self::Illicit),
            Self::SelfHarmIntent | Self::SelfHarmInstructions => Some(Self::SelfHarm),
            Self::SexualMinors => Some(Self::Sexual),
            Self::ViolenceGraphic => Some(Self::Violence),
            _ => None,
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not one of OpenAI's moderation categories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownCategory(pub String);

impl fmt::Display for UnknownCategory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown moderation category {:?} (expected one of: {})",
            self.0,
            Category::ALL.map(Category::as_str).join(", ")
        )
    }
}

impl std::error::Error for UnknownCategory {}

impl FromStr for Category {
    type Err = UnknownCategory;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // OpenAI's own spellings; its API also sends `self_harm`-style keys in some SDKs.
        let wanted = s.trim().to_ascii_lowercase().replace('_', "-");
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == wanted)
            .ok_or_else(|| UnknownCategory(s.to_owned()))
    }
}

impl Serialize for Category {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Category {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// A score from 0 to 1 per category.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Scores([f32; 13]);

impl Scores {
    /// Every category at 0.
    pub const fn zero() -> Self {
        Self([0.0; 13])
    }

    /// The score of `category`.
    pub fn get(&self, category: Category) -> f32 {
        self.0[category.index()]
    }

    /// Raises `category` to `score` (scores only grow).
    pub fn raise(&mut self, category: Category, score: f32) {
        let slot = &mut self.0[category.index()];
        *slot = slot.max(score.clamp(0.0, 1.0));
    }

    /// Raises every category to the other's score.
    pub fn merge(&mut self, other: &Self) {
        for c in Category::ALL {
            self.raise(c, other.get(c));
        }
    }

    /// Each category with its score.
    pub fn iter(&self) -> impl Iterator<Item = (Category, f32)> + '_ {
        Category::ALL.into_iter().map(|c| (c, self.get(c)))
    }

    /// The highest-scoring category, and its score.
    pub fn top(&self) -> (Category, f32) {
        self.iter()
            .fold((Category::Harassment, 0.0), |best, (c, s)| {
                if s > best.1 {
                    (c, s)
                } else {
                    best
                }
            })
    }
}

/// The result of one input, in the shape of OpenAI's moderation API (`results[i]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModerationResult {
    /// Whether any category was flagged.
    pub flagged: bool,
    /// Per category: flagged or not.
    pub categories: std::collections::BTreeMap<Category, bool>,
    /// Per category: the score.
    pub category_scores: std::collections::BTreeMap<Category, f32>,
}

impl ModerationResult {
    /// The result for `scores`, a category flagged when its score reaches `threshold(category)`.
    pub fn new(scores: &Scores, threshold: impl Fn(Category) -> f32) -> Self {
        let categories: std::collections::BTreeMap<Category, bool> =
            scores.iter().map(|(c, s)| (c, s >= threshold(c))).collect();
        Self {
            flagged: categories.values().any(|&f| f),
            categories,
            category_scores: scores.iter().collect(),
        }
    }

    /// The scores, read back (categories the result does not name score 0).
    pub fn scores(&self) -> Scores {
        let mut scores = Scores::zero();
        for (&c, &s) in &self.category_scores {
            scores.raise(c, s);
        }
        // A result that flags without a score (some compatible servers): count it as certain.
        for (&c, &flagged) in &self.categories {
            if flagged && scores.get(c) == 0.0 {
                scores.raise(c, 1.0);
            }
        }
        scores
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_say_what_is_expected() {
        for c in Category::ALL {
            assert_eq!(c.as_str().parse::<Category>().unwrap(), c);
            assert_eq!(Category::ALL[c.index()], c);
        }
        assert_eq!(
            "self_harm/intent".parse::<Category>().unwrap(),
            Category::SelfHarmIntent
        );
        let err = "gore".parse::<Category>().unwrap_err().to_string();
        assert!(
            err.contains("\"gore\"") && err.contains("violence/graphic"),
            "{err}"
        );
    }

    #[test]
    fn results_serialize_as_openai_does() {
        let mut scores = Scores::zero();
        scores.raise(Category::Hate, 0.9);
        let result = ModerationResult::new(&scores, |_| 0.5);
        let json = serde_json::to_value(&result).unwrap();
        assert_eq!(json["flagged"], true);
        assert_eq!(json["categories"]["hate"], true);
        assert_eq!(json["categories"]["self-harm/intent"], false);
        assert!((json["category_scores"]["hate"].as_f64().unwrap() - 0.9).abs() < 1e-6);
        let back: ModerationResult = serde_json::from_value(json).unwrap();
        assert_eq!(back.scores().get(Category::Hate), 0.9);
    }
}
