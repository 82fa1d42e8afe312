//! `loupe`: the operator's command line. It reads the dataplane's stats
//! report and runs the HSM's CA lifecycle and audit checks (`hsm`); the
//! control daemon (policy, decryption log, metrics) grows here.

mod hsm;

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
    /// Verify the key-usage audit log, or export its public key.
    Audit {
        #[command(flatten)]
        hsm: hsm::HsmArgs,
        #[command(subcommand)]
        command: hsm::AuditCommand,
    },
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
