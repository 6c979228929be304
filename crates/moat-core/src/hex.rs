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
        // Spelled into a buffer and written 64 bytes at a time: a write per byte cost more
        // than the digits (a digest is one write).
        let mut text = [0; 128];
        for chunk in self.0.chunks(64) {
            for (pair, &b) in text.chunks_exact_mut(2).zip(chunk) {
                pair[0] = DIGITS[usize::from(b >> 4)];
                pair[1] = DIGITS[usize::from(b & 15)];
            }
            let digits = &text[..2 * chunk.len()];
            f.write_str(std::str::from_utf8(digits).expect("hex digits are ASCII"))?;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spells_every_byte_whatever_the_length() {
        let bytes: Vec<u8> = (0..=255).collect();
        for len in [0, 1, 31, 32, 63, 64, 65, 129, 256] {
            let text = Hex(&bytes[..len]).to_string();
            let each: String = bytes[..len].iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(text, each, "{len} bytes");
        }
    }
}
