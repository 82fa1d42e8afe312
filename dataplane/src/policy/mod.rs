//! The compiled policy the dataplane executes, and its decisions.
//!
//! The control process (`loupe`) owns the policy language: it parses the
//! TOML file, reports errors, and compiles it into a [`Policy`], which it
//! sends here as JSON. The dataplane validates it again ([`Policy::validate`],
//! never trusting the wire), derives the XDP steering from it
//! ([`Policy::steering`]) and swaps it in between batches. A new connection
//! is decided once, at its decision point (a complete ClientHello, other
//! first bytes, or the server speaking first): the first rule that matches
//! gives the action; a connection keeps its decision for life.

pub mod glob;
pub mod prefix;

use std::{
    collections::BTreeMap,
    fmt,
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use loupe_common::{Addr, MAX_PREFIXES, MAX_STEER_PORTS};
use serde::{Deserialize, Serialize};

pub use self::glob::{BadGlob, CoverKey, HostGlob};
pub use self::prefix::{Prefix, PrefixKey};
pub use crate::inspect::signature::SignatureAction;

/// A rule's action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Inspect the plaintext: a TLS man-in-the-middle with the rule's
    /// decryption profile.
    Decrypt,
    /// Leave the connection alone: its held bytes go out unchanged and the
    /// flow moves to the XDP fast path.
    NoDecrypt,
    /// Refuse: a TLS alert (or a RST when the client did not speak TLS) to
    /// the client, a RST to the server.
    Block,
    /// Terminate both TCP halves and relay the byte streams.
    TcpSplit,
    /// SSL inbound inspection of the organisation's own server: the
    /// client's TLS is terminated with that server's certificate and its
    /// key on the HSM (the rule's server profile), and re-encrypted toward
    /// the server.
    InboundInspect,
}

impl Action {
    pub const ALL: [Action; 5] = [
        Action::Decrypt,
        Action::NoDecrypt,
        Action::Block,
        Action::TcpSplit,
        Action::InboundInspect,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Action::Decrypt => "decrypt",
            Action::NoDecrypt => "no-decrypt",
            Action::Block => "block",
            Action::TcpSplit => "tcp-split",
            Action::InboundInspect => "inbound-inspect",
        }
    }

    /// What the dataplane does for it today.
    pub fn verdict(self) -> Verdict {
        match self {
            Action::NoDecrypt => Verdict::Pass,
            Action::Block => Verdict::Refuse,
            Action::TcpSplit => Verdict::Split,
            Action::Decrypt | Action::InboundInspect => Verdict::Decrypt,
        }
    }
}

impl FromStr for Action {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Action::ALL
            .into_iter()
            .find(|a| a.label() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Action::ALL.iter().map(|a| a.label()).collect();
                format!(
                    "unknown action {s:?} (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

/// What the session table does with a connection at its decision point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Terminate both halves and relay (tcp-split).
    Split,
    /// Terminate both halves and intercept the TLS between them.
    Decrypt,
    /// Release the held bytes unchanged and hand the flow to the XDP fast
    /// path for good.
    Pass,
    /// Refuse the client and reset the server.
    Refuse,
}

/// An inclusive range of TCP ports; `443` or `8000-8099` as text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    pub fn covers(&self, other: &PortRange) -> bool {
        self.first <= other.first && other.last <= self.last
    }
}

impl FromStr for PortRange {
    type Err = String;

    /// `443` or `8000-8099`: digits only, no spaces or signs.
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
            _ => Err(format!("bad port {p:?}: expected a number from 1 to 65535")),
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(s)?, port(s)?),
        };
        if first > last {
            return Err(format!("bad port range {s:?}: {first} is above {last}"));
        }
        Ok(PortRange { first, last })
    }
}

/// Port ranges sorted, with overlapping and adjacent ones joined.
pub fn merge_ports(ranges: &[PortRange]) -> Vec<PortRange> {
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable_by_key(|r| r.first);
    let mut out: Vec<PortRange> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match out.last_mut() {
            Some(last) if u32::from(r.first) <= u32::from(last.last) + 1 => {
                last.last = last.last.max(r.last);
            }
            _ => out.push(r),
        }
    }
    out
}

/// The ports of `ranges` that are not in `excluded`, both as
/// [`merge_ports`] makes them (the result is too): linear in the two,
/// whatever the ranges' widths.
pub fn ports_less(ranges: &[PortRange], excluded: &[PortRange]) -> Vec<PortRange> {
    let mut out = Vec::new();
    for r in ranges {
        let (mut start, end) = (u32::from(r.first), u32::from(r.last));
        let from = excluded.partition_point(|e| e.last < r.first);
        for e in excluded[from..]
            .iter()
            .take_while(|e| u32::from(e.first) <= end)
        {
            if u32::from(e.first) > start {
                out.push(PortRange {
                    first: start as u16,
                    last: e.first - 1,
                });
            }
            start = start.max(u32::from(e.last) + 1);
        }
        if start <= end {
            out.push(PortRange {
                first: start as u16,
                last: end as u16,
            });
        }
    }
    out
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A rule's conditions. Within a list any element may match; across the
/// fields all must hold; a `not_` field holds when none of its elements
/// matches. An empty field holds for every connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Match {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub src: Vec<Prefix>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_src: Vec<Prefix>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dst: Vec<Prefix>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_dst: Vec<Prefix>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRange>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<PortRange>,
    /// Server names (the ClientHello's SNI); a connection without one
    /// matches no `sni` and every `not_sni`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sni: Vec<HostGlob>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_sni: Vec<HostGlob>,
    /// Categories of the server name (see [`Policy::categories`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_categories: Vec<String>,
}

/// An ordered rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    #[serde(rename = "match", default)]
    pub matcher: Match,
    pub action: Action,
    /// The decryption profile (for `decrypt` and `inbound-inspect`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// The server profile (for `inbound-inspect`, which needs one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_profile: Option<String>,
}

/// How the engine checks the real server's certificate on an inbound
/// connection's server leg.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamCheck {
    /// The server must present the server profile's own certificate.
    #[default]
    Pinned,
    /// The server's chain must verify against the decryption profile's
    /// trust store, for the name the client asked for.
    TrustStore,
}

impl UpstreamCheck {
    pub fn label(self) -> &'static str {
        match self {
            UpstreamCheck::Pinned => "pinned",
            UpstreamCheck::TrustStore => "trust-store",
        }
    }
}

/// A server profile (`[server_profiles.NAME]`): one of the organisation's
/// servers as inbound inspection presents it: its certificate chain (a
/// PEM file, leaf first) and its private key on the HSM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerProfile {
    /// The chain file (absolute once compiled).
    pub chain: String,
    /// The token holding the key (`None`: the engine's token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The key's label as `loupe key` names it.
    pub key: String,
    #[serde(default)]
    pub upstream: UpstreamCheck,
}

/// What to do with a certificate problem upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// Refuse the connection.
    Block,
    /// Let the client decide: the impersonation certificate is signed by the
    /// forward-untrust CA, so the client sees an untrusted certificate.
    PassOn,
}

/// What to do with a connection that cannot be decrypted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fallback {
    /// Refuse it (fail closed).
    Block,
    /// Leave it encrypted: before the takeover it goes to the fast path
    /// unchanged; after it (client authentication, a server outside the
    /// allowed versions) this connection ends and the site goes into the
    /// decryption exclusion cache, so the next one is passed.
    NoDecrypt,
}

impl Fallback {
    pub fn label(self) -> &'static str {
        match self {
            Fallback::Block => "block",
            Fallback::NoDecrypt => "no-decrypt",
        }
    }
}

/// What to do with a ClientHello carrying encrypted_client_hello.
///
/// A client sends that extension with a real ECH configuration (the
/// server name it wants is hidden; the visible one is the ECH provider's
/// public name) or as GREASE (a random placeholder; Chromium sends it on
/// every connection, the visible name being the real one). Nothing on the
/// wire tells the two apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EchAction {
    /// Decrypt as a server that does not support ECH: for the visible
    /// name. GREASE is what it is, and a real ECH client learns that ECH
    /// was not accepted (and, seeing a certificate from a root installed
    /// locally, goes on or retries without it, as the ECH draft's
    /// middlebox section has it).
    Decrypt,
    /// Leave it encrypted (released to the fast path).
    NoDecrypt,
    /// Refuse it.
    Block,
}

impl EchAction {
    pub fn label(self) -> &'static str {
        match self {
            EchAction::Decrypt => "decrypt",
            EchAction::NoDecrypt => "no-decrypt",
            EchAction::Block => "block",
        }
    }
}

/// TLS protocol versions a profile may allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// Seconds a site stays in the decryption exclusion cache (12 h, as a
/// firewall keeps it).
pub const EXCLUDE_SECS: u64 = 12 * 3600;

fn block() -> OnError {
    OnError::Block
}
fn fallback_block() -> Fallback {
    Fallback::Block
}
fn fallback_pass() -> Fallback {
    Fallback::NoDecrypt
}
fn ech_decrypt() -> EchAction {
    EchAction::Decrypt
}
fn exclude_secs() -> u64 {
    EXCLUDE_SECS
}
fn is_false(b: &bool) -> bool {
    !*b
}

/// A decryption profile: checks on the upstream server's certificate, the
/// protocol versions and algorithms allowed on both sides, and what to do
/// when decryption cannot go ahead. Every field but the four original ones
/// has a default, so older policies stay valid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub expired: OnError,
    pub untrusted: OnError,
    /// The certificate does not name the server the client asked for.
    #[serde(default = "block")]
    pub name_mismatch: OnError,
    /// RSA under 2048 bits, EC under 256, or a SHA-1/MD5 signature.
    #[serde(default = "block")]
    pub weak: OnError,
    /// Revoked, by the configured revocation data (`crls`).
    #[serde(default = "block")]
    pub revoked: OnError,
    pub min_version: TlsVersion,
    pub max_version: TlsVersion,
    /// A client or server outside the allowed versions, suites or groups.
    #[serde(default = "fallback_block")]
    pub unsupported: Fallback,
    /// Cipher suites allowed on both legs (rustls names, e.g.
    /// `TLS13_AES_256_GCM_SHA384`); empty: every suite Loupe offers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub suites: Vec<String>,
    /// Key exchange groups allowed (`X25519MLKEM768`, `X25519`,
    /// `secp256r1`, `secp384r1`); empty: every group, post-quantum first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// The server asks for a client certificate (the engine cannot present
    /// the client's).
    #[serde(default = "fallback_pass")]
    pub client_auth: Fallback,
    /// The HSM cannot sign (down, timed out, queue full).
    #[serde(default = "fallback_block")]
    pub hsm_unavailable: Fallback,
    /// The engine is out of resources for another decrypted connection.
    #[serde(default = "fallback_block")]
    pub no_resources: Fallback,
    /// A ClientHello with encrypted_client_hello (real ECH or GREASE).
    #[serde(default = "ech_decrypt")]
    pub ech: EchAction,
    /// Drop QUIC (UDP/443) to the destinations of the `decrypt` rules with
    /// this profile, in XDP, so browsers fall back to TLS over TCP (which
    /// is decrypted). Off by default: QUIC then passes unseen.
    #[serde(default, skip_serializing_if = "is_false")]
    pub block_quic: bool,
    /// Copy the CN into the SANs when the server's certificate has none.
    #[serde(default, skip_serializing_if = "is_false")]
    pub append_cn_to_san: bool,
    /// Write both legs' TLS secrets here (NSS key log format); off when
    /// absent. Enabling it is written to the HSM audit log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keylog: Option<String>,
    /// CA certificates (PEM) upstream servers are checked against; the
    /// system bundle when absent. Never Loupe's own CAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_store: Option<String>,
    /// Certificate revocation lists (PEM or DER) to check chains against.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub crls: Vec<String>,
    /// Seconds a site stays excluded from decryption after a pinned client
    /// refused the minted certificate, or after client authentication or
    /// an unsupported version made it `no-decrypt`.
    #[serde(default = "exclude_secs")]
    pub exclude_secs: u64,
    /// Parse HTTP/1.1 in decrypted connections: one log record per
    /// request. On by default.
    #[serde(default = "yes")]
    pub http: bool,
    /// The policy's signatures (`[signatures.NAME]`) to look for in both
    /// directions of decrypted connections.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signatures: Vec<String>,
    /// Copy the decrypted plaintext of its connections to these of the
    /// engine's export destinations ([`crate::export`]); none by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export: Vec<ExportSink>,
    /// The token (tenant) whose CAs sign the certificates minted under
    /// this profile; the engine's first token when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// An export destination a profile may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExportSink {
    /// The ring of pcapng files (`loupe-dataplane --export-pcap DIR`).
    Pcap,
    /// The mirror port (`loupe-dataplane --export-mirror IFACE`).
    Mirror,
    /// The client leg as it was on the wire (TLS), with its key log in
    /// Decryption Secrets Blocks, in the pcapng directory's second ring.
    PcapTls,
}

impl ExportSink {
    pub fn label(self) -> &'static str {
        match self {
            ExportSink::Pcap => "pcap",
            ExportSink::Mirror => "mirror",
            ExportSink::PcapTls => "pcap-tls",
        }
    }
}

fn yes() -> bool {
    true
}

/// A URL rule (`[[url_rules]]`): matched, in order, against every HTTP
/// request of decrypted connections whose profile parses HTTP; the first
/// that matches decides.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UrlRule {
    pub name: String,
    /// Host globs the request's host must match one of (none: any host).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostGlob>,
    /// Path globs (`*` matches any run of characters) the request's path
    /// must match one of (none: any path); see [`normalize_path`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Categories (the policy's lists) the request's host must be in one
    /// of (none: any host).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
    /// The host globs of those categories, filled in by
    /// [`Policy::prepared_url_rules`] (not sent: the policy has them).
    #[serde(skip)]
    pub category_hosts: Vec<HostGlob>,
    pub action: UrlAction,
}

/// What a URL rule does with the requests it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UrlAction {
    /// Let it through (no later rule is looked at); the record names the rule.
    Allow,
    /// Let it through and name the rule in the record.
    Log,
    /// Answer it with a 403 page naming the rule and close the connection;
    /// the server never sees it.
    Block,
}

impl UrlAction {
    pub fn label(self) -> &'static str {
        match self {
            UrlAction::Allow => "allow",
            UrlAction::Log => "log",
            UrlAction::Block => "block",
        }
    }
}

impl UrlRule {
    /// Whether the request for `host` (any port cut off, any case) and
    /// `path` (as [`normalize_path`] gives it) is one this rule matches.
    pub fn matches(&self, host: Option<&str>, path: &str) -> bool {
        let host = host.map(|h| {
            // A port is cut off: `name:443` or `[v6]:443`.
            let h = match h.strip_prefix('[') {
                Some(rest) => rest.split_once(']').map_or(h, |(addr, _)| addr),
                None => match h.split_once(':') {
                    Some((name, port))
                        if !port.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) =>
                    {
                        name
                    }
                    _ => h,
                },
            };
            h.trim_end_matches('.').to_ascii_lowercase()
        });
        let in_any = |globs: &[HostGlob]| {
            host.as_deref()
                .is_some_and(|h| globs.iter().any(|g| g.matches(h)))
        };
        (self.hosts.is_empty() || in_any(&self.hosts))
            && (self.categories.is_empty() || in_any(&self.category_hosts))
            && (self.paths.is_empty() || self.paths.iter().any(|p| path_glob(p, path)))
    }
}

/// A request target's path as URL rules see it, so that spellings a server
/// takes for the same resource match alike: the scheme and authority of an
/// absolute target cut off, then the query and fragment; percent-encoded
/// bytes decoded; runs of `/` merged; `.` and `..` segments resolved (never
/// above the root). A target that is not a path (`*`, an authority) is
/// kept as it is. Matching is also blind to ASCII case ([`path_glob`]),
/// so a rule errs on the side of matching.
pub fn normalize_path(target: &str) -> String {
    let mut rest = target;
    if let Some((scheme, after)) = target.split_once("://") {
        if !scheme.contains('/') {
            rest = after.find('/').map_or("/", |i| &after[i..]);
        }
    }
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    if !rest.is_empty() && !rest.starts_with('/') {
        // `*` (OPTIONS) or an authority (CONNECT): not a path.
        return rest.to_string();
    }
    let raw = rest.as_bytes();
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            raw[i],
            raw.get(i + 1).and_then(|b| hex(*b)),
            raw.get(i + 2).and_then(|b| hex(*b)),
        ) {
            (b'%', Some(h), Some(l)) => {
                bytes.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                bytes.push(b);
                i += 1;
            }
        }
    }
    let decoded = String::from_utf8_lossy(&bytes);
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len() + 1);
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (decoded.ends_with('/') && !segments.is_empty()) {
        out.push('/');
    }
    out
}

/// Whether `text` matches `glob` (ASCII case aside), where `*` stands for
/// any run of characters. Only the last star is backtracked to, so the cost is at
/// most the product of the two lengths (both bounded: globs by the
/// checker, paths by the HTTP inspector), and linear for the usual
/// `/prefix/*` and `*.ext`.
pub fn path_glob(glob: &str, text: &str) -> bool {
    let (g, t) = (glob.as_bytes(), text.as_bytes());
    let (mut gi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if gi < g.len() && g[gi] == b'*' {
            star = Some((gi, ti));
            gi += 1;
        } else if gi < g.len() && g[gi].eq_ignore_ascii_case(&t[ti]) {
            gi += 1;
            ti += 1;
        } else if let Some((sg, st)) = star {
            gi = sg + 1;
            ti = st + 1;
            star = Some((sg, st + 1));
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|b| *b == b'*')
}

/// URL rules one policy may have, host and path globs in them all, and
/// the longest path glob (every request is matched against them on the
/// packet worker).
pub const MAX_URL_RULES: usize = 1_000;
pub const MAX_URL_PATTERNS: usize = 10_000;
pub const MAX_PATH_GLOB: usize = 256;

/// A content signature (`[signatures.NAME]`): bytes looked for in the
/// plaintext of decrypted connections, and what a match does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// (In hex when serialized: half the size of a list of numbers.)
    #[serde(with = "hex_pattern")]
    pub pattern: Vec<u8>,
    pub action: SignatureAction,
}

/// Signature patterns as hex strings.
mod hex_pattern {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        if !text.len().is_multiple_of(2) {
            return Err(D::Error::custom("an odd number of hex digits"));
        }
        (0..text.len())
            .step_by(2)
            .map(|i| {
                text.get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| D::Error::custom("not hex"))
            })
            .collect()
    }
}

/// All signature patterns of a policy together, at most (a policy goes to
/// the dataplane in one message).
pub const MAX_SIGNATURE_BYTES: usize = 4 << 20;

impl Default for Profile {
    fn default() -> Self {
        Profile {
            expired: OnError::Block,
            untrusted: OnError::Block,
            name_mismatch: OnError::Block,
            weak: OnError::Block,
            revoked: OnError::Block,
            min_version: TlsVersion::Tls12,
            max_version: TlsVersion::Tls13,
            unsupported: Fallback::Block,
            suites: Vec::new(),
            groups: Vec::new(),
            client_auth: Fallback::NoDecrypt,
            hsm_unavailable: Fallback::Block,
            no_resources: Fallback::Block,
            ech: EchAction::Decrypt,
            block_quic: false,
            append_cn_to_san: false,
            keylog: None,
            trust_store: None,
            crls: Vec::new(),
            exclude_secs: EXCLUDE_SECS,
            http: true,
            signatures: Vec::new(),
            export: Vec::new(),
            token: None,
        }
    }
}

/// Cipher suites a profile may name (rustls's names of what it offers).
pub fn known_suites() -> Vec<&'static str> {
    rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES
        .iter()
        .filter_map(|s| s.suite().as_str())
        .collect()
}

/// Key exchange groups a profile may name.
pub fn known_groups() -> Vec<&'static str> {
    rustls::crypto::aws_lc_rs::ALL_KX_GROUPS
        .iter()
        .filter_map(|g| g.name().as_str())
        .collect()
}

impl Profile {
    /// What the dataplane cannot take on trust: versions in order, known
    /// suites and groups, at least one suite for an allowed version.
    pub fn check(&self) -> Result<(), String> {
        if self.min_version > self.max_version {
            return Err("min_version is above max_version".into());
        }
        let suites = known_suites();
        for s in &self.suites {
            if !suites.contains(&s.as_str()) {
                return Err(format!(
                    "unknown cipher suite {s:?} (known: {})",
                    suites.join(", ")
                ));
            }
        }
        let groups = known_groups();
        for g in &self.groups {
            if !groups.contains(&g.as_str()) {
                return Err(format!(
                    "unknown key exchange group {g:?} (known: {})",
                    groups.join(", ")
                ));
            }
        }
        if !self.suites.is_empty() {
            let usable = self.suites.iter().any(|s| {
                let v13 = s.starts_with("TLS13_");
                (v13 && self.max_version == TlsVersion::Tls13)
                    || (!v13 && self.min_version == TlsVersion::Tls12)
            });
            if !usable {
                return Err("no allowed cipher suite belongs to an allowed TLS version".into());
            }
        }
        if let Some(t) = &self.token {
            if t.trim().is_empty() || t.chars().any(char::is_control) {
                return Err(format!("token {t:?} is not a token label"));
            }
        }
        Ok(())
    }
}

/// The compiled policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Given by control, increasing with each apply.
    pub version: u64,
    /// SHA-256 of the sources (policy and category file): control compares
    /// it to re-sync after a restart.
    pub digest: String,
    /// Where it came from (for `policy show` and the log).
    pub source: String,
    /// Ports examined for rules that name none (and for the default).
    pub tls_ports: Vec<u16>,
    /// Addresses never steered to userspace (source or destination).
    #[serde(default)]
    pub exempt: Vec<Prefix>,
    /// For connections no rule matches.
    pub default_action: Action,
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
    /// Category name → the host names in it.
    #[serde(default)]
    pub categories: BTreeMap<String, Vec<HostGlob>>,
    /// Content signatures by name (profiles say which they use).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub signatures: BTreeMap<String, Signature>,
    /// URL rules, in order (for every profile that parses HTTP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub url_rules: Vec<UrlRule>,
    /// Server profiles by name (`inbound-inspect` rules name theirs).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub server_profiles: BTreeMap<String, ServerProfile>,
}

/// The XDP steering a policy needs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Steering {
    pub ports: Vec<u16>,
    pub prefixes: Vec<Prefix>,
    pub exempt: Vec<Prefix>,
    /// Destinations QUIC (UDP/443) is dropped to.
    #[serde(default)]
    pub quic: Vec<Prefix>,
}

/// What a connection looks like to the rules.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    pub client: Addr,
    pub server: Addr,
    pub server_port: u16,
    pub sni: Option<&'a str>,
}

/// A decision: the action and the rule that gave it (`None`: the default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub rule: Option<usize>,
}

/// Most rules a policy may have.
pub const MAX_RULES: usize = 10_000;
/// Content signatures one policy may define.
pub const MAX_SIGNATURES: usize = 10_000;
/// Most host-name globs (in rules and categories together).
pub const MAX_GLOBS: usize = 1_000_000;

/// Name the log uses for the default action.
pub const DEFAULT_RULE: &str = "(default)";

fn any_or_empty<T>(list: &[T], f: impl Fn(&T) -> bool) -> bool {
    list.is_empty() || list.iter().any(f)
}

impl Policy {
    /// Split everything except connections whose ClientHello names one of
    /// `exempt_sni` (the engine's `--tcp-split` without a control process).
    pub fn split_all(tls_ports: &[u16], exempt_sni: Vec<HostGlob>) -> Policy {
        let rules = if exempt_sni.is_empty() {
            Vec::new()
        } else {
            vec![Rule {
                name: "split-exempt-sni".into(),
                matcher: Match {
                    sni: exempt_sni,
                    ..Match::default()
                },
                action: Action::NoDecrypt,
                profile: None,
                server_profile: None,
            }]
        };
        Policy {
            version: 0,
            // Not from a file: a digest no file has.
            digest: "0".repeat(64),
            source: "command line (--tcp-split)".into(),
            tls_ports: tls_ports.to_vec(),
            exempt: Vec::new(),
            default_action: Action::TcpSplit,
            rules,
            profiles: BTreeMap::new(),
            server_profiles: BTreeMap::new(),
            categories: BTreeMap::new(),
            signatures: BTreeMap::new(),
            url_rules: Vec::new(),
        }
    }

    /// The URL rules with their categories' host globs filled in, as the
    /// inspectors match them.
    pub fn prepared_url_rules(&self) -> Vec<UrlRule> {
        self.url_rules
            .iter()
            .map(|r| UrlRule {
                category_hosts: r
                    .categories
                    .iter()
                    .filter_map(|c| self.categories.get(c))
                    .flatten()
                    .cloned()
                    .collect(),
                ..r.clone()
            })
            .collect()
    }

    fn in_categories(&self, names: &[String], sni: Option<&str>) -> bool {
        let Some(sni) = sni else { return false };
        names.iter().any(|c| {
            self.categories
                .get(c)
                .is_some_and(|globs| globs.iter().any(|g| g.matches(sni)))
        })
    }

    /// The conditions on addresses and ports.
    fn matches_addresses(&self, m: &Match, s: &Subject) -> bool {
        any_or_empty(&m.src, |p| p.contains(&s.client))
            && !m.not_src.iter().any(|p| p.contains(&s.client))
            && any_or_empty(&m.dst, |p| p.contains(&s.server))
            && !m.not_dst.iter().any(|p| p.contains(&s.server))
            && self.port_matches(m, s.server_port)
    }

    fn matches(&self, m: &Match, s: &Subject) -> bool {
        let sni_in = |globs: &[HostGlob]| s.sni.is_some_and(|n| globs.iter().any(|g| g.matches(n)));
        self.matches_addresses(m, s)
            && (m.sni.is_empty() || sni_in(&m.sni))
            && !sni_in(&m.not_sni)
            && (m.categories.is_empty() || self.in_categories(&m.categories, s.sni))
            && !self.in_categories(&m.not_categories, s.sni)
    }

    /// A rule without ports stands for the policy's TLS ports.
    fn port_matches(&self, m: &Match, port: u16) -> bool {
        let listed = if m.ports.is_empty() {
            self.tls_ports.contains(&port)
        } else {
            m.ports.iter().any(|r| r.contains(port))
        };
        listed && !m.not_ports.iter().any(|r| r.contains(port))
    }

    /// The first rule that matches, or the default.
    pub fn decide(&self, s: &Subject) -> Decision {
        match self.rules.iter().position(|r| self.matches(&r.matcher, s)) {
            Some(i) => Decision {
                action: self.rules[i].action,
                rule: Some(i),
            },
            None => Decision {
                action: self.default_action,
                rule: None,
            },
        }
    }

    /// The decision for a connection whose server name could not be
    /// learned: its hold ended before a decision point (no complete
    /// ClientHello in time or within the bound, evicted while held), or it
    /// cannot be split (URG before the decision). Rules on the name may or
    /// may not match. Fails closed: a `block` rule that might match before
    /// the first rule that surely matches blocks the connection (otherwise
    /// splitting a ClientHello into many segments would get around every
    /// name-based block); else the first rule that surely matches, or the
    /// default.
    pub fn decide_unnamed(&self, s: &Subject) -> Decision {
        for (i, r) in self.rules.iter().enumerate() {
            let m = &r.matcher;
            if !self.matches_addresses(m, s) {
                continue;
            }
            let on_name = !(m.sni.is_empty()
                && m.not_sni.is_empty()
                && m.categories.is_empty()
                && m.not_categories.is_empty());
            if !on_name || r.action == Action::Block {
                return Decision {
                    action: r.action,
                    rule: Some(i),
                };
            }
        }
        Decision {
            action: self.default_action,
            rule: None,
        }
    }

    /// The decryption profile of the rule behind a decision (`None`: the
    /// default profile).
    pub fn profile_of(&self, d: &Decision) -> Option<&str> {
        d.rule
            .and_then(|i| self.rules.get(i))
            .and_then(|r| r.profile.as_deref())
    }

    /// The server profile of the rule behind a decision (inbound-inspect).
    pub fn server_profile_of(&self, d: &Decision) -> Option<&str> {
        d.rule
            .and_then(|i| self.rules.get(i))
            .filter(|r| r.action == Action::InboundInspect)
            .and_then(|r| r.server_profile.as_deref())
    }

    /// The name of the rule behind a decision.
    pub fn rule_name(&self, d: &Decision) -> &str {
        d.rule
            .and_then(|i| self.rules.get(i))
            .map_or(DEFAULT_RULE, |r| r.name.as_str())
    }

    /// The ports a rule examines: its own, or the TLS ports, less its
    /// `not_ports` (sorted, disjoint ranges).
    pub fn examined_ports(&self, m: &Match) -> Vec<PortRange> {
        let own = if m.ports.is_empty() {
            self.tls_ports
                .iter()
                .map(|&p| PortRange { first: p, last: p })
                .collect()
        } else {
            m.ports.clone()
        };
        ports_less(&merge_ports(&own), &merge_ports(&m.not_ports))
    }

    /// Marks the ports a rule examines in `set` (one flag per port).
    fn mark_rule_ports(&self, m: &Match, set: &mut [bool]) {
        for r in self.examined_ports(m) {
            set[usize::from(r.first)..=usize::from(r.last)].fill(true);
        }
    }

    /// The steering the rules need: the ports and server prefixes of every
    /// rule (a `no-decrypt` rule's connections are steered too, held for
    /// their ClientHello, decided and logged, then handed to the XDP fast
    /// path), the default action's unless it is `no-decrypt` (connections
    /// no rule names are then never seen), and the policy's exemptions,
    /// which keep addresses out of userspace altogether.
    pub fn steering(&self) -> Result<Steering, String> {
        let mut port_set = vec![false; 1 << 16];
        let mut prefixes = Vec::new();
        let default = Match::default();
        let default_acts = self.default_action != Action::NoDecrypt;
        let matchers = self.rules.iter().map(|r| &r.matcher);
        for m in matchers.chain(default_acts.then_some(&default)) {
            self.mark_rule_ports(m, &mut port_set);
            if m.dst.is_empty() {
                prefixes.extend(prefix::default_steer_prefixes());
            } else {
                prefixes.extend(m.dst.iter().copied());
            }
        }
        let ports: Vec<u16> = (1..=u16::MAX)
            .filter(|&p| port_set[usize::from(p)])
            .collect();
        if ports.len() > MAX_STEER_PORTS as usize {
            return Err(format!(
                "the rules examine {} ports, more than the {MAX_STEER_PORTS} the classifier \
                 steers (narrow the port ranges)",
                ports.len()
            ));
        }
        let mut kept = minimal(prefixes);
        if ports.is_empty() {
            kept.clear();
        }
        // QUIC blocked toward what decrypt rules whose profile says so
        // cover (the default action's profile is the default one, which
        // does not block QUIC).
        let mut quic = Vec::new();
        for r in &self.rules {
            let blocks = r.action == Action::Decrypt
                && r.profile
                    .as_ref()
                    .and_then(|p| self.profiles.get(p))
                    .is_some_and(|p| p.block_quic);
            if blocks {
                if r.matcher.dst.is_empty() {
                    quic.extend(prefix::default_steer_prefixes());
                } else {
                    quic.extend(r.matcher.dst.iter().copied());
                }
            }
        }
        Ok(Steering {
            ports,
            prefixes: kept,
            exempt: self.exempt.clone(),
            quic: minimal(quic),
        })
    }

    /// Checks what the wire cannot: rule names unique and not empty,
    /// profiles and categories named by rules present, ports sane, and a
    /// steering that fits the classifier. Control checks all of this with
    /// file positions first; the dataplane checks again on receipt.
    pub fn validate(&self) -> Result<(), String> {
        // Bounds first: everything after is linear in them (or the
        // prefix de-duplication, quadratic in at most MAX_PREFIXES).
        let prefixes: usize = self
            .rules
            .iter()
            .map(|r| {
                r.matcher.dst.len()
                    + r.matcher.src.len()
                    + r.matcher.not_src.len()
                    + r.matcher.not_dst.len()
            })
            .sum();
        let globs: usize = self.categories.values().map(Vec::len).sum::<usize>()
            + self
                .rules
                .iter()
                .map(|r| r.matcher.sni.len() + r.matcher.not_sni.len())
                .sum::<usize>();
        for (what, n, max) in [
            ("rules", self.rules.len(), MAX_RULES),
            ("tls_ports", self.tls_ports.len(), MAX_STEER_PORTS as usize),
            ("exempt prefixes", self.exempt.len(), MAX_PREFIXES as usize),
            ("prefixes in rules", prefixes, MAX_PREFIXES as usize),
            ("host-name globs", globs, MAX_GLOBS),
        ] {
            if n > max {
                return Err(format!("{n} {what}: at most {max}"));
            }
        }
        if self.digest.len() != 64 || !self.digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("the digest is not a SHA-256 in hex".into());
        }
        if self.tls_ports.contains(&0) {
            return Err("tls_ports: port 0 is not a TCP port".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, r) in self.rules.iter().enumerate() {
            let at = || format!("rule {} ({:?})", i + 1, r.name);
            if r.name.trim().is_empty() {
                return Err(format!("rule {}: empty name", i + 1));
            }
            if !names.insert(r.name.as_str()) {
                return Err(format!("{}: the name is used twice", at()));
            }
            if let Some(p) = &r.profile {
                if !self.profiles.contains_key(p) {
                    return Err(format!("{}: unknown profile {p:?}", at()));
                }
            }
            match (&r.server_profile, r.action) {
                (Some(p), Action::InboundInspect) => {
                    if !self.server_profiles.contains_key(p) {
                        return Err(format!("{}: unknown server profile {p:?}", at()));
                    }
                }
                (None, Action::InboundInspect) => {
                    return Err(format!("{}: inbound-inspect needs a server profile", at()));
                }
                (Some(_), _) => {
                    return Err(format!(
                        "{}: only inbound-inspect rules name a server profile",
                        at()
                    ));
                }
                (None, _) => {}
            }
            for c in r.matcher.categories.iter().chain(&r.matcher.not_categories) {
                if !self.categories.contains_key(c) {
                    return Err(format!("{}: unknown category {c:?}", at()));
                }
            }
        }
        if self.signatures.len() > MAX_SIGNATURES {
            return Err(format!(
                "{} signatures: at most {MAX_SIGNATURES}",
                self.signatures.len()
            ));
        }
        let total: usize = self.signatures.values().map(|s| s.pattern.len()).sum();
        if total > MAX_SIGNATURE_BYTES {
            return Err(format!(
                "signature patterns of {total} bytes together: at most {MAX_SIGNATURE_BYTES}"
            ));
        }
        for (name, sig) in &self.signatures {
            let n = sig.pattern.len();
            if n == 0 || n > crate::inspect::signature::MAX_PATTERN {
                return Err(format!(
                    "signature {name:?}: a pattern of {n} bytes (1 to {})",
                    crate::inspect::signature::MAX_PATTERN
                ));
            }
        }
        let patterns: usize = self
            .url_rules
            .iter()
            .map(|r| r.hosts.len() + r.paths.len())
            .sum();
        if self.url_rules.len() > MAX_URL_RULES || patterns > MAX_URL_PATTERNS {
            return Err(format!(
                "{} URL rules with {patterns} host and path globs: at most {MAX_URL_RULES} \
                 and {MAX_URL_PATTERNS}",
                self.url_rules.len()
            ));
        }
        for r in &self.url_rules {
            if let Some(c) = r
                .categories
                .iter()
                .find(|c| !self.categories.contains_key(*c))
            {
                return Err(format!("URL rule {:?}: unknown category {c:?}", r.name));
            }
            if let Some(p) = r.paths.iter().find(|p| p.len() > MAX_PATH_GLOB) {
                return Err(format!(
                    "URL rule {:?}: a path glob of {} bytes (at most {MAX_PATH_GLOB})",
                    r.name,
                    p.len()
                ));
            }
        }
        for (name, p) in &self.profiles {
            p.check().map_err(|e| format!("profile {name:?}: {e}"))?;
            for s in &p.signatures {
                if !self.signatures.contains_key(s) {
                    return Err(format!("profile {name:?}: unknown signature {s:?}"));
                }
            }
        }
        for (name, sp) in &self.server_profiles {
            let at = || format!("server profile {name:?}");
            if !std::path::Path::new(&sp.chain).is_absolute() {
                return Err(format!("{}: the chain file is not an absolute path", at()));
            }
            loupe_hsm::server_keys::token_label(&sp.key).map_err(|e| format!("{}: {e}", at()))?;
            if sp.token.as_ref().is_some_and(|t| t.trim().is_empty()) {
                return Err(format!("{}: an empty token label", at()));
            }
        }
        self.steering().map(|_| ())
    }
}

/// `prefixes` without duplicates or prefixes another one covers (the
/// tries need neither): exact duplicates by sorting, then the covered
/// ones, each found by its covering keys (at most 129 lookups, not a scan
/// of all kept so far).
fn minimal(mut prefixes: Vec<Prefix>) -> Vec<Prefix> {
    prefixes.sort_by_key(|p| (p.mapped_len(), p.addr));
    prefixes.dedup();
    let mut kept: Vec<Prefix> = Vec::new();
    let mut by_key: std::collections::HashMap<PrefixKey, Prefix> = Default::default();
    for p in prefixes {
        let covered = p
            .covering_keys()
            .any(|k| by_key.get(&k).is_some_and(|c| c.covers(&p)));
        if !covered {
            by_key.insert(p.key(), p);
            kept.push(p);
        }
    }
    kept
}

/// The running policy, shared by the engine thread (which swaps it) and
/// the workers (which pick it up between batches: one atomic load per
/// round, the lock only when it changed).
#[derive(Debug, Default)]
pub struct PolicyCell {
    generation: AtomicU64,
    current: Mutex<Option<Arc<Policy>>>,
}

impl PolicyCell {
    pub fn publish(&self, policy: Arc<Policy>) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(policy);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Changes with every publish.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn current(&self) -> Option<Arc<Policy>> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Addr {
        s.parse::<Prefix>().unwrap().addr
    }

    fn subject<'a>(client: &str, server: &str, port: u16, sni: Option<&'a str>) -> Subject<'a> {
        Subject {
            client: addr(client),
            server: addr(server),
            server_port: port,
            sni,
        }
    }

    fn rule(name: &str, action: Action, m: Match) -> Rule {
        Rule {
            name: name.into(),
            matcher: m,
            action,
            profile: None,
            server_profile: None,
        }
    }

    fn policy(rules: Vec<Rule>, default_action: Action) -> Policy {
        let mut p = Policy::split_all(&[443], Vec::new());
        p.rules = rules;
        p.default_action = default_action;
        p.categories.insert(
            "financial-services".into(),
            vec![
                "*.bank.example".parse().unwrap(),
                "pay.example".parse().unwrap(),
            ],
        );
        p
    }

    fn globs(list: &[&str]) -> Vec<HostGlob> {
        list.iter().map(|g| g.parse().unwrap()).collect()
    }

    fn prefixes(list: &[&str]) -> Vec<Prefix> {
        list.iter().map(|g| g.parse().unwrap()).collect()
    }

    #[test]
    fn signature_patterns_travel_as_hex() {
        let sig = Signature {
            pattern: vec![0x00, 0xde, 0xad, b'A'],
            action: SignatureAction::Block,
        };
        let json = serde_json::to_string(&sig).unwrap();
        assert_eq!(json, r#"{"pattern":"00dead41","action":"block"}"#);
        assert_eq!(serde_json::from_str::<Signature>(&json).unwrap(), sig);
        for bad in [
            r#"{"pattern":"abc","action":"block"}"#,
            r#"{"pattern":"zz","action":"block"}"#,
        ] {
            assert!(serde_json::from_str::<Signature>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_are_normalized_before_matching() {
        for (target, want) in [
            ("/", "/"),
            ("", "/"),
            ("*", "*"),
            ("/a/b/", "/a/b/"),
            ("/a/./b/../c", "/a/c"),
            ("/..", "/"),
            ("http://h.test", "/"),
            ("http://h.test/x?y", "/x"),
            ("/%41%zz%", "/A%zz%"),
            ("/a//b", "/a/b"),
        ] {
            assert_eq!(normalize_path(target), want, "{target}");
        }
    }

    #[test]
    fn path_globs_match_as_written() {
        for (glob, text, want) in [
            ("/a/*", "/a/b/c", true),
            ("/a/*", "/ab", false),
            ("*.exe", "/x/setup.exe", true),
            ("*.exe", "/x/setup.exe.txt", false),
            ("/a*b*c", "/aXbYbZc", true),
            ("/a*b*c", "/aXbYbZ", false),
            ("/exact", "/exact", true),
            ("/exact", "/exact/", false),
            ("*", "", true),
            ("/**", "/", true),
        ] {
            assert_eq!(path_glob(glob, text), want, "{glob} ~ {text}");
        }
    }

    #[test]
    fn a_url_rule_with_categories_matches_their_hosts_only_and_ports_are_cut() {
        let mut p = Policy::split_all(&[443], Vec::new());
        p.categories.insert("news".into(), globs(&["*.news.test"]));
        p.url_rules.push(UrlRule {
            name: "news".into(),
            hosts: Vec::new(),
            paths: vec!["/live/*".into()],
            categories: vec!["news".into()],
            category_hosts: Vec::new(),
            action: UrlAction::Block,
        });
        assert!(p.validate().is_ok());
        // Unprepared (as received), a category matches nothing...
        assert!(!p.url_rules[0].matches(Some("a.news.test"), "/live/1"));
        // ...prepared, its hosts.
        let r = &p.prepared_url_rules()[0];
        assert!(r.matches(Some("A.News.Test:8443"), "/live/1"));
        assert!(!r.matches(Some("a.news.test"), "/archive/1"));
        assert!(!r.matches(Some("other.test"), "/live/1"));
        p.url_rules[0].categories = vec!["sports".into()];
        let e = p.validate().unwrap_err();
        assert!(e.contains("unknown category \"sports\""), "{e}");
        // IPv6 literals lose their port too.
        let v6 = UrlRule {
            name: "v6".into(),
            hosts: Vec::new(),
            paths: Vec::new(),
            categories: vec!["x".into()],
            category_hosts: Vec::new(),
            action: UrlAction::Log,
        };
        assert!(!v6.matches(Some("[2001:2::1]:443"), "/"));
    }

    #[test]
    fn url_rules_match_host_without_port_or_case_and_path_without_query() {
        let r = UrlRule {
            name: "r".into(),
            hosts: globs(&["*.shop.test"]),
            paths: vec!["/cart/*".into()],
            categories: Vec::new(),
            category_hosts: Vec::new(),
            action: UrlAction::Block,
        };
        let m = |host, target| r.matches(host, &normalize_path(target));
        assert!(m(Some("WWW.Shop.test:8443"), "/cart/1?next=/home"));
        assert!(m(Some("www.shop.test."), "/cart/x#frag"));
        assert!(!m(Some("www.shop.test"), "/home?/cart/1"));
        assert!(!m(None, "/cart/1"));
        assert!(!m(Some("[2001:2::1]:443"), "/cart/1"));
        // Other spellings of the same path.
        for target in [
            "/CART/1",
            "/%63art/1",
            "//cart//1",
            "/./cart/1",
            "/x/../cart/1",
            "/../../cart/1",
            "https://www.shop.test/cart/1",
            "/cart%2F1",
        ] {
            assert!(m(Some("www.shop.test"), target), "{target}");
        }
        let any_host = UrlRule {
            hosts: Vec::new(),
            ..r
        };
        assert!(any_host.matches(None, "/cart/1"));
    }

    #[test]
    fn first_matching_rule_wins_and_the_default_catches_the_rest() {
        let p = policy(
            vec![
                rule(
                    "finance",
                    Action::NoDecrypt,
                    Match {
                        categories: vec!["financial-services".into()],
                        ..Match::default()
                    },
                ),
                rule(
                    "blocked",
                    Action::Block,
                    Match {
                        sni: globs(&["*.bad.example"]),
                        ..Match::default()
                    },
                ),
                rule(
                    "lab",
                    Action::TcpSplit,
                    Match {
                        dst: prefixes(&["198.18.0.0/24"]),
                        ..Match::default()
                    },
                ),
            ],
            Action::NoDecrypt,
        );
        let d = |s: Subject| {
            let d = p.decide(&s);
            (d.action, p.rule_name(&d).to_string())
        };
        let c = "198.18.1.1";
        assert_eq!(
            d(subject(c, "198.18.0.2", 443, Some("www.bank.example"))),
            (Action::NoDecrypt, "finance".into())
        );
        assert_eq!(
            d(subject(c, "198.18.0.2", 443, Some("x.bad.example"))),
            (Action::Block, "blocked".into())
        );
        assert_eq!(
            d(subject(c, "198.18.0.2", 443, None)),
            (Action::TcpSplit, "lab".into())
        );
        assert_eq!(
            d(subject(c, "198.18.7.2", 443, None)),
            (Action::NoDecrypt, DEFAULT_RULE.into())
        );
        // A rule without ports stands for the TLS ports only.
        assert_eq!(
            d(subject(c, "198.18.0.2", 8443, None)),
            (Action::NoDecrypt, DEFAULT_RULE.into())
        );
    }

    #[test]
    fn without_a_name_a_block_that_might_match_blocks() {
        let p = policy(
            vec![
                rule(
                    "bank",
                    Action::NoDecrypt,
                    Match {
                        categories: vec!["financial-services".into()],
                        ..Match::default()
                    },
                ),
                rule(
                    "bad-names",
                    Action::Block,
                    Match {
                        sni: globs(&["*.bad.example"]),
                        dst: prefixes(&["198.18.0.0/24"]),
                        ..Match::default()
                    },
                ),
                rule(
                    "lab",
                    Action::TcpSplit,
                    Match {
                        dst: prefixes(&["198.18.0.0/16"]),
                        ..Match::default()
                    },
                ),
            ],
            Action::NoDecrypt,
        );
        let d = |server: &str| {
            let d = p.decide_unnamed(&subject("198.18.9.1", server, 443, None));
            (d.action, p.rule_name(&d).to_string())
        };
        // The block rule might match: blocked (the bank rule might match
        // too, but no-decrypt is not assumed).
        assert_eq!(d("198.18.0.2"), (Action::Block, "bad-names".into()));
        // Out of the block rule's addresses: the first sure match.
        assert_eq!(d("198.18.5.2"), (Action::TcpSplit, "lab".into()));
        assert_eq!(d("198.19.0.2"), (Action::NoDecrypt, DEFAULT_RULE.into()));
        // With a name, the ordinary decision.
        let named = p.decide(&subject(
            "198.18.9.1",
            "198.18.0.2",
            443,
            Some("ok.example"),
        ));
        assert_eq!(named.action, Action::TcpSplit);
    }

    #[test]
    fn negation_of_each_field() {
        let p = policy(
            vec![rule(
                "not-these",
                Action::Block,
                Match {
                    not_src: prefixes(&["198.18.9.0/24"]),
                    not_dst: prefixes(&["2001:2::/64"]),
                    ports: vec!["400-500".parse().unwrap()],
                    not_ports: vec!["444".parse().unwrap()],
                    not_sni: globs(&["ok.example"]),
                    not_categories: vec!["financial-services".into()],
                    ..Match::default()
                },
            )],
            Action::TcpSplit,
        );
        let act = |s: Subject| p.decide(&s).action;
        assert_eq!(
            act(subject("2001:2:1::1", "2001:2:5::1", 443, None)),
            Action::Block
        );
        assert_eq!(
            act(subject("198.18.1.1", "198.18.0.2", 450, Some("x.example"))),
            Action::Block
        );
        for s in [
            subject("198.18.9.7", "198.18.0.2", 443, None),
            subject("2001:2:1::1", "2001:2::1", 443, None),
            subject("198.18.1.1", "198.18.0.2", 444, None),
            subject("198.18.1.1", "198.18.0.2", 501, None),
            subject("198.18.1.1", "198.18.0.2", 443, Some("OK.example")),
            subject("198.18.1.1", "198.18.0.2", 443, Some("pay.example")),
        ] {
            assert_eq!(act(s), Action::TcpSplit, "{s:?}");
        }
    }

    #[test]
    fn sni_rules_need_a_name_and_prefixes_keep_families_apart() {
        let p = policy(
            vec![
                rule(
                    "named",
                    Action::Block,
                    Match {
                        sni: globs(&["*"]),
                        ..Match::default()
                    },
                ),
                rule(
                    "v6",
                    Action::NoDecrypt,
                    Match {
                        dst: prefixes(&["::/0"]),
                        ..Match::default()
                    },
                ),
            ],
            Action::TcpSplit,
        );
        assert_eq!(
            p.decide(&subject("198.18.0.1", "198.18.0.2", 443, None))
                .action,
            Action::TcpSplit
        );
        assert_eq!(
            p.decide(&subject("2001:2::1", "2001:2::2", 443, None))
                .action,
            Action::NoDecrypt
        );
        assert_eq!(
            p.decide(&subject("198.18.0.1", "198.18.0.2", 443, Some("a")))
                .action,
            Action::Block
        );
    }

    #[test]
    fn quic_is_blocked_toward_decrypt_rules_whose_profile_says_so() {
        let mut p = policy(
            vec![
                rule(
                    "quiet",
                    Action::Decrypt,
                    Match {
                        dst: prefixes(&["198.18.0.0/24"]),
                        ..Match::default()
                    },
                ),
                rule(
                    "loud",
                    Action::Decrypt,
                    Match {
                        dst: prefixes(&["198.18.1.0/24", "198.18.0.64/26"]),
                        ..Match::default()
                    },
                ),
                rule(
                    "split",
                    Action::TcpSplit,
                    Match {
                        dst: prefixes(&["198.18.2.0/24"]),
                        ..Match::default()
                    },
                ),
            ],
            Action::Decrypt,
        );
        // Without a profile that blocks it, QUIC passes everywhere.
        assert!(p.steering().unwrap().quic.is_empty());
        p.profiles.insert(
            "noquic".into(),
            Profile {
                block_quic: true,
                ..Profile::default()
            },
        );
        for r in &mut p.rules {
            r.profile = Some("noquic".into());
        }
        // Only the decrypt rules' destinations, the covered one folded in.
        assert_eq!(
            p.steering().unwrap().quic,
            prefixes(&["198.18.0.0/24", "198.18.1.0/24"])
        );
    }

    #[test]
    fn steering_follows_the_rules() {
        let mut p = policy(
            vec![
                rule(
                    "exempt",
                    Action::NoDecrypt,
                    Match {
                        dst: prefixes(&["198.18.0.0/25"]),
                        ports: vec!["8443".parse().unwrap()],
                        ..Match::default()
                    },
                ),
                rule(
                    "lab",
                    Action::TcpSplit,
                    Match {
                        dst: prefixes(&["198.18.0.0/24", "198.18.0.128/25"]),
                        ports: vec!["443".parse().unwrap(), "8443".parse().unwrap()],
                        ..Match::default()
                    },
                ),
            ],
            Action::NoDecrypt,
        );
        p.exempt = prefixes(&["198.18.0.99/32"]);
        let s = p.steering().unwrap();
        assert_eq!(s.ports, vec![443, 8443]);
        assert_eq!(s.prefixes, prefixes(&["198.18.0.0/24"]));
        assert_eq!(s.exempt, prefixes(&["198.18.0.99/32"]));
        // No rule: nothing is steered.
        p.rules.clear();
        let s = p.steering().unwrap();
        assert!(s.ports.is_empty() && s.prefixes.is_empty());
        // The default acts on every address of the TLS ports.
        p.default_action = Action::Block;
        let s = p.steering().unwrap();
        assert_eq!(s.ports, vec![443]);
        let all = prefix::default_steer_prefixes();
        assert!(s.prefixes.len() == 2 && all.iter().all(|p| s.prefixes.contains(p)));
        // Too many ports is an error, not a truncation.
        p.rules.push(rule(
            "wide",
            Action::TcpSplit,
            Match {
                ports: vec!["1-2000".parse().unwrap()],
                ..Match::default()
            },
        ));
        let e = p.steering().unwrap_err();
        assert!(e.contains("examine 2000 ports, more than the 1024"), "{e}");
        // Exclusions count before the bound: 500 ports remain.
        p.rules.last_mut().unwrap().matcher.not_ports = vec!["1-1500".parse().unwrap()];
        let s = p.steering().unwrap();
        assert_eq!((s.ports.len(), s.ports[0]), (501, 443));
    }

    #[test]
    fn validation_names_the_rule() {
        let mut p = policy(
            vec![rule("a", Action::Decrypt, Match::default())],
            Action::NoDecrypt,
        );
        p.rules[0].profile = Some("strict".into());
        assert!(p
            .validate()
            .unwrap_err()
            .contains("unknown profile \"strict\""));
        p.profiles.insert("strict".into(), Profile::default());
        p.validate().unwrap();
        p.rules.push(rule("a", Action::Block, Match::default()));
        assert!(p.validate().unwrap_err().contains("used twice"));
        p.rules[1].name = "b".into();
        p.rules[1].matcher.categories = vec!["nope".into()];
        assert!(p.validate().unwrap_err().contains("unknown category"));
    }

    #[test]
    fn wire_form_round_trips() {
        let mut p = policy(
            vec![rule(
                "x",
                Action::Block,
                Match {
                    src: prefixes(&["2001:2::/48"]),
                    ports: vec!["8000-8100".parse().unwrap()],
                    sni: globs(&["*.a.example"]),
                    ..Match::default()
                },
            )],
            Action::TcpSplit,
        );
        p.profiles.insert("p".into(), Profile::default());
        let j = serde_json::to_string(&p).unwrap();
        assert!(
            j.contains("\"8000-8100\"") && j.contains("\"tcp-split\""),
            "{j}"
        );
        let back: Policy = serde_json::from_str(&j).unwrap();
        assert_eq!(back, p);
        let bad = j.replace("2001:2::/48", "2001:2::/200");
        assert!(serde_json::from_str::<Policy>(&bad).is_err());
    }

    /// Exclusions come off ranges of any width without a walk over each
    /// port; what is left is what a port-by-port check leaves.
    #[test]
    fn ports_less_exclusions_matches_a_port_by_port_check() {
        let r = |s: &str| s.parse::<PortRange>().unwrap();
        let cases: [(&[&str], &[&str]); 5] = [
            (&["1-65535"], &["2-65534"]),
            (
                &["443", "8000-8100", "8050-8200", "9000"],
                &["8001", "8100-8999", "9000"],
            ),
            (&["1-10", "11-20"], &[]),
            (&["5-15"], &["1-4", "16-30"]),
            (&["100-200"], &["100-200"]),
        ];
        for (own, not) in cases {
            let own: Vec<PortRange> = own.iter().map(|s| r(s)).collect();
            let not: Vec<PortRange> = not.iter().map(|s| r(s)).collect();
            let got = ports_less(&merge_ports(&own), &merge_ports(&not));
            let want: Vec<u16> = (1..=u16::MAX)
                .filter(|&p| {
                    own.iter().any(|x| x.contains(p)) && !not.iter().any(|x| x.contains(p))
                })
                .collect();
            let got_ports: Vec<u16> = got.iter().flat_map(|x| x.first..=x.last).collect();
            assert_eq!(got_ports, want, "{own:?} less {not:?}: {got:?}");
            assert!(got
                .windows(2)
                .all(|w| u32::from(w[0].last) + 1 < u32::from(w[1].first)));
        }
    }

    /// The steering's prefixes are those no other one covers, as a
    /// comparison of every pair finds them.
    #[test]
    fn minimal_keeps_exactly_the_uncovered_prefixes() {
        let all = prefixes(&[
            "198.18.0.0/15",
            "198.18.5.0/24",
            "198.20.0.0/16",
            "198.20.0.0/16",
            "198.20.1.1/32",
            "0.0.0.0/0",
            "::ffff:0:0/96",
            "::/0",
            "2001:2::/48",
            "2001:2:0:1::/64",
            "2001:3::/48",
        ]);
        for n in 1..=all.len() {
            let some = all[..n].to_vec();
            let mut want: Vec<Prefix> = Vec::new();
            for p in &some {
                let covered = some.iter().any(|k| k.v4 == p.v4 && k != p && k.covers(p));
                if !covered && !want.contains(p) {
                    want.push(*p);
                }
            }
            let mut got = minimal(some);
            let key = |p: &Prefix| (p.v4, p.mapped_len(), p.addr);
            got.sort_by_key(key);
            want.sort_by_key(key);
            assert_eq!(got, want, "the first {n}");
        }
    }

    #[test]
    fn port_ranges() {
        assert_eq!("443".parse::<PortRange>().unwrap().to_string(), "443");
        assert_eq!(
            "8000-8100".parse::<PortRange>().unwrap().to_string(),
            "8000-8100"
        );
        // Whole numbers as written: no spaces, no sign, no empty end.
        for bad in [
            "0",
            "9-1",
            "x",
            "1-70000",
            "",
            " 443",
            "443 ",
            "8000 - 8100",
            "8000-",
            "+443",
            "1-+5",
        ] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }
}
