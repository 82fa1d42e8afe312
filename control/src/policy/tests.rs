use std::path::Path;

use super::*;

fn check(text: &str) -> Checked {
    compile(Path::new("p.toml"), text, &|p| {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            p.display().to_string(),
        ))
    })
}

fn messages(c: &Checked, severity: Severity) -> Vec<String> {
    c.diagnostics
        .iter()
        .filter(|d| d.severity == severity)
        .map(|d| d.to_string())
        .collect()
}

#[test]
fn the_shipped_example_compiles_cleanly() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/example.toml");
    let c = check_file(&path).unwrap();
    assert_eq!(messages(&c, Severity::Error), Vec::<String>::new());
    let p = c.policy.clone().expect("compiled");
    assert_eq!(p.rules.len(), 4);
    assert_eq!(p.rules[3].matcher.ports.len(), 2);
    assert!(p.categories["health"]
        .iter()
        .any(|g| g.matches("records-7.health.loupe.test")));
    assert_eq!(c.dataplane.inside.as_deref(), Some("inside"));
    // Nothing to remark on: the profile is used by the decrypt rule.
    let warnings = messages(&c, Severity::Warning);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(p.rules[3].action, Action::Decrypt);
    assert_eq!(p.rules[3].profile.as_deref(), Some("strict"));
    // The digest is the SHA-256 of the policy and its category file.
    let dir = path.parent().unwrap();
    let mut sha = Sha256::new();
    sha.update(std::fs::read(&path).unwrap());
    sha.update(b"\0categories\0");
    sha.update(std::fs::read(dir.join("categories.toml")).unwrap());
    assert_eq!(p.digest, format!("{:x}", sha.finalize()));
}

#[test]
fn flat_rule_fields_compile_into_the_match() {
    let c = check(
        r#"
[policy]
tls_ports = [443, "8443-8444"]
default_action = "tcp-split"
[[rules]]
name = "r"
src = ["198.18.0.0/24"]
not_dst = ["2001:2::/48"]
ports = [8443]
not_sni = ["*.ok.example"]
action = "block"
"#,
    );
    assert_eq!(c.errors(), 0, "{:?}", c.diagnostics);
    let p = c.policy.unwrap();
    assert_eq!(p.tls_ports, vec![443, 8443, 8444]);
    assert_eq!(p.default_action, Action::TcpSplit);
    let m = &p.rules[0].matcher;
    assert_eq!(m.src[0].to_string(), "198.18.0.0/24");
    assert_eq!(m.not_dst[0].to_string(), "2001:2::/48");
    assert_eq!(m.ports[0].to_string(), "8443");
    assert_eq!(m.not_sni[0].to_string(), "*.ok.example");
}

#[test]
fn every_error_is_reported_not_only_the_first() {
    let c = check(
        r#"[[rules]]
name = "a"
dst = ["300.0.0.1/8"]
sni = ["a..b"]
action = "block"
[[rules]]
name = "b"
action = "nope"
"#,
    );
    let e = messages(&c, Severity::Error);
    assert_eq!(e.len(), 3, "{e:?}");
    assert!(
        e[0].starts_with("p.toml:3:8: error: bad prefix '300.0.0.1/8'"),
        "{e:?}"
    );
    assert!(
        e[1].starts_with("p.toml:4:8: error: host-name glob"),
        "{e:?}"
    );
    assert!(
        e[2].starts_with("p.toml:8:10: error: unknown action"),
        "{e:?}"
    );
    assert!(c.policy.is_none());
}

#[test]
fn shadowed_rules_are_warned_of() {
    let c = check(
        r#"[[rules]]
name = "lab"
dst = ["198.18.0.0/15"]
action = "tcp-split"
[[rules]]
name = "one-host"
dst = ["198.18.0.2/32"]
action = "block"
[[rules]]
name = "v6"
dst = ["2001:2::/48"]
action = "block"
[[rules]]
name = "names"
sni = ["*.example"]
action = "block"
[[rules]]
name = "fewer-names"
sni = ["www.example", "*.a.example"]
action = "block"
[[rules]]
name = "all-else"
action = "no-decrypt"
[[rules]]
name = "after-all"
sni = ["x.other"]
action = "block"
"#,
    );
    assert_eq!(c.errors(), 0);
    let w = messages(&c, Severity::Warning);
    assert_eq!(w.len(), 3, "{w:?}");
    assert!(
        w[0].contains("\"one-host\" is never reached: rule \"lab\" (line 1)")
            && w[0].contains("decides tcp-split instead of block"),
        "{w:?}"
    );
    assert!(
        w[1].contains("\"fewer-names\"") && w[1].contains("redundant"),
        "{w:?}"
    );
    assert!(
        w[2].contains("\"after-all\"") && w[2].contains("\"all-else\""),
        "{w:?}"
    );
}

/// A shadowed rule with the same action but another profile is not
/// redundant: the warning says which profile wins.
#[test]
fn a_shadowed_rule_with_another_profile_is_named_as_such() {
    let c = check(
        r#"[profiles.a]
[profiles.b]
[[rules]]
name = "first"
dst = ["198.18.0.0/24"]
action = "decrypt"
profile = "a"
[[rules]]
name = "second"
dst = ["198.18.0.2/32"]
action = "decrypt"
profile = "b"
[[rules]]
name = "third"
dst = ["198.18.0.3/32"]
action = "decrypt"
profile = "a"
"#,
    );
    let w = messages(&c, Severity::Warning);
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].contains("\"second\" is never reached")
            && w[0].contains("decides decrypt with profile \"a\" instead of profile \"b\""),
        "{w:?}"
    );
    assert!(
        w[1].contains("\"third\"") && w[1].contains("redundant"),
        "{w:?}"
    );
}

#[test]
fn negation_and_ports_keep_rules_reachable() {
    let c = check(
        r#"[[rules]]
name = "not-bank"
not_sni = ["*.bank.example"]
action = "tcp-split"
[[rules]]
name = "bank"
sni = ["www.bank.example"]
action = "no-decrypt"
[[rules]]
name = "other-port"
ports = [8443]
action = "block"
"#,
    );
    assert_eq!(messages(&c, Severity::Warning), Vec::<String>::new());
}

#[test]
fn decrypt_is_parsed_with_its_profile() {
    let c = check(
        r#"[profiles.p]
expired = "pass-on"
untrusted = "block"
min_version = "1.3"
[[rules]]
name = "d"
action = "decrypt"
profile = "p"
[[rules]]
name = "s"
action = "tcp-split"
profile = "p"
"#,
    );
    assert_eq!(c.errors(), 0, "{:?}", c.diagnostics);
    let p = c.policy.clone().unwrap();
    let prof = &p.profiles["p"];
    assert_eq!(
        (prof.expired, prof.untrusted),
        (OnError::PassOn, OnError::Block)
    );
    assert_eq!(
        (prof.min_version, prof.max_version),
        (TlsVersion::Tls13, TlsVersion::Tls13)
    );
    // Decryption is real now: nothing says it is relayed; the shadowed
    // rule and its pointless profile are remarked on.
    let w = messages(&c, Severity::Warning);
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w.iter().all(|m| !m.contains("tcp-split (and says")),
        "{w:?}"
    );
    assert!(w[1].contains("only matters for `decrypt`"), "{w:?}");
    // The options not written take their safe defaults.
    assert_eq!(
        (prof.name_mismatch, prof.weak, prof.revoked),
        (OnError::Block, OnError::Block, OnError::Block)
    );
    assert_eq!(
        (prof.client_auth, prof.hsm_unavailable, prof.unsupported),
        (Fallback::NoDecrypt, Fallback::Block, Fallback::Block)
    );
    // ECH or its GREASE (Chromium sends it always): decrypted by default.
    assert_eq!(prof.ech, EchAction::Decrypt);
    assert_eq!(prof.exclude_secs, 43_200);
}

/// A DER CRL (revoking serial 7) from a throwaway CA.
fn test_crl() -> Vec<u8> {
    use rcgen::{
        date_time_ymd, BasicConstraints, CertificateParams, CertificateRevocationListParams, IsCa,
        Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
    };
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let issuer = Issuer::new(ca, KeyPair::generate().unwrap());
    CertificateRevocationListParams {
        this_update: date_time_ymd(2025, 1, 1),
        next_update: date_time_ymd(2035, 1, 1),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: vec![RevokedCertParams {
            serial_number: SerialNumber::from_slice(&[7]),
            revocation_time: date_time_ymd(2025, 1, 1),
            reason_code: None,
            invalidity_date: None,
        }],
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)
    .unwrap()
    .der()
    .to_vec()
}

/// Key logs the engine would refuse and CRLs it could not read are
/// reported by the checker, each where it is named.
#[test]
fn unusable_key_logs_and_crls_are_reported() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("loupe-profile-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let shared = dir.join("shared.log");
    std::fs::write(&shared, b"").unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o644)).unwrap();
    let private = dir.join("private.log");
    std::fs::write(&private, b"").unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&private, dir.join("link.log")).unwrap();
    // A key log kept in clear: the engine appends sealed lines only to a
    // sealed one.
    let clear = dir.join("clear.log");
    std::fs::write(&clear, b"CLIENT_RANDOM 00 11\n").unwrap();
    std::fs::set_permissions(&clear, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(dir.join("garbage.crl"), b"not a CRL").unwrap();
    std::fs::write(dir.join("good.crl"), test_crl()).unwrap();
    let d = dir.display();
    let text = format!(
        r#"[profiles.a]
keylog = "{d}/shared.log"
[profiles.b]
keylog = "{d}/link.log"
[profiles.c]
keylog = "{d}"
[profiles.d]
keylog = "{d}/private.log"
crls = ["good.crl"]
[profiles.e]
keylog = "{d}/new.log"
crls = ["garbage.crl"]
[profiles.f]
keylog = "{d}/missing/keys.log"
[profiles.g]
keylog = "{d}/clear.log"
"#
    );
    let c = compile(&dir.join("p.toml"), &text, &|p| std::fs::read(p));
    std::fs::remove_dir_all(&dir).unwrap();
    let e = messages(&c, Severity::Error);
    for (line, what) in [
        (2, "its mode 644 gives access beyond its owner"),
        (4, "it is a symbolic link"),
        (6, "it is a directory"),
        (12, "garbage.crl: CRL"),
        (14, "its directory"),
        (16, "not a sealed key log"),
    ] {
        assert!(
            e.iter()
                .any(|m| m.contains(&format!("p.toml:{line}:")) && m.contains(what)),
            "line {line}: {what}: {e:#?}"
        );
    }
    assert_eq!(e.len(), 6, "{e:#?}");
}

#[test]
fn every_profile_option_is_read() {
    let dir = std::env::temp_dir().join(format!("loupe-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy("/etc/ssl/certs/ca-certificates.crt", dir.join("roots.pem")).unwrap();
    std::fs::write(dir.join("a.crl"), test_crl()).unwrap();
    let text = r#"[profiles.p]
expired = "pass-on"
untrusted = "pass-on"
name_mismatch = "pass-on"
weak = "pass-on"
revoked = "pass-on"
min_version = "1.2"
max_version = "1.3"
unsupported = "no-decrypt"
suites = ["TLS13_AES_256_GCM_SHA384", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"]
groups = ["X25519MLKEM768", "X25519"]
client_auth = "block"
hsm_unavailable = "no-decrypt"
no_resources = "no-decrypt"
ech = "block"
append_cn_to_san = true
keylog = "/tmp/loupe-policy-test-keys.log"
trust_store = "roots.pem"
crls = ["a.crl"]
exclude_secs = 60
[[rules]]
name = "d"
action = "decrypt"
profile = "p"
"#;
    let c = compile(&dir.join("p.toml"), text, &|p| std::fs::read(p));
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(c.errors(), 0, "{:?}", c.diagnostics);
    let p = &c.policy.unwrap().profiles["p"];
    assert_eq!(
        (p.name_mismatch, p.weak, p.revoked),
        (OnError::PassOn, OnError::PassOn, OnError::PassOn)
    );
    assert_eq!(
        (
            p.unsupported,
            p.client_auth,
            p.hsm_unavailable,
            p.no_resources
        ),
        (
            Fallback::NoDecrypt,
            Fallback::Block,
            Fallback::NoDecrypt,
            Fallback::NoDecrypt
        )
    );
    assert_eq!(p.ech, EchAction::Block);
    assert_eq!(p.suites.len(), 2);
    assert_eq!(p.groups, ["X25519MLKEM768", "X25519"]);
    assert!(p.append_cn_to_san);
    assert_eq!(p.keylog.as_deref(), Some("/tmp/loupe-policy-test-keys.log"));
    // Files are made absolute against the policy's directory.
    assert_eq!(
        p.trust_store.as_deref(),
        Some(dir.join("roots.pem").to_str().unwrap())
    );
    assert_eq!(p.crls, [dir.join("a.crl").display().to_string()]);
    assert_eq!(p.exclude_secs, 60);
}

#[test]
fn bad_profile_options_are_each_reported_where_they_stand() {
    let c = check(
        r#"[profiles.p]
expired = "block"
untrusted = "block"
min_version = "1.2"
client_auth = "pass-on"
suites = ["TLS_RSA_WITH_RC4_128_SHA"]
groups = []
keylog = "keys.log"
trust_store = "/nonexistent/roots.pem"
exclude_secs = 0
ech = "allow"
[[rules]]
name = "d"
action = "decrypt"
profile = "p"
"#,
    );
    let e = messages(&c, Severity::Error);
    for (line, what) in [
        (
            5,
            "client_auth = \"pass-on\": expected \"block\" or \"no-decrypt\"",
        ),
        (6, "unknown suites entry \"TLS_RSA_WITH_RC4_128_SHA\""),
        (7, "groups is empty"),
        (8, "keylog: an absolute path"),
        (9, "trust_store /nonexistent/roots.pem"),
        (10, "exclude_secs = 0"),
        (11, "ech = \"allow\": expected \"decrypt\""),
    ] {
        assert!(
            e.iter()
                .any(|m| m.contains(&format!("p.toml:{line}:")) && m.contains(what)),
            "line {line}: {what}: {e:#?}"
        );
    }
    assert_eq!(e.len(), 7, "{e:#?}");
    assert!(c.policy.is_none());
}

#[test]
fn the_digest_covers_the_category_file() {
    let text = "[policy]\ncategories = \"c.toml\"\n";
    let with = |cats: &'static str| {
        compile(Path::new("/x/p.toml"), text, &move |p| {
            assert_eq!(p, Path::new("/x/c.toml"));
            Ok(cats.as_bytes().to_vec())
        })
    };
    let a = with("f = [\"*.a.example\"]\n").policy.unwrap();
    let b = with("f = [\"*.b.example\"]\n").policy.unwrap();
    assert_ne!(a.digest, b.digest);
    assert!(a.categories["f"][0].matches("x.a.example"));
}

/// Each file of the malformed corpus says on its first line where and
/// what its error is; checking it must report exactly that, and compile
/// nothing.
#[test]
fn malformed_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policies/bad");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 20, "{} files", files.len());
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: no `# expect:` line", f.display()));
        let c = check_file(&f).unwrap();
        assert!(c.policy.is_none(), "{}: compiled", f.display());
        let errors = messages(&c, Severity::Error);
        // "LINE:COL: message" or "FILE:LINE:COL: message" (another file).
        let found = errors.iter().any(|e| {
            let (place, msg) = expect.split_once(": ").unwrap();
            let at = if place.matches(':').count() == 2 {
                e.contains(&format!("{place}: error: "))
            } else {
                e.starts_with(&format!("{}:{place}: error: ", f.display()))
            };
            at && e.contains(msg)
        });
        assert!(
            found,
            "{}: expected `{expect}`, got {errors:#?}",
            f.display()
        );
    }
}

/// A category file that is a device, a directory or too large is an
/// error where it is named, at once (`categories = "/dev/zero"` read until
/// memory ran out); so is a policy that is a directory.
#[test]
fn category_files_that_are_not_small_regular_files_are_refused() {
    let dir = std::env::temp_dir().join(format!("loupe-policy-cats-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let big = dir.join("big.toml");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(MAX_POLICY_BYTES + 1)
        .unwrap();
    let policy = dir.join("p.toml");
    for (cats, why) in [
        ("/dev/zero", "a device"),
        ("sub", "a directory"),
        ("big.toml", "larger than the 16777216 bytes allowed"),
    ] {
        std::fs::write(&policy, format!("[policy]\ncategories = {cats:?}\n")).unwrap();
        let c = check_file(&policy).unwrap();
        let e = messages(&c, Severity::Error);
        assert_eq!(e.len(), 1, "{e:#?}");
        assert!(
            e[0].contains("p.toml:2:14: error: cannot read the category file")
                && e[0].contains(why),
            "{cats}: {e:#?}"
        );
    }
    let e = check_file(&dir.join("sub")).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("a directory"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Rules, globs and prefixes beyond the limits are refused before any
/// other check: the limit errors, each where the first item too many
/// stands, and nothing else (no glob parsed, no shadowing looked for).
#[test]
fn limits_are_checked_before_anything_else() {
    use loupe_dataplane::policy::{MAX_GLOBS, MAX_RULES};
    // A rule the analysis would warn of (shadowed), and a bad glob it
    // would report, so that their absence shows it did not run.
    let mut text = String::from(
        "[[rules]]\nname = \"all\"\naction = \"block\"\n\
         [[rules]]\nname = \"bad\"\nsni = [\"a..b\"]\naction = \"block\"\n",
    );
    for i in 2..=MAX_RULES {
        text.push_str(&format!("[[rules]]\nname = \"r{i}\"\naction = \"block\"\n"));
    }
    let c = check(&text);
    let e = messages(&c, Severity::Error);
    let last_rule_line = 1 + 3 * MAX_RULES + 1;
    assert_eq!(
        e,
        [format!(
            "p.toml:{last_rule_line}:1: error: {} rules: at most {MAX_RULES}",
            MAX_RULES + 1
        )]
    );
    assert_eq!(messages(&c, Severity::Warning), Vec::<String>::new());

    // Globs: those of the category file and of the rules count together.
    let cats = format!("c = [{}]\n", vec!["\"a.example\""; MAX_GLOBS - 1].join(","));
    let text = "[policy]\ncategories = \"c.toml\"\n[[rules]]\nname = \"x\"\n\
                sni = [\"ok.example\", \"one.too.many\", \"a..b\"]\naction = \"block\"\n";
    let c = compile(Path::new("/p/p.toml"), text, &|_| {
        Ok(cats.clone().into_bytes())
    });
    let e = messages(&c, Severity::Error);
    assert_eq!(
        e,
        [format!(
            "/p/p.toml:5:22: error: {} host-name globs: at most {MAX_GLOBS}",
            MAX_GLOBS + 2
        )]
    );

    // Prefixes in rules, and exempt prefixes, each against its limit.
    let max = loupe_common::MAX_PREFIXES as usize;
    let list = |n: usize| {
        (0..n)
            .map(|i| format!("\"198.18.{}.{}/32\"", i / 256, i % 256))
            .collect::<Vec<_>>()
            .join(",")
    };
    let text = format!(
        "[policy]\nexempt = [{}]\n[[rules]]\nname = \"x\"\ndst = [{}]\nnot_src = [\"198.18.0.0/33\", \"10.0.0.0/8\"]\naction = \"block\"\n",
        list(max + 1),
        list(max - 1)
    );
    let c = check(&text);
    let e = messages(&c, Severity::Error);
    assert_eq!(e.len(), 2, "{e:#?}");
    assert!(
        e[0].starts_with("p.toml:2:")
            && e[0].ends_with(&format!("{} exempt prefixes: at most {max}", max + 1)),
        "{e:#?}"
    );
    assert!(
        e[1].starts_with("p.toml:6:29: error: ")
            && e[1].ends_with(&format!("{} prefixes in rules: at most {max}", max + 1)),
        "{e:#?}"
    );
}

/// Text with more tables or values than any policy within the limits is
/// refused from its tokens, before it is parsed (a 15 MiB file of empty
/// tables took 4 GiB and 9 s); what is in strings and comments does not
/// count.
#[test]
fn structure_beyond_any_policy_is_refused_unparsed() {
    let c = check(&"[[rules]]\n".repeat(25_000));
    assert_eq!(
        messages(&c, Severity::Error),
        ["p.toml:20001:1: error: more than 20000 tables (rules, profiles): a policy has at most \
          10000 rules; refused unparsed"]
    );
    let c = check(&format!("x = [{}]\n", "1,".repeat(1_600_000)));
    let e = messages(&c, Severity::Error);
    // The 1,500,001st value: `=`, the list, then the 1,499,999th comma.
    let col = 5 + 2 * 1_499_999;
    assert_eq!(
        e,
        [format!(
            "p.toml:1:{col}: error: more than 1500000 values (keys and list items): a policy has \
             at most 10000 rules and 1000000 globs; refused unparsed"
        )]
    );
    // Brackets, braces and commas in strings and comments are not values.
    let text = format!(
        "# {}\n[[rules]]\nname = \"r\"\ndescription = \"{}\"\naction = \"block\"\n\
         [[rules]]\nname = \"s\"\ndescription = '''\n{}\n'''\naction = \"block\"\n",
        "[{,".repeat(600_000),
        "{[,".repeat(600_000),
        "[[x]]\n{,".repeat(30_000),
    );
    let c = check(&text);
    assert_eq!(messages(&c, Severity::Error), Vec::<String>::new());
    assert_eq!(c.policy.unwrap().rules.len(), 2);
}

/// A policy named as a FIFO, a device or a directory is an error at once
/// (`loupe policy check /dev/zero` read forever; a FIFO hung the CLI).
#[test]
fn policy_files_that_are_not_regular_files_are_refused_at_once() {
    let dir = std::env::temp_dir().join(format!("loupe-policy-fifo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("p.toml");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a node.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = check_file(&fifo).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("a FIFO"), "{e}");
    let e = check_file(Path::new("/dev/zero")).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("a device"), "{e}");
    // A category file that is a FIFO is reported where it is named.
    let policy = dir.join("q.toml");
    std::fs::write(
        &policy,
        "[policy]\ncategories = \"p.toml\"\n[[rules]]\nname = \"r\"\naction = \"block\"\n",
    )
    .unwrap();
    let checked = check_file(&policy).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let e = messages(&checked, Severity::Error);
    assert!(e.iter().any(|m| m.contains("a FIFO")), "{e:#?}");
}

/// A rule name longer than the limit is an error where it stands (every
/// flow record carries it: a 15 MiB name made 15 MiB log lines).
#[test]
fn a_rule_name_past_the_limit_is_refused() {
    let at_limit = "n".repeat(super::MAX_RULE_NAME);
    let ok = check(&format!(
        "[[rules]]\nname = \"{at_limit}\"\naction = \"block\"\n"
    ));
    assert_eq!(messages(&ok, Severity::Error), Vec::<String>::new());
    let long = "n".repeat(super::MAX_RULE_NAME + 1);
    let c = check(&format!(
        "[[rules]]\nname = \"{long}\"\naction = \"block\"\n"
    ));
    assert_eq!(
        messages(&c, Severity::Error),
        [format!(
            "p.toml:2:8: error: a rule name of {} bytes: at most {}",
            super::MAX_RULE_NAME + 1,
            super::MAX_RULE_NAME
        )]
    );
}

/// A file that is not UTF-8 is refused where its first bad byte stands.
#[test]
fn non_utf8_is_refused_with_its_position() {
    let dir = std::env::temp_dir().join(format!("loupe-policy-utf8-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("p.toml");
    let text = ["[[rules]]\nname = \"\u{e9}t\u{e9}".as_bytes(), b"\xff\"\n"].concat();
    std::fs::write(&p, text).unwrap();
    let e = super::read_text(&p).unwrap_err();
    // Columns in characters: the bad byte is the 12th.
    assert_eq!(e.to_string(), "not UTF-8 text (line 2, column 12)");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn signatures_compile_into_bytes_and_profiles_name_them() {
    let c = check(
        r#"
[signatures.eicar]
builtin = "eicar"
action = "block"
[signatures.marker]
pattern = "LOUPE-MARK"
[signatures.magic]
hex = "de ad:BE EF"
action = "alert"
[signatures.unused]
pattern = "x"
[profiles.p]
expired = "block"
untrusted = "block"
http = false
signatures = ["eicar", "marker", "magic", "marker"]
[[rules]]
name = "d"
action = "decrypt"
profile = "p"
"#,
    );
    assert_eq!(messages(&c, Severity::Error), Vec::<String>::new());
    assert_eq!(
        messages(&c, Severity::Warning),
        vec!["p.toml:10:1: warning: signature \"unused\" is not used by any profile"]
    );
    let p = c.policy.unwrap();
    let s = &p.signatures;
    assert_eq!(
        s["eicar"].pattern,
        loupe_dataplane::inspect::signature::EICAR
    );
    assert_eq!(s["eicar"].action, SignatureAction::Block);
    assert_eq!(s["marker"].pattern, b"LOUPE-MARK");
    assert_eq!(s["marker"].action, SignatureAction::Alert);
    assert_eq!(s["magic"].pattern, [0xde, 0xad, 0xbe, 0xef]);
    let prof = &p.profiles["p"];
    assert!(!prof.http);
    assert_eq!(prof.signatures, ["eicar", "marker", "magic"]);
    assert!(p.validate().is_ok());
}

/// A signature file's exact bytes (any bytes, not only text) are the
/// pattern, its path relative to the policy file; a new file is a new
/// policy (digest).
#[test]
fn a_signature_file_is_the_pattern_byte_for_byte() {
    let dir = std::env::temp_dir().join(format!("loupe-sig-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("sigs")).unwrap();
    let bytes = b"\xff\x00MZ\r\n\x90\x90 tail".to_vec();
    std::fs::write(dir.join("sigs/bin.sig"), &bytes).unwrap();
    let text = r#"[signatures.bin]
file = "sigs/bin.sig"
action = "block"
[profiles.p]
signatures = ["bin"]
[[rules]]
name = "d"
action = "decrypt"
profile = "p"
"#;
    let policy = dir.join("p.toml");
    std::fs::write(&policy, text).unwrap();
    let c = check_file(&policy).unwrap();
    assert_eq!(messages(&c, Severity::Error), Vec::<String>::new());
    let p = c.policy.unwrap();
    assert_eq!(p.signatures["bin"].pattern, bytes);
    assert_eq!(p.signatures["bin"].action, SignatureAction::Block);
    assert!(p.validate().is_ok());
    std::fs::write(dir.join("sigs/bin.sig"), b"other").unwrap();
    let again = check_file(&policy).unwrap().policy.unwrap();
    assert_eq!(again.signatures["bin"].pattern, b"other");
    assert_ne!(again.digest, p.digest, "the file is part of the policy");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A signature file that is missing, empty, over a pattern's 1 KiB, not
/// a regular file, or given with another form is an error where `file`
/// (or the signature) stands.
#[test]
fn bad_signature_files_are_each_reported_where_they_stand() {
    let dir = std::env::temp_dir().join(format!("loupe-sig-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("adir")).unwrap();
    std::fs::write(dir.join("empty.sig"), b"").unwrap();
    std::fs::write(dir.join("big.sig"), vec![b'A'; 1025]).unwrap();
    std::fs::write(dir.join("full.sig"), vec![b'A'; 1024]).unwrap();
    let text = r#"[signatures.missing]
file = "nosuch.sig"
[signatures.empty]
file = "empty.sig"
[signatures.big]
file = "big.sig"
[signatures.adir]
file = "adir"
[signatures.both]
pattern = "x"
file = "full.sig"
[signatures.full]
file = "full.sig"
[profiles.p]
signatures = ["missing", "empty", "big", "adir", "both", "full"]
[[rules]]
name = "d"
action = "decrypt"
profile = "p"
"#;
    let policy = dir.join("p.toml");
    std::fs::write(&policy, text).unwrap();
    let c = check_file(&policy).unwrap();
    let d = dir.display();
    let errors = messages(&c, Severity::Error);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(c.policy.is_none());
    let want = [
        format!("{d}/p.toml:2:8: error: signature \"missing\": cannot read the file {d}/nosuch.sig: No such file or directory (os error 2)"),
        format!("{d}/p.toml:4:8: error: signature \"empty\": the file {d}/empty.sig is empty"),
        format!("{d}/p.toml:6:8: error: signature \"big\": the file {d}/big.sig holds more than 1024 bytes, the most a pattern may have"),
        format!("{d}/p.toml:9:1: error: signature \"both\": give exactly one of builtin, pattern, hex or file"),
    ];
    for w in &want {
        assert!(errors.iter().any(|e| e == w), "{w}\nnot in {errors:#?}");
    }
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with(&format!("{d}/p.toml:8:8: error: signature \"adir\": cannot read the file {d}/adir: not a regular file"))),
        "{errors:#?}"
    );
    // The file of exactly 1 KiB is fine, and so the only other errors are
    // those above (the unknown signatures they leave in the profile).
    assert!(
        !errors.iter().any(|e| e.contains("\"full\": ")),
        "{errors:#?}"
    );
}

#[test]
fn bad_signatures_are_each_reported_where_they_stand() {
    let c = check(
        r#"
[signatures.two]
pattern = "a"
hex = "61"
[signatures.odd]
hex = "abc"
[signatures.nothex]
hex = "zz"
[signatures.empty]
pattern = ""
[signatures.long]
pattern = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
[signatures.builtin]
builtin = "mimikatz"
[signatures.act]
pattern = "a"
action = "drop"
[profiles.p]
expired = "block"
untrusted = "block"
signatures = ["nosuch"]
[[rules]]
name = "d"
action = "decrypt"
profile = "p"
"#,
    );
    assert!(c.policy.is_none());
    let errors = messages(&c, Severity::Error);
    let want = [
        "p.toml:2:1: error: signature \"two\": give exactly one of builtin, pattern, hex or file",
        "p.toml:6:7: error: hex: an odd number of hex digits",
        "p.toml:8:7: error: hex: 'z' is not a hex digit",
        "p.toml:10:11: error: signature \"empty\": a pattern of 0 bytes (1 to 1024)",
        "p.toml:12:11: error: signature \"long\": a pattern of 1025 bytes (1 to 1024)",
        "p.toml:14:11: error: builtin = \"mimikatz\": the built-in signatures are \"eicar\"",
        "p.toml:17:10: error: action = \"drop\": expected \"alert\" or \"block\"",
        "p.toml:21:15: error: unknown signature \"nosuch\" (signatures defined: act, builtin, empty, long, nothex, odd, two)",
    ];
    for w in want {
        assert!(errors.iter().any(|e| e == w), "{w}\nnot in {errors:#?}");
    }
}

#[test]
fn url_rules_compile_in_order_and_bad_ones_are_reported_where_they_stand() {
    let c = check(
        r#"
[[url_rules]]
name = "open"
path = ["/docs/*"]
action = "allow"
[[url_rules]]
name = "no-admin"
host = ["*.corp.test"]
path = ["/admin/*", "*.php"]
action = "block"
[[url_rules]]
name = "all"
action = "log"
"#,
    );
    assert_eq!(messages(&c, Severity::Error), Vec::<String>::new());
    assert_eq!(
        messages(&c, Severity::Warning),
        vec![
            "p.toml:11:1: warning: a URL rule with no host, path or category matches every request"
        ]
    );
    let rules = c.policy.unwrap().url_rules;
    let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["open", "no-admin", "all"]);
    assert_eq!(rules[1].action, UrlAction::Block);
    assert!(rules[1].matches(Some("x.corp.test"), "/a/b.php"));

    let c = check(
        r#"
[[url_rules]]
name = "a"
host = ["bad host"]
path = ["admin", "/ok", "/has space"]
action = "deny"
[[url_rules]]
name = "a"
action = "log"
[[url_rules]]
path = ["/x"]
"#,
    );
    assert!(c.policy.is_none());
    let errors = messages(&c, Severity::Error);
    for want in [
        "p.toml:4:9: error:",
        "p.toml:5:9: error: path \"admin\": a path glob starts with / or *",
        "p.toml:5:25: error: path \"/has space\": a path glob has no spaces or control characters",
        "p.toml:6:10: error: action = \"deny\": expected \"allow\", \"log\" or \"block\"",
        "p.toml:8:8: error: URL rule name \"a\" is used twice",
        "p.toml:10:1: error: a URL rule needs a name",
        "p.toml:10:1: error: a URL rule needs an action (allow, log or block)",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(want)),
            "{want}\nnot in {errors:#?}"
        );
    }
}

#[test]
fn names_with_control_characters_and_too_many_signatures_are_refused_where_they_stand() {
    let c = check(
        r#"
[signatures."bell\u0007"]
pattern = "x"
[[url_rules]]
name = "crlf\r\nX-Injected: 1"
path = ["/x"]
action = "block"
"#,
    );
    let errors = messages(&c, Severity::Error);
    for want in [
        "p.toml:2:1: error: signature name \"bell\\u{7}\": 1 to 128 bytes, no control characters",
        "p.toml:5:8: error: a URL rule's name has no control characters",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(want)),
            "{want}\nnot in {errors:#?}"
        );
    }

    let mut text = String::new();
    for i in 0..=MAX_SIGNATURES {
        text.push_str(&format!("[signatures.s{i}]\npattern = \"p{i}\"\n"));
    }
    let c = check(&text);
    let errors = messages(&c, Severity::Error);
    // The one too many, where it stands (line 2 per signature).
    let line = 2 * MAX_SIGNATURES + 1;
    assert_eq!(
        errors,
        vec![format!(
            "p.toml:{line}:1: error: more than {MAX_SIGNATURES} signatures: at most {MAX_SIGNATURES}"
        )]
    );
}

#[test]
fn profiles_name_their_export_destinations_and_a_wrong_one_is_placed() {
    let c = check(
        r#"
[profiles.p]
expired = "block"
untrusted = "block"
export = ["pcap", "mirror", "pcap"]
[profiles.q]
expired = "block"
untrusted = "block"
export = ["tape"]
[[rules]]
name = "d"
action = "decrypt"
profile = "p"
[[rules]]
name = "e"
action = "decrypt"
profile = "q"
"#,
    );
    assert!(c.policy.is_none());
    assert_eq!(
        messages(&c, Severity::Error),
        vec![
            "p.toml:9:11: error: export = [\"tape\"]: the destinations are \"pcap\", \
             \"pcap-tls\" and \"mirror\" (the engine's --export-pcap and --export-mirror)"
        ]
    );
    let c = check(
        r#"
[profiles.p]
expired = "block"
untrusted = "block"
export = ["pcap", "mirror", "pcap", "pcap-tls"]
[[rules]]
name = "d"
action = "decrypt"
profile = "p"
"#,
    );
    let p = c.policy.expect("valid");
    assert_eq!(
        p.profiles["p"].export,
        [ExportSink::Pcap, ExportSink::Mirror, ExportSink::PcapTls]
    );
}

#[test]
fn a_profile_names_its_tenants_token_and_a_bad_label_is_placed() {
    let text = r#"
[profiles.b]
token = "tenant-b"
[profiles.c]
token = ""
[[rules]]
name = "b"
action = "decrypt"
profile = "b"
[[rules]]
name = "c"
action = "decrypt"
profile = "c"
"#;
    let c = check(text);
    assert_eq!(
        messages(&c, Severity::Error),
        [
            "p.toml:5:9: error: token = \"\": a token label is 1 to 32 bytes without control \
          characters"
        ]
    );
    let c = check(&text.replace("token = \"\"", "token = \"tenant-c\""));
    let p = c.policy.expect("valid");
    assert_eq!(p.profiles["b"].token.as_deref(), Some("tenant-b"));
    assert_eq!(p.profiles["c"].token.as_deref(), Some("tenant-c"));
    assert!(p.validate().is_ok());
}

#[test]
fn url_rules_name_categories_of_the_category_file() {
    let text = "[policy]\ncategories = \"c.toml\"\n\
                [[url_rules]]\nname = \"no-gambling\"\ncategories = [\"gambling\"]\naction = \"block\"\n\
                [[url_rules]]\nname = \"typo\"\ncategories = [\"gamblin\"]\naction = \"log\"\n";
    let c = compile(Path::new("/x/p.toml"), text, &|_| {
        Ok(b"gambling = [\"*.casino.example\"]\n".to_vec())
    });
    assert_eq!(
        messages(&c, Severity::Error),
        ["/x/p.toml:9:15: error: unknown category \"gamblin\" (categories known: gambling)"]
    );
    let ok = text.replace("gamblin\"]", "gambling\"]");
    let c = compile(Path::new("/x/p.toml"), &ok, &|_| {
        Ok(b"gambling = [\"*.casino.example\"]\n".to_vec())
    });
    let p = c.policy.expect("valid");
    assert_eq!(p.url_rules[0].categories, ["gambling"]);
    assert!(p.validate().is_ok());
    // The dataplane fills in the category's globs and matches hosts in it.
    let rules = p.prepared_url_rules();
    assert!(rules[0].matches(Some("www.casino.example:443"), "/"));
    assert!(!rules[0].matches(Some("www.bank.example"), "/"));
    assert!(!rules[0].matches(None, "/"));
}

#[test]
fn inbound_inspect_rules_and_server_profiles_are_checked() {
    let dir = std::env::temp_dir().join(format!("loupe-server-profiles-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["www.loupe.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("www.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("junk.pem"), "not a certificate\n").unwrap();
    // A CA and a leaf it issued, written CA first; an Ed25519 leaf; an
    // expired one.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Test CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["www.loupe.test".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    std::fs::write(dir.join("reversed.pem"), ca.pem() + &leaf.pem()).unwrap();
    std::fs::write(dir.join("ordered.pem"), leaf.pem() + &ca.pem()).unwrap();
    let ed_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let ed = rcgen::CertificateParams::new(vec!["www.loupe.test".to_string()])
        .unwrap()
        .self_signed(&ed_key)
        .unwrap();
    std::fs::write(dir.join("ed25519.pem"), ed.pem()).unwrap();
    let mut old_params = rcgen::CertificateParams::new(vec!["www.loupe.test".to_string()]).unwrap();
    old_params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    old_params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let old = old_params.self_signed(&key).unwrap();
    std::fs::write(dir.join("old.pem"), old.pem()).unwrap();
    let good = r#"[server_profiles.www]
chain = "www.pem"
key = "www-2026"
upstream = "trust-store"
[[rules]]
name = "in"
dst = ["198.18.0.2/32"]
action = "inbound-inspect"
server_profile = "www"
"#;
    let c = compile(&dir.join("p.toml"), good, &|p| std::fs::read(p));
    assert_eq!(c.errors(), 0, "{:?}", c.diagnostics);
    assert!(c.diagnostics.is_empty(), "{:?}", c.diagnostics);
    let p = c.policy.unwrap();
    assert_eq!(p.rules[0].action, Action::InboundInspect);
    assert_eq!(p.rules[0].server_profile.as_deref(), Some("www"));
    let sp = &p.server_profiles["www"];
    // Relative to the policy file, made absolute for the engine.
    assert_eq!(
        Path::new(&sp.chain),
        std::fs::canonicalize(dir.join("www.pem")).unwrap()
    );
    assert_eq!(sp.key, "www-2026");
    assert_eq!(sp.upstream, UpstreamCheck::TrustStore);
    assert_eq!(sp.token, None);

    let bad = r#"[server_profiles.a]
chain = "missing.pem"
key = "no spaces allowed"
upstream = "maybe"
[server_profiles.b]
chain = "junk.pem"
[[rules]]
name = "no-profile"
action = "inbound-inspect"
[[rules]]
name = "unknown"
action = "inbound-inspect"
server_profile = "nope"
[[rules]]
name = "wrong-action"
action = "decrypt"
server_profile = "a"
[server_profiles.reversed]
chain = "reversed.pem"
key = "k"
[server_profiles.ed]
chain = "ed25519.pem"
key = "k"
[server_profiles.old]
chain = "old.pem"
key = "k"
token = "a token label much longer than thirty-two bytes"
[server_profiles.ordered]
chain = "ordered.pem"
key = "k"
"#;
    let c = compile(&dir.join("p.toml"), bad, &|p| std::fs::read(p));
    std::fs::remove_dir_all(&dir).unwrap();
    let e = messages(&c, Severity::Error);
    for (at, what) in [
        ("p.toml:2:9:", "missing.pem: No such file"),
        ("p.toml:3:7:", "a server key label is"),
        ("p.toml:4:12:", "upstream = \"maybe\""),
        ("p.toml:5:1:", "server profile \"b\" needs a `key`"),
        ("p.toml:6:9:", "no certificate in it"),
        ("p.toml:9:10:", "inbound-inspect needs a `server_profile`"),
        ("p.toml:13:18:", "unknown server profile \"nope\""),
        (
            "p.toml:17:18:",
            "only inbound-inspect rules name a server profile",
        ),
        ("p.toml:19:9:", "is not the issuer of certificate 1"),
        ("p.toml:22:9:", "has a key of type ed25519"),
        ("p.toml:27:9:", "a token label is 1 to 32 bytes"),
    ] {
        assert!(
            e.iter().any(|m| m.contains(at) && m.contains(what)),
            "{at} {what}: {e:#?}"
        );
    }
    let w = messages(&c, Severity::Warning);
    for (at, what) in [
        ("p.toml:25:9:", "the leaf certificate expired"),
        (
            "p.toml:28:1:",
            "server profile \"ordered\" is not used by any rule",
        ),
    ] {
        assert!(
            w.iter().any(|m| m.contains(at) && m.contains(what)),
            "{at} {what}: {w:#?}"
        );
    }
    assert!(c.policy.is_none());
}
