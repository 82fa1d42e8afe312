//! The `loupe` command line as a user runs it.

use std::{
    path::Path,
    process::{Command, Stdio},
};

/// `loupe policy check --json FILE | head -c 0`: the reader of standard
/// output is gone before a byte is written. The command ends quietly and
/// successfully, as `head` wanted, instead of panicking on EPIPE.
#[test]
fn a_closed_standard_output_ends_the_command_quietly() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/example.toml");
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_loupe"))
        .args(["policy", "check", "--json"])
        .arg(&example)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert_eq!(err, "", "nothing said about it");
}

/// With standard output open, the same command prints the compiled policy.
#[test]
fn policy_check_json_prints_the_compiled_policy() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/example.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_loupe"))
        .args(["policy", "check", "--json"])
        .arg(&example)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(p["rules"].as_array().map(Vec::len), Some(4), "{p}");
}
