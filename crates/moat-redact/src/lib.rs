//! PII and secrets never reach the provider, and users get their values back.
//!
//! [`Redactor`] finds personal data and secrets with byte-level ASCII patterns validated by
//! checksums ([`Entity`] lists them), replaces them with an [`Operator`] (by default `[EMAIL_1]`
//! placeholders kept in a per-request [`Vault`]), and restores the originals in the reply: in
//! plain text, in every string of a JSON document, and in streamed text through a
//! [`StreamRestorer`] that holds back only a tail that could still be a placeholder.
//!
//! ```
//! use moat_redact::{Entity, Redactor, StreamRestorer, Vault};
//!
//! let redactor = Redactor::new(&Entity::ALL);
//! let mut vault = Vault::new();
//! let prompt = redactor.redact_str("Email jane@example.com the card 4111 1111 1111 1111", &mut vault);
//! assert_eq!(prompt.text, "Email [EMAIL_1] the card [CARD_1]");
//!
//! // The model's reply streams back in pieces that split a placeholder.
//! let mut restorer = StreamRestorer::new();
//! let mut reply = restorer.push("Sent to [EMA", &vault);
//! reply += &restorer.push("IL_1].", &vault);
//! reply += &restorer.finish(&vault);
//! assert_eq!(reply, "Sent to jane@example.com.");
//! ```
//!
//! [`RedactLayer`] applies it to a service: every text segment of an OpenAI or Anthropic request
//! is redacted with a vault of its own, and JSON replies (tool-call arguments included, correctly
//! escaped) and streamed OpenAI chat and Anthropic replies are restored.

#![forbid(unsafe_code)]

mod cipher;
mod detect;
mod entity;
mod fake;
mod patterns;
mod redactor;
mod reply;
mod service;
mod session;
mod validate;

pub use cipher::{Cipher, InvalidKey};
pub use detect::{Detector, Finding, DEFAULT_THRESHOLD};
pub use entity::Entity;
pub use redactor::{Operator, Redacted, Redactor, StreamRestorer, Vault, MAX_VAULT_ENTRIES};
pub use reply::{StreamRedactor, MAX_CARRY};
pub use service::{Redact, RedactLayer, ResponseFuture, RestoreBody};
pub use session::{Sessions, SharedVault, CONVERSATION_HEADER, MAX_CONVERSATION_ID};
