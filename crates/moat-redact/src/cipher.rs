//! [`Cipher`]: values replaced by AES-256-GCM tokens that whoever holds the key can open.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use moat_core::identity::Fingerprinter;

use crate::entity::Entity;

/// Encrypts values into `[EMAIL:…]` tokens with AES-256-GCM, and opens them again.
///
/// The nonce is derived from the value (HMAC-SHA256 under a key derived from the cipher key),
/// so the same value always gives the same token: a model sees one token per person, as with
/// placeholders, and equal tokens reveal only that the values are equal. The entity label is
/// authenticated with the value, so a token cannot be passed off as another kind.
///
/// ```
/// use moat_redact::{Cipher, Entity, Operator, Redactor, Vault};
///
/// let cipher = Cipher::new(&[7; 32]);
/// let redactor = Redactor::new(&[Entity::Email]).with_operator(Operator::Encrypt(cipher.clone()));
/// let out = redactor.redact_str("mail jane@example.com", &mut Vault::new());
/// assert!(out.text.starts_with("mail [EMAIL:"));
/// // Whoever holds the key gets the value back, here or in a log months later.
/// assert_eq!(cipher.decrypt_str(&out.text), "mail jane@example.com");
/// ```
#[derive(Clone)]
pub struct Cipher {
    inner: Arc<Keys>,
}

struct Keys {
    aead: Aes256Gcm,
    nonces: Fingerprinter,
}

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cipher { .. }")
    }
}

/// A key that is not 32 bytes of base64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidKey;

impl fmt::Display for InvalidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an encryption key must be 32 bytes, base64-encoded")
    }
}

impl std::error::Error for InvalidKey {}

impl Cipher {
    /// A cipher with this 256-bit key.
    pub fn new(key: &[u8; 32]) -> Self {
        let mut nonce_key = b"moat-redact nonce key:".to_vec();
        nonce_key.extend_from_slice(key);
        Self {
            inner: Arc::new(Keys {
                aead: Aes256Gcm::new(key.into()),
                nonces: Fingerprinter::new(&nonce_key),
            }),
        }
    }

    /// A cipher with a key given as base64 (standard or URL-safe, padded or not), e.g. from an
    /// environment variable filled with `openssl rand -base64 32`.
    pub fn from_base64(key: &str) -> Result<Self, InvalidKey> {
        let key = key.trim();
        let bytes = [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::STANDARD_NO_PAD,
        ]
        .iter()
        .find_map(|e| e.decode(key).ok())
        .or_else(|| URL_SAFE_NO_PAD.decode(key.trim_end_matches('=')).ok())
        .ok_or(InvalidKey)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| InvalidKey)?;
        Ok(Self::new(&key))
    }

    /// The token for a value: `[LABEL:base64url(nonce ‖ ciphertext ‖ tag)]`.
    pub(crate) fn seal(&self, entity: Entity, value: &str) -> String {
        let label = entity.label();
        let mut input = label.as_bytes().to_vec();
        input.push(0);
        input.extend_from_slice(value.as_bytes());
        let nonce_bytes = self.inner.nonces.fingerprint(&input);
        let nonce = Nonce::from_slice(&nonce_bytes.as_bytes()[..12]);
        let sealed = self
            .inner
            .aead
            .encrypt(
                nonce,
                Payload {
                    msg: value.as_bytes(),
                    aad: label.as_bytes(),
                },
            )
            .expect("AES-GCM encrypts any value shorter than 64 GiB");
        let mut raw = nonce.to_vec();
        raw.extend_from_slice(&sealed);
        format!("[{label}:{}]", URL_SAFE_NO_PAD.encode(raw))
    }

    /// The value inside one token, if this key made it.
    pub fn decrypt(&self, token: &str) -> Option<String> {
        let inner = token.strip_prefix('[')?.strip_suffix(']')?;
        let (label, body) = inner.split_once(':')?;
        let raw = URL_SAFE_NO_PAD.decode(body).ok()?;
        if raw.len() < 12 + 16 {
            return None;
        }
        let (nonce, sealed) = raw.split_at(12);
        let plain = self
            .inner
            .aead
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: label.as_bytes(),
                },
            )
            .ok()?;
        String::from_utf8(plain).ok()
    }

    /// `text` with every token this key made replaced by its value; anything else is left as is.
    pub fn decrypt_str<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = String::new();
        let mut at = 0;
        let mut search = 0;
        while let Some(open) = text[search..].find('[').map(|i| search + i) {
            // A token holds no bracket: the next `[` or `]` decides, so the walk stays linear.
            let Some(next) = text[open + 1..].find(['[', ']']).map(|i| open + 1 + i) else {
                break;
            };
            if text.as_bytes()[next] == b'[' {
                search = next;
                continue;
            }
            let close = next;
            match self.decrypt(&text[open..=close]) {
                Some(value) => {
                    out.push_str(&text[at..open]);
                    out.push_str(&value);
                    at = close + 1;
                    search = at;
                }
                None => search = open + 1,
            }
        }
        if at == 0 {
            return Cow::Borrowed(text);
        }
        out.push_str(&text[at..]);
        Cow::Owned(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_open_with_their_key_only() {
        let cipher = Cipher::new(&[1; 32]);
        let token = cipher.seal(Entity::Email, "jane@example.com");
        assert_eq!(token, cipher.seal(Entity::Email, "jane@example.com"));
        assert_ne!(token, cipher.seal(Entity::Email, "john@example.com"));
        assert_eq!(cipher.decrypt(&token).as_deref(), Some("jane@example.com"));
        assert_eq!(Cipher::new(&[2; 32]).decrypt(&token), None, "another key");
        // The label is authenticated: a token relabelled does not open.
        let relabelled = token.replacen("[EMAIL:", "[PHONE:", 1);
        assert_eq!(cipher.decrypt(&relabelled), None);
        // A flipped character does not open either.
        let mut tampered = token.clone().into_bytes();
        let i = tampered.len() - 3;
        tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            cipher.decrypt(std::str::from_utf8(&tampered).unwrap()),
            None
        );
        assert_eq!(
            cipher.decrypt_str(&format!("to {token} and [EMAIL_1] [x")),
            "to jane@example.com and [EMAIL_1] [x"
        );
    }

    #[test]
    fn keys_from_base64() {
        let b64 = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
        let a = Cipher::from_base64(&b64).unwrap();
        let token = Cipher::new(&[9; 32]).seal(Entity::Iban, "GB82WEST12345698765432");
        assert!(a.decrypt(&token).is_some());
        assert_eq!(Cipher::from_base64("c2hvcnQ=").unwrap_err(), InvalidKey);
        assert_eq!(Cipher::from_base64("not base64!").unwrap_err(), InvalidKey);
    }
}
