//! Checks on candidates the patterns found: checksums, ranges, shapes.
//!
//! Each takes the matched bytes (ASCII) and says whether they are what the pattern claims.

use sha2::{Digest, Sha256};

/// The digits of a candidate, as values 0-9, without allocating (candidates are short; past 32
/// digits the rest is dropped, which no validator accepts anyway).
pub(crate) struct Digits {
    buf: [u8; 32],
    len: usize,
}

impl std::ops::Deref for Digits {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

pub(crate) fn digits(b: &[u8]) -> Digits {
    let mut d = Digits {
        buf: [0; 32],
        len: 0,
    };
    for c in b.iter().filter(|c| c.is_ascii_digit()) {
        if d.len == d.buf.len() {
            break;
        }
        d.buf[d.len] = c - b'0';
        d.len += 1;
    }
    d
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

pub(crate) fn card(b: &[u8]) -> bool {
    let d = digits(b);
    let n = d.len();
    let prefix = |k: usize| d.iter().take(k).fold(0u32, |a, &x| a * 10 + u32::from(x));
    let maestro = (12..=19).contains(&n)
        && (matches!(prefix(2), 50 | 56..=58)
            || matches!(prefix(4), 6304 | 6759 | 6761..=6763 | 6390 | 604));
    let brand = match d.first() {
        Some(4) => matches!(n, 13 | 16 | 19),                 // Visa
        Some(5) => n == 16 && (51..=55).contains(&prefix(2)), // Mastercard
        Some(2) => {
            (2221..=2720).contains(&prefix(4)) && n == 16 // Mastercard 2-series
                || prefix(4) == 2131 && n == 15 // JCB
        }
        Some(1) => prefix(4) == 1800 && n == 15, // JCB
        Some(3) => {
            matches!(prefix(2), 34 | 37) && n == 15
                || (prefix(2) == 35 && (16..=19).contains(&n))
                || matches!(prefix(2), 36 | 38 | 39 | 30) && (14..=19).contains(&n)
        } // Amex, JCB, Diners
        Some(6) => {
            (prefix(4) == 6011 || matches!(prefix(2), 62 | 65) || (644..=649).contains(&prefix(3)))
                && (16..=19).contains(&n)
        } // Discover, UnionPay
        _ => false,
    };
    (brand || maestro) && luhn(&d)
}

/// IBAN lengths by country (the SWIFT registry's, for the countries most often seen).
pub(crate) fn iban_length(country: &[u8]) -> Option<usize> {
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

pub(crate) fn iban(b: &[u8]) -> bool {
    let b = &b[..iban_value(b).1];
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

/// The IBAN in a match: as many characters as its country's IBANs have, so a capital letter
/// after a space (`ES98...64 B`) is left out.
pub(crate) fn iban_value(b: &[u8]) -> (usize, usize) {
    let Some(length) = b.get(..2).and_then(iban_length) else {
        return (0, b.len());
    };
    let mut seen = 0;
    for (i, c) in b.iter().enumerate() {
        if !c.is_ascii_whitespace() {
            seen += 1;
            if seen == length {
                return (0, i + 1);
            }
        }
    }
    (0, b.len())
}

pub(crate) fn ssn(b: &[u8]) -> bool {
    let d = digits(b);
    if d.len() != 9 {
        return false;
    }
    let area = u32::from(d[0]) * 100 + u32::from(d[1]) * 10 + u32::from(d[2]);
    let group = u32::from(d[3]) * 10 + u32::from(d[4]);
    let serial = d[5..].iter().fold(0u32, |a, &x| a * 10 + u32::from(x));
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

pub(crate) fn ipv4(b: &[u8]) -> bool {
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

pub(crate) fn pesel(b: &[u8]) -> bool {
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

pub(crate) fn dni(b: &[u8]) -> bool {
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

pub(crate) fn nir(b: &[u8]) -> bool {
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
    // `2A` reads as 21 above; it counts as 19 (`2B` as 18).
    if body[6] == b'A' {
        n -= 2_000_000;
    } else if body[6] == b'B' {
        n -= 3_000_000;
    }
    let key: u64 = std::str::from_utf8(key)
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(u64::MAX);
    97 - n % 97 == key
}

pub(crate) fn verhoeff(d: &[u8]) -> bool {
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

pub(crate) fn aadhaar(b: &[u8]) -> bool {
    let d = digits(b);
    d.len() == 12 && d[0] >= 2 && verhoeff(&d)
}

pub(crate) fn cpf(b: &[u8]) -> bool {
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

pub(crate) fn sin(b: &[u8]) -> bool {
    let d = digits(b);
    d.len() == 9 && d[0] != 8 && luhn(&d)
}

pub(crate) fn cn_id(b: &[u8]) -> bool {
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

pub(crate) fn de_tax(b: &[u8]) -> bool {
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

pub(crate) fn fiscal_code(b: &[u8]) -> bool {
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

pub(crate) fn nino(b: &[u8]) -> bool {
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

/// A phone number in international form: `+` or `00`, a country code, 8 to 15 digits in all.
pub(crate) fn phone_international(b: &[u8]) -> bool {
    let number = strip_extension(b);
    let mut n = digits(number).len();
    if number.starts_with(b"00") {
        n -= 2;
    }
    (8..=15).contains(&n)
}

/// A phone number in a national form: 7 to 12 digits (the trunk `0` included), not a date.
pub(crate) fn phone_national(b: &[u8]) -> bool {
    (7..=12).contains(&digits(strip_extension(b)).len()) && !date(b)
}

/// Whether digits are grouped by separators or an area code in parentheses, as people write
/// phone numbers (a bare digit run is more often an order number).
pub(crate) fn phone_grouped(b: &[u8]) -> bool {
    strip_extension(b)
        .iter()
        .any(|c| matches!(c, b' ' | b'-' | b'.' | b'(' | b'/'))
}

fn strip_extension(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == b'x' || c == b'e') {
        Some(i) => &b[..i],
        None => b,
    }
}

/// An IPv6 address with at least five hex digits (so `a::b` in code is not one).
pub(crate) fn ipv6(b: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(b) else {
        return false;
    };
    s.parse::<std::net::Ipv6Addr>().is_ok()
        && (s.split(':').count() == 8 || b.iter().filter(|c| c.is_ascii_hexdigit()).count() >= 5)
}

/// A MAC address with one separator throughout.
pub(crate) fn mac(b: &[u8]) -> bool {
    let seps: Vec<u8> = b
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_hexdigit())
        .collect();
    seps.windows(2).all(|w| w[0] == w[1])
}

/// A Bitcoin address in base58 with a valid check (version byte 0 or 5).
pub(crate) fn base58check(b: &[u8]) -> bool {
    const ALPHABET: &[u8; 58] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    // Big-endian base-256 accumulator; 25 bytes for a P2PKH/P2SH address.
    let mut bytes = [0u8; 25];
    for &c in b {
        let Some(mut carry) = ALPHABET.iter().position(|&a| a == c) else {
            return false;
        };
        for byte in bytes.iter_mut().rev() {
            carry += usize::from(*byte) * 58;
            *byte = (carry & 0xff) as u8;
            carry >>= 8;
        }
        if carry != 0 {
            return false;
        }
    }
    let leading_ones = b.iter().take_while(|&&c| c == b'1').count();
    let leading_zeros = bytes.iter().take_while(|&&x| x == 0).count();
    if leading_ones != leading_zeros || !matches!(bytes[0], 0 | 5) {
        return false;
    }
    let check = Sha256::digest(Sha256::digest(&bytes[..21]));
    check[..4] == bytes[21..]
}

/// A bech32 or bech32m segwit address (`bc1...`) with a valid checksum.
pub(crate) fn bech32(b: &[u8]) -> bool {
    const CHARSET: &[u8; 32] = b"qpzry9x8gf2tvdw0s3jn54khce6mua7l";
    const GEN: [u32; 5] = [
        0x3b6a_57b2,
        0x2650_8e6d,
        0x1ea1_19fa,
        0x3d42_33dd,
        0x2a14_62b3,
    ];
    let lower: Vec<u8> = b.iter().map(u8::to_ascii_lowercase).collect();
    let Some(sep) = lower.iter().rposition(|&c| c == b'1') else {
        return false;
    };
    let (hrp, data) = (&lower[..sep], &lower[sep + 1..]);
    let mut values: Vec<u32> = hrp.iter().map(|&c| u32::from(c >> 5)).collect();
    values.push(0);
    values.extend(hrp.iter().map(|&c| u32::from(c & 31)));
    for &c in data {
        match CHARSET.iter().position(|&x| x == c) {
            Some(v) => values.push(v as u32),
            None => return false,
        }
    }
    let mut chk: u32 = 1;
    for v in values {
        let top = chk >> 25;
        chk = ((chk & 0x1ff_ffff) << 5) ^ v;
        for (i, g) in GEN.iter().enumerate() {
            if (top >> i) & 1 == 1 {
                chk ^= g;
            }
        }
    }
    // bech32 (witness v0) or bech32m (v1+).
    chk == 1 || chk == 0x2bc8_30a3
}

/// A calendar date: day-month-year, month-day-year or year-month-day, or with a month name.
pub(crate) fn date(b: &[u8]) -> bool {
    // Up to four numbers, without allocating; a fifth makes it no date.
    let mut numbers = [0u32; 4];
    let mut count = 0;
    for part in b.split(|c| !c.is_ascii_digit()).filter(|p| !p.is_empty()) {
        if count == numbers.len() {
            return false;
        }
        numbers[count] = part.iter().fold(0u32, |a, &c| {
            a.saturating_mul(10).saturating_add(u32::from(c - b'0'))
        });
        count += 1;
    }
    let numbers = &numbers[..count];
    let day_month = |d: u32, m: u32| (1..=31).contains(&d) && (1..=12).contains(&m);
    let year = |y: u32| (1900..=2099).contains(&y);
    let month_name = b.iter().any(u8::is_ascii_alphabetic);
    match *numbers {
        [y, m, d] if year(y) => day_month(d, m),
        [a, b, y] if year(y) => day_month(a, b) || day_month(b, a),
        // A month name and two numbers: a day and a year.
        [d, y] | [y, d] if month_name && year(y) => (1..=31).contains(&d),
        _ => false,
    }
}

/// A password value: not empty-looking, not a template or one of our placeholders.
pub(crate) fn password(b: &[u8]) -> bool {
    let v = value_after_keyword(b);
    let value = &b[v.0..v.1];
    value.len() >= 4
        && !matches!(value[0], b'[' | b'<' | b'{' | b'$' | b'%' | b'*')
        && !value.iter().all(|&c| c == value[0])
        && !value.eq_ignore_ascii_case(b"password")
        && !value.eq_ignore_ascii_case(b"null")
        && !value.eq_ignore_ascii_case(b"none")
}

/// A secret value: at least 16 characters, two of lowercase, uppercase and digits, and
/// random-looking (Shannon entropy of at least 3 bits per character).
pub(crate) fn secret(b: &[u8]) -> bool {
    let v = value_after_keyword(b);
    let value = &b[v.0..v.1];
    let classes = [
        value.iter().any(u8::is_ascii_lowercase),
        value.iter().any(u8::is_ascii_uppercase),
        value.iter().any(u8::is_ascii_digit),
    ];
    if value.len() < 16 || classes.iter().filter(|&&c| c).count() < 2 {
        return false;
    }
    let mut counts = [0u32; 256];
    value.iter().for_each(|&c| counts[usize::from(c)] += 1);
    let n = value.len() as f64;
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    entropy >= 3.0
}

/// Where the value after a keyword lies in a match such as `password = "hunter22` or
/// `Bearer abc`: the trailing run without spaces, quotes, `=` or `:` (base64 padding kept).
pub(crate) fn value_after_keyword(b: &[u8]) -> (usize, usize) {
    let end = b.len();
    let body_end = end - b.iter().rev().take_while(|&&c| c == b'=').count();
    let start = b[..body_end]
        .iter()
        .rposition(|&c| matches!(c, b' ' | b'\t' | b'"' | b'\'' | b'=' | b':'))
        .map_or(0, |i| i + 1);
    (start, end)
}
