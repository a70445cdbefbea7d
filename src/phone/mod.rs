//! Facts about a phone number that analytics group by: its country and a short prefix.
//!
//! The country comes from the table built from libphonenumber's metadata
//! (phone/country.rs), the same one the policy decides with, so shared calling codes
//! resolve to the real territory (+1 876 → JM, +44 7911 1… → GG) and a record's country is
//! the country its rules saw. Anything that is not strict E.164 has no facts.

pub mod country;
pub mod trie;

use serde::{Deserialize, Serialize};

/// Digits kept after the calling code in [`NumberFacts::prefix`]: enough to tell ranges
/// apart (`+46701…`), too few to identify a subscriber.
const PREFIX_DIGITS_AFTER_CODE: usize = 3;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumberFacts {
    /// ISO 3166-1 alpha-2, or `None` when the number belongs to no territory
    /// (non-geographic codes such as +882, or invalid numbers in a shared code).
    pub country: Option<String>,
    /// `+`, the calling code and the next three digits.
    pub prefix: Option<String>,
}

/// `+` and 2 to 15 digits, first digit not 0.
pub fn is_e164(number: &str) -> bool {
    e164_digits(number).is_some_and(|d| d.len() >= 2)
}

/// The digits of `+` followed by 1 to 15 digits, the first not 0 (a number or a prefix of
/// one); `None` for anything else. The one place this rule is written.
pub fn e164_digits(number: &str) -> Option<&str> {
    let digits = number.strip_prefix('+')?;
    let valid = (1..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0');
    valid.then_some(digits)
}

pub fn facts(number: &str) -> NumberFacts {
    if !is_e164(number) {
        return NumberFacts::default();
    }
    let table = country::CountryTable::get();
    let Some(code_len) = table.calling_code_len(number) else {
        return NumberFacts::default();
    };
    let prefix_len = (1 + code_len + PREFIX_DIGITS_AFTER_CODE).min(number.len());
    NumberFacts {
        country: table.country_of(number).map(str::to_owned),
        prefix: Some(number[..prefix_len].to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_calling_codes_resolve_to_the_real_territory() {
        for (number, country) in [
            ("+14155552671", Some("US")),
            ("+16135550123", Some("CA")),
            ("+18765550123", Some("JM")),
            ("+46700000001", Some("SE")),
            ("+447911123456", Some("GG")),
            ("+77012345678", Some("KZ")),
            ("+88212345678", None),
        ] {
            assert_eq!(facts(number).country.as_deref(), country, "{number}");
        }
    }

    #[test]
    fn prefixes_keep_the_calling_code_and_three_digits() {
        assert_eq!(facts("+46700000001").prefix.as_deref(), Some("+46700"));
        assert_eq!(facts("+14155552671").prefix.as_deref(), Some("+1415"));
        assert_eq!(facts("+8825551234").prefix.as_deref(), Some("+882555"));
    }

    #[test]
    fn anything_not_e164_has_no_facts() {
        for bad in [
            "",
            "+",
            "46700000001",
            "+0467",
            "+46 70",
            "tel:+46700000001",
            "+1234567890123456",
        ] {
            assert_eq!(facts(bad), NumberFacts::default(), "{bad:?}");
        }
    }
}
