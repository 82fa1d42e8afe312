//! Decisions for new connections at their decision point (the compiled
//! side of the policy the control process owns).
//!
//! Today's policy is the tcp-split action with server-name exemptions:
//! split every steered connection except those whose ClientHello names an
//! exempt server, which are released to the XDP fast path. The full rule
//! language (prefixes, ports, categories, decrypt profiles) replaces
//! [`SplitPolicy`] behind the same [`Verdict`].

use std::fmt;

use crate::tls::hello::ClientHello;

/// What a connection showed by its decision point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Opening {
    /// The client's first bytes were a complete TLS ClientHello.
    Tls(ClientHello),
    /// The client's first bytes were something else (or it closed first).
    Other,
    /// The server sent data before the client did.
    ServerFirst,
}

/// What to do with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Terminate both halves and relay (tcp-split).
    Split,
    /// Release the held bytes unchanged and hand the flow to the XDP fast
    /// path for good.
    Pass,
}

/// A server-name pattern: `host.example` matches that name only;
/// `*.example` matches every name below `example` (any depth), not
/// `example` itself. Case-insensitive; a trailing dot is ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SniPattern {
    suffix: String,
    wildcard: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub struct BadPattern(String);

impl fmt::Display for BadPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadPattern {}

impl std::str::FromStr for SniPattern {
    type Err = BadPattern;

    fn from_str(s: &str) -> Result<Self, BadPattern> {
        let lower = s.trim().trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, lower.clone()),
        };
        let bad = |why: &str| Err(BadPattern(format!("server-name pattern {s:?}: {why}")));
        if name.is_empty() {
            return bad("empty name");
        }
        if name.contains('*') {
            return bad("`*` is allowed only as the whole first label (`*.example.com`)");
        }
        for label in name.split('.') {
            if label.is_empty() || label.len() > 63 {
                return bad("a label is empty or longer than 63 characters");
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return bad("only letters, digits, `-` and `_` may appear in a label");
            }
        }
        Ok(SniPattern {
            suffix: name,
            wildcard,
        })
    }
}

impl SniPattern {
    pub fn matches(&self, sni: &str) -> bool {
        let sni = sni.trim_end_matches('.');
        if !self.wildcard {
            return sni.eq_ignore_ascii_case(&self.suffix);
        }
        let n = self.suffix.len();
        sni.len() > n + 1
            && sni.as_bytes()[sni.len() - n - 1] == b'.'
            && sni[sni.len() - n..].eq_ignore_ascii_case(&self.suffix)
    }
}

/// Split everything except connections to exempt server names.
#[derive(Clone, Debug, Default)]
pub struct SplitPolicy {
    pub exempt_sni: Vec<SniPattern>,
}

impl SplitPolicy {
    pub fn decide(&self, opening: &Opening) -> Verdict {
        match opening {
            Opening::Tls(ClientHello { sni: Some(sni), .. })
                if self.exempt_sni.iter().any(|p| p.matches(sni)) =>
            {
                Verdict::Pass
            }
            _ => Verdict::Split,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> SniPattern {
        s.parse().unwrap()
    }

    #[test]
    fn exact_and_wildcard_names() {
        assert!(p("bank.example").matches("BANK.example."));
        assert!(!p("bank.example").matches("www.bank.example"));
        let w = p("*.bank.example");
        assert!(w.matches("www.bank.example"));
        assert!(w.matches("a.b.bank.example"));
        assert!(!w.matches("bank.example"));
        assert!(!w.matches("evilbank.example"));
        assert!(!w.matches(".bank.example"));
    }

    #[test]
    fn bad_patterns_say_why() {
        for bad in ["", "*", "*.", "a.*.b", "a..b", "exa mple.com", "*foo.com"] {
            let e = bad.parse::<SniPattern>().unwrap_err();
            assert!(e.to_string().contains("server-name pattern"), "{bad}: {e}");
        }
    }

    #[test]
    fn exempt_names_pass_and_the_rest_split() {
        let policy = SplitPolicy {
            exempt_sni: vec![p("*.bank.example")],
        };
        let hello = |sni: Option<&str>| {
            Opening::Tls(ClientHello {
                sni: sni.map(Into::into),
                alpn: vec![],
            })
        };
        assert_eq!(
            policy.decide(&hello(Some("www.bank.example"))),
            Verdict::Pass
        );
        assert_eq!(policy.decide(&hello(Some("shop.example"))), Verdict::Split);
        assert_eq!(policy.decide(&hello(None)), Verdict::Split);
        assert_eq!(policy.decide(&Opening::Other), Verdict::Split);
        assert_eq!(policy.decide(&Opening::ServerFirst), Verdict::Split);
    }
}
