//! What kinds of personal data and secrets are found.

use std::fmt;
use std::str::FromStr;

/// A kind of personal data or secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Entity {
    /// An email address.
    Email,
    /// A phone number: international (`+` or `00` and a country code) or in a national format
    /// (trunk `0`, area code in parentheses, grouped digits; the weaker shapes need a context word).
    Phone,
    /// A payment card number that passes the Luhn check and a brand's prefix and length.
    CreditCard,
    /// An IBAN that passes the mod-97 check with its country's length.
    Iban,
    /// A US social security number outside the never-issued ranges.
    UsSsn,
    /// An IPv4 or IPv6 address.
    IpAddress,
    /// A MAC address.
    MacAddress,
    /// A cryptocurrency wallet address (Bitcoin base58check or bech32, Ethereum).
    CryptoWallet,
    /// A date next to words that make it a date of birth ("born", "DOB", "geboren", ...).
    DateOfBirth,
    /// A provider API key or token (OpenAI, Anthropic, AWS, Google, GitHub, GitLab, Slack, Stripe,
    /// Hugging Face, SendGrid, npm, ...).
    ApiKey,
    /// A JSON Web Token.
    Jwt,
    /// A PEM private key block.
    PrivateKey,
    /// A URL with a password in it (`scheme://user:password@host`).
    UrlCredentials,
    /// A password after a keyword (`password=`, `Pwd:`, "my password is"), e.g. in a connection
    /// string; only the value is replaced.
    Password,
    /// A high-entropy token after a keyword such as `secret`, `token`, `api_key` or `Bearer`; only
    /// the value is replaced.
    Secret,
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
    /// A person's name after "my name is", a title, or a common first name (off by default).
    Person,
    /// A term from the deny list.
    Custom,
}

impl Entity {
    /// Every built-in entity except [`Entity::Person`], which is opt-in (names are the least
    /// certain finding), and [`Entity::Custom`], which comes with a deny list.
    pub const ALL: [Entity; 25] = [
        Entity::Email,
        Entity::Phone,
        Entity::CreditCard,
        Entity::Iban,
        Entity::UsSsn,
        Entity::IpAddress,
        Entity::MacAddress,
        Entity::CryptoWallet,
        Entity::DateOfBirth,
        Entity::ApiKey,
        Entity::Jwt,
        Entity::PrivateKey,
        Entity::UrlCredentials,
        Entity::Password,
        Entity::Secret,
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
    pub const SECRETS: [Entity; 6] = [
        Entity::ApiKey,
        Entity::Jwt,
        Entity::PrivateKey,
        Entity::UrlCredentials,
        Entity::Password,
        Entity::Secret,
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
            Entity::MacAddress => "MAC",
            Entity::CryptoWallet => "WALLET",
            Entity::DateOfBirth => "DOB",
            Entity::ApiKey => "API_KEY",
            Entity::Password => "PASSWORD",
            Entity::Secret => "SECRET",
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
            Entity::Person => "PERSON",
            Entity::Custom => "REDACTED",
        }
    }
}

impl Entity {
    /// The name used in configuration and metrics, e.g. `credit_card`.
    pub fn name(self) -> &'static str {
        match self {
            Entity::Email => "email",
            Entity::Phone => "phone",
            Entity::CreditCard => "credit_card",
            Entity::Iban => "iban",
            Entity::UsSsn => "ssn",
            Entity::IpAddress => "ip",
            Entity::MacAddress => "mac",
            Entity::CryptoWallet => "crypto_wallet",
            Entity::DateOfBirth => "date_of_birth",
            Entity::ApiKey => "api_key",
            Entity::Password => "password",
            Entity::Secret => "secret",
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
            Entity::Person => "person",
            Entity::Custom => "custom",
        }
    }
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not an entity's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownEntity {
    name: String,
}

impl fmt::Display for UnknownEntity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown entity `{}`", self.name)
    }
}

impl std::error::Error for UnknownEntity {}

impl FromStr for Entity {
    type Err = UnknownEntity;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Entity::ALL
            .into_iter()
            .chain([Entity::Person, Entity::Custom])
            .find(|e| e.name() == s)
            .ok_or_else(|| UnknownEntity { name: s.to_owned() })
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for Entity {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for Entity {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for e in Entity::ALL
            .into_iter()
            .chain([Entity::Person, Entity::Custom])
        {
            assert_eq!(e.to_string().parse::<Entity>(), Ok(e));
        }
        assert!("passport".parse::<Entity>().is_err());
    }
}
