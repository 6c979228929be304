//! The built-in patterns: what each entity looks like, how sure a match is, and the words that
//! make a weak match likely.
//!
//! All patterns are byte-level (`(?-u)`); they are compiled together into one automaton, so the
//! text is scanned once however many entities are on. A pattern matches ASCII, or whole UTF-8
//! sequences where a value may hold any character (passwords), so a match never splits one. Order matters: where
//! two patterns match at the same place, the earlier one is tried first.
//!
//! Scores follow Presidio's model: a pattern match has a base score, a failed checksum drops
//! it, and a context word shortly before it adds [`CONTEXT_BOOST`]. Shapes that ordinary numbers
//! also take (nine bare digits, a date) start below the default threshold of 0.5 and count only
//! with a context word.

use crate::entity::Entity;
use crate::validate::*;

/// What a context word adds to a score.
pub(crate) const CONTEXT_BOOST: f32 = 0.35;

/// How far before a match context words are looked for, in bytes.
pub(crate) const CONTEXT_WINDOW: usize = 64;

/// One pattern of an entity.
pub(crate) struct Spec {
    pub(crate) entity: Entity,
    /// The highest score `score` gives (before context): below the entity's threshold, the
    /// pattern counts only with a context word.
    pub(crate) best: f32,
    pub(crate) pattern: &'static str,
    /// The score of a match, or `None` when it fails its check.
    pub(crate) score: fn(&[u8]) -> Option<f32>,
    /// Where the value lies in the match (after a keyword, for passwords and secrets).
    pub(crate) value: fn(&[u8]) -> (usize, usize),
}

fn whole(b: &[u8]) -> (usize, usize) {
    (0, b.len())
}

fn when(valid: bool, score: f32) -> Option<f32> {
    valid.then_some(score)
}

/// `spec!(Entity, best score, pattern, score function[, value function])`.
macro_rules! spec {
    ($entity:ident, $best:expr, $pattern:expr, $score:expr) => {
        spec!($entity, $best, $pattern, $score, whole)
    };
    ($entity:ident, $best:expr, $pattern:expr, $score:expr, $value:expr) => {
        Spec {
            entity: Entity::$entity,
            best: $best,
            pattern: concat!("(?-u)", $pattern),
            score: $score,
            value: $value,
        }
    };
}

/// A phone number's trailing extension: `x123`, `ext. 123`.
macro_rules! ext {
    () => {
        r"(?: ?(?:x|ext\.?) ?[0-9]{1,5})?\b"
    };
}

/// Every pattern, most specific first.
pub(crate) static SPECS: &[Spec] = &[
    spec!(
        PrivateKey,
        1.0,
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----",
        |_| Some(1.0)
    ),
    // A block cut short (pasted without its end line): the key material that follows.
    spec!(
        PrivateKey,
        1.0,
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----(?:[A-Za-z0-9+/=\s:,-]|\\n)+",
        |_| Some(1.0)
    ),
    spec!(
        Jwt,
        0.95,
        r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
        |_| Some(0.95)
    ),
    spec!(
        ApiKey,
        0.95,
        r"\b(?:sk-ant-(?:api|admin|oat)[0-9]{2}-[A-Za-z0-9_-]{80,120}|sk-(?:proj-|svcacct-|admin-|or-v1-)?[A-Za-z0-9_-]{32,200}|(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{60,255}|glpat-[A-Za-z0-9_-]{20,}|xox[abposr]-[A-Za-z0-9-]{10,200}|xapp-[0-9]-[A-Za-z0-9-]{10,200}|(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{20,200}|whsec_[A-Za-z0-9]{24,}|AIza[0-9A-Za-z_-]{35}|ya29\.[0-9A-Za-z_-]{20,}|GOCSPX-[A-Za-z0-9_-]{28}|hf_[A-Za-z0-9]{30,}|npm_[A-Za-z0-9]{36}|gsk_[A-Za-z0-9]{48,}|SG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43})",
        |_| Some(0.95)
    ),
    spec!(
        ApiKey,
        0.95,
        r"https://hooks\.slack\.com/services/[A-Za-z0-9_/]{20,}",
        |_| Some(0.95)
    ),
    spec!(
        UrlCredentials,
        0.95,
        r"\b[a-z][a-z0-9+.-]{1,20}://(?:[^\s:/@\x80-\xFF]|[\xC0-\xFF][\x80-\xBF]+){1,64}:(?:[^\s@/\x80-\xFF]|[\xC0-\xFF][\x80-\xBF]+){1,128}@[A-Za-z0-9.-]+",
        |_| Some(0.95)
    ),
    spec!(
        Email,
        0.9,
        r"(?:\b[A-Za-z0-9._%+-]|[\xC0-\xFF][\x80-\xBF]+)(?:[A-Za-z0-9._%+-]|[\xC0-\xFF][\x80-\xBF]+){0,63}@(?:(?:[A-Za-z0-9-]|[\xC0-\xFF][\x80-\xBF]+){1,63}\.)+(?:xn--[A-Za-z0-9-]{1,59}\b|[A-Za-z]{2,24}\b|(?:[\xC0-\xFF][\x80-\xBF]+){1,24})",
        |_| Some(0.9)
    ),
    spec!(
        Iban,
        0.9,
        r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b",
        |b| when(iban(b), 0.9),
        iban_value
    ),
    spec!(CnResidentId, 0.85, r"\b[1-9][0-9]{16}[0-9Xx]\b", |b| when(
        cn_id(b),
        0.85
    )),
    // 12- and 13-digit numbers (Maestro, old Visa) are also EANs, Aadhaar numbers and order
    // numbers: they count with a context word.
    spec!(
        CreditCard,
        0.8,
        r"\b[0-9](?:[ -]?[0-9]){11,18}\b",
        |b| when(card(b), if digits(b).len() >= 14 { 0.8 } else { 0.45 })
    ),
    spec!(
        FrNir,
        0.8,
        r"\b[12] ?[0-9]{2} ?(?:0[1-9]|1[0-2]|[2-9][0-9]) ?(?:[0-9]{2}|2A|2B) ?[0-9]{3} ?[0-9]{3} ?[0-9]{2}\b",
        |b| when(nir(b), 0.8)
    ),
    spec!(
        ItFiscalCode,
        0.95,
        r"\b[A-Z]{6}[0-9LMNPQRSTUV]{2}[ABCDEHLMPRST][0-9LMNPQRSTUV]{2}[A-Z][0-9LMNPQRSTUV]{3}[A-Z]\b",
        |b| when(fiscal_code(b), 0.95)
    ),
    spec!(
        UkNino,
        0.6,
        r"\b[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?[0-9]{2} ?[0-9]{2} ?[0-9]{2} ?[A-D]\b",
        |b| when(nino(b), 0.6)
    ),
    spec!(
        BrCpf,
        0.9,
        r"\b[0-9]{3}\.[0-9]{3}\.[0-9]{3}-[0-9]{2}\b",
        |b| { when(cpf(b), 0.9) }
    ),
    spec!(EsDni, 0.7, r"\b(?:[0-9]{8}|[XYZ][0-9]{7})-?[A-Z]\b", |b| {
        when(dni(b), 0.7)
    }),
    spec!(
        MacAddress,
        0.7,
        r"\b(?:[0-9A-Fa-f]{2}(?:[:-][0-9A-Fa-f]{2}){5}|[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4})\b",
        |b| when(mac(b), 0.7)
    ),
    // IPv6: full, compressed in the middle, at the end, at the start (times such as 10:32:11
    // take none of these shapes).
    spec!(
        IpAddress,
        0.7,
        r"\b(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b|(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:){0,5}[0-9A-Fa-f]{1,4}\b|(?:[0-9A-Fa-f]{1,4}:){1,7}:)|\B::(?:[0-9A-Fa-f]{1,4}:){0,6}[0-9A-Fa-f]{1,4}\b",
        |b| when(ipv6(b), 0.7)
    ),
    spec!(
        IpAddress,
        0.6,
        r"\b[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\b",
        |b| when(ipv4(b), 0.6)
    ),
    spec!(UsSsn, 0.6, r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b", |b| when(
        ssn(b),
        0.6
    )),
    spec!(UsSsn, 0.4, r"\b[0-9]{3} [0-9]{2} [0-9]{4}\b", |b| when(
        ssn(b),
        0.4
    )),
    spec!(
        Phone,
        0.7,
        concat!(
            r"(?:\+|\b00)[1-9][0-9]{0,2}(?:[ .-]?\(?[0-9]{1,4}\)?){2,6}",
            ext!()
        ),
        |b| when(
            phone_international(b),
            if b[0] == b'+' || phone_grouped(b) {
                0.7
            } else {
                0.4
            }
        )
    ),
    spec!(
        CryptoWallet,
        0.9,
        r"\b(?:[13][a-km-zA-HJ-NP-Z1-9]{25,34}|bc1[02-9ac-hj-np-z]{11,71}|BC1[02-9AC-HJ-NP-Z]{11,71})\b",
        |b| when(
            if b[0] == b'b' || b[0] == b'B' {
                bech32(b)
            } else {
                base58check(b)
            },
            0.9
        )
    ),
    spec!(CryptoWallet, 0.6, r"\b0x[0-9a-fA-F]{40}\b", |_| Some(0.6)),
    spec!(
        DateOfBirth,
        0.2,
        r"\b(?:[0-9]{1,2}[./-][0-9]{1,2}[./-](?:19|20)[0-9]{2}|(?:19|20)[0-9]{2}[./-][0-9]{1,2}[./-][0-9]{1,2})\b",
        |b| when(date(b), 0.2)
    ),
    spec!(
        DateOfBirth,
        0.2,
        r"(?i)\b(?:[0-9]{1,2}(?:st|nd|rd|th)?\.? (?:of )?(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]{0,6}\.?,? (?:19|20)[0-9]{2}|(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]{0,6}\.? [0-9]{1,2}(?:st|nd|rd|th)?,? (?:19|20)[0-9]{2})\b",
        |b| when(date(b), 0.2)
    ),
    spec!(
        InAadhaar,
        0.5,
        r"\b[2-9][0-9]{3} [0-9]{4} [0-9]{4}\b",
        |b| when(aadhaar(b), 0.5)
    ),
    spec!(InAadhaar, 0.3, r"\b[2-9][0-9]{11}\b", |b| when(
        aadhaar(b),
        0.3
    )),
    // Trunk-0 national numbers: `020 7946 0958`, `(0151) 1234567`, `03-1234-5678`.
    spec!(
        Phone,
        0.55,
        concat!(
            r"(?:\(0[0-9]{1,4}\)|\b0[0-9]{1,4})[ ./-]?[0-9]{2,4}(?:[ .-]?[0-9]{2,4}){1,4}",
            ext!()
        ),
        |b| when(phone_national(b), if phone_grouped(b) { 0.55 } else { 0.3 })
    ),
    // North American numbers: `(555) 123-4567`, `555-123-4567`, `555.123.4567`.
    spec!(
        Phone,
        0.55,
        concat!(
            r"(?:\b1[-. ])?(?:\([0-9]{3}\) ?|\b[0-9]{3}[-.])[0-9]{3}[-.][0-9]{4}",
            ext!()
        ),
        |_| Some(0.55)
    ),
    spec!(BrCpf, 0.4, r"\b[0-9]{11}\b", |b| when(cpf(b), 0.4)),
    spec!(PlPesel, 0.4, r"\b[0-9]{11}\b", |b| when(pesel(b), 0.4)),
    spec!(DeTaxId, 0.3, r"\b[1-9][0-9]{10}\b", |b| when(
        de_tax(b),
        0.3
    )),
    spec!(CaSin, 0.4, r"\b[0-9]{3}[ -][0-9]{3}[ -][0-9]{3}\b", |b| {
        when(sin(b), 0.4)
    }),
    spec!(CaSin, 0.3, r"\b[0-9]{9}\b", |b| when(sin(b), 0.3)),
    // Other grouped numbers (`912 345 678`, `98765 43210`, `(11) 91234-5678`): phones only with a
    // context word.
    spec!(
        Phone,
        0.3,
        concat!(
            r"(?:\([0-9]{2,4}\) ?|\b)[1-9][0-9]{1,4}(?:[ .-][0-9]{2,5}){1,4}",
            ext!()
        ),
        |b| when(phone_national(b) && phone_grouped(b), 0.3)
    ),
    // Nine to eleven bare digits (`5209220538`, Chinese and Italian mobiles): phones only with a
    // context word.
    spec!(Phone, 0.3, r"\b[1-9][0-9]{8,10}\b", |_| Some(0.3)),
    spec!(
        Password,
        0.8,
        r#"(?i)\b(?:password|passwd|passwort|passcode|pwd|pass|mot de passe|senha|haslo|contrasena)\s*(?:[:=]|\bis\b)\s*["']?(?:[^\s"',;&<>\x80-\xFF]|[\xC0-\xFF][\x80-\xBF]+){4,128}"#,
        |b| when(password(b), 0.8),
        value_after_keyword
    ),
    spec!(
        Secret,
        0.7,
        r#"(?i)\b[a-z0-9_.-]{0,24}(?:secret|token|api[_-]?key|apikey|access[_-]?key|auth|credential)s?[a-z0-9_.-]{0,24}["']?\s*(?:[:=]|=>|\bis\b)\s*["']?[A-Za-z0-9+/_.~-]{16,256}=*"#,
        |b| when(secret(b), 0.7),
        value_after_keyword
    ),
    spec!(
        Secret,
        0.7,
        r"(?i)\bbearer\s+[A-Za-z0-9+/_.~-]{16,512}=*",
        |b| when(secret(b), 0.7),
        value_after_keyword
    ),
];

/// Words that make a match of the entity likely when they appear just before it (matched
/// ASCII-case-insensitively, as whole words).
pub(crate) fn context_words(entity: Entity) -> &'static [&'static str] {
    match entity {
        Entity::Phone => &[
            "phone",
            "tel",
            "telephone",
            "call",
            "mobile",
            "cell",
            "fax",
            "whatsapp",
            "sms",
            "contact",
            "telefon",
            "téléphone",
            "portable",
            "handy",
            "telefono",
            "teléfono",
            "celular",
            "móvil",
            "telefone",
            "电话",
            "電話",
            "手机",
            "携帯",
            "tlf",
            "puhelin",
            "телефон",
        ],
        Entity::CreditCard => &[
            "card",
            "credit",
            "debit",
            "visa",
            "mastercard",
            "amex",
            "carte",
            "karte",
            "tarjeta",
            "carta",
            "cartão",
            "karta",
            "charge",
            "pay",
            "payment",
            "paid",
        ],
        Entity::UsSsn => &["ssn", "social security", "social sec"],
        Entity::Iban => &["iban", "account", "bank", "konto", "compte"],
        Entity::IpAddress => &["ip", "address", "host", "server", "client"],
        Entity::MacAddress => &["mac", "hardware", "ethernet", "wifi"],
        Entity::CryptoWallet => &[
            "wallet", "btc", "bitcoin", "eth", "ethereum", "crypto", "address",
        ],
        Entity::DateOfBirth => &[
            "born",
            "birth",
            "dob",
            "d.o.b",
            "birthday",
            "birthdate",
            "geboren",
            "geburtsdatum",
            "né",
            "née",
            "naissance",
            "nato",
            "nata",
            "nascita",
            "nacido",
            "nacida",
            "nacimiento",
            "nascimento",
            "nasceu",
            "urodzony",
            "urodzona",
            "urodzenia",
            "出生",
            "生年月日",
            "生日",
            "age",
        ],
        Entity::UkNino => &["national insurance", "nino", "ni number", "ni no", "nin"],
        Entity::ItFiscalCode => &["codice fiscale", "cf", "fiscale"],
        Entity::PlPesel => &["pesel"],
        Entity::EsDni => &["dni", "nie", "nif", "documento"],
        Entity::FrNir => &[
            "sécurité sociale",
            "securite sociale",
            "nir",
            "insee",
            "sécu",
            "secu",
        ],
        Entity::InAadhaar => &["aadhaar", "aadhar", "uid", "uidai"],
        Entity::BrCpf => &["cpf"],
        Entity::CaSin => &["sin", "social insurance", "nas", "assurance sociale"],
        Entity::CnResidentId => &["身份证", "居民身份", "resident", "identity", "id card"],
        Entity::DeTaxId => &[
            "steuer",
            "steuerid",
            "steuer-id",
            "idnr",
            "tax id",
            "tin",
            "identifikationsnummer",
            "steuernummer",
            "steuer-idnr",
        ],
        _ => &[],
    }
}
