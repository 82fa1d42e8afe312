//! Host-name globs, as policy rules and category files write them.
//!
//! - `www.example.com` matches that name only.
//! - `*.example.com`: a first label that is just `*` stands for one or more
//!   labels (`a.example.com`, `a.b.example.com`), never for none
//!   (`example.com` does not match).
//! - `api-*.example.com`: a `*` inside a label stands for any run of
//!   characters within that one label, possibly empty.
//! - `*` alone matches every name.
//!
//! Matching is ASCII case-insensitive and ignores one trailing dot; names
//! are compared as sent (IDNs in their `xn--` form).

use std::{fmt, str::FromStr};

/// A parsed host-name glob (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostGlob {
    /// The glob as written (lower-cased, without a trailing dot).
    text: String,
    /// `*.rest`: one or more labels, then the labels of `rest`.
    any_depth: bool,
    /// Every name (`*`).
    all: bool,
    /// How many labels `rest` has (they are read from `text`: a policy
    /// holds up to a million globs, and one allocation each is enough).
    labels: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadGlob(pub String);

impl fmt::Display for BadGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadGlob {}

impl FromStr for HostGlob {
    type Err = BadGlob;

    fn from_str(s: &str) -> Result<Self, BadGlob> {
        let bad = |why: &str| Err(BadGlob(format!("host-name glob {s:?}: {why}")));
        let text = s.trim();
        if text.len() > 253 {
            return bad("longer than 253 characters");
        }
        let text = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
        if text == "*" {
            return Ok(HostGlob {
                text,
                any_depth: false,
                all: true,
                labels: 0,
            });
        }
        let (any_depth, rest) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text.as_str()),
        };
        if rest.is_empty() {
            return bad("empty name");
        }
        let mut labels = 0;
        for label in rest.split('.') {
            if label.is_empty() {
                return bad("a label is empty (two dots in a row, or a leading dot)");
            }
            if label.len() > 63 {
                return bad("a label is longer than 63 characters");
            }
            if label == "*" {
                return bad("a `*` label may only come first (`*.example.com`)");
            }
            if label.contains("**") {
                return bad("`**` is not a glob here; one `*` matches any run within a label");
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'*')
            {
                return bad("only letters, digits, `-`, `_` and `*` may appear in a label");
            }
            // RFC 952/1123: no host name label starts or ends with a hyphen,
            // so such a glob could never match.
            if label.starts_with('-') || label.ends_with('-') {
                return bad("a label may not start or end with `-`");
            }
            labels += 1;
        }
        Ok(HostGlob {
            text,
            any_depth,
            all: false,
            labels,
        })
    }
}

impl fmt::Display for HostGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl serde::Serialize for HostGlob {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for HostGlob {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `*` within one label: any run of characters (a classic two-pointer
/// wildcard match, linear in practice for the few stars a label has).
fn label_matches(pat: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pat.len() && pat[p] != b'*' && pat[p].eq_ignore_ascii_case(&name[n]) {
            p += 1;
            n += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&b| b == b'*')
}

impl HostGlob {
    /// Whether `name` (a server name as sent) matches.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty() {
            return false;
        }
        if self.all {
            return true;
        }
        let labels: Vec<&str> = name.split('.').collect();
        if labels.iter().any(|l| l.is_empty()) {
            return false;
        }
        let n = self.labels;
        let fits = if self.any_depth {
            labels.len() > n
        } else {
            labels.len() == n
        };
        fits && self
            .rest()
            .split('.')
            .zip(&labels[labels.len() - n..])
            .all(|(p, l)| label_matches(p.as_bytes(), l.as_bytes()))
    }

    /// The labels after a leading `*.` (all of them for other globs).
    fn rest(&self) -> &str {
        if self.any_depth {
            &self.text[2..]
        } else {
            &self.text
        }
    }

    /// Whether every name this glob matches is matched by `self` (a sound
    /// under-approximation: `false` when unsure). Used to warn of shadowed
    /// rules.
    pub fn covers(&self, other: &HostGlob) -> bool {
        if self.all || self == other {
            return true;
        }
        if !self.is_suffix_glob() || other.all {
            return false;
        }
        // `*.s` covers names with more labels than `s` ending in `s`: the
        // same labels and a `*` before them, or more labels.
        let (s, o) = (self.rest(), other.rest());
        (o == s && other.any_depth)
            || (o.len() > s.len() && o.ends_with(s) && o.as_bytes()[o.len() - s.len() - 1] == b'.')
    }

    /// `*.s` with no `*` in `s`: the only globs that cover others than
    /// themselves and `*`.
    fn is_suffix_glob(&self) -> bool {
        self.any_depth && !self.rest().contains('*')
    }

    /// The key this glob is filed under as a possible cover of others
    /// (see [`CoverKey`]).
    pub fn cover_key(&self) -> CoverKey {
        if self.all {
            CoverKey::ALL
        } else if self.is_suffix_glob() {
            CoverKey::of(b'S', self.rest())
        } else {
            CoverKey::of(b'E', &self.text)
        }
    }

    /// The keys of every glob that may cover this one: if `x.covers(self)`
    /// then `x.cover_key()` is among them. At most one more than the
    /// glob has labels.
    pub fn covered_by_keys(&self) -> Vec<CoverKey> {
        let mut keys = vec![CoverKey::ALL, CoverKey::of(b'E', &self.text)];
        if !self.all {
            // `*.s` covers this glob for each suffix `s` it has that leaves
            // at least one label (or the `*` of an any-depth glob) before it.
            let rest = self.rest();
            if self.any_depth {
                keys.push(CoverKey::of(b'S', rest));
            }
            for (dot, _) in rest.match_indices('.') {
                keys.push(CoverKey::of(b'S', &rest[dot + 1..]));
            }
        }
        keys
    }
}

/// Where globs are found when rules are compared for shadowing: a map from
/// [`HostGlob::cover_key`] to rules finds the globs that may cover a given
/// one through its [`HostGlob::covered_by_keys`], in a few lookups instead
/// of a scan. It is a hash of what covering depends on (`*`; `*.s` by
/// `s`; any other glob by itself), so two globs may share one by chance:
/// [`HostGlob::covers`] stays the judge, a key only narrows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CoverKey(pub u64);

impl CoverKey {
    /// `*`: covers every glob.
    pub const ALL: CoverKey = CoverKey(0);

    /// FNV-1a of a kind byte and the text, then mixed, so that the low
    /// bits a hash table uses are as good as the high ones.
    fn of(kind: u8, text: &str) -> CoverKey {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in std::iter::once(kind).chain(text.bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        // Never the key of `*`.
        CoverKey(h | 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(s: &str) -> HostGlob {
        s.parse().unwrap()
    }

    #[test]
    fn exact_names_ignore_case_and_one_trailing_dot() {
        assert!(g("bank.example").matches("BANK.example."));
        assert!(g("Bank.Example.").matches("bank.example"));
        assert!(!g("bank.example").matches("www.bank.example"));
        assert!(!g("bank.example").matches("bank.example.."));
        assert!(!g("bank.example").matches(""));
    }

    #[test]
    fn leading_star_is_one_or_more_labels() {
        let w = g("*.bank.example");
        assert!(w.matches("www.bank.example"));
        assert!(w.matches("a.b.bank.example"));
        assert!(!w.matches("bank.example"));
        assert!(!w.matches("evilbank.example"));
        assert!(!w.matches(".bank.example"));
        assert!(!w.matches("bank.example.evil"));
    }

    #[test]
    fn star_inside_a_label_stays_in_that_label() {
        let w = g("api-*.example.com");
        assert!(w.matches("api-1.example.com"));
        assert!(w.matches("api-.example.com"));
        assert!(!w.matches("api.example.com"));
        assert!(!w.matches("api-1.eu.example.com"));
        assert!(g("*-prod.example.com").matches("db-prod.example.com"));
        assert!(g("a*b*c.example").matches("aXXbYYc.example"));
        assert!(g("a*b*c.example").matches("abc.example"));
        assert!(!g("a*b*c.example").matches("acb.example"));
    }

    #[test]
    fn lone_star_matches_every_name_but_none() {
        assert_eq!(g("*."), g("*"));
        assert!(g("*").matches("anything.example"));
        assert!(g("*").matches("localhost"));
        assert!(!g("*").matches(""));
    }

    #[test]
    fn bad_globs_say_why() {
        for (bad, why) in [
            ("", "empty name"),
            ("a.*.b", "may only come first"),
            ("a..b", "empty"),
            ("exa mple.com", "only letters"),
            ("**.example", "`**`"),
            ("*.*.example", "may only come first"),
            ("ex?mple.com", "only letters"),
            ("-a.example", "start or end with `-`"),
            ("a-.example", "start or end with `-`"),
            ("*.example-", "start or end with `-`"),
            ("*-.example", "start or end with `-`"),
        ] {
            let e = bad.parse::<HostGlob>().unwrap_err().to_string();
            assert!(
                e.contains("host-name glob") && e.contains(why),
                "{bad}: {e}"
            );
        }
        let long = format!("{}.example", "a".repeat(64));
        assert!(long.parse::<HostGlob>().is_err());
    }

    #[test]
    fn coverage_for_shadow_warnings() {
        assert!(g("*").covers(&g("*.a.example")));
        assert!(g("*.example").covers(&g("*.a.example")));
        assert!(g("*.example").covers(&g("www.example")));
        assert!(g("*.example").covers(&g("*.example")));
        assert!(!g("*.example").covers(&g("example")));
        assert!(!g("*.a.example").covers(&g("*.example")));
        assert!(!g("www.example").covers(&g("*.example")));
        assert!(!g("api-*.example").covers(&g("api-1.example")));
    }

    /// Every glob that covers another has its key among the other's
    /// covered-by keys, so an index by key misses no cover.
    #[test]
    fn cover_keys_find_every_covering_glob() {
        let all: Vec<HostGlob> = [
            "*",
            "*.example",
            "*.a.example",
            "www.a.example",
            "a.example",
            "example",
            "*.b.a.example",
            "api-*.example",
            "*.api-*.example",
            "*-x.a.example",
            "x.y.z.a.example",
        ]
        .iter()
        .map(|s| g(s))
        .collect();
        let mut covering_pairs = 0;
        for y in &all {
            let keys = y.covered_by_keys();
            assert!(keys.len() <= y.labels + 2, "{y}: {keys:?}");
            for x in &all {
                if x.covers(y) {
                    covering_pairs += 1;
                    assert!(keys.contains(&x.cover_key()), "{x} covers {y}: {keys:?}");
                }
            }
        }
        // Not a vacuous check: covers between different globs are there.
        assert!(covering_pairs > all.len() + 10, "{covering_pairs}");
    }

    #[test]
    fn serde_round_trip() {
        let j = serde_json::to_string(&g("*.Bank.example.")).unwrap();
        assert_eq!(j, "\"*.bank.example\"");
        let back: HostGlob = serde_json::from_str(&j).unwrap();
        assert_eq!(back, g("*.bank.example"));
        assert!(serde_json::from_str::<HostGlob>("\"a..b\"").is_err());
    }
}
