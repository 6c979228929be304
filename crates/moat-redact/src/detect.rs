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

fn pesel(b: &[u8]) -> bool {
    let d = digits(b);
    if d.len() != 11 {
        return false;
    }
    let weights = [1u32, 3, 7, 9, 1, 3, 7, 9, 1, 3];
    let sum: u32 = d[..10]
        .iter()
        .zip(weights)
        .map(|(&x, w)| u32::from(x) * w)
        .sum();
    let month = u32::from(d[2]) * 10 + u32::from(d[3]);
    let day = u32::from(d[4]) * 10 + u32::from(d[5]);
    (10 - sum % 10) % 10 == u32::from(d[10])
        && (1..=12).contains(&(month % 20))
        && (1..=31).contains(&day)
}

fn dni(b: &[u8]) -> bool {
    const LETTERS: &[u8; 23] = b"TRWAGMYFPDXBNJZSQVHLCKE";
    let s: Vec<u8> = b
        .iter()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(u8::to_ascii_uppercase)
        .collect();
    let Some((&letter, body)) = s.split_last() else {
        return false;
    };
    let mut number: u32 = match body.first() {
        Some(b'X') => 0,
        Some(b'Y') => 1,
        Some(b'Z') => 2,
        Some(c) if c.is_ascii_digit() => u32::from(c - b'0'),
        _ => return false,
    };
    for &c in &body[1..] {
        if !c.is_ascii_digit() {
            return false;
        }
        number = number * 10 + u32::from(c - b'0');
    }
    LETTERS[(number % 23) as usize] == letter
}

fn nir(b: &[u8]) -> bool {
    let s: Vec<u8> = b
        .iter()
        .filter(|c| !c.is_ascii_whitespace())
        .map(u8::to_ascii_uppercase)
        .collect();
    if s.len() != 15 {
        return false;
    }
    let (body, key) = s.split_at(13);
    // Corsica's departments 2A and 2B count as 19 and 18.
    let mut n: u64 = 0;
    for (i, &c) in body.iter().enumerate() {
        let v = match c {
            b'0'..=b'9' => u64::from(c - b'0'),
            b'A' if i == 6 => 1,
            b'B' if i == 6 => 1,
            _ => return false,
        };
        n = n * 10 + v;
    }
    if body[6] == b'A' {
        n -= 1_000_000;
    } else if body[6] == b'B' {
        n -= 2_000_000;
    }
    let key: u64 = std::str::from_utf8(key)
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(u64::MAX);
    97 - n % 97 == key
}

fn verhoeff(d: &[u8]) -> bool {
    const D: [[u8; 10]; 10] = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        [1, 2, 3, 4, 0, 6, 7, 8, 9, 5],
        [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
        [3, 4, 0, 1, 2, 8, 9, 5, 6, 7],
        [4, 0, 1, 2, 3, 9, 5, 6, 7, 8],
        [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
        [6, 5, 9, 8, 7, 1, 0, 4, 3, 2],
        [7, 6, 5, 9, 8, 2, 1, 0, 4, 3],
        [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
        [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
    ];
    const P: [[u8; 10]; 8] = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        [1, 5, 7, 6, 2, 8, 3, 0, 9, 4],
        [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
        [8, 9, 1, 6, 0, 4, 3, 5, 2, 7],
        [9, 4, 5, 3, 1, 2, 6, 8, 7, 0],
        [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
        [2, 7, 9, 3, 8, 0, 6, 4, 1, 5],
        [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
    ];
    d.iter().rev().enumerate().fold(0u8, |c, (i, &x)| {
        D[c as usize][P[i % 8][x as usize] as usize]
    }) == 0
}

fn aadhaar(b: &[u8]) -> bool {
    let d = digits(b);
    d.len() == 12 && d[0] >= 2 && verhoeff(&d)
}

fn cpf(b: &[u8]) -> bool {
    let d = digits(b);
    if d.len() != 11 || d.iter().all(|&x| x == d[0]) {
        return false;
    }
    let check = |n: usize| {
        let sum: u32 = d[..n]
            .iter()
            .enumerate()
            .map(|(i, &x)| u32::from(x) * (n as u32 + 1 - i as u32))
            .sum();
        let r = sum % 11;
        if r < 2 {
            0
        } else {
            11 - r
        }
    };
    check(9) == u32::from(d[9]) && check(10) == u32::from(d[10])
}

fn sin(b: &[u8]) -> bool {
    let d = digits(b);
    d.len() == 9 && d[0] != 8 && luhn(&d)
}

fn cn_id(b: &[u8]) -> bool {
    const W: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    if b.len() != 18 || !b[..17].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let sum: u32 = b[..17]
        .iter()
        .zip(W)
        .map(|(&c, w)| u32::from(c - b'0') * w)
        .sum();
    let month = u32::from(b[10] - b'0') * 10 + u32::from(b[11] - b'0');
    let day = u32::from(b[12] - b'0') * 10 + u32::from(b[13] - b'0');
    b"10X98765432"[(sum % 11) as usize] == b[17].to_ascii_uppercase()
        && (1..=12).contains(&month)
        && (1..=31).contains(&day)
}

fn de_tax(b: &[u8]) -> bool {
    let d = digits(b);
    if d.len() != 11 || d[0] == 0 {
        return false;
    }
    // In the first ten digits exactly one digit repeats (twice or three times).
    let mut counts = [0u8; 10];
    d[..10].iter().for_each(|&x| counts[x as usize] += 1);
    let repeated = counts.iter().filter(|&&c| c > 1).count();
    if repeated != 1 || counts.iter().any(|&c| c > 3) {
        return false;
    }
    let mut product = 10u32;
    for &x in &d[..10] {
        let mut sum = (u32::from(x) + product) % 10;
        if sum == 0 {
            sum = 10;
        }
        product = (sum * 2) % 11;
    }
    let check = (11 - product) % 10;
    check == u32::from(d[10])
}

fn fiscal_code(b: &[u8]) -> bool {
    const ODD: [u32; 26] = [
        1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6, 8, 12, 14, 16, 10, 22, 25, 24,
        23,
    ];
    if b.len() != 16 {
        return false;
    }
    let value = |i: usize, c: u8| -> Option<u32> {
        let (digit, letter) = match c {
            b'0'..=b'9' => (u32::from(c - b'0'), None),
            b'A'..=b'Z' => (u32::from(c - b'A'), Some(usize::from(c - b'A'))),
            _ => return None,
        };
        Some(if i % 2 == 0 {
            ODD[letter.unwrap_or(digit as usize)]
        } else {
            digit
        })
    };
    let mut sum = 0;
    for (i, &c) in b[..15].iter().enumerate() {
        match value(i, c.to_ascii_uppercase()) {
            Some(v) => sum += v,
            None => return false,
        }
    }
    u32::from(b[15].to_ascii_uppercase()) == u32::from(b'A') + sum % 26
}

fn nino(b: &[u8]) -> bool {
    let s: Vec<u8> = b
        .iter()
        .filter(|c| !c.is_ascii_whitespace())
        .map(u8::to_ascii_uppercase)
        .collect();
    !matches!(
        &s[..2],
        b"BG" | b"GB" | b"NK" | b"KN" | b"TN" | b"NT" | b"ZZ"
    )
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
                Entity::UkNino => (
                    r"(?-u)\b[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?[0-9]{2} ?[0-9]{2} ?[0-9]{2} ?[A-D]\b",
                    nino,
                    None,
                ),
                Entity::ItFiscalCode => (
                    r"(?-u)\b[A-Z]{6}[0-9LMNPQRSTUV]{2}[ABCDEHLMPRST][0-9LMNPQRSTUV]{2}[A-Z][0-9LMNPQRSTUV]{3}[A-Z]\b",
                    fiscal_code,
                    None,
                ),
                Entity::PlPesel => (r"(?-u)\b[0-9]{11}\b", pesel, None),
                Entity::EsDni => (r"(?-u)\b(?:[0-9]{8}|[XYZ][0-9]{7})-?[A-Z]\b", dni, None),
                Entity::FrNir => (
                    r"(?-u)\b[12] ?[0-9]{2} ?(?:0[1-9]|1[0-2]|[2-9][0-9]) ?(?:[0-9]{2}|2A|2B) ?[0-9]{3} ?[0-9]{3} ?[0-9]{2}\b",
                    nir,
                    None,
                ),
                Entity::InAadhaar => (r"(?-u)\b[2-9][0-9]{3} ?[0-9]{4} ?[0-9]{4}\b", aadhaar, None),
                Entity::BrCpf => (
                    r"(?-u)\b[0-9]{3}\.?[0-9]{3}\.?[0-9]{3}-?[0-9]{2}\b",
                    cpf,
                    None,
                ),
                Entity::CaSin => (r"(?-u)\b[0-9]{3}[ -]?[0-9]{3}[ -]?[0-9]{3}\b", sin, None),
                Entity::CnResidentId => (r"(?-u)\b[1-9][0-9]{16}[0-9Xx]\b", cn_id, None),
                Entity::DeTaxId => (r"(?-u)\b[1-9][0-9]{10}\b", de_tax, None),
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
}
