//! Signed checkpoints: the chain's size and head hash, in the C2SP `tlog-checkpoint` body,
//! signed as a C2SP `signed-note` with Ed25519, so tools that read transparency-log checkpoints
//! (Go's `golang.org/x/mod/sumdb/note`, for one) read and verify these.
//!
//! ```text
//! moat-audit/prod-eu          <- origin
//! 1042                        <- records in the chain
//! 3q2+7w...=                  <- base64 of the last record's hash (the chain head)
//!
//! — moat-audit/prod-eu Ab12cd...=   <- key name, base64(key hash || Ed25519 signature)
//! ```
//!
//! Keys use the note format: `PRIVATE+KEY+<name>+<hash>+<base64>` to sign (kept in an
//! environment variable), `<name>+<hash>+<base64>` to verify. `moat-audit keygen NAME` makes a
//! pair. Unlike a Merkle-tree log the head is a hash chain's last link: it commits to every
//! record before it, and the verifier checks it by recomputing the chain up to `size`.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use crate::chain::{digest, Head};

/// The note algorithm byte for Ed25519.
const ALG_ED25519: u8 = 1;

/// A key problem, or a checkpoint that does not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The key text is not a note key.
    BadKey(&'static str),
    /// The note is not a checkpoint.
    Malformed(&'static str),
    /// No signature by a known key verifies.
    Unverified,
}

impl fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadKey(why) => write!(f, "invalid key: {why}"),
            Self::Malformed(why) => write!(f, "malformed checkpoint: {why}"),
            Self::Unverified => f.write_str("no signature by a known key verifies"),
        }
    }
}

impl std::error::Error for CheckpointError {}

fn key_hash(name: &str, public: &[u8]) -> u32 {
    let mut input = Vec::with_capacity(name.len() + 34);
    input.extend_from_slice(name.as_bytes());
    input.push(b'\n');
    input.push(ALG_ED25519);
    input.extend_from_slice(public);
    let d = digest(&input);
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('+')
        && !name.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Signs checkpoints with an Ed25519 key.
pub struct Signer {
    name: String,
    hash: u32,
    pair: Ed25519KeyPair,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("name", &self.name)
            .field("verifier", &self.verifier_key())
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A new random key named `name`, and its private key text (to keep secret).
    pub fn generate(name: &str) -> Result<(Self, String), CheckpointError> {
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| CheckpointError::BadKey("no system randomness"))?;
        let signer = Self::from_seed(name, &seed)?;
        let mut key = vec![ALG_ED25519];
        key.extend_from_slice(&seed);
        let text = format!("PRIVATE+KEY+{name}+{:08x}+{}", signer.hash, B64.encode(key));
        Ok((signer, text))
    }

    fn from_seed(name: &str, seed: &[u8]) -> Result<Self, CheckpointError> {
        if !valid_name(name) {
            return Err(CheckpointError::BadKey(
                "the name is empty or has '+', spaces or controls",
            ));
        }
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| CheckpointError::BadKey("not an Ed25519 seed"))?;
        Ok(Self {
            name: name.to_owned(),
            hash: key_hash(name, pair.public_key().as_ref()),
            pair,
        })
    }

    /// The key's name (the signature line names it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key that verifies this signer's checkpoints: `<name>+<hash>+<base64>`.
    pub fn verifier_key(&self) -> String {
        let mut key = vec![ALG_ED25519];
        key.extend_from_slice(self.pair.public_key().as_ref());
        format!("{}+{:08x}+{}", self.name, self.hash, B64.encode(key))
    }

    /// The signed note of `checkpoint`.
    pub fn sign(&self, checkpoint: &Checkpoint) -> String {
        let text = checkpoint.text();
        let signature = self.pair.sign(text.as_bytes());
        let mut blob = self.hash.to_be_bytes().to_vec();
        blob.extend_from_slice(signature.as_ref());
        format!("{text}\n\u{2014} {} {}\n", self.name, B64.encode(blob))
    }
}

impl FromStr for Signer {
    type Err = CheckpointError;

    /// Reads `PRIVATE+KEY+<name>+<hash>+<base64(1 || seed)>`.
    fn from_str(text: &str) -> Result<Self, CheckpointError> {
        let rest = text
            .trim()
            .strip_prefix("PRIVATE+KEY+")
            .ok_or(CheckpointError::BadKey(
                "a signing key starts with PRIVATE+KEY+",
            ))?;
        let (name, hash, key) = split_key(rest)?;
        let key = B64
            .decode(key)
            .map_err(|_| CheckpointError::BadKey("the key is not base64"))?;
        match key.split_first() {
            Some((&ALG_ED25519, seed)) if seed.len() == 32 => {
                let signer = Self::from_seed(name, seed)?;
                if signer.hash != hash {
                    return Err(CheckpointError::BadKey(
                        "the key hash does not match the key",
                    ));
                }
                Ok(signer)
            }
            _ => Err(CheckpointError::BadKey("not an Ed25519 key")),
        }
    }
}

fn split_key(text: &str) -> Result<(&str, u32, &str), CheckpointError> {
    let mut parts = text.splitn(3, '+');
    let (Some(name), Some(hash), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(CheckpointError::BadKey("expected <name>+<hash>+<key>"));
    };
    let hash = u32::from_str_radix(hash, 16)
        .ok()
        .filter(|_| hash.len() == 8)
        .ok_or(CheckpointError::BadKey("the key hash is not 8 hex digits"))?;
    if !valid_name(name) {
        return Err(CheckpointError::BadKey("bad key name"));
    }
    Ok((name, hash, key))
}

/// A key that verifies checkpoints: `<name>+<hash>+<base64(1 || public key)>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierKey {
    name: String,
    hash: u32,
    public: Vec<u8>,
}

impl VerifierKey {
    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl FromStr for VerifierKey {
    type Err = CheckpointError;

    fn from_str(text: &str) -> Result<Self, CheckpointError> {
        let (name, hash, key) = split_key(text.trim())?;
        let key = B64
            .decode(key)
            .map_err(|_| CheckpointError::BadKey("the key is not base64"))?;
        match key.split_first() {
            Some((&ALG_ED25519, public)) if public.len() == 32 => {
                if key_hash(name, public) != hash {
                    return Err(CheckpointError::BadKey(
                        "the key hash does not match the key",
                    ));
                }
                Ok(Self {
                    name: name.to_owned(),
                    hash,
                    public: public.to_vec(),
                })
            }
            _ => Err(CheckpointError::BadKey("not an Ed25519 key")),
        }
    }
}

/// What a checkpoint commits to: the log's origin, how many records and the last one's hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's name, e.g. `moat-audit/prod-eu`.
    pub origin: String,
    /// Records in the chain.
    pub size: u64,
    /// The hash of record `size - 1` (32 zero bytes when empty).
    pub hash: [u8; 32],
}

impl Checkpoint {
    /// The checkpoint of a chain at `head`.
    pub fn at(origin: &str, head: Head) -> Self {
        Self {
            origin: origin.to_owned(),
            size: head.next_seq,
            hash: head.hash,
        }
    }

    /// The note text that is signed.
    pub fn text(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.hash)
        )
    }

    /// Reads a signed note and checks that a signature by one of `keys` verifies.
    pub fn open(note: &str, keys: &[VerifierKey]) -> Result<Self, CheckpointError> {
        let split = note.rfind("\n\n").ok_or(CheckpointError::Malformed(
            "no blank line before the signatures",
        ))?;
        let (text, signatures) = (&note[..=split], &note[split + 2..]);
        let checkpoint = Self::parse(text)?;
        for line in signatures.lines() {
            let Some(rest) = line.strip_prefix("\u{2014} ") else {
                return Err(CheckpointError::Malformed(
                    "a signature line starts with an em dash",
                ));
            };
            let Some((name, blob)) = rest.split_once(' ') else {
                return Err(CheckpointError::Malformed(
                    "a signature line is '— <name> <base64>'",
                ));
            };
            let Ok(blob) = B64.decode(blob) else {
                return Err(CheckpointError::Malformed("a signature is not base64"));
            };
            if blob.len() != 68 {
                continue;
            }
            let hash = u32::from_be_bytes([blob[0], blob[1], blob[2], blob[3]]);
            let verified = keys.iter().any(|k| {
                k.name == name
                    && k.hash == hash
                    && UnparsedPublicKey::new(&ED25519, &k.public)
                        .verify(text.as_bytes(), &blob[4..])
                        .is_ok()
            });
            if verified {
                return Ok(checkpoint);
            }
        }
        Err(CheckpointError::Unverified)
    }

    fn parse(text: &str) -> Result<Self, CheckpointError> {
        let mut lines = text.lines();
        let (Some(origin), Some(size), Some(hash)) = (lines.next(), lines.next(), lines.next())
        else {
            return Err(CheckpointError::Malformed(
                "expected origin, size and hash lines",
            ));
        };
        let size = size
            .parse()
            .map_err(|_| CheckpointError::Malformed("the size is not a number"))?;
        let hash = B64
            .decode(hash)
            .ok()
            .and_then(|h| <[u8; 32]>::try_from(h).ok())
            .ok_or(CheckpointError::Malformed(
                "the hash is not 32 bytes of base64",
            ))?;
        Ok(Self {
            origin: origin.to_owned(),
            size,
            hash,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            origin: "moat-audit/test".into(),
            size: 42,
            hash: digest(b"head"),
        }
    }

    #[test]
    fn signs_and_verifies_with_keys_in_note_format() {
        let (signer, private) = Signer::generate("moat-audit/test").unwrap();
        assert!(private.starts_with("PRIVATE+KEY+moat-audit/test+"));
        let reread: Signer = private.parse().unwrap();
        assert_eq!(reread.verifier_key(), signer.verifier_key());
        let key: VerifierKey = signer.verifier_key().parse().unwrap();
        let note = signer.sign(&checkpoint());
        assert!(note.starts_with("moat-audit/test\n42\n"));
        assert_eq!(Checkpoint::open(&note, &[key]).unwrap(), checkpoint());
    }

    #[test]
    fn a_forged_or_edited_checkpoint_does_not_verify() {
        let (signer, _) = Signer::generate("audit").unwrap();
        let (other, _) = Signer::generate("audit").unwrap();
        let key: VerifierKey = signer.verifier_key().parse().unwrap();
        // Signed by another key of the same name.
        let forged = other.sign(&checkpoint());
        assert_eq!(
            Checkpoint::open(&forged, std::slice::from_ref(&key)),
            Err(CheckpointError::Unverified)
        );
        // The size edited after signing.
        let edited = signer.sign(&checkpoint()).replacen("\n42\n", "\n41\n", 1);
        assert_eq!(
            Checkpoint::open(&edited, &[key]),
            Err(CheckpointError::Unverified)
        );
    }

    #[test]
    fn rejects_malformed_keys() {
        assert!("PRIVATE+KEY+x+00000000+AQ==".parse::<Signer>().is_err());
        assert!("x+zz+AQ==".parse::<VerifierKey>().is_err());
        let (signer, _) = Signer::generate("a").unwrap();
        let wrong_hash = signer.verifier_key().replacen("+", "+0", 1);
        assert!(wrong_hash.parse::<VerifierKey>().is_err());
    }
}
