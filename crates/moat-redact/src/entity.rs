//! What kinds of personal data and secrets are found.

use std::fmt;
use std::str::FromStr;

/// A kind of personal data or secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Entity {
    /// An email address.
    Email,
    /// A phone number in international format (`+` and country code).
    Phone,
    /// A payment card number that passes the Luhn check and a brand's prefix and length.
    CreditCard,
    /// An IBAN that passes the mod-97 check with its country's length.
    Iban,
    /// A US social security number outside the never-issued ranges.
    UsSsn,
    /// An IPv4 address.
    IpAddress,
    /// A provider API key or token (OpenAI, Anthropic, AWS, GitHub, Slack, Stripe, Google).
    ApiKey,
    /// A JSON Web Token.
    Jwt,
    /// A PEM private key block.
    PrivateKey,
    /// A URL with a password in it (`scheme://user:password@host`).
    UrlCredentials,
    /// A UK National Insurance number.
    UkNino,
    /// An Italian codice fiscale (check character verified).
    ItFiscalCode,
    /// A Polish PESEL (date and checksum verified).
    PlPesel,
    /// A Spanish DNI or NIE (check letter verified).
    EsDni,
    /// A French NIR / social security number (mod-97 key verified).
    FrNir,
    /// An Indian Aadhaar number (Verhoeff checksum verified).
    InAadhaar,
    /// A Brazilian CPF (both check digits verified).
    BrCpf,
    /// A Canadian SIN (Luhn verified).
    CaSin,
    /// A Chinese resident identity number (date and check character verified).
    CnResidentId,
    /// A German tax identification number (ISO 7064 check digit verified).
    DeTaxId,
}

impl Entity {
    /// Every entity.
    pub const ALL: [Entity; 20] = [
        Entity::Email,
        Entity::Phone,
        Entity::CreditCard,
        Entity::Iban,
        Entity::UsSsn,
        Entity::IpAddress,
        Entity::ApiKey,
        Entity::Jwt,
        Entity::PrivateKey,
        Entity::UrlCredentials,
        Entity::UkNino,
        Entity::ItFiscalCode,
        Entity::PlPesel,
        Entity::EsDni,
        Entity::FrNir,
        Entity::InAadhaar,
        Entity::BrCpf,
        Entity::CaSin,
        Entity::CnResidentId,
        Entity::DeTaxId,
    ];

    /// The national identity numbers among them.
    pub const NATIONAL_IDS: [Entity; 10] = [
        Entity::UkNino,
        Entity::ItFiscalCode,
        Entity::PlPesel,
        Entity::EsDni,
        Entity::FrNir,
        Entity::InAadhaar,
        Entity::BrCpf,
        Entity::CaSin,
        Entity::CnResidentId,
        Entity::DeTaxId,
    ];

    /// The secrets among them.
    pub const SECRETS: [Entity; 4] = [
        Entity::ApiKey,
        Entity::Jwt,
        Entity::PrivateKey,
        Entity::UrlCredentials,
    ];

    /// The name used in placeholders, e.g. `EMAIL` in `[EMAIL_1]`.
    pub fn label(self) -> &'static str {
        match self {
            Entity::Email => "EMAIL",
            Entity::Phone => "PHONE",
            Entity::CreditCard => "CARD",
            Entity::Iban => "IBAN",
            Entity::UsSsn => "SSN",
            Entity::IpAddress => "IP",
            Entity::ApiKey => "SECRET",
            Entity::Jwt => "JWT",
            Entity::PrivateKey => "PRIVATE_KEY",
            Entity::UrlCredentials => "URL_CREDENTIALS",
            Entity::UkNino => "NINO",
            Entity::ItFiscalCode => "CODICE_FISCALE",
            Entity::PlPesel => "PESEL",
            Entity::EsDni => "DNI",
            Entity::FrNir => "NIR",
            Entity::InAadhaar => "AADHAAR",
            Entity::BrCpf => "CPF",
            Entity::CaSin => "SIN",
            Entity::CnResidentId => "CN_ID",
            Entity::DeTaxId => "STEUER_ID",
        }
    }
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Entity::Email => "email",
            Entity::Phone => "phone",
            Entity::CreditCard => "credit_card",
            Entity::Iban => "iban",
            Entity::UsSsn => "ssn",
            Entity::IpAddress => "ip",
            Entity::ApiKey => "api_key",
            Entity::Jwt => "jwt",
            Entity::PrivateKey => "private_key",
            Entity::UrlCredentials => "url_credentials",
            Entity::UkNino => "uk_nino",
            Entity::ItFiscalCode => "it_fiscal_code",
            Entity::PlPesel => "pl_pesel",
            Entity::EsDni => "es_dni",
            Entity::FrNir => "fr_nir",
            Entity::InAadhaar => "in_aadhaar",
            Entity::BrCpf => "br_cpf",
            Entity::CaSin => "ca_sin",
            Entity::CnResidentId => "cn_resident_id",
            Entity::DeTaxId => "de_tax_id",
        })
    }
}

impl FromStr for Entity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Entity::ALL
            .into_iter()
            .find(|e| e.to_string() == s)
            .ok_or_else(|| format!("unknown entity `{s}`"))
    }
}
