//! A digit trie for longest-prefix lookups of E.164 numbers: one array step per digit,
//! no allocation per lookup, and the lookup cost does not grow with the number of
//! prefixes (10,000 prefixes cost the same per request as 10).

/// Maps digit strings to values; finds the longest stored prefix of a number.
#[derive(Debug, Clone)]
pub struct DigitTrie<T> {
    /// `children[n][d]`: index of node `n`'s child for digit `d`, 0 for none (node 0 is
    /// the root, which is never a child).
    children: Vec<[u32; 10]>,
    values: Vec<Option<T>>,
}

impl<T> Default for DigitTrie<T> {
    fn default() -> Self {
        Self {
            children: vec![[0; 10]],
            values: vec![None],
        }
    }
}

impl<T> DigitTrie<T> {
    /// Stores `value` under `digits` (a leading `+` and any non-digit are ignored).
    /// A later insert of the same digits replaces the value.
    pub fn insert(&mut self, digits: &str, value: T) {
        let mut node = 0usize;
        for d in digits
            .bytes()
            .filter(u8::is_ascii_digit)
            .map(|b| usize::from(b - b'0'))
        {
            if self.children[node][d] == 0 {
                self.children.push([0; 10]);
                self.values.push(None);
                self.children[node][d] = u32::try_from(self.children.len() - 1).unwrap_or(u32::MAX);
            }
            node = self.children[node][d] as usize;
        }
        self.values[node] = Some(value);
    }

    /// The longest stored prefix of `number` (digits after an optional `+`): its length
    /// in digits and its value.
    pub fn longest_match(&self, number: &str) -> Option<(usize, &T)> {
        let mut best = None;
        self.walk(number, |depth, v| best = Some((depth, v)));
        best
    }

    /// Calls `f` with the value of every stored prefix of `number`, shortest first.
    pub fn for_each_match<'a>(&'a self, number: &str, mut f: impl FnMut(&'a T)) {
        self.walk(number, |_, v| f(v));
    }

    /// Follows `number`'s digits down the trie, calling `f(depth, value)` at every stored
    /// prefix on the way.
    fn walk<'a>(&'a self, number: &str, mut f: impl FnMut(usize, &'a T)) {
        let mut node = 0usize;
        if let Some(v) = &self.values[0] {
            f(0, v);
        }
        for (depth, b) in number.bytes().skip_while(|b| *b == b'+').enumerate() {
            if !b.is_ascii_digit() {
                break;
            }
            let next = self.children[node][usize::from(b - b'0')];
            if next == 0 {
                break;
            }
            node = next as usize;
            if let Some(v) = &self.values[node] {
                f(depth + 1, v);
            }
        }
    }

    /// Every stored prefix, as `+digits`.
    pub fn keys(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![(0usize, String::from("+"))];
        while let Some((node, prefix)) = stack.pop() {
            if self.values[node].is_some() {
                out.push(prefix.clone());
            }
            for (d, &child) in self.children[node].iter().enumerate() {
                if child != 0 {
                    stack.push((child as usize, format!("{prefix}{d}")));
                }
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.values.iter().filter(|v| v.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_longest_prefix_wins() {
        let mut t = DigitTrie::default();
        t.insert("+44", "GB");
        t.insert("+447911", "GG?");
        t.insert("+4479111", "GG");
        assert_eq!(t.longest_match("+447911123456"), Some((7, &"GG")));
        assert_eq!(t.longest_match("+447912123456"), Some((2, &"GB")));
        assert_eq!(t.longest_match("+46700000000"), None);
        assert_eq!(t.longest_match("+44"), Some((2, &"GB")));
    }

    proptest! {
        /// The trie agrees with a scan of every prefix for the longest one that matches.
        #[test]
        fn trie_agrees_with_a_naive_scan(
            prefixes in proptest::collection::vec("[1-9][0-9]{0,6}", 1..200),
            number in "[1-9][0-9]{3,14}",
        ) {
            let mut trie = DigitTrie::default();
            for (i, p) in prefixes.iter().enumerate() {
                trie.insert(p, i);
            }
            let naive = prefixes
                .iter()
                .enumerate()
                .filter(|(_, p)| number.starts_with(p.as_str()))
                .max_by_key(|(i, p)| (p.len(), *i))
                .map(|(i, p)| (p.len(), i));
            let ours = trie.longest_match(&format!("+{number}")).map(|(len, i)| (len, *i));
            // Equal prefixes listed twice: the later insert wins in both.
            prop_assert_eq!(ours, naive);
        }
    }
}
