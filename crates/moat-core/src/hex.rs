//! Lowercase hexadecimal, for digests, fingerprints and keys in logs and configuration.
//!
//! ```
//! use moat_core::hex::{decode_32, Hex};
//!
//! let digest = [0xab; 32];
//! let text = Hex(&digest).to_string();
//! assert_eq!(&text[..4], "abab");
//! assert_eq!(decode_32(&text), Some(digest));
//! assert_eq!(decode_32("not hex"), None);
//! ```

use std::fmt;

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Renders bytes as lowercase hexadecimal.
#[derive(Debug, Clone, Copy)]
pub struct Hex<'a>(pub &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|&b| {
            let pair = [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 15)]];
            f.write_str(std::str::from_utf8(&pair).expect("hex digits are ASCII"))
        })
    }
}

/// The 32 bytes that 64 hexadecimal digits (either case) spell, e.g. a SHA-256.
pub fn decode_32(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0; 32];
    for (byte, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}
