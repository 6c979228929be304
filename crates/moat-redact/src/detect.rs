//! Finding entities in text: byte-level ASCII patterns, then checksums.
//!
//! Patterns run on bytes with Unicode classes off (`(?-u)`), which keeps digit-heavy patterns
//! fast; text around them may be any UTF-8, and a match never splits a character because every
//! pattern matches ASCII only. Candidates are then validated: Luhn and brand ranges for cards,
//! mod-97 and country lengths for IBANs, issued ranges for SSNs, octets for IPv4.

use regex::bytes::Regex;

use crate::entity::Entity;

/// One entity found in a text, by byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    /// What was found.
    pub entity: Entity,
    /// Where it starts, in bytes.
    pub start: usize,
    /// Where it ends, in bytes.
    pub end: usize,
}

/// A pattern, its validator, and a byte every match contains.
type Spec = (&'static str, fn(&[u8]) -> bool, Option<u8>);

struct Pattern {
    entity: Entity,
    regex: Regex,
    /// Checks a candidate the pattern matched.
    valid: fn(&[u8]) -> bool,
    /// A byte every match contains, to skip texts that cannot match.
    needle: Option<u8>,
}

/// Finds the configured entities.
pub struct Detector {
    patterns: Vec<Pattern>,
}

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.patterns.iter().map(|p| p.entity))
            .finish()
    }
}

fn any(_: &[u8]) -> bool {
    true
}

fn digits(b: &[u8]) -> Vec<u8> {
    b.iter()
        .filter(|c| c.is_ascii_digit())
        .map(|c| c - b'0')
        .collect()
}

/// The Luhn checksum of a digit sequence.
pub(crate) fn luhn(d: &[u8]) -> bool {
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            let x = u32::from(x);
            if i % 2 == 1 {
                let y = x * 2;
                if y > 9 {
                    y - 9
                } else {
                    y
                }
            } else {
                x
            }
        })
        .sum();
    sum % 10 == 0
}

fn card(b: &[u8]) -> bool {
    let d = digits(b);
    let n = d.len();
    let prefix = |k: usize| d.iter().take(k).fold(0u32, |a, &x| a * 10 + u32::from(x));
    let brand = match d.first() {
        Some(4) => matches!(n, 13 | 16 | 19),                 // Visa
        Some(5) => n == 16 && (51..=55).contains(&prefix(2)), // Mastercard
        Some(2) => (2221..=2720).contains(&prefix(4)) && n == 16, // Mastercard 2-series
        Some(3) => {
            matches!(prefix(2), 34 | 37) && n == 15
                || (prefix(2) == 35 && (3528..=3589).contains(&prefix(4)) && (16..=19).contains(&n))
                || matches!(prefix(2), 36 | 38 | 39 | 30) && (14..=19).contains(&n)
        } // Amex, JCB, Diners
        Some(6) => {
            (prefix(4) == 6011
                || prefix(2) == 65
                || (644..=649).contains(&prefix(3))
                || (622_126..=622_925).contains(&prefix(6)))
                && (16..=19).contains(&n)
        } // Discover, UnionPay
        _ => false,
    };
    brand && luhn(&d)
}

/// IBAN lengths by country (the SWIFT registry's, for the countries most often seen).
fn iban_length(country: &[u8]) -> Option<usize> {
    Some(match country {
        b"AD" => 24,
        b"AE" => 23,
        b"AT" => 20,
        b"BE" => 16,
        b"BG" => 22,
        b"BH" => 22,
        b"BR" => 29,
        b"CH" => 21,
        b"CY" => 28,
        b"CZ" => 24,
        b"DE" => 22,
        b"DK" => 18,
        b"EE" => 20,
        b"ES" => 24,
        b"FI" => 18,
        b"FR" => 27,
        b"GB" => 22,
        b"GR" => 27,
        b"HR" => 21,
        b"HU" => 28,
        b"IE" => 22,
        b"IL" => 23,
        b"IS" => 26,
        b"IT" => 27,
        b"KW" => 30,
        b"LI" => 21,
        b"LT" => 20,
        b"LU" => 20,
        b"LV" => 21,
        b"MC" => 27,
        b"MT" => 31,
        b"NL" => 18,
        b"NO" => 15,
        b"PL" => 28,
        b"PT" => 25,
        b"QA" => 29,
        b"RO" => 24,
        b"SA" => 24,
        b"SE" => 24,
        b"SI" => 19,
        b"SK" => 24,
        b"SM" => 27,
        b"TR" => 26,
        b"UA" => 29,
        _ => return None,
    })
}

fn iban(b: &[u8]) -> bool {
    let s: Vec<u8> = b
        .iter()
        .filter(|c| !c.is_ascii_whitespace())
        .map(u8::to_ascii_uppercase)
        .collect();
    if s.len() < 15 || iban_length(&s[..2]) != Some(s.len()) {
        return false;
    }
    // Move the first four characters to the end, letters to numbers, then mod 97 piecewise.
    let mut rem: u32 = 0;
    for &c in s[4..].iter().chain(&s[..4]) {
        let v = match c {
            b'0'..=b'9' => u32::from(c - b'0'),
            b'A'..=b'Z' => u32::from(c - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

fn ssn(b: &[u8]) -> bool {
    let d = digits(b);
    if d.len() != 9 {
        return false;
    }
    let area = u32::from(d[0]) * 100 + u32::from(d[1]) * 10 + u32::from(d[2]);
    let group = u32::from(d[3]) * 10 + u32::from(d[4]);
    let serial = d[5..].iter().fold(0u32, |a, &x| a * 10 + u32::from(x));
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

fn ipv4(b: &[u8]) -> bool {
    let parts: Vec<&[u8]> = b.split(|&c| c == b'.').collect();
    parts.len() == 4
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 3
                && (p.len() == 1 || p[0] != b'0')
                && std::str::from_utf8(p)
                    .ok()
                    .and_then(|s| s.parse::<u16>().ok())
                    .is_some_and(|v| v <= 255)
        })
}

fn phone(b: &[u8]) -> bool {
    // E.164: at most 15 digits, at least 8 after the country code's + sign.
    let n = digits(b).len();
    (8..=15).contains(&n)
}

/// Checks what the patterns cannot see (no lookaround): an IPv4 address is not part of a longer
/// dotted number such as a version `1.2.3.4.5`.
fn context_ok(entity: Entity, text: &[u8], start: usize, end: usize) -> bool {
    if entity != Entity::IpAddress {
        return true;
    }
    let dotted_after =
        text.get(end) == Some(&b'.') && text.get(end + 1).is_some_and(u8::is_ascii_digit);
    let dotted_before = start >= 2 && text[start - 1] == b'.' && text[start - 2].is_ascii_digit();
    !dotted_after && !dotted_before
}

impl Detector {
    /// A detector for these entities.
    pub fn new(entities: &[Entity]) -> Self {
        let build = |entity: Entity| -> Pattern {
            let (pattern, valid, needle): Spec = match entity {
                Entity::Email => (
                    r"(?-u)\b[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}\b",
                    any,
                    Some(b'@'),
                ),
                Entity::Phone => (
                    r"(?-u)\+[1-9][0-9]{0,2}(?:[ .-]?\(?[0-9]{1,4}\)?){2,6}\b",
                    phone,
                    Some(b'+'),
                ),
                Entity::CreditCard => (r"(?-u)\b[0-9](?:[ -]?[0-9]){12,18}\b", card, None),
                Entity::Iban => (
                    r"(?-u)\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b",
                    iban,
                    None,
                ),
                Entity::UsSsn => (r"(?-u)\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b", ssn, Some(b'-')),
                Entity::IpAddress => (
                    r"(?-u)\b[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\b",
                    ipv4,
                    Some(b'.'),
                ),
                Entity::ApiKey => (
                    r"(?-u)\b(?:sk-ant-(?:api|admin)[0-9]{2}-[A-Za-z0-9_-]{80,120}|sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{32,200}|(?:AKIA|ASIA)[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{60,255}|xox[abposr]-[A-Za-z0-9-]{10,200}|(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{20,200}|AIza[0-9A-Za-z_-]{35})",
                    any,
                    None,
                ),
                Entity::Jwt => (
                    r"(?-u)\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
                    any,
                    Some(b'.'),
                ),
                Entity::PrivateKey => (
                    r"(?-u)-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z]+ )?PRIVATE KEY-----",
                    any,
                    Some(b'-'),
                ),
                Entity::UrlCredentials => (
                    r"(?-u)\b[a-z][a-z0-9+.-]{1,20}://[^\s:/@]{1,64}:[^\s@/]{1,128}@[A-Za-z0-9.-]+",
                    any,
                    Some(b'@'),
                ),
            };
            Pattern {
                entity,
                regex: Regex::new(pattern).expect("the built-in patterns compile"),
                valid,
                needle,
            }
        };
        let mut entities = entities.to_vec();
        entities.sort_unstable();
        entities.dedup();
        Self {
            patterns: entities.into_iter().map(build).collect(),
        }
    }

    /// Every entity found in `text`, in order, without overlaps (the earlier, then the longer,
    /// wins).
    pub fn find(&self, text: &str) -> Vec<Finding> {
        let bytes = text.as_bytes();
        let mut found: Vec<Finding> = Vec::new();
        for p in &self.patterns {
            if p.needle.is_some_and(|n| !bytes.contains(&n)) {
                continue;
            }
            for m in p.regex.find_iter(bytes) {
                if (p.valid)(m.as_bytes()) && context_ok(p.entity, bytes, m.start(), m.end()) {
                    found.push(Finding {
                        entity: p.entity,
                        start: m.start(),
                        end: m.end(),
                    });
                }
            }
        }
        found.sort_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
        let mut out: Vec<Finding> = Vec::with_capacity(found.len());
        for f in found {
            if out.last().is_none_or(|last| f.start >= last.end) {
                out.push(f);
            }
        }
        out
    }
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
}
