//! `loupe`: the operator's command line. It reads the dataplane's stats
//! report and runs the HSM's CA lifecycle and audit checks (`hsm`); the
//! control daemon (policy, decryption log, metrics) grows here.

mod hsm;
mod policy;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use loupe_dataplane::stats::StatsReport;

/// mimalloc: buffers and signing requests are allocated on one thread and
/// freed on another, which glibc's per-thread arenas serialise.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "loupe",
    version,
    about = "Loupe TLS inspection engine: operator CLI"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show a running (or stopped) dataplane's stats report.
    Stats {
        /// The file the dataplane writes with --stats-file.
        #[arg(long, default_value = "/run/loupe/stats.json")]
        file: PathBuf,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Manage the forward-trust / forward-untrust CAs on the HSM.
    Ca {
        #[command(flatten)]
        hsm: hsm::HsmArgs,
        #[command(subcommand)]
        command: hsm::CaCommand,
    },
    /// Check, apply or show the policy.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Verify the key-usage audit log, or export its public key.
    Audit {
        #[command(flatten)]
        hsm: hsm::HsmArgs,
        #[command(subcommand)]
        command: hsm::AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Check a policy file: every error and warning with file:line:column.
    /// Exit status 1 when there is an error.
    Check {
        file: PathBuf,
        /// Print the compiled policy (JSON) when it is valid.
        #[arg(long)]
        json: bool,
    },
}

fn policy_check(file: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    let checked = policy::check_file(file)
        .with_context(|| format!("cannot read the policy {}", file.display()))?;
    for d in &checked.diagnostics {
        eprintln!("{d}");
    }
    let Some(p) = checked.policy else {
        eprintln!(
            "{}: {} error(s); the policy was not compiled",
            file.display(),
            checked.errors()
        );
        return Ok(ExitCode::FAILURE);
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(ExitCode::SUCCESS);
    }
    let st = p.steering().map_err(anyhow::Error::msg)?;
    println!(
        "{}: OK: {} rules, default {}, {} profiles, {} categories; digest {}",
        file.display(),
        p.rules.len(),
        p.default_action.label(),
        p.profiles.len(),
        p.categories.len(),
        &p.digest[..12]
    );
    let text = |ps: &[loupe_dataplane::config::Prefix]| {
        ps.iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "steering: tcp ports {:?}, server prefixes [{}], exempt [{}]",
        st.ports,
        text(&st.prefixes),
        text(&st.exempt)
    );
    Ok(ExitCode::SUCCESS)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Stats { file, json } => {
            let report = StatsReport::read(&file).with_context(|| {
                format!(
                    "cannot read the dataplane stats at {} (is loupe-dataplane running \
                     with --stats-file {}?)",
                    file.display(),
                    file.display()
                )
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca { hsm, command } => hsm::ca(&hsm, command),
        Command::Audit { hsm, command } => hsm::audit(&hsm, command),
        Command::Policy { command } => match command {
            PolicyCommand::Check { file, json } => policy_check(&file, json),
        },
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loupe: {e:#}");
            ExitCode::FAILURE
        }
    }
}
