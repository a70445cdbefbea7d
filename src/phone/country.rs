//! E.164 number → ISO 3166 territory, by longest-prefix lookup in a table generated from
//! libphonenumber's metadata (the `phonenumber` crate) and committed as
//! `country_table.txt`, so that no start and no policy reload pays for building it (about
//! three seconds of CPU and a hundred megabytes of the crate's compiled patterns).
//!
//! How the table is made: a calling code used by one territory maps straight to it. A
//! shared one (+1, +7, +44, +47, +358, …) is refined digit by digit: for each prefix,
//! numbers completed at random to each possible length are classified by the crate; a
//! prefix where they all agree becomes a table entry, one where they disagree is split into
//! its ten children. A test regenerates the table from the crate and fails if the
//! committed one differs (`VERIGATE_WRITE_COUNTRY_TABLE=1 cargo test country_table`
//! rewrites it after a crate upgrade).

#[cfg(test)]
use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use super::trie::DigitTrie;

const TABLE: &str = include_str!("country_table.txt");

/// Deepest refinement below a calling code (GG/JE/IM ranges under +44 need five digits).
#[cfg(test)]
const MAX_DEPTH: usize = 6;
/// Shared codes are always split this deep (NANP territories differ by area code).
#[cfg(test)]
const MIN_DEPTH: usize = 3;
/// Valid samples needed to trust that a prefix belongs to one territory.
#[cfg(test)]
const MIN_AGREEING: usize = 4;
/// Random completions classified per prefix and possible number length.
#[cfg(test)]
const SAMPLES_PER_LENGTH: usize = 8;

pub struct CountryTable {
    trie: DigitTrie<&'static str>,
    /// Every calling code, geographic or not (they are prefix-free).
    codes: DigitTrie<()>,
}

impl CountryTable {
    /// The table, read on first use (about a millisecond) and shared by everything.
    pub fn get() -> &'static CountryTable {
        static TABLE_IN_MEMORY: OnceLock<CountryTable> = OnceLock::new();
        TABLE_IN_MEMORY.get_or_init(|| CountryTable::parse(TABLE))
    }

    /// The territory of an E.164 number, or `None` (non-geographic codes, and ranges of a
    /// shared code that no territory uses).
    pub fn country_of(&self, number: &str) -> Option<&'static str> {
        self.trie.longest_match(number).map(|(_, c)| *c)
    }

    /// How many digits of `number` (after `+`) are its calling code.
    pub fn calling_code_len(&self, number: &str) -> Option<usize> {
        self.codes.longest_match(number).map(|(len, _)| len)
    }

    pub fn entries(&self) -> usize {
        self.trie.len()
    }

    /// Reads the committed table: `code <digits>` lines, then `<prefix> <territory>` lines.
    fn parse(text: &'static str) -> Self {
        let mut trie = DigitTrie::default();
        let mut codes = DigitTrie::default();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            match line.split_once(' ') {
                Some(("code", digits)) => codes.insert(digits, ()),
                Some((prefix, territory)) => trie.insert(prefix, territory),
                None => {}
            }
        }
        Self { trie, codes }
    }
}

/// Builds the table from the crate, in the committed file's format.
#[cfg(test)]
fn generate() -> String {
    let mut regions: BTreeMap<u16, BTreeSet<&'static str>> = BTreeMap::new();
    let mut lengths: BTreeMap<u16, BTreeSet<usize>> = BTreeMap::new();
    let mut hints: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    let mut mains: BTreeMap<u16, &'static str> = BTreeMap::new();
    // Iterating the database goes by region id, and the non-geographic codes (+800, +882,
    // …) share the id `001`: ask for every code instead.
    let all_codes: BTreeSet<String> = (1u16..1000)
        .filter(|code| phonenumber::metadata::DATABASE.by_code(code).is_some())
        .map(|code| code.to_string())
        .collect();
    for meta in phonenumber::metadata::DATABASE.iter() {
        let id: &'static str = leak_id(meta.id());
        if id == "001" {
            continue; // non-geographic: no territory
        }
        regions.entry(meta.country_code()).or_default().insert(id);
        let d = meta.descriptors();
        let l = lengths.entry(meta.country_code()).or_default();
        for descriptor in [Some(d.general()), d.fixed_line(), d.mobile()]
            .into_iter()
            .flatten()
        {
            l.extend(descriptor.possible_length().iter().map(|&n| usize::from(n)));
        }
        // Where a smaller territory's numbers start, as its own patterns say: random
        // samples alone would miss narrow ranges such as +44 7911 1 (Guernsey).
        if meta.is_main_country_for_code() {
            mains.insert(meta.country_code(), id);
        } else {
            let h = hints.entry(meta.country_code()).or_default();
            for descriptor in [d.fixed_line(), d.mobile()].into_iter().flatten() {
                h.extend(literal_prefixes(descriptor.national_number().as_str()));
            }
        }
    }
    let mut entries = BTreeMap::new();
    for (code, ids) in &regions {
        let code_digits = code.to_string();
        if ids.len() == 1 {
            if let Some(id) = ids.first() {
                entries.insert(code_digits, *id);
            }
            continue;
        }
        // Subscriber numbers only (8+ national digits): short codes are not verified.
        let mut lens: Vec<usize> = lengths[code].iter().copied().filter(|l| *l >= 8).collect();
        if lens.is_empty() {
            lens = (8..=11).collect();
        }
        let code_hints = hints.get(code).map(Vec::as_slice).unwrap_or_default();
        refine(
            &mut entries,
            &code_digits,
            "",
            &lens,
            code_hints,
            mains.get(code).copied(),
        );
    }
    let mut out = String::from(
        "# E.164 prefix -> ISO 3166 territory, generated from the phonenumber crate's metadata\n\
         # by src/phone/country.rs (`VERIGATE_WRITE_COUNTRY_TABLE=1 cargo test country_table`).\n\
         # Do not edit by hand.\n",
    );
    for code in &all_codes {
        out.push_str(&format!("code {code}\n"));
    }
    for (prefix, id) in entries {
        out.push_str(&format!("{prefix} {id}\n"));
    }
    out
}

/// Region ids come from the crate's static database; interning them keeps the table
/// `&'static str` without tying it to the crate's lifetimes.
#[cfg(test)]
fn leak_id(id: &str) -> &'static str {
    static IDS: OnceLock<std::sync::Mutex<BTreeSet<&'static str>>> = OnceLock::new();
    let ids = IDS.get_or_init(Default::default);
    let mut ids = ids.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(known) = ids.get(id) {
        return known;
    }
    let leaked: &'static str = Box::leak(id.to_owned().into_boxed_str());
    ids.insert(leaked);
    leaked
}

/// Literal digit prefixes every match of a national-number pattern starts with (at most
/// `MAX_DEPTH` digits), e.g. `7781`, `7839`, `79111`, `79117` for Guernsey's mobiles.
#[cfg(test)]
fn literal_prefixes(pattern: &str) -> Vec<String> {
    use regex_syntax::hir::literal::{ExtractKind, Extractor};
    // Metadata patterns keep the XML's line breaks and indentation.
    let pattern: String = pattern.chars().filter(|c| !c.is_whitespace()).collect();
    let Ok(hir) = regex_syntax::parse(&pattern) else {
        return Vec::new();
    };
    let seq = Extractor::new().kind(ExtractKind::Prefix).extract(&hir);
    seq.literals()
        .unwrap_or_default()
        .iter()
        .filter_map(|l| std::str::from_utf8(l.as_bytes()).ok())
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .map(|s| s[..s.len().min(MAX_DEPTH)].to_owned())
        .collect()
}

#[cfg(test)]
fn refine(
    entries: &mut BTreeMap<String, &'static str>,
    code: &str,
    node: &str,
    lengths: &[usize],
    hints: &[String],
    main: Option<&'static str>,
) {
    let found = classify(code, node, lengths);
    let valid: usize = found.values().sum();
    let hinted_deeper = hints
        .iter()
        .any(|h| h.len() > node.len() && h.starts_with(node));
    let deep_enough = node.len() >= MIN_DEPTH && !hinted_deeper;
    match found.len() {
        // No valid sample here: the code's main territory, as libphonenumber defaults.
        0 if deep_enough => {
            if let Some(main) = main {
                entries.insert(format!("{code}{node}"), main);
            }
        }
        1 if deep_enough && (valid >= MIN_AGREEING || node.len() > MIN_DEPTH) => {
            if let Some((id, _)) = found.iter().next() {
                entries.insert(format!("{code}{node}"), *id);
            }
        }
        _ if node.len() >= MAX_DEPTH => {
            if let Some((id, _)) = found.iter().max_by_key(|(_, n)| **n) {
                entries.insert(format!("{code}{node}"), *id);
            }
        }
        _ => {
            for d in 0..10 {
                refine(entries, code, &format!("{node}{d}"), lengths, hints, main);
            }
        }
    }
}

/// Territories (with counts) of valid numbers starting `+<code><node>`.
#[cfg(test)]
fn classify(code: &str, node: &str, lengths: &[usize]) -> BTreeMap<&'static str, usize> {
    let mut rng = Lcg::seeded(code, node);
    let mut found = BTreeMap::new();
    for &len in lengths.iter().filter(|l| **l >= node.len()) {
        for _ in 0..SAMPLES_PER_LENGTH {
            let mut number = format!("+{code}{node}");
            for _ in node.len()..len {
                number.push(char::from(b'0' + rng.digit()));
            }
            if let Ok(parsed) = phonenumber::parse(None, &number) {
                if let Some(id) = parsed.country().id() {
                    *found.entry(leak_id(id.as_ref())).or_default() += 1;
                }
            }
        }
    }
    found
}

/// Deterministic pseudo-random digits, so the table is the same on every generation.
#[cfg(test)]
struct Lcg(u64);

#[cfg(test)]
impl Lcg {
    fn seeded(code: &str, node: &str) -> Self {
        let seed = format!("{code}/{node}")
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
        Self(seed)
    }

    fn digit(&mut self) -> u8 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % 10) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_country_table_is_what_the_crate_gives() {
        let generated = generate();
        if std::env::var_os("VERIGATE_WRITE_COUNTRY_TABLE").is_some() {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/phone/country_table.txt");
            std::fs::write(path, &generated).unwrap();
            return;
        }
        assert!(
            generated == TABLE,
            "src/phone/country_table.txt is stale (the phonenumber crate changed?): \
             rewrite it with `VERIGATE_WRITE_COUNTRY_TABLE=1 cargo test country_table` and \
             review the diff"
        );
    }

    #[test]
    fn calling_codes_are_known_geographic_or_not() {
        let table = CountryTable::get();
        assert_eq!(table.calling_code_len("+46700000001"), Some(2));
        assert_eq!(table.calling_code_len("+14155552671"), Some(1));
        assert_eq!(table.calling_code_len("+8825551234"), Some(3));
        assert_eq!(table.calling_code_len("+2250701234567"), Some(3));
        assert_eq!(table.calling_code_len("+999123"), None);
    }

    #[test]
    fn shared_codes_resolve_like_libphonenumber() {
        let table = CountryTable::get();
        for (number, country) in [
            ("+14155552671", Some("US")),
            ("+16135550123", Some("CA")),
            ("+13455550123", Some("KY")),
            ("+18765550123", Some("JM")),
            ("+79123456789", Some("RU")),
            ("+77012345678", Some("KZ")),
            ("+447911123456", Some("GG")),
            ("+447400123456", Some("GB")),
            ("+46700000001", Some("SE")),
            ("+2250701234567", Some("CI")),
            ("+88212345678", None),
            ("+97912345678", None),
        ] {
            assert_eq!(table.country_of(number), country, "{number}");
        }
    }

    /// Property: for pseudo-random numbers that libphonenumber places in a territory,
    /// the table names the same territory. Deterministic (fixed seed) so it never flakes;
    /// 20,000 numbers across every calling code, weighted to the shared ones.
    #[test]
    fn the_table_agrees_with_the_crate_on_valid_numbers() {
        let table = CountryTable::get();
        let codes: Vec<u16> = phonenumber::metadata::DATABASE
            .iter()
            .map(|m| m.country_code())
            .collect();
        let shared = [1u16, 7, 44, 47, 61, 262, 290, 358, 39, 590, 599, 212];
        let mut rng = Lcg::seeded("property", "test");
        let (mut checked, mut wrong) = (0, Vec::new());
        for i in 0..20_000 {
            let code = if i % 2 == 0 {
                shared[i % shared.len()]
            } else {
                codes[(rng.digit() as usize * 97 + i) % codes.len()]
            };
            let len = 6 + usize::from(rng.digit() % 6);
            let number: String = format!("+{code}")
                + &(0..len)
                    .map(|_| char::from(b'0' + rng.digit()))
                    .collect::<String>();
            let Ok(parsed) = phonenumber::parse(None, &number) else {
                continue;
            };
            let Some(id) = parsed.country().id() else {
                continue;
            };
            // Only what Sinch verifies: canonical E.164 (no trunk 0 after the code) of a
            // subscriber number (8+ national digits; short codes are not verified).
            let canonical = parsed.format().mode(phonenumber::Mode::E164).to_string();
            let national_len = parsed.national().value().to_string().len();
            if !phonenumber::is_valid(&parsed) || canonical != number || national_len < 8 {
                continue;
            }
            checked += 1;
            if table.country_of(&number) != Some(id.as_ref()) {
                wrong.push((
                    number,
                    id.as_ref().to_owned(),
                    table.country_of(&parsed.to_string()),
                ));
            }
        }
        assert!(checked > 500, "only {checked} valid numbers generated");
        assert!(
            wrong.is_empty(),
            "{} of {checked} disagree, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
    }
}
