//! The policy language: a TOML file of ordered rules, decryption profiles,
//! a category file, and the dataplane and HSM it is written for. This
//! module checks it (every error and warning with file:line:column) and
//! compiles it into the dataplane's [`Policy`]. The format is documented
//! in `docs/POLICY.md`; `policy/example.toml` is the shipped example.

mod raw;
mod shadow;

use std::{
    cell::OnceCell,
    collections::{BTreeMap, HashMap},
    fmt, io,
    ops::Range,
    path::{Path, PathBuf},
    str::FromStr,
};

use loupe_common::MAX_STEER_PORTS;
use loupe_dataplane::{
    config::Prefix,
    inspect::signature::{EICAR, MAX_PATTERN},
    policy::{
        known_groups, known_suites, merge_ports, ports_less, Action, EchAction, ExportSink,
        Fallback, HostGlob, Match, OnError, Policy, PortRange, Profile, Rule, ServerProfile,
        Signature, SignatureAction, TlsVersion, UpstreamCheck, UrlAction, UrlRule, MAX_GLOBS,
        MAX_PATH_GLOB, MAX_RULES, MAX_SIGNATURES, MAX_SIGNATURE_BYTES, MAX_URL_PATTERNS,
        MAX_URL_RULES,
    },
    sys::read_regular,
    tls::{
        upstream::keylog_file_problem,
        verify::{TrustStore, MAX_CRL_BYTES},
    },
};
use sha2::{Digest, Sha256};
use toml::Spanned;

use self::raw::{
    PortItem, RawCategories, RawPolicy, RawProfile, RawRule, RawServerProfile, RawSignature,
    RawUrlRule,
};

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
    /// Where each line starts (made when first needed).
    lines: OnceCell<Vec<usize>>,
}

impl<'a> Source<'a> {
    fn new(path: &'a Path, text: &'a str) -> Source<'a> {
        Source {
            path,
            text,
            lines: OnceCell::new(),
        }
    }

    /// The line (from 1) of a byte offset.
    fn line(&self, offset: usize) -> usize {
        let starts = self.lines.get_or_init(|| {
            std::iter::once(0)
                .chain(self.text.match_indices('\n').map(|(i, _)| i + 1))
                .collect()
        });
        starts.partition_point(|&s| s <= offset)
    }

    /// The diagnostics of findings at byte offsets, in one pass over the
    /// text (a position found by scanning from the start for each one
    /// made a million errors take hours).
    fn resolve(&self, mut found: Vec<Finding>) -> Vec<Diagnostic> {
        found.sort_by_key(|f| f.offset);
        let (mut pos, mut line, mut col) = (0usize, 1usize, 1usize);
        found
            .into_iter()
            .map(|f| {
                let mut offset = f.offset.clamp(pos, self.text.len());
                while !self.text.is_char_boundary(offset) {
                    offset -= 1;
                }
                let seg = &self.text[pos..offset.max(pos)];
                match seg.rfind('\n') {
                    Some(nl) => {
                        line += seg.bytes().filter(|&b| b == b'\n').count();
                        col = seg[nl + 1..].chars().count() + 1;
                    }
                    None => col += seg.chars().count(),
                }
                pos = offset.max(pos);
                Diagnostic {
                    severity: f.severity,
                    file: self.path.to_path_buf(),
                    line,
                    col,
                    message: f.message,
                }
            })
            .collect()
    }
}

/// A diagnostic before its position is worked out.
struct Finding {
    severity: Severity,
    offset: usize,
    message: String,
}

/// Collects diagnostics for one source.
struct Report<'a> {
    src: Source<'a>,
    found: Vec<Finding>,
    /// Diagnostics with their positions already.
    done: Vec<Diagnostic>,
    /// Errors among them.
    errors: usize,
    /// Compiling a policy that was already accepted (see
    /// [`compile_saved`]): host files a profile names are the engine's to
    /// read, and their trouble is a warning.
    saved: bool,
    /// Looks server profiles' keys up on their tokens (`policy check
    /// --keys`).
    keys: Option<&'a KeyCheck<'a>>,
}

/// Checks a server profile's key on its token: `Err` with the severity and
/// what is wrong.
pub type KeyCheck<'a> = dyn Fn(&ServerProfile) -> Result<(), (Severity, String)> + 'a;

impl<'a> Report<'a> {
    fn new(src: Source<'a>, saved: bool) -> Report<'a> {
        Report {
            src,
            found: Vec::new(),
            done: Vec::new(),
            errors: 0,
            saved,
            keys: None,
        }
    }

    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.push(Severity::Error, span, message.into());
    }

    fn warn(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.push(Severity::Warning, span, message.into());
    }

    fn push(&mut self, severity: Severity, span: Range<usize>, message: String) {
        self.errors += usize::from(severity == Severity::Error);
        self.found.push(Finding {
            severity,
            offset: span.start,
            message,
        });
    }

    /// How many errors so far.
    fn errors(&self) -> usize {
        self.errors
    }

    /// A diagnostic whose position is known already.
    fn push_done(&mut self, d: Diagnostic) {
        self.errors += usize::from(d.severity == Severity::Error);
        self.done.push(d);
    }

    /// The diagnostics, with their positions.
    fn finish(self) -> Vec<Diagnostic> {
        let mut out = self.src.resolve(self.found);
        out.extend(self.done);
        out
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
                PortItem::Float(f) => Err(format!(
                    "bad port {f}: expected a whole number from 1 to 65535"
                )),
                PortItem::Other(v) => Err(format!(
                    "bad port {v}: expected a number from 1 to 65535 or a range such as \
                     \"8000-8099\""
                )),
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

/// Values (keys, list items, lists and tables) one policy or category
/// file may hold: a policy at the limits (10,000 rules, 1,000,000 globs,
/// 16,384 prefixes) needs fewer. Parsing costs memory by the value, so
/// this is checked on the tokens first.
const MAX_VALUES: usize = 1_500_000;
/// Tables ([[rules]], [profiles.x], inline tables) one file may hold.
const MAX_TABLES: usize = 20_000;

/// The longest rule name, in bytes.
pub const MAX_RULE_NAME: usize = 128;

/// Parses TOML text into `T`, or a diagnostic. Text with more values or
/// tables than any policy within the limits is refused before it is
/// parsed (a 15 MiB file of empty tables took 4 GiB).
fn parse_toml<T: serde::de::DeserializeOwned>(src: &Source) -> Result<T, Diagnostic> {
    let error = |offset: usize, message: String| {
        let found = Finding {
            severity: Severity::Error,
            offset,
            message,
        };
        src.resolve(vec![found]).remove(0)
    };
    if let Err((offset, message)) = count_values(src.text) {
        return Err(error(offset, message));
    }
    toml::from_str(src.text).map_err(|e| error(e.span().map_or(0, |s| s.start), toml_message(&e)))
}

/// Counts the values and tables of TOML text from its tokens (no parse,
/// no allocation): the offset where a limit is passed, and why.
fn count_values(text: &str) -> Result<(), (usize, String)> {
    use toml_parser::lexer::TokenKind as K;
    let (mut values, mut tables, mut depth) = (0usize, 0usize, 0usize);
    let (mut line_start, mut header) = (true, false);
    for t in toml_parser::Source::new(text).lex() {
        match t.kind() {
            K::Newline => {
                (line_start, header) = (true, false);
                continue;
            }
            K::Whitespace | K::Comment => continue,
            // A table header: `[name]` or `[[name]]` first on a line.
            K::LeftSquareBracket if depth == 0 && line_start => {
                tables += 1;
                header = true;
            }
            _ if header => {}
            K::LeftSquareBracket => {
                depth += 1;
                values += 1;
            }
            K::LeftCurlyBracket => {
                depth += 1;
                values += 1;
                tables += 1;
            }
            K::RightSquareBracket | K::RightCurlyBracket => depth = depth.saturating_sub(1),
            K::Equals | K::Comma => values += 1,
            _ => {}
        }
        line_start = false;
        if tables > MAX_TABLES {
            return Err((
                t.span().start(),
                format!(
                    "more than {MAX_TABLES} tables (rules, profiles): a policy has at most \
                     {MAX_RULES} rules; refused unparsed"
                ),
            ));
        }
        if values > MAX_VALUES {
            return Err((
                t.span().start(),
                format!(
                    "more than {MAX_VALUES} values (keys and list items): a policy has at most \
                     {MAX_RULES} rules and {MAX_GLOBS} globs; refused unparsed"
                ),
            ));
        }
    }
    Ok(())
}

/// The category file a policy names (for the CLI, which reads it for the
/// daemon), if the policy parses far enough to say.
pub fn category_file(path: &Path, text: &str) -> Option<PathBuf> {
    #[derive(serde::Deserialize)]
    struct Head {
        policy: Option<HeadPolicy>,
    }
    #[derive(serde::Deserialize)]
    struct HeadPolicy {
        categories: Option<String>,
    }
    let head: Head = toml::from_str(text).ok()?;
    let cat = head.policy?.categories?;
    Some(path.parent().unwrap_or(Path::new(".")).join(cat))
}

/// The files that `[signatures.*]` take their patterns from, relative to
/// the policy at `path` (none if the text does not parse).
pub fn signature_files(path: &Path, text: &str) -> Vec<PathBuf> {
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(default)]
        signatures: BTreeMap<String, HeadSignature>,
    }
    #[derive(serde::Deserialize)]
    struct HeadSignature {
        file: Option<String>,
    }
    let Ok(head) = toml::from_str::<Head>(text) else {
        return Vec::new();
    };
    let base = path.parent().unwrap_or(Path::new("."));
    head.signatures
        .into_values()
        .filter_map(|s| s.file.map(|f| base.join(f)))
        .collect()
}

/// Reads a signature file for the daemon: a regular file, at most one
/// byte more than a pattern may have (enough for the check to say it is
/// too long), never a wait on a FIFO.
pub fn read_signature_file(path: &Path) -> io::Result<Vec<u8>> {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut bytes = Vec::new();
    file.take(MAX_PATTERN as u64 + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The limits on the policy's size, checked before anything else (a
/// policy far beyond them is refused at once, not analysed): rules,
/// host-name globs (the rules' and the category file's together) and
/// prefixes. Each error stands where the first item too many stands.
/// False when one is exceeded.
fn within_limits(
    rep: &mut Report,
    crep: Option<&mut Report>,
    raw: &RawPolicy,
    cats: Option<&RawCategories>,
) -> bool {
    let max_prefixes = loupe_common::MAX_PREFIXES as usize;
    let mut ok = true;
    if let Some(r) = raw.rules.get(MAX_RULES) {
        rep.error(
            r.span(),
            format!("{} rules: at most {MAX_RULES}", raw.rules.len()),
        );
        ok = false;
    }
    if let Some(p) = raw.policy.as_ref().and_then(|g| g.exempt.get(max_prefixes)) {
        let n = raw.policy.as_ref().map_or(0, |g| g.exempt.len());
        rep.error(
            p.span(),
            format!("{n} exempt prefixes: at most {max_prefixes}"),
        );
        ok = false;
    }
    let rules = || raw.rules.iter().map(|r| r.get_ref());
    fn prefixes(r: &RawRule) -> [&Vec<Spanned<String>>; 4] {
        [&r.src, &r.not_src, &r.dst, &r.not_dst]
    }
    let n: usize = rules().flat_map(prefixes).map(Vec::len).sum();
    if n > max_prefixes {
        let at = nth_start(rules().flat_map(prefixes).flatten(), max_prefixes);
        rep.error(
            at..at,
            format!("{n} prefixes in rules: at most {max_prefixes}"),
        );
        ok = false;
    }
    fn globs(r: &RawRule) -> [&Vec<Spanned<String>>; 2] {
        [&r.sni, &r.not_sni]
    }
    let in_cats: usize = cats.map_or(0, |c| c.values().map(|l| l.get_ref().len()).sum());
    let n = in_cats + rules().flat_map(globs).map(Vec::len).sum::<usize>();
    if n > MAX_GLOBS {
        let message = format!("{n} host-name globs: at most {MAX_GLOBS}");
        match (crep, cats) {
            (Some(crep), Some(c)) if in_cats > MAX_GLOBS => {
                let at = nth_start(c.values().flat_map(|l| l.get_ref()), MAX_GLOBS);
                crep.error(at..at, message);
            }
            _ => {
                let at = nth_start(rules().flat_map(globs).flatten(), MAX_GLOBS - in_cats);
                rep.error(at..at, message);
            }
        }
        ok = false;
    }
    ok
}

/// Where the `n`th (from 0) of these items stands in its file.
fn nth_start<'a, T: 'a>(items: impl Iterator<Item = &'a Spanned<T>>, n: usize) -> usize {
    let mut starts: Vec<usize> = items.map(|i| i.span().start).collect();
    if n >= starts.len() {
        return 0;
    }
    *starts.select_nth_unstable(n).1
}

/// Reads a file a policy names (the category file, signature files) as
/// its bytes.
pub type Load<'a> = dyn Fn(&Path) -> io::Result<Vec<u8>> + 'a;

/// Checks and compiles the policy at `path` whose text is `text`; `load`
/// reads the files it names (the category file, signature files), so the caller decides
/// where they come from.
pub fn compile(path: &Path, text: &str, load: &Load<'_>) -> Checked {
    compile_as(path, text, load, false, None)
}

/// [`compile`] for a policy that was checked and accepted before (the
/// daemon's saved state, pushed again to a restarted dataplane). A trust
/// store, CRL or key log that has become unusable since is a warning, not
/// an error: refusing the whole policy would leave the dataplane without
/// one (no block rule enforced), while the engine blocks the connections
/// of a profile it cannot prepare and enforces the rest.
pub fn compile_saved(path: &Path, text: &str, load: &Load<'_>) -> Checked {
    compile_as(path, text, load, true, None)
}

fn compile_as(
    path: &Path,
    text: &str,
    load: &Load<'_>,
    saved: bool,
    keys: Option<&KeyCheck<'_>>,
) -> Checked {
    let src = Source::new(path, text);
    let raw: RawPolicy = match parse_toml(&src) {
        Ok(r) => r,
        Err(d) => {
            return Checked {
                diagnostics: vec![d],
                ..Checked::default()
            }
        }
    };
    let mut rep = Report::new(src, saved);
    rep.keys = keys;
    let mut digest = Sha256::new();
    digest.update(text.as_bytes());

    // The category file, parsed (its globs count toward the limits).
    let global = raw.policy.as_ref();
    let categories_set = global.and_then(|g| g.categories.as_ref()).is_some();
    let mut cat_file: Option<(PathBuf, String)> = None;
    if let Some(cat) = global.and_then(|g| g.categories.as_ref()) {
        let cpath = path.parent().unwrap_or(Path::new(".")).join(cat.get_ref());
        match load(&cpath).and_then(utf8_text) {
            Err(e) => rep.error(
                cat.span(),
                format!("cannot read the category file {}: {e}", cpath.display()),
            ),
            Ok(ctext) => {
                digest.update(b"\0categories\0");
                digest.update(ctext.as_bytes());
                cat_file = Some((cpath, ctext));
            }
        }
    }
    let mut crep = cat_file
        .as_ref()
        .map(|(cpath, ctext)| Report::new(Source::new(cpath, ctext), saved));
    let raw_cats = crep
        .as_mut()
        .and_then(|crep| match parse_toml::<RawCategories>(&crep.src) {
            Ok(c) => Some(c),
            Err(d) => {
                crep.push_done(d);
                None
            }
        });

    if !within_limits(&mut rep, crep.as_mut(), &raw, raw_cats.as_ref()) {
        let mut diagnostics = rep.finish();
        diagnostics.extend(crep.map(Report::finish).unwrap_or_default());
        return Checked {
            diagnostics: sorted(diagnostics),
            ..Checked::default()
        };
    }

    // [policy]
    let tls_ports: Vec<u16> = match global.and_then(|g| g.tls_ports.as_ref()) {
        Some(list) => {
            let ranges = rep.ports(list.get_ref());
            if list.get_ref().is_empty() {
                rep.error(
                    list.span(),
                    "tls_ports is empty: rules without `ports` would match nothing",
                );
            }
            tls_ports_within_limit(&mut rep, list.get_ref(), &ranges)
        }
        None => vec![443],
    };
    let default_action = match global.and_then(|g| g.default_action.as_ref()) {
        Some(a) => action(&mut rep, a).unwrap_or(Action::NoDecrypt),
        None => Action::NoDecrypt,
    };
    let exempt = global.map_or_else(Vec::new, |g| rep.each(&g.exempt, Prefix::from_str));

    let mut categories: BTreeMap<String, Vec<HostGlob>> = BTreeMap::new();
    if let (Some(crep), Some(raw_cats)) = (crep.as_mut(), raw_cats.as_ref()) {
        for (name, globs) in raw_cats {
            if globs.get_ref().is_empty() {
                crep.warn(globs.span(), format!("category {name:?} is empty"));
            }
            let parsed = crep.each(globs.get_ref(), HostGlob::from_str);
            categories.insert(name.clone(), parsed);
        }
    }

    // [signatures.*], in the order written (for the limits' positions);
    // their files are relative to the policy file.
    let base = path.parent().unwrap_or(Path::new("."));
    let mut signatures = BTreeMap::new();
    let mut written_sigs: Vec<(&String, &Spanned<RawSignature>)> = raw.signatures.iter().collect();
    written_sigs.sort_by_key(|(_, s)| s.span().start);
    let mut pattern_bytes = 0;
    for (i, (name, s)) in written_sigs.into_iter().enumerate() {
        if i == MAX_SIGNATURES {
            rep.error(
                s.span(),
                format!("more than {MAX_SIGNATURES} signatures: at most {MAX_SIGNATURES}"),
            );
            break;
        }
        if let Some(sig) = signature(&mut rep, name, s, base, load) {
            if s.get_ref().file.is_some() {
                // The file is the policy's too: a new one is a new policy.
                digest.update(b"\0signature\0");
                digest.update(name.as_bytes());
                digest.update(b"\0");
                digest.update(&sig.pattern);
            }
            pattern_bytes += sig.pattern.len();
            if pattern_bytes > MAX_SIGNATURE_BYTES {
                rep.error(
                    s.span(),
                    format!(
                        "signature patterns of more than {MAX_SIGNATURE_BYTES} bytes together \
                         (4 MiB) from here on"
                    ),
                );
                break;
            }
            signatures.insert(name.clone(), sig);
        }
    }

    // [[url_rules]]
    let mut url_rules = Vec::new();
    let mut url_names: HashMap<String, Range<usize>> = HashMap::new();
    // The categories URL rules and rules may name.
    let cats = Categories {
        known: &categories,
        file_set: categories_set,
        listing: OnceCell::new(),
    };
    for (i, r) in raw.url_rules.iter().enumerate() {
        if i == MAX_URL_RULES {
            rep.error(
                r.span(),
                format!("more than {MAX_URL_RULES} URL rules: at most {MAX_URL_RULES}"),
            );
            break;
        }
        if let Some(rule) = url_rule(&mut rep, r, &cats, &mut url_names) {
            url_rules.push(rule);
        }
    }
    let patterns: usize = url_rules
        .iter()
        .map(|r| r.hosts.len() + r.paths.len())
        .sum();
    if patterns > MAX_URL_PATTERNS {
        rep.error(
            0..0,
            format!("{patterns} host and path globs in URL rules: at most {MAX_URL_PATTERNS}"),
        );
    }

    // [profiles.*]
    let mut profiles = BTreeMap::new();
    let mut files = HostFiles::default();
    for (name, p) in &raw.profiles {
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(profile) = profile(&mut rep, &mut files, base, name, p, &raw) {
            profiles.insert(name.clone(), profile);
        }
    }
    // [server_profiles.*]
    let mut server_profiles = BTreeMap::new();
    for (name, p) in &raw.server_profiles {
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(sp) = server_profile(&mut rep, base, name, p) {
            server_profiles.insert(name.clone(), sp);
        }
    }
    let named: std::collections::HashSet<&str> = raw
        .profiles
        .values()
        .flat_map(|p| p.get_ref().signatures.iter().map(|s| s.get_ref().as_str()))
        .collect();
    for (name, s) in &raw.signatures {
        if !named.contains(name.as_str()) {
            rep.warn(
                s.span(),
                format!("signature {name:?} is not used by any profile"),
            );
        }
    }

    // [[rules]]
    let mut rules: Vec<Rule> = Vec::new();
    let mut written: Vec<&Spanned<RawRule>> = Vec::new();
    let mut seen: HashMap<String, Range<usize>> = HashMap::new();
    for r in &raw.rules {
        if let Some(rule) = rule(&mut rep, r.get_ref(), r.span(), &raw, &cats, &mut seen) {
            rules.push(rule);
            written.push(r);
        }
    }
    let used_servers: std::collections::HashSet<&str> = rules
        .iter()
        .filter_map(|r| r.server_profile.as_deref())
        .collect();
    for (name, p) in &raw.server_profiles {
        if !used_servers.contains(name.as_str()) {
            rep.warn(
                p.span(),
                format!("server profile {name:?} is not used by any rule"),
            );
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
        signatures,
        url_rules,
        server_profiles,
    };
    steered_ports_within_limit(&mut rep, &policy, &written, global);
    shadow_warnings(&mut rep, &policy, &written);
    policy.digest = format!("{:x}", digest.finalize());
    // What the dataplane checks on receipt (bounds, steering) is checked
    // here too, so `check` accepts only what `apply` can run. Each of
    // those errors was reported above where it stands; this is the last
    // guard.
    let positioned = rep.errors() > 0 || crep.as_ref().is_some_and(|c| c.errors() > 0);
    if let Err(e) = policy.validate() {
        if !positioned {
            rep.error(0..0, e);
        }
    }
    let dataplane = dataplane_spec(&mut rep, &raw);

    let mut diagnostics = rep.finish();
    diagnostics.extend(crep.map(Report::finish).unwrap_or_default());
    let diagnostics = sorted(diagnostics);
    let errors = diagnostics.iter().any(|d| d.severity == Severity::Error);
    Checked {
        policy: (!errors).then_some(policy),
        dataplane,
        diagnostics,
    }
}

/// Diagnostics in the order of their files and positions.
fn sorted(mut diagnostics: Vec<Diagnostic>) -> Vec<Diagnostic> {
    diagnostics.sort_by(|a, b| (&a.file, a.line, a.col).cmp(&(&b.file, b.line, b.col)));
    diagnostics
}

/// The TLS ports: the union of `ranges` (those of `items` that parsed),
/// of at most [`MAX_STEER_PORTS`]; more is an error where the item that
/// goes beyond stands.
fn tls_ports_within_limit(
    rep: &mut Report,
    items: &[Spanned<PortItem>],
    ranges: &[PortRange],
) -> Vec<u16> {
    let max = MAX_STEER_PORTS as usize;
    let total: usize = merge_ports(ranges)
        .iter()
        .map(|r| usize::from(r.last - r.first) + 1)
        .sum();
    let mut seen = vec![false; 1 << 16];
    let mut ports = Vec::new();
    for item in items {
        let Some(r) = port_item(item.get_ref()) else {
            continue;
        };
        for p in r.first..=r.last {
            if !std::mem::replace(&mut seen[usize::from(p)], true) {
                ports.push(p);
            }
            if ports.len() > max {
                rep.error(
                    item.span(),
                    format!(
                        "tls_ports hold {total} ports, more than the {max} the classifier steers"
                    ),
                );
                ports.sort_unstable();
                return ports;
            }
        }
    }
    ports.sort_unstable();
    ports
}

/// A port item as a range, when it is one.
fn port_item(item: &PortItem) -> Option<PortRange> {
    match item {
        PortItem::Number(n) => u16::try_from(*n)
            .ok()
            .filter(|&p| p > 0)
            .map(|p| PortRange { first: p, last: p }),
        PortItem::Text(t) => t.parse().ok(),
        PortItem::Float(_) | PortItem::Other(_) => None,
    }
}

/// The ports the rules examine (and the default action, unless it is
/// `no-decrypt`) must fit the classifier: more is an error where the port
/// item (or rule, or default action) that goes beyond stands. `written`
/// are the rules as written, one for each of `policy`'s.
fn steered_ports_within_limit(
    rep: &mut Report,
    policy: &Policy,
    written: &[&Spanned<RawRule>],
    global: Option<&raw::RawGlobal>,
) {
    let Err(e) = policy.steering() else {
        return;
    };
    let max = MAX_STEER_PORTS as usize;
    let mut seen = vec![false; 1 << 16];
    let mut count = 0usize;
    // Marks `ranges`; true once the count goes beyond the limit.
    let mut mark = |ranges: Vec<PortRange>| {
        for r in ranges {
            for p in r.first..=r.last {
                if !std::mem::replace(&mut seen[usize::from(p)], true) {
                    count += 1;
                    if count > max {
                        return true;
                    }
                }
            }
        }
        false
    };
    for (rule, raw) in policy.rules.iter().zip(written) {
        let m = &rule.matcher;
        if m.ports.is_empty() {
            if mark(policy.examined_ports(m)) {
                return rep.error(raw.span(), e);
            }
            continue;
        }
        let excluded = merge_ports(&m.not_ports);
        for (range, item) in m.ports.iter().zip(&raw.get_ref().ports) {
            if mark(ports_less(&[*range], &excluded)) {
                return rep.error(item.span(), e);
            }
        }
    }
    // Beyond only with the default action's (the TLS ports).
    let at = global
        .and_then(|g| {
            let action = g.default_action.as_ref().map(Spanned::span);
            action.or_else(|| g.tls_ports.as_ref().map(Spanned::span))
        })
        .unwrap_or(0..0);
    rep.error(at, e);
}

fn action(rep: &mut Report, a: &Spanned<String>) -> Option<Action> {
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
    parse: impl FnOnce(&Path) -> Result<(), String>,
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
    if let Some(why) = keylog_file_problem(&meta) {
        return Some(why);
    }
    // The engine appends sealed lines only to a sealed key log.
    (meta.len() > 0 && !loupe_hsm::keylog::starts_sealed(path))
        .then(|| "it is not a sealed key log (a clear one?): move it away".to_string())
}

/// The trust stores and CRLs profiles name, each read and checked once
/// however many profiles name it.
#[derive(Default)]
struct HostFiles {
    stores: HashMap<PathBuf, Result<TrustStore, String>>,
    /// The system bundle, read when a CRL is to be checked against it.
    system: Option<Option<TrustStore>>,
    /// A CRL's check against a store (`None`: the system bundle).
    crls: HashMap<(Option<PathBuf>, PathBuf), Result<(), String>>,
}

impl HostFiles {
    fn store(&mut self, path: &Path) -> Result<TrustStore, String> {
        self.stores
            .entry(path.to_path_buf())
            .or_insert_with(|| TrustStore::from_pem_file(path).map_err(|e| e.to_string()))
            .clone()
    }

    fn crl(&mut self, store: Option<&Path>, crl: &Path) -> Result<(), String> {
        let key = (store.map(Path::to_path_buf), crl.to_path_buf());
        if let Some(r) = self.crls.get(&key) {
            return r.clone();
        }
        let trust = match store {
            Some(s) => self.store(s).ok(),
            None => self
                .system
                .get_or_insert_with(|| TrustStore::system().ok())
                .clone(),
        };
        let r = match trust {
            Some(t) => t
                .with_crl_files(&[crl])
                .map(|_| ())
                .map_err(|e| e.to_string()),
            None => read_regular(crl, MAX_CRL_BYTES)
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        self.crls.insert(key, r.clone());
        r
    }
}

fn profile(
    rep: &mut Report,
    files: &mut HostFiles,
    base: &Path,
    name: &str,
    p: &Spanned<RawProfile>,
    policy: &RawPolicy,
) -> Option<Profile> {
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
    let trust_store = match &raw.trust_store {
        None => Some(None),
        Some(t) => {
            profile_file(rep, base, t, "trust_store", |p| files.store(p).map(|_| ())).map(Some)
        }
    };
    // CRLs are checked as the engine reads them: against the profile's
    // trust store (if it could be read), or the system bundle (when this
    // host has one).
    let store = match &raw.trust_store {
        Some(_) => trust_store.clone().flatten().map(PathBuf::from),
        None => None,
    };
    let store_unreadable = raw.trust_store.is_some() && store.is_none();
    let mut crls = Some(Vec::new());
    for c in &raw.crls {
        let ok = profile_file(rep, base, c, "crl", |p| {
            if store_unreadable {
                read_regular(p, MAX_CRL_BYTES)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            } else {
                files.crl(store.as_deref(), p)
            }
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
    let mut signatures = Some(Vec::new());
    for s in &raw.signatures {
        let n = s.get_ref();
        if !policy.signatures.contains_key(n) {
            let known: Vec<&str> = policy.signatures.keys().map(String::as_str).collect();
            rep.error(
                s.span(),
                format!(
                    "unknown signature {n:?} (signatures defined: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            );
            signatures = None;
        } else if let Some(list) = signatures.as_mut() {
            if !list.contains(n) {
                list.push(n.clone());
            }
        }
    }
    let mut export = Some(Vec::new());
    for s in &raw.export {
        let sink = match s.get_ref().as_str() {
            "pcap" => ExportSink::Pcap,
            "mirror" => ExportSink::Mirror,
            "pcap-tls" => ExportSink::PcapTls,
            other => {
                rep.error(
                    s.span(),
                    format!(
                        "export = [{other:?}]: the destinations are \"pcap\", \"pcap-tls\" \
                         and \"mirror\" (the engine's --export-pcap and --export-mirror)"
                    ),
                );
                export = None;
                continue;
            }
        };
        if let Some(list) = export.as_mut() {
            if !list.contains(&sink) {
                list.push(sink);
            }
        }
    }
    // Checked here, each where it is written, even when other options of
    // the profile are wrong too.
    if let (Some(lo), Some(hi), Some(v)) = (min, max, raw.min_version.as_ref()) {
        if lo > hi {
            rep.error(
                v.span(),
                format!(
                    "profile {name:?}: min_version {:?} is above max_version {:?}",
                    v.get_ref(),
                    raw.max_version
                        .as_ref()
                        .map_or("1.3", |m| m.get_ref().as_str())
                ),
            );
            return None;
        }
    }
    if let (Some(lo), Some(hi), Some(s), Some(list)) = (min, max, &suites, raw.suites.as_ref()) {
        let usable = s.is_empty()
            || Profile {
                min_version: lo,
                max_version: hi,
                suites: s.clone(),
                ..Profile::default()
            }
            .check()
            .is_ok();
        if !usable {
            rep.error(
                list.span(),
                format!(
                    "profile {name:?}: no allowed cipher suite belongs to an allowed TLS version"
                ),
            );
            return None;
        }
    }
    let token = token_label(rep, raw.token.as_ref());
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
        http: raw.http.as_ref().is_none_or(|b| *b.get_ref()),
        signatures: signatures?,
        export: export?,
        token: token?,
    };
    if let Err(e) = profile.check() {
        rep.error(p.span(), format!("profile {name:?}: {e}"));
        return None;
    }
    Some(profile)
}

/// A `token = "label"` (a tenant's), reported where it stands when it
/// cannot be a PKCS#11 token label (1 to 32 bytes, no control
/// characters). `None` when it cannot.
fn token_label(rep: &mut Report, t: Option<&Spanned<String>>) -> Option<Option<String>> {
    let Some(t) = t else {
        return Some(None);
    };
    let l = t.get_ref();
    if l.trim().is_empty() || l.len() > 32 || l.chars().any(char::is_control) {
        rep.error(
            t.span(),
            format!("token = {l:?}: a token label is 1 to 32 bytes without control characters"),
        );
        return None;
    }
    Some(Some(l.clone()))
}

/// A `[[url_rules]]` entry: its name (unique), host and path globs, and
/// action, each error where it stands.
fn url_rule(
    rep: &mut Report,
    r: &Spanned<RawUrlRule>,
    cats: &Categories,
    names: &mut HashMap<String, Range<usize>>,
) -> Option<UrlRule> {
    let raw = r.get_ref();
    let name = match &raw.name {
        None => {
            rep.error(r.span(), "a URL rule needs a name");
            None
        }
        Some(n) if n.get_ref().trim().is_empty() => {
            rep.error(n.span(), "a URL rule's name is empty");
            None
        }
        Some(n) if n.get_ref().len() > MAX_RULE_NAME => {
            rep.error(
                n.span(),
                format!(
                    "a rule name of {} bytes: at most {MAX_RULE_NAME}",
                    n.get_ref().len()
                ),
            );
            None
        }
        Some(n) if n.get_ref().chars().any(char::is_control) => {
            rep.error(
                n.span(),
                "a URL rule's name has no control characters (it goes into pages, logs and metrics)",
            );
            None
        }
        Some(n) => match names.get(n.get_ref()) {
            Some(_) => {
                rep.error(
                    n.span(),
                    format!("URL rule name {:?} is used twice", n.get_ref()),
                );
                None
            }
            None => {
                names.insert(n.get_ref().clone(), n.span());
                Some(n.get_ref().clone())
            }
        },
    };
    let errors = rep.errors();
    let hosts = rep.each(&raw.host, HostGlob::from_str);
    let mut paths = Vec::new();
    for p in &raw.path {
        let text = p.get_ref();
        let why = if !(text.starts_with('/') || text.starts_with('*')) {
            Some("a path glob starts with / or *".to_string())
        } else if text.len() > MAX_PATH_GLOB {
            Some(format!(
                "a path glob of {} bytes: at most {MAX_PATH_GLOB}",
                text.len()
            ))
        } else if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            Some("a path glob has no spaces or control characters".to_string())
        } else {
            None
        };
        match why {
            Some(w) => rep.error(p.span(), format!("path {text:?}: {w}")),
            None => paths.push(text.clone()),
        }
    }
    let action = match &raw.action {
        None => {
            rep.error(r.span(), "a URL rule needs an action (allow, log or block)");
            None
        }
        Some(a) => match a.get_ref().as_str() {
            "allow" => Some(UrlAction::Allow),
            "log" => Some(UrlAction::Log),
            "block" => Some(UrlAction::Block),
            other => {
                rep.error(
                    a.span(),
                    format!("action = {other:?}: expected \"allow\", \"log\" or \"block\""),
                );
                None
            }
        },
    };
    let mut categories = Vec::new();
    for c in &raw.categories {
        if cats.known.contains_key(c.get_ref()) {
            categories.push(c.get_ref().clone());
        } else {
            rep.error(
                c.span(),
                format!("unknown category {:?} ({})", c.get_ref(), cats.listing()),
            );
        }
    }
    if raw.host.is_empty() && raw.path.is_empty() && raw.categories.is_empty() {
        rep.warn(
            r.span(),
            "a URL rule with no host, path or category matches every request",
        );
    }
    if rep.errors() > errors {
        return None;
    }
    Some(UrlRule {
        name: name?,
        hosts,
        paths,
        categories,
        category_hosts: Vec::new(),
        action: action?,
    })
}

/// `[signatures.NAME]`: its pattern's bytes and its action; a `file`
/// is read with `load`, relative to `base` (the policy file's directory).
fn signature(
    rep: &mut Report,
    name: &str,
    s: &Spanned<RawSignature>,
    base: &Path,
    load: &Load<'_>,
) -> Option<Signature> {
    let raw = s.get_ref();
    if name.is_empty() || name.len() > MAX_RULE_NAME || name.chars().any(char::is_control) {
        rep.error(
            s.span(),
            format!(
                "signature name {name:?}: 1 to {MAX_RULE_NAME} bytes, no control characters \
                 (it goes into logs and metrics)"
            ),
        );
        return None;
    }
    let action = match &raw.action {
        None => Some(SignatureAction::Alert),
        Some(a) => match a.get_ref().as_str() {
            "alert" => Some(SignatureAction::Alert),
            "block" => Some(SignatureAction::Block),
            other => {
                rep.error(
                    a.span(),
                    format!("action = {other:?}: expected \"alert\" or \"block\""),
                );
                None
            }
        },
    };
    let given = [
        raw.builtin.is_some(),
        raw.pattern.is_some(),
        raw.hex.is_some(),
        raw.file.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        rep.error(
            s.span(),
            format!("signature {name:?}: give exactly one of builtin, pattern, hex or file"),
        );
        return None;
    }
    let (bytes, span) = if let Some(b) = &raw.builtin {
        match b.get_ref().as_str() {
            "eicar" => (Some(EICAR.to_vec()), b.span()),
            other => {
                rep.error(
                    b.span(),
                    format!("builtin = {other:?}: the built-in signatures are \"eicar\""),
                );
                (None, b.span())
            }
        }
    } else if let Some(p) = &raw.pattern {
        (Some(p.get_ref().as_bytes().to_vec()), p.span())
    } else if let Some(f) = &raw.file {
        let path = base.join(f.get_ref());
        let too_long = || {
            format!(
                "the file {} holds more than {MAX_PATTERN} bytes, the most a pattern may have",
                path.display()
            )
        };
        let problem = match load(&path) {
            // A file too large to read at all is too long a pattern.
            Err(_)
                if std::fs::metadata(&path)
                    .is_ok_and(|m| m.is_file() && m.len() > MAX_PATTERN as u64) =>
            {
                Err(too_long())
            }
            Err(e) => Err(format!("cannot read the file {}: {e}", path.display())),
            Ok(b) if b.is_empty() => Err(format!("the file {} is empty", path.display())),
            Ok(b) if b.len() > MAX_PATTERN => Err(too_long()),
            Ok(b) => Ok(b),
        };
        match problem {
            Ok(b) => (Some(b), f.span()),
            Err(e) => {
                rep.error(f.span(), format!("signature {name:?}: {e}"));
                return None;
            }
        }
    } else {
        let h = raw.hex.as_ref().expect("one of the four");
        match hex_bytes(h.get_ref()) {
            Ok(b) => (Some(b), h.span()),
            Err(e) => {
                rep.error(h.span(), format!("hex: {e}"));
                (None, h.span())
            }
        }
    };
    let bytes = bytes?;
    if bytes.is_empty() || bytes.len() > MAX_PATTERN {
        rep.error(
            span,
            format!(
                "signature {name:?}: a pattern of {} bytes (1 to {MAX_PATTERN})",
                bytes.len()
            ),
        );
        return None;
    }
    Some(Signature {
        pattern: bytes,
        action: action?,
    })
}

/// Hex digits in pairs, with spaces, tabs or colons between pairs allowed.
fn hex_bytes(text: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = text
        .bytes()
        .filter(|b| !matches!(b, b' ' | b'\t' | b':'))
        .collect();
    if let Some(bad) = digits.iter().find(|b| !b.is_ascii_hexdigit()) {
        return Err(format!("{:?} is not a hex digit", char::from(*bad)));
    }
    if digits.len() % 2 == 1 {
        return Err("an odd number of hex digits".into());
    }
    Ok(digits
        .chunks(2)
        .map(|p| {
            let v = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
            v(p[0]) << 4 | v(p[1])
        })
        .collect())
}

/// The categories a rule may name.
struct Categories<'a> {
    known: &'a BTreeMap<String, Vec<HostGlob>>,
    /// `[policy] categories` is set (the file may have failed to load).
    file_set: bool,
    /// What an unknown category's error says of the known ones (made
    /// once: a listing per error would make many errors quadratic).
    listing: OnceCell<String>,
}

impl Categories<'_> {
    fn listing(&self) -> &str {
        self.listing.get_or_init(|| {
            if self.known.is_empty() && self.file_set {
                "the category file did not load".to_string()
            } else if self.known.is_empty() {
                "no category file is loaded: set [policy] categories".to_string()
            } else {
                let known: Vec<&str> = self.known.keys().map(String::as_str).collect();
                format!("categories known: {}", known.join(", "))
            }
        })
    }
}

fn rule(
    rep: &mut Report,
    r: &RawRule,
    span: Range<usize>,
    raw: &RawPolicy,
    categories: &Categories,
    seen: &mut HashMap<String, Range<usize>>,
) -> Option<Rule> {
    let errors_before = rep.errors();
    let name = match &r.name {
        Some(n) if !n.get_ref().trim().is_empty() => {
            // Every flow record carries it: a long one would swell the log.
            if n.get_ref().len() > MAX_RULE_NAME {
                rep.error(
                    n.span(),
                    format!(
                        "a rule name of {} bytes: at most {MAX_RULE_NAME}",
                        n.get_ref().len()
                    ),
                );
            }
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
            rep.error(span.clone(), format!("rule {name:?} needs an `action`"));
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
        } else if act.is_some_and(|a| !matches!(a, Action::Decrypt | Action::InboundInspect)) {
            rep.warn(
                p.span(),
                format!(
                    "rule {name:?}: a profile only matters for `decrypt` and `inbound-inspect` \
                     rules"
                ),
            );
        }
    }
    match (&r.server_profile, act) {
        (Some(p), Some(Action::InboundInspect))
            if !raw.server_profiles.contains_key(p.get_ref()) =>
        {
            let known: Vec<&str> = raw.server_profiles.keys().map(String::as_str).collect();
            rep.error(
                p.span(),
                format!(
                    "unknown server profile {:?} (server profiles defined: {})",
                    p.get_ref(),
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        }
        (Some(_), Some(Action::InboundInspect)) => {}
        (None, Some(Action::InboundInspect)) => rep.error(
            r.action.as_ref().map_or(span.clone(), Spanned::span),
            format!(
                "rule {name:?}: inbound-inspect needs a `server_profile` (the server's \
                 certificate and key)"
            ),
        ),
        (Some(p), Some(_)) => rep.error(
            p.span(),
            format!("rule {name:?}: only inbound-inspect rules name a server profile"),
        ),
        _ => {}
    }

    let mut cats = |list: &[Spanned<String>]| -> Vec<String> {
        let mut out = Vec::new();
        for c in list {
            if categories.known.contains_key(c.get_ref()) {
                out.push(c.get_ref().clone());
            } else {
                rep.error(
                    c.span(),
                    format!(
                        "unknown category {:?} ({})",
                        c.get_ref(),
                        categories.listing()
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
    let failed = rep.errors() > errors_before;
    (!failed).then(|| Rule {
        name,
        matcher,
        action: act.expect("no error, so an action"),
        profile: r.profile.as_ref().map(|p| p.get_ref().clone()),
        server_profile: r.server_profile.as_ref().map(|p| p.get_ref().clone()),
    })
}

/// `[server_profiles.NAME]`: the chain file is read as the engine reads
/// it (the key on the token is proven against it when the policy is
/// applied).
fn server_profile(
    rep: &mut Report,
    base: &Path,
    name: &str,
    raw: &Spanned<RawServerProfile>,
) -> Option<ServerProfile> {
    let errors_before = rep.errors();
    let sp = raw.get_ref();
    let mut doubts = Vec::new();
    let chain = match &sp.chain {
        None => {
            rep.error(
                raw.span(),
                format!("server profile {name:?} needs a `chain` (the certificate chain file)"),
            );
            None
        }
        Some(c) => profile_file(rep, base, c, "chain", |p| {
            let chain = loupe_dataplane::tls::inbound::read_chain(p)?;
            for w in loupe_dataplane::tls::inbound::chain_warnings(&chain) {
                doubts.push(w);
            }
            Ok(())
        })
        .map(|p| std::fs::canonicalize(&p).map_or(p, |c| c.display().to_string())),
    };
    let key = match &sp.key {
        None => {
            rep.error(
                raw.span(),
                format!("server profile {name:?} needs a `key` (its label: `loupe key list`)"),
            );
            None
        }
        Some(k) => match loupe_hsm::server_keys::token_label(k.get_ref()) {
            Ok(_) => Some(k.get_ref().clone()),
            Err(e) => {
                rep.error(k.span(), e.to_string());
                None
            }
        },
    };
    if let (Some(c), false) = (&sp.chain, doubts.is_empty()) {
        for d in doubts {
            rep.warn(c.span(), d);
        }
    }
    let _ = token_label(rep, sp.token.as_ref());
    let upstream = match sp.upstream.as_ref().map(|u| (u, u.get_ref().as_str())) {
        None | Some((_, "pinned")) => UpstreamCheck::Pinned,
        Some((_, "trust-store")) => UpstreamCheck::TrustStore,
        Some((u, other)) => {
            rep.error(
                u.span(),
                format!("upstream = {other:?}: expected \"pinned\" or \"trust-store\""),
            );
            UpstreamCheck::Pinned
        }
    };
    if rep.errors() > errors_before {
        return None;
    }
    let out = ServerProfile {
        chain: chain.expect("no error, so a chain"),
        token: sp.token.as_ref().map(|t| t.get_ref().clone()),
        key: key.expect("no error, so a key"),
        upstream,
    };
    if let (Some(check), Some(k)) = (rep.keys, &sp.key) {
        if let Err((severity, why)) = check(&out) {
            rep.push(severity, k.span(), why);
            if severity == Severity::Error {
                return None;
            }
        }
    }
    Some(out)
}

fn dataplane_spec(rep: &mut Report, raw: &RawPolicy) -> DataplaneSpec {
    let mut spec = DataplaneSpec::default();
    if let Some(d) = &raw.dataplane {
        for (what, name) in [("inside", &d.inside), ("outside", &d.outside)] {
            if let Some(n) = name {
                if let Err(why) = interface_name(n.get_ref()) {
                    rep.error(
                        n.span(),
                        format!("{what} = {:?}: not an interface name ({why})", n.get_ref()),
                    );
                }
            }
        }
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

/// Why `name` cannot be a Linux interface name (see the kernel's
/// `dev_valid_name`), if it cannot.
fn interface_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("it is empty")
    } else if name.len() > 15 {
        Err("more than 15 bytes")
    } else if name == "." || name == ".." {
        Err("`.` and `..` are not names")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        Err("no `/`, `:`, spaces or control characters")
    } else {
        Ok(())
    }
}

/// Warns of rules an earlier rule makes unreachable. `written` are the
/// rules as written, one for each of `policy`'s.
fn shadow_warnings(rep: &mut Report, policy: &Policy, written: &[&Spanned<RawRule>]) {
    let found = shadow::find(policy, shadow::BUDGET);
    for (j, by) in found.by.iter().enumerate() {
        let Some(i) = *by else { continue };
        let (a, b) = (&policy.rules[i], &policy.rules[j]);
        let line = rep.src.line(written[i].span().start);
        rep.warn(
            written[j].span(),
            format!(
                "rule {:?} is never reached: rule {:?} (line {line}) matches every connection \
                 it would{}",
                b.name,
                a.name,
                if a.action == b.action
                    && (a.profile != b.profile || a.server_profile != b.server_profile)
                {
                    let with = |r: &Rule| match (&r.server_profile, &r.profile) {
                        (Some(s), _) => format!("server profile {s:?}"),
                        (None, Some(p)) => format!("profile {p:?}"),
                        (None, None) => "the default profile".to_string(),
                    };
                    format!(
                        " and decides {} with {} instead of {}",
                        a.action.label(),
                        with(a),
                        with(b)
                    )
                } else if a.action == b.action {
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
    if let Some(j) = found.stopped_at {
        rep.warn(
            written[j].span(),
            format!(
                "rules from {:?} on were not checked for being shadowed: the rules are too many \
                 and too alike to compare in reasonable time (the policy is valid)",
                policy.rules[j].name
            ),
        );
    }
}

/// Reads a policy from disk and checks it.
pub fn check_file(path: &Path) -> io::Result<Checked> {
    let text = read_text(path)?;
    Ok(compile(path, &text, &|p| read_regular(p, MAX_POLICY_BYTES)))
}

/// [`check_file`], each server profile's key looked up by `keys`.
pub fn check_file_keys(path: &Path, keys: &KeyCheck<'_>) -> io::Result<Checked> {
    let text = read_text(path)?;
    Ok(compile_as(
        path,
        &text,
        &|p| read_regular(p, MAX_POLICY_BYTES),
        false,
        Some(keys),
    ))
}

/// The most a policy or category file may hold.
pub const MAX_POLICY_BYTES: u64 = 16 << 20;

/// Reads a policy or category file: a regular file of at most
/// [`MAX_POLICY_BYTES`], UTF-8. A FIFO, a device (`/dev/zero`) or a
/// directory is an error at once, never a wait or an endless read.
pub fn read_text(path: &Path) -> io::Result<String> {
    utf8_text(read_regular(path, MAX_POLICY_BYTES)?)
}

/// A policy or category file's bytes as text, or where they stop being
/// UTF-8.
fn utf8_text(bytes: Vec<u8>) -> io::Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        // Where the first bad byte stands, as every other error.
        let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = good.iter().filter(|b| **b == b'\n').count() + 1;
        let start = good.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        // In characters, as the other errors count columns.
        let col = String::from_utf8_lossy(&good[start..]).chars().count() + 1;
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not UTF-8 text (line {line}, column {col})"),
        )
    })
}

#[cfg(test)]
mod tests;
