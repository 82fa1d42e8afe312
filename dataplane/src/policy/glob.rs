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
    /// `*.rest`: one or more labels, then `labels`.
    any_depth: bool,
    /// Every name (`*`).
    all: bool,
    labels: Vec<String>,
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
                labels: Vec::new(),
            });
        }
        let (any_depth, rest) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text.as_str()),
        };
        if rest.is_empty() {
            return bad("empty name");
        }
        let mut labels = Vec::new();
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
            labels.push(label.to_string());
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
        let n = self.labels.len();
        let fits = if self.any_depth {
            labels.len() > n
        } else {
            labels.len() == n
        };
        fits && self
            .labels
            .iter()
            .zip(&labels[labels.len() - n..])
            .all(|(p, l)| label_matches(p.as_bytes(), l.as_bytes()))
    }

    /// Whether every name this glob matches is matched by `self` (a sound
    /// under-approximation: `false` when unsure). Used to warn of shadowed
    /// rules.
    pub fn covers(&self, other: &HostGlob) -> bool {
        if self.all || self == other {
            return true;
        }
        if other.all || !self.any_depth || self.labels.iter().any(|l| l.contains('*')) {
            return false;
        }
        // `*.s` covers names with more labels than `s` ending in `s`.
        let n = self.labels.len();
        let extra = other.labels.len() + usize::from(other.any_depth);
        extra > n && other.labels[other.labels.len() - n..] == self.labels[..]
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

    #[test]
    fn serde_round_trip() {
        let j = serde_json::to_string(&g("*.Bank.example.")).unwrap();
        assert_eq!(j, "\"*.bank.example\"");
        let back: HostGlob = serde_json::from_str(&j).unwrap();
        assert_eq!(back, g("*.bank.example"));
        assert!(serde_json::from_str::<HostGlob>("\"a..b\"").is_err());
    }
}
