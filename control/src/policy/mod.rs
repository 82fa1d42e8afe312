//! The policy language: a TOML file of ordered rules, decryption profiles,
//! a category file, and the dataplane and HSM it is written for. This
//! module checks it (every error and warning with file:line:column) and
//! compiles it into the dataplane's [`Policy`]. The format is documented
//! in `docs/POLICY.md`; `policy/example.toml` is the shipped example.

mod raw;

use std::{
    collections::{BTreeMap, HashMap},
    fmt, io,
    ops::Range,
    path::{Path, PathBuf},
    str::FromStr,
};

use loupe_dataplane::{
    config::Prefix,
    policy::{
        known_groups, known_suites, Action, EchAction, Fallback, HostGlob, Match, OnError, Policy,
        PortRange, Profile, Rule, TlsVersion,
    },
    sys::read_regular,
    tls::{
        upstream::keylog_file_problem,
        verify::{TrustStore, MAX_CRL_BYTES},
    },
};
use sha2::{Digest, Sha256};
use toml::Spanned;

use self::raw::{PortItem, RawCategories, RawPolicy, RawProfile, RawRule};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One finding, at a place in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.col,
            match self.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            },
            self.message
        )
    }
}

/// The dataplane a policy is written for (`[dataplane]`); each field that
/// is set must match the running dataplane.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataplaneSpec {
    pub inside: Option<String>,
    pub outside: Option<String>,
    pub workers: Option<usize>,
    /// HSM token labels the dataplane must serve (`[hsm] tokens`).
    pub hsm_tokens: Vec<String>,
}

/// What checking a policy found, and the compiled policy when there was
/// no error.
#[derive(Debug, Default)]
pub struct Checked {
    pub policy: Option<Policy>,
    pub dataplane: DataplaneSpec,
    pub diagnostics: Vec<Diagnostic>,
}

impl Checked {
    pub fn errors(&self) -> usize {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .count()
    }
}

/// A source file and its text, for positions.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn at(&self, severity: Severity, span: Option<Range<usize>>, message: String) -> Diagnostic {
        let offset = span.map_or(0, |s| s.start).min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Diagnostic {
            severity,
            file: self.path.to_path_buf(),
            line,
            col,
            message,
        }
    }
}

/// Collects diagnostics for one source.
struct Report<'a> {
    src: Source<'a>,
    out: Vec<Diagnostic>,
    /// Compiling a policy that was already accepted (see
    /// [`compile_saved`]): host files a profile names are the engine's to
    /// read, and their trouble is a warning.
    saved: bool,
}

impl Report<'_> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let d = self.src.at(Severity::Error, Some(span), message.into());
        self.out.push(d);
    }

    fn warn(&mut self, span: Range<usize>, message: impl Into<String>) {
        let d = self.src.at(Severity::Warning, Some(span), message.into());
        self.out.push(d);
    }

    /// Parses each item with `parse`, reporting the failures.
    fn each<T, E: fmt::Display>(
        &mut self,
        items: &[Spanned<String>],
        parse: impl Fn(&str) -> Result<T, E>,
    ) -> Vec<T> {
        let mut out = Vec::new();
        for item in items {
            match parse(item.get_ref()) {
                Ok(v) => out.push(v),
                Err(e) => self.error(item.span(), e.to_string()),
            }
        }
        out
    }

    fn ports(&mut self, items: &[Spanned<PortItem>]) -> Vec<PortRange> {
        let mut out = Vec::new();
        for item in items {
            let parsed = match item.get_ref() {
                PortItem::Number(n) if (1..=65535).contains(n) => Ok(PortRange {
                    first: *n as u16,
                    last: *n as u16,
                }),
                PortItem::Number(n) => Err(format!("bad port {n}: expected 1 to 65535")),
                PortItem::Text(t) => t.parse::<PortRange>(),
            };
            match parsed {
                Ok(r) => out.push(r),
                Err(e) => self.error(item.span(), e),
            }
        }
        out
    }
}

/// The message of a TOML error, without the position toml puts in it
/// (the diagnostic has its own).
fn toml_message(e: &toml::de::Error) -> String {
    let lines: Vec<&str> = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines.join("; ")
}

/// Parses TOML text into `T`, or a diagnostic.
fn parse_toml<T: serde::de::DeserializeOwned>(src: &Source) -> Result<T, Diagnostic> {
    toml::from_str(src.text).map_err(|e| src.at(Severity::Error, e.span(), toml_message(&e)))
}

/// Checks and compiles the policy at `path` whose text is `text`; `load`
/// reads the files it names (the category file), so the caller decides
/// where they come from.
pub fn compile(path: &Path, text: &str, load: &dyn Fn(&Path) -> io::Result<String>) -> Checked {
    compile_as(path, text, load, false)
}

/// [`compile`] for a policy that was checked and accepted before (the
/// daemon's saved state, pushed again to a restarted dataplane). A trust
/// store, CRL or key log that has become unusable since is a warning, not
/// an error: refusing the whole policy would leave the dataplane without
/// one (no block rule enforced), while the engine blocks the connections
/// of a profile it cannot prepare and enforces the rest.
pub fn compile_saved(
    path: &Path,
    text: &str,
    load: &dyn Fn(&Path) -> io::Result<String>,
) -> Checked {
    compile_as(path, text, load, true)
}

fn compile_as(
    path: &Path,
    text: &str,
    load: &dyn Fn(&Path) -> io::Result<String>,
    saved: bool,
) -> Checked {
    let src = Source { path, text };
    let raw: RawPolicy = match parse_toml(&src) {
        Ok(r) => r,
        Err(d) => {
            return Checked {
                diagnostics: vec![d],
                ..Checked::default()
            }
        }
    };
    let mut rep = Report {
        src: Source { path, text },
        out: Vec::new(),
        saved,
    };
    let mut digest = Sha256::new();
    digest.update(text.as_bytes());

    // [policy]
    let global = raw.policy.as_ref();
    let tls_ports: Vec<u16> = match global.and_then(|g| g.tls_ports.as_ref()) {
        Some(list) => {
            let ranges = rep.ports(list.get_ref());
            if list.get_ref().is_empty() {
                rep.error(
                    list.span(),
                    "tls_ports is empty: rules without `ports` would match nothing",
                );
            }
            let mut ports: Vec<u16> = ranges
                .iter()
                .flat_map(|r| r.first..=r.last)
                .take(loupe_common::MAX_STEER_PORTS as usize + 1)
                .collect();
            ports.sort_unstable();
            ports.dedup();
            ports
        }
        None => vec![443],
    };
    let default_action = match global.and_then(|g| g.default_action.as_ref()) {
        Some(a) => action(&mut rep, a).unwrap_or(Action::NoDecrypt),
        None => Action::NoDecrypt,
    };
    let exempt = global.map_or_else(Vec::new, |g| rep.each(&g.exempt, Prefix::from_str));

    // The category file.
    let mut categories: BTreeMap<String, Vec<HostGlob>> = BTreeMap::new();
    let categories_set = global.and_then(|g| g.categories.as_ref()).is_some();
    if let Some(cat) = global.and_then(|g| g.categories.as_ref()) {
        let cpath = path.parent().unwrap_or(Path::new(".")).join(cat.get_ref());
        match load(&cpath) {
            Err(e) => rep.error(
                cat.span(),
                format!("cannot read the category file {}: {e}", cpath.display()),
            ),
            Ok(ctext) => {
                digest.update(b"\0categories\0");
                digest.update(ctext.as_bytes());
                let csrc = Source {
                    path: &cpath,
                    text: &ctext,
                };
                match parse_toml::<RawCategories>(&csrc) {
                    Err(d) => rep.out.push(d),
                    Ok(raw_cats) => {
                        let mut crep = Report {
                            src: csrc,
                            out: Vec::new(),
                            saved,
                        };
                        for (name, globs) in &raw_cats {
                            if globs.get_ref().is_empty() {
                                crep.warn(globs.span(), format!("category {name:?} is empty"));
                            }
                            let parsed = crep.each(globs.get_ref(), HostGlob::from_str);
                            categories.insert(name.clone(), parsed);
                        }
                        rep.out.extend(crep.out);
                    }
                }
            }
        }
    }

    // [profiles.*]
    let mut profiles = BTreeMap::new();
    for (name, p) in &raw.profiles {
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(profile) = profile(&mut rep, base, name, p) {
            profiles.insert(name.clone(), profile);
        }
    }

    // [[rules]]
    let mut rules: Vec<Rule> = Vec::new();
    let mut spans: Vec<Range<usize>> = Vec::new();
    let mut seen: HashMap<String, Range<usize>> = HashMap::new();
    for r in &raw.rules {
        let cats = Categories {
            known: &categories,
            file_set: categories_set,
        };
        if let Some(rule) = rule(&mut rep, r.get_ref(), r.span(), &raw, &cats, &mut seen) {
            rules.push(rule);
            spans.push(r.span());
        }
    }
    let used: std::collections::HashSet<&str> =
        rules.iter().filter_map(|r| r.profile.as_deref()).collect();
    for (name, p) in &raw.profiles {
        if !used.contains(name.as_str()) {
            rep.warn(
                p.span(),
                format!("profile {name:?} is not used by any rule"),
            );
        }
    }

    let mut policy = Policy {
        version: 0,
        digest: String::new(),
        source: path.display().to_string(),
        tls_ports,
        exempt,
        default_action,
        rules,
        profiles,
        categories,
    };
    shadow_warnings(&mut rep, &policy, &spans);
    policy.digest = format!("{:x}", digest.finalize());
    // What the dataplane checks on receipt (bounds, steering) is checked
    // here too, so `check` accepts only what `apply` can run. Errors with
    // a position were reported above (their rules are not in `policy`).
    let positioned = rep.out.iter().any(|d| d.severity == Severity::Error);
    if let Err(e) = policy.validate() {
        if !positioned {
            rep.error(0..0, e);
        }
    }
    let dataplane = dataplane_spec(&mut rep, &raw);

    let mut diagnostics = rep.out;
    diagnostics.sort_by(|a, b| (&a.file, a.line, a.col).cmp(&(&b.file, b.line, b.col)));
    let errors = diagnostics.iter().any(|d| d.severity == Severity::Error);
    Checked {
        policy: (!errors).then_some(policy),
        dataplane,
        diagnostics,
    }
}

fn action(rep: &mut Report, a: &Spanned<String>) -> Option<Action> {
    if a.get_ref() == "inbound-inspect" {
        rep.error(
            a.span(),
            "action \"inbound-inspect\" is not available yet (it comes with SSL inbound \
             inspection); use decrypt, no-decrypt, block or tcp-split",
        );
        return None;
    }
    match a.get_ref().parse::<Action>() {
        Ok(v) => Some(v),
        Err(e) => {
            rep.error(a.span(), e);
            None
        }
    }
}

fn on_error(rep: &mut Report, v: &Option<Spanned<String>>, what: &str) -> Option<OnError> {
    let Some(v) = v else {
        return Some(OnError::Block);
    };
    match v.get_ref().as_str() {
        "block" => Some(OnError::Block),
        "pass-on" => Some(OnError::PassOn),
        other => {
            rep.error(
                v.span(),
                format!("{what} = {other:?}: expected \"block\" or \"pass-on\""),
            );
            None
        }
    }
}

fn version(
    rep: &mut Report,
    v: &Option<Spanned<String>>,
    default: TlsVersion,
) -> Option<TlsVersion> {
    let Some(v) = v else {
        return Some(default);
    };
    match v.get_ref().as_str() {
        "1.2" => Some(TlsVersion::Tls12),
        "1.3" => Some(TlsVersion::Tls13),
        "1.0" | "1.1" => {
            rep.error(
                v.span(),
                format!(
                    "TLS {} is deprecated (RFC 8996) and not supported",
                    v.get_ref()
                ),
            );
            None
        }
        other => {
            rep.error(
                v.span(),
                format!("unknown TLS version {other:?}: expected \"1.2\" or \"1.3\""),
            );
            None
        }
    }
}

fn fallback(
    rep: &mut Report,
    v: &Option<Spanned<String>>,
    what: &str,
    default: Fallback,
) -> Option<Fallback> {
    let Some(v) = v else {
        return Some(default);
    };
    match v.get_ref().as_str() {
        "block" => Some(Fallback::Block),
        "no-decrypt" => Some(Fallback::NoDecrypt),
        other => {
            rep.error(
                v.span(),
                format!("{what} = {other:?}: expected \"block\" or \"no-decrypt\""),
            );
            None
        }
    }
}

/// Names from a list that must be among `known`.
fn names(
    rep: &mut Report,
    v: &Option<Spanned<Vec<Spanned<String>>>>,
    what: &str,
    known: &[&str],
) -> Option<Vec<String>> {
    let Some(list) = v else {
        return Some(Vec::new());
    };
    if list.get_ref().is_empty() {
        rep.error(
            list.span(),
            format!("{what} is empty: leave it out to allow every one"),
        );
        return None;
    }
    let mut ok = true;
    for n in list.get_ref() {
        if !known.contains(&n.get_ref().as_str()) {
            rep.error(
                n.span(),
                format!(
                    "unknown {what} entry {:?} (known: {})",
                    n.get_ref(),
                    known.join(", ")
                ),
            );
            ok = false;
        }
    }
    ok.then(|| list.get_ref().iter().map(|n| n.get_ref().clone()).collect())
}

/// A file a profile names, relative to the policy file; it must be
/// readable now (by whoever checks) and, with `parse`, parse.
fn profile_file(
    rep: &mut Report,
    base: &Path,
    v: &Spanned<String>,
    what: &str,
    parse: impl Fn(&Path) -> Result<(), String>,
) -> Option<String> {
    let path = base.join(v.get_ref());
    match parse(&path) {
        Ok(()) => Some(path.display().to_string()),
        Err(e) if rep.saved => {
            rep.warn(
                v.span(),
                format!("{what} {}: {e}{UNUSABLE}", path.display()),
            );
            Some(path.display().to_string())
        }
        Err(e) => {
            rep.error(v.span(), format!("{what} {}: {e}", path.display()));
            None
        }
    }
}

/// The end of a warning about a saved policy's host file.
const UNUSABLE: &str = " (the dataplane blocks this profile's connections until it is fixed and \
                        the policy applied again)";

/// Why the engine would refuse an existing key log file (see
/// `KeyLogFile::open`): only a private regular file, not a link, will do.
/// A file that does not exist yet is fine: the engine creates it.
fn keylog_problem(path: &Path) -> Option<String> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // The engine creates the file, not its directory.
            let dir = path.parent().unwrap_or(Path::new("/"));
            return match std::fs::metadata(dir) {
                Ok(d) if d.is_dir() => None,
                Ok(_) => Some(format!("{} is not a directory", dir.display())),
                Err(e) => Some(format!("its directory {}: {e}", dir.display())),
            };
        }
        Err(e) => return Some(e.to_string()),
    };
    keylog_file_problem(&meta)
}

fn profile(rep: &mut Report, base: &Path, name: &str, p: &Spanned<RawProfile>) -> Option<Profile> {
    let raw = p.get_ref();
    let d = Profile::default();
    let expired = on_error(rep, &raw.expired, "expired");
    let untrusted = on_error(rep, &raw.untrusted, "untrusted");
    let name_mismatch = on_error(rep, &raw.name_mismatch, "name_mismatch");
    let weak = on_error(rep, &raw.weak, "weak");
    let revoked = on_error(rep, &raw.revoked, "revoked");
    let min = version(rep, &raw.min_version, TlsVersion::Tls12);
    let max = version(rep, &raw.max_version, TlsVersion::Tls13);
    let unsupported = fallback(rep, &raw.unsupported, "unsupported", d.unsupported);
    let client_auth = fallback(rep, &raw.client_auth, "client_auth", d.client_auth);
    let hsm_unavailable = fallback(
        rep,
        &raw.hsm_unavailable,
        "hsm_unavailable",
        d.hsm_unavailable,
    );
    let no_resources = fallback(rep, &raw.no_resources, "no_resources", d.no_resources);
    let ech = match &raw.ech {
        None => Some(d.ech),
        Some(v) => {
            let all = [EchAction::Decrypt, EchAction::NoDecrypt, EchAction::Block];
            let found = all.into_iter().find(|a| a.label() == v.get_ref());
            if found.is_none() {
                rep.error(
                    v.span(),
                    format!(
                        "ech = {:?}: expected \"decrypt\", \"no-decrypt\" or \"block\"",
                        v.get_ref()
                    ),
                );
            }
            found
        }
    };
    let suites = names(rep, &raw.suites, "suites", &known_suites());
    let groups = names(rep, &raw.groups, "groups", &known_groups());
    let store = std::cell::RefCell::new(None);
    let trust_store = match &raw.trust_store {
        None => Some(None),
        Some(t) => profile_file(rep, base, t, "trust_store", |p| {
            let t = TrustStore::from_pem_file(p).map_err(|e| e.to_string())?;
            *store.borrow_mut() = Some(t);
            Ok(())
        })
        .map(Some),
    };
    // CRLs are checked as the engine reads them: against the profile's
    // trust store, or the system bundle (when this host has one).
    let store = store.into_inner().or_else(|| {
        raw.trust_store
            .is_none()
            .then(|| TrustStore::system().ok())
            .flatten()
    });
    let mut crls = Some(Vec::new());
    for c in &raw.crls {
        let ok = profile_file(rep, base, c, "crl", |p| match &store {
            Some(t) => t
                .clone()
                .with_crl_files(&[p])
                .map(|_| ())
                .map_err(|e| e.to_string()),
            None => read_regular(p, MAX_CRL_BYTES)
                .map(|_| ())
                .map_err(|e| e.to_string()),
        });
        match (ok, crls.as_mut()) {
            (Some(path), Some(list)) => list.push(path),
            _ => crls = None,
        }
    }
    let keylog = match &raw.keylog {
        None => Some(None),
        Some(k) if !Path::new(k.get_ref()).is_absolute() => {
            rep.error(
                k.span(),
                "keylog: an absolute path (the dataplane writes it)",
            );
            None
        }
        Some(k) => match keylog_problem(Path::new(k.get_ref())) {
            Some(why) if rep.saved => {
                rep.warn(k.span(), format!("keylog {}: {why}{UNUSABLE}", k.get_ref()));
                Some(Some(k.get_ref().clone()))
            }
            Some(why) => {
                rep.error(
                    k.span(),
                    format!("keylog {}: {why} (the engine refuses it)", k.get_ref()),
                );
                None
            }
            None => Some(Some(k.get_ref().clone())),
        },
    };
    let exclude_secs = match &raw.exclude_secs {
        None => Some(d.exclude_secs),
        Some(v) if (1..=30 * 86_400).contains(v.get_ref()) => Some(*v.get_ref() as u64),
        Some(v) => {
            rep.error(
                v.span(),
                format!(
                    "exclude_secs = {}: from 1 to 2592000 (30 days)",
                    v.get_ref()
                ),
            );
            None
        }
    };
    let profile = Profile {
        expired: expired?,
        untrusted: untrusted?,
        name_mismatch: name_mismatch?,
        weak: weak?,
        revoked: revoked?,
        min_version: min?,
        max_version: max?,
        unsupported: unsupported?,
        suites: suites?,
        groups: groups?,
        client_auth: client_auth?,
        hsm_unavailable: hsm_unavailable?,
        no_resources: no_resources?,
        ech: ech?,
        block_quic: raw.block_quic.as_ref().is_some_and(|b| *b.get_ref()),
        append_cn_to_san: raw.append_cn_to_san.as_ref().is_some_and(|b| *b.get_ref()),
        keylog: keylog?,
        trust_store: trust_store?,
        crls: crls?,
        exclude_secs: exclude_secs?,
    };
    if let Err(e) = profile.check() {
        rep.error(p.span(), format!("profile {name:?}: {e}"));
        return None;
    }
    Some(profile)
}

/// The categories a rule may name.
struct Categories<'a> {
    known: &'a BTreeMap<String, Vec<HostGlob>>,
    /// `[policy] categories` is set (the file may have failed to load).
    file_set: bool,
}

fn rule(
    rep: &mut Report,
    r: &RawRule,
    span: Range<usize>,
    raw: &RawPolicy,
    categories: &Categories,
    seen: &mut HashMap<String, Range<usize>>,
) -> Option<Rule> {
    let errors_before = rep.out.len();
    let name = match &r.name {
        Some(n) if !n.get_ref().trim().is_empty() => {
            if seen.contains_key(n.get_ref()) {
                rep.error(
                    n.span(),
                    format!("rule name {:?} is used twice", n.get_ref()),
                );
            }
            seen.insert(n.get_ref().clone(), n.span());
            n.get_ref().clone()
        }
        Some(n) => {
            rep.error(n.span(), "a rule's name may not be empty");
            String::new()
        }
        None => {
            rep.error(
                span.clone(),
                "a rule needs a `name` (the log names the rule that decided)",
            );
            String::new()
        }
    };
    let act = match &r.action {
        Some(a) => action(rep, a),
        None => {
            rep.error(span, format!("rule {name:?} needs an `action`"));
            None
        }
    };
    if let Some(p) = &r.profile {
        if !raw.profiles.contains_key(p.get_ref()) {
            let known: Vec<&str> = raw.profiles.keys().map(String::as_str).collect();
            rep.error(
                p.span(),
                format!(
                    "unknown profile {:?} (profiles defined: {})",
                    p.get_ref(),
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        } else if act.is_some_and(|a| a != Action::Decrypt) {
            rep.warn(
                p.span(),
                format!("rule {name:?}: a profile only matters for `decrypt` rules"),
            );
        }
    }

    let mut cats = |list: &[Spanned<String>]| -> Vec<String> {
        let mut out = Vec::new();
        for c in list {
            if categories.known.contains_key(c.get_ref()) {
                out.push(c.get_ref().clone());
            } else {
                let known: Vec<&str> = categories.known.keys().map(String::as_str).collect();
                rep.error(
                    c.span(),
                    format!(
                        "unknown category {:?} ({})",
                        c.get_ref(),
                        if known.is_empty() && categories.file_set {
                            "the category file did not load".to_string()
                        } else if known.is_empty() {
                            "no category file is loaded: set [policy] categories".to_string()
                        } else {
                            format!("categories known: {}", known.join(", "))
                        }
                    ),
                );
            }
        }
        out
    };
    let (categories, not_categories) = (cats(&r.categories), cats(&r.not_categories));
    let matcher = Match {
        src: rep.each(&r.src, Prefix::from_str),
        not_src: rep.each(&r.not_src, Prefix::from_str),
        dst: rep.each(&r.dst, Prefix::from_str),
        not_dst: rep.each(&r.not_dst, Prefix::from_str),
        ports: rep.ports(&r.ports),
        not_ports: rep.ports(&r.not_ports),
        sni: rep.each(&r.sni, HostGlob::from_str),
        not_sni: rep.each(&r.not_sni, HostGlob::from_str),
        categories,
        not_categories,
    };
    let failed = rep.out[errors_before..]
        .iter()
        .any(|d| d.severity == Severity::Error);
    (!failed).then(|| Rule {
        name,
        matcher,
        action: act.expect("no error, so an action"),
        profile: r.profile.as_ref().map(|p| p.get_ref().clone()),
    })
}

fn dataplane_spec(rep: &mut Report, raw: &RawPolicy) -> DataplaneSpec {
    let mut spec = DataplaneSpec::default();
    if let Some(d) = &raw.dataplane {
        spec.inside = d.inside.as_ref().map(|s| s.get_ref().clone());
        spec.outside = d.outside.as_ref().map(|s| s.get_ref().clone());
        if let Some(w) = &d.workers {
            if *w.get_ref() < 1 || *w.get_ref() > 64 {
                rep.error(w.span(), "workers must be from 1 to 64");
            } else {
                spec.workers = Some(*w.get_ref() as usize);
            }
        }
        if let (Some(i), Some(o)) = (&d.inside, &d.outside) {
            if i.get_ref() == o.get_ref() {
                rep.error(
                    o.span(),
                    "inside and outside must be two different interfaces",
                );
            }
        }
    }
    if let Some(h) = &raw.hsm {
        if h.tokens.is_empty() {
            if let Some(m) = &h.module {
                rep.error(
                    m.span(),
                    "[hsm] names no token: set tokens = [\"label\", ...]",
                );
            }
        }
        spec.hsm_tokens = h.tokens.iter().map(|t| t.get_ref().clone()).collect();
        if let Some(p) = &h.pin_file {
            if !Path::new(p.get_ref()).is_absolute() {
                rep.error(p.span(), "pin_file must be an absolute path");
            }
        }
    }
    spec
}

/// Whether every connection `b` matches is matched by `a` (a sound
/// under-approximation: `false` when unsure).
fn covers(policy: &Policy, a: &Match, b: &Match) -> bool {
    fn list<T>(a: &[T], b: &[T], covers: impl Fn(&T, &T) -> bool) -> bool {
        a.is_empty() || (!b.is_empty() && b.iter().all(|y| a.iter().any(|x| covers(x, y))))
    }
    // A's exclusions remove nothing B matches when B excludes them too.
    fn excluded<T>(a: &[T], b: &[T], covers: impl Fn(&T, &T) -> bool) -> bool {
        a.iter().all(|x| b.iter().any(|y| covers(y, x)))
    }
    let prefix = |x: &Prefix, y: &Prefix| x.v4 == y.v4 && x.covers(y);
    let ports = |m: &Match| -> Vec<PortRange> {
        if m.ports.is_empty() {
            policy
                .tls_ports
                .iter()
                .map(|&p| PortRange { first: p, last: p })
                .collect()
        } else {
            m.ports.clone()
        }
    };
    let (pa, pb) = (ports(a), ports(b));
    list(&a.src, &b.src, prefix)
        && excluded(&a.not_src, &b.not_src, prefix)
        && list(&a.dst, &b.dst, prefix)
        && excluded(&a.not_dst, &b.not_dst, prefix)
        && pb.iter().all(|y| pa.iter().any(|x| x.covers(y)))
        && excluded(&a.not_ports, &b.not_ports, |x, y| x.covers(y))
        && list(&a.sni, &b.sni, |x, y| x.covers(y))
        && excluded(&a.not_sni, &b.not_sni, |x, y| x.covers(y))
        && list(&a.categories, &b.categories, |x, y| x == y)
        && excluded(&a.not_categories, &b.not_categories, |x, y| x == y)
}

/// Warns of rules an earlier rule makes unreachable.
fn shadow_warnings(rep: &mut Report, policy: &Policy, spans: &[Range<usize>]) {
    for (j, b) in policy.rules.iter().enumerate() {
        if let Some(i) = (0..j).find(|&i| covers(policy, &policy.rules[i].matcher, &b.matcher)) {
            let a = &policy.rules[i];
            let line = rep
                .src
                .at(Severity::Warning, Some(spans[i].clone()), String::new())
                .line;
            rep.warn(
                spans[j].clone(),
                format!(
                    "rule {:?} is never reached: rule {:?} (line {line}) matches every connection \
                     it would{}",
                    b.name,
                    a.name,
                    if a.action == b.action {
                        " (same action: redundant)".to_string()
                    } else {
                        format!(
                            " and decides {} instead of {}",
                            a.action.label(),
                            b.action.label()
                        )
                    }
                ),
            );
        }
    }
}

/// Reads a policy from disk and checks it.
pub fn check_file(path: &Path) -> io::Result<Checked> {
    let text = read_text(path)?;
    Ok(compile(path, &text, &|p| read_text(p)))
}

/// The most a policy or category file may hold.
pub const MAX_POLICY_BYTES: u64 = 16 << 20;

/// Reads a policy or category file: a regular file of at most
/// [`MAX_POLICY_BYTES`], UTF-8. A FIFO, a device (`/dev/zero`) or a
/// directory is an error at once, never a wait or an endless read.
pub fn read_text(path: &Path) -> io::Result<String> {
    let bytes = read_regular(path, MAX_POLICY_BYTES)?;
    String::from_utf8(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

#[cfg(test)]
mod tests;
