//! Realistic stand-ins: a fake value of the same kind and shape, the same for the same value.

use moat_core::identity::Fingerprinter;

use crate::entity::Entity;
use crate::validate::luhn;

const FIRST: [&str; 16] = [
    "alex", "sam", "maria", "jordan", "li", "noah", "emma", "lucas", "sofia", "omar", "anna",
    "david", "yuki", "ines", "marco", "lena",
];
const LAST: [&str; 16] = [
    "smith", "garcia", "muller", "rossi", "martin", "kowalski", "silva", "tanaka", "dubois",
    "jensen", "novak", "okafor", "patel", "chen", "costa", "weber",
];

/// A small deterministic generator seeded from the value's keyed hash.
struct Draw(u64, u64);

impl Draw {
    fn next(&mut self) -> u64 {
        // xorshift128+
        let (mut s1, s0) = (self.0, self.1);
        self.0 = s0;
        s1 ^= s1 << 23;
        self.1 = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26);
        self.1.wrapping_add(s0)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len() as u64) as usize]
    }
}

/// Every digit and letter replaced by a random one of its kind; separators and `keep` leading
/// characters stay.
fn same_shape(value: &str, keep: usize, draw: &mut Draw) -> String {
    value
        .chars()
        .enumerate()
        .map(|(i, c)| match c {
            _ if i < keep => c,
            '0'..='9' => char::from(b'0' + draw.below(10) as u8),
            'a'..='z' => char::from(b'a' + draw.below(26) as u8),
            'A'..='Z' => char::from(b'A' + draw.below(26) as u8),
            _ => c,
        })
        .collect()
}

/// How many leading characters say what kind of key or number it is (`sk-proj-`, `+44`, `GB`).
fn prefix_len(entity: Entity, value: &str) -> usize {
    match entity {
        Entity::ApiKey | Entity::Jwt => value
            .char_indices()
            .find(|&(_, c)| c == '-' || c == '_' || c == '.')
            .map_or(4, |(i, _)| i + 1)
            .min(8),
        Entity::Phone if value.starts_with('+') => 3,
        Entity::Iban | Entity::CryptoWallet => 2,
        _ => 0,
    }
}

/// A fake of `value`: realistic for the common kinds, the same shape for the rest.
pub(crate) fn fake(entity: Entity, value: &str, seed: &Fingerprinter) -> String {
    let mut input = entity.label().as_bytes().to_vec();
    input.push(0);
    input.extend_from_slice(value.as_bytes());
    let h = seed.fingerprint(&input);
    let b = h.as_bytes();
    let mut draw = Draw(
        u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
        u64::from_le_bytes(b[8..].try_into().expect("8 bytes")) | 1,
    );
    match entity {
        Entity::Email => format!(
            "{}.{}{}@example.{}",
            draw.pick(&FIRST),
            draw.pick(&LAST),
            draw.below(100),
            draw.pick(&["com", "org", "net"])
        ),
        Entity::Person => {
            let cap = |s: &str| {
                let mut c = s.chars();
                c.next()
                    .map(|f| f.to_uppercase().chain(c).collect::<String>())
                    .unwrap_or_default()
            };
            format!("{} {}", cap(draw.pick(&FIRST)), cap(draw.pick(&LAST)))
        }
        Entity::IpAddress if value.contains(':') => {
            format!("2001:db8::{:x}", draw.below(0xffff) + 1)
        }
        // The documentation ranges: never anyone's address.
        Entity::IpAddress => format!("192.0.2.{}", draw.below(254) + 1),
        Entity::CreditCard => {
            // A Visa test-range number of the same grouping, with a valid Luhn digit.
            let mut shaped: Vec<char> = same_shape(value, 0, &mut draw).chars().collect();
            let positions: Vec<usize> = (0..shaped.len())
                .filter(|&i| shaped[i].is_ascii_digit())
                .collect();
            for (n, &i) in positions.iter().enumerate() {
                if n < 6 {
                    shaped[i] = b"400000"[n] as char;
                }
            }
            let last = *positions.last().unwrap_or(&0);
            for check in '0'..='9' {
                shaped[last] = check;
                let digits: Vec<u8> = positions.iter().map(|&i| shaped[i] as u8 - b'0').collect();
                if luhn(&digits) {
                    break;
                }
            }
            shaped.into_iter().collect()
        }
        _ => same_shape(value, prefix_len(entity, value), &mut draw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::Detector;

    #[test]
    fn fakes_are_stable_realistic_and_of_the_same_kind() {
        let seed = Fingerprinter::new(b"seed");
        let email = fake(Entity::Email, "jane@corp.io", &seed);
        assert_eq!(email, fake(Entity::Email, "jane@corp.io", &seed));
        assert_ne!(email, fake(Entity::Email, "john@corp.io", &seed));
        assert!(email.contains("@example."), "{email}");
        let card = fake(Entity::CreditCard, "5555 5555 5555 4444", &seed);
        assert!(card.starts_with("4000 00") && card.len() == 19, "{card}");
        // The fakes are still found as what they are (a model reads them as such).
        let detector = Detector::new(&[Entity::Email, Entity::CreditCard, Entity::IpAddress]);
        for text in [email, card, fake(Entity::IpAddress, "10.1.2.3", &seed)] {
            assert_eq!(detector.find(&text).len(), 1, "{text}");
        }
        let key = fake(
            Entity::ApiKey,
            "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD",
            &seed,
        );
        assert!(key.starts_with("sk-") && key.len() == 48, "{key}");
        assert_eq!(
            fake(Entity::Person, "Jane Doe", &seed).split(' ').count(),
            2
        );
    }
}
