//! `prefix`: the number starts with one of these E.164 prefixes. Thousands are fine:
//! they are held in a digit trie, and the rule index finds the rule by them.

use super::{e164_entries, Anchor, Check, CompileContext, Compiled, Condition, LintScope, OneOrMany};
use crate::phone::trie::DigitTrie;
use crate::policy::facts::Facts;

pub(in crate::policy) struct Prefix;

impl Condition for Prefix {
    const HOLDS_WHEN: &'static str =
        "the number starts with one of these E.164 prefixes (thousands are fine)";
    const EXAMPLE: &'static str = r#"prefix = ["+882", "+883", "@irsf"]"#;
    type File = OneOrMany;

    fn compile(file: &OneOrMany, cx: &CompileContext<'_>) -> Result<Compiled, String> {
        let prefixes = e164_entries(cx.entries(file, "prefix")?, 1, "prefix")?;
        let mut trie = DigitTrie::default();
        prefixes.iter().for_each(|p| trie.insert(p, ()));
        Ok(Compiled::Check(Box::new(PrefixIn { trie, prefixes })))
    }
}

#[derive(Debug)]
struct PrefixIn {
    trie: DigitTrie<()>,
    prefixes: Vec<String>,
}

impl Check for PrefixIn {
    fn holds(&self, f: &Facts<'_>) -> bool {
        self.trie.longest_match(&f.number).is_some()
    }

    fn describe(&self) -> String {
        format!("prefix in {} prefixes", self.prefixes.len())
    }

    fn anchor(&self) -> Option<Anchor> {
        Some(Anchor::Prefixes(self.prefixes.clone()))
    }

    fn matched_prefix(&self, f: &Facts<'_>) -> Option<String> {
        let (len, _) = self.trie.longest_match(&f.number)?;
        Some(f.number[..len + 1].to_owned())
    }

    fn lint(&self, scope: &LintScope<'_>) -> Option<String> {
        if !scope.enforced {
            return None;
        }
        // An earlier enforced rule with nothing but prefixes decides every number under
        // them, so this rule never sees one.
        let (earlier, _) = scope.earlier.iter().find(|(_, c)| {
            c.len() == 1
                && c.get::<PrefixIn>()
                    .is_some_and(|outer| self.prefixes.iter().all(|p| outer.trie.longest_match(p).is_some()))
        })?;
        Some(format!("can never decide: every prefix it lists is under a prefix of the earlier rule `{earlier}`"))
    }
}
