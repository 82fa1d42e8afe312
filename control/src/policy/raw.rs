//! The policy file as written: TOML tables with the position of every
//! value kept, so each error names file:line:column.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// The whole policy file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    #[serde(default)]
    pub policy: Option<RawGlobal>,
    #[serde(default)]
    pub dataplane: Option<RawDataplane>,
    #[serde(default)]
    pub hsm: Option<RawHsm>,
    #[serde(default)]
    pub profiles: BTreeMap<String, Spanned<RawProfile>>,
    #[serde(default)]
    pub rules: Vec<Spanned<RawRule>>,
    #[serde(default)]
    pub signatures: BTreeMap<String, Spanned<RawSignature>>,
    #[serde(default)]
    pub url_rules: Vec<Spanned<RawUrlRule>>,
    #[serde(default)]
    pub server_profiles: BTreeMap<String, Spanned<RawServerProfile>>,
}

/// `[server_profiles.NAME]`: one of the organisation's servers for
/// inbound inspection.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServerProfile {
    /// The certificate chain (PEM, leaf first), relative to this file.
    pub chain: Option<Spanned<String>>,
    /// The key's label (`loupe key list`).
    pub key: Option<Spanned<String>>,
    pub token: Option<Spanned<String>>,
    /// `pinned` or `trust-store`.
    pub upstream: Option<Spanned<String>>,
    /// Free text for people; not used.
    #[allow(dead_code)]
    pub description: Option<String>,
}

/// `[[url_rules]]`, in order.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUrlRule {
    pub name: Option<Spanned<String>>,
    /// Free text for people; not used.
    #[allow(dead_code)]
    pub description: Option<String>,
    #[serde(default)]
    pub host: Vec<Spanned<String>>,
    #[serde(default)]
    pub path: Vec<Spanned<String>>,
    #[serde(default)]
    pub categories: Vec<Spanned<String>>,
    pub action: Option<Spanned<String>>,
}

/// `[signatures.NAME]`: one of `builtin`, `pattern` (text), `hex` or
/// `file` (whose bytes are the pattern, relative to the policy file).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSignature {
    pub builtin: Option<Spanned<String>>,
    pub pattern: Option<Spanned<String>>,
    pub hex: Option<Spanned<String>>,
    pub file: Option<Spanned<String>>,
    pub action: Option<Spanned<String>>,
    /// Free text for people; not used.
    #[allow(dead_code)]
    pub description: Option<String>,
}

/// `[policy]`: what holds for every rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGlobal {
    pub tls_ports: Option<Spanned<Vec<Spanned<PortItem>>>>,
    pub default_action: Option<Spanned<String>>,
    /// The category file, relative to this one.
    pub categories: Option<Spanned<String>>,
    #[serde(default)]
    pub exempt: Vec<Spanned<String>>,
}

/// `[dataplane]`: the dataplane this policy is written for; checked
/// against the running one when applied.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDataplane {
    pub inside: Option<Spanned<String>>,
    pub outside: Option<Spanned<String>>,
    pub workers: Option<Spanned<i64>>,
}

/// `[hsm]`: the signer the dataplane must run with.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHsm {
    pub module: Option<Spanned<String>>,
    #[serde(default)]
    pub tokens: Vec<Spanned<String>>,
    pub pin_file: Option<Spanned<String>>,
}

/// `[profiles.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfile {
    pub expired: Option<Spanned<String>>,
    pub untrusted: Option<Spanned<String>>,
    pub name_mismatch: Option<Spanned<String>>,
    pub weak: Option<Spanned<String>>,
    pub revoked: Option<Spanned<String>>,
    pub min_version: Option<Spanned<String>>,
    pub max_version: Option<Spanned<String>>,
    pub unsupported: Option<Spanned<String>>,
    pub suites: Option<Spanned<Vec<Spanned<String>>>>,
    pub groups: Option<Spanned<Vec<Spanned<String>>>>,
    pub client_auth: Option<Spanned<String>>,
    pub hsm_unavailable: Option<Spanned<String>>,
    pub no_resources: Option<Spanned<String>>,
    pub ech: Option<Spanned<String>>,
    pub block_quic: Option<Spanned<bool>>,
    pub append_cn_to_san: Option<Spanned<bool>>,
    pub keylog: Option<Spanned<String>>,
    pub trust_store: Option<Spanned<String>>,
    #[serde(default)]
    pub crls: Vec<Spanned<String>>,
    pub exclude_secs: Option<Spanned<i64>>,
    pub http: Option<Spanned<bool>>,
    #[serde(default)]
    pub signatures: Vec<Spanned<String>>,
    #[serde(default)]
    pub export: Vec<Spanned<String>>,
    pub token: Option<Spanned<String>>,
}

/// A port as `443` or `"8000-8099"`; anything else is kept, so that the
/// error stands where it was written (not at the whole list).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PortItem {
    Number(i64),
    Text(String),
    Float(f64),
    Other(toml::Value),
}

/// `[[rules]]`, in order.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: Option<Spanned<String>>,
    /// Free text for people; not used.
    #[allow(dead_code)]
    pub description: Option<String>,
    pub action: Option<Spanned<String>>,
    pub profile: Option<Spanned<String>>,
    pub server_profile: Option<Spanned<String>>,
    #[serde(default)]
    pub src: Vec<Spanned<String>>,
    #[serde(default)]
    pub not_src: Vec<Spanned<String>>,
    #[serde(default)]
    pub dst: Vec<Spanned<String>>,
    #[serde(default)]
    pub not_dst: Vec<Spanned<String>>,
    #[serde(default)]
    pub ports: Vec<Spanned<PortItem>>,
    #[serde(default)]
    pub not_ports: Vec<Spanned<PortItem>>,
    #[serde(default)]
    pub sni: Vec<Spanned<String>>,
    #[serde(default)]
    pub not_sni: Vec<Spanned<String>>,
    #[serde(default)]
    pub categories: Vec<Spanned<String>>,
    #[serde(default)]
    pub not_categories: Vec<Spanned<String>>,
}

/// The category file: `name = ["glob", ...]`.
pub type RawCategories = BTreeMap<String, Spanned<Vec<Spanned<String>>>>;
