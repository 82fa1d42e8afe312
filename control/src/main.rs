//! `loupe`: the control process and the operator's command line. `loupe
//! daemon` owns the policy, the flow log and the metrics (`daemon`); the
//! other commands talk to it (`client`), check policies (`policy`), or run
//! the HSM's CA lifecycle and audit checks (`hsm`).

/// A line to standard output, for the commands (`println!` panics when
/// the reader has gone away); an error to pass on with `?`.
macro_rules! outln {
    () => {
        outln!("")
    };
    ($($arg:tt)*) => {
        $crate::stdout_result(std::io::Write::write_fmt(
            &mut std::io::stdout().lock(),
            format_args!("{}\n", format_args!($($arg)*)),
        ))
    };
}

/// [`outln!`] without the newline.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::stdout_result(std::io::Write::write_fmt(
            &mut std::io::stdout().lock(),
            format_args!($($arg)*),
        ))
    };
}

mod client;
mod daemon;
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
    /// The control daemon's socket.
    #[arg(
        long,
        global = true,
        env = "LOUPE_SOCKET",
        default_value = "/run/loupe/control.sock"
    )]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control daemon: keep the dataplane on the policy, write the
    /// flow log, serve the CLI and the metrics.
    Daemon(daemon::DaemonArgs),
    /// Control's state and the dataplane's: workers, counters, HSM health.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Active flows with their decision and bytes.
    Flows {
        /// Only flows whose client, server, server name, rule or state
        /// contains this text.
        #[arg(long)]
        filter: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The flow log.
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
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
    /// Server keys on the HSM (inbound inspection): import, generate,
    /// CSR, list.
    Key {
        #[command(flatten)]
        hsm: hsm::HsmArgs,
        #[command(subcommand)]
        command: hsm::KeyCommand,
    },
    /// Check, apply or show the policy.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// TLS decryption: the exclusion cache of sites left encrypted.
    Decrypt {
        #[command(subcommand)]
        command: DecryptCommand,
    },
    /// Sealed TLS key logs: open one for Wireshark.
    Keylog {
        #[command(flatten)]
        hsm: hsm::HsmArgs,
        #[command(subcommand)]
        command: hsm::KeylogCommand,
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
        /// Also look each server profile's key up on the token (the HSM
        /// options below) and check it is the key of its certificate.
        #[arg(long)]
        keys: bool,
        #[command(flatten)]
        hsm: hsm::HsmArgs,
    },
    /// Check a policy and make the dataplane run it (atomically: on any
    /// error the running policy stays).
    Apply { file: PathBuf },
    /// The policy the daemon holds (as written; --json: as compiled).
    Show {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DecryptCommand {
    /// Sites excluded from decryption (a pinned client refused the
    /// impersonation certificate; the server wants a client certificate
    /// or a version the profile does not decrypt) and for how long.
    Exclusions {
        /// Forget them all: the next connections are decrypted again.
        #[arg(long)]
        clear: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum LogCommand {
    /// The newest records.
    Tail {
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
    },
}

/// A policy's errors and warnings, one a line on standard error, written
/// in large pieces (a line at a time took most of the time of a policy
/// with a million errors).
fn print_diagnostics(lines: &[impl std::fmt::Display]) {
    use std::io::Write;
    let mut err = std::io::BufWriter::with_capacity(1 << 16, std::io::stderr().lock());
    for d in lines {
        if writeln!(err, "{d}").is_err() {
            return;
        }
    }
    let _ = err.flush();
}

/// One request to the daemon; a refusal is an error.
fn ctl(socket: &std::path::Path, req: &daemon::CtlRequest) -> anyhow::Result<daemon::CtlResponse> {
    let r: daemon::CtlResponse = client::call(socket, req, std::time::Duration::from_secs(60))?;
    print_diagnostics(&r.diagnostics);
    match (r.ok, &r.error) {
        (true, _) => Ok(r),
        (false, e) => anyhow::bail!("{}", e.clone().unwrap_or_else(|| "refused".into())),
    }
}

fn status(socket: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    let r = ctl(socket, &daemon::CtlRequest::Status)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&r)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(c) = &r.control {
        outln!(
            "loupe control (pid {}, up {:.1}s): dataplane {} {}",
            c.pid,
            c.uptime_ms as f64 / 1000.0,
            c.dataplane_socket,
            if c.dataplane_connected {
                "connected"
            } else {
                "NOT REACHABLE"
            }
        )?;
        outln!(
            "policy: {} ({}); flow log {} ({} records written)",
            c.desired_version.map_or("none applied".into(), |v| format!(
                "version {v} from {}",
                c.desired_source.as_deref().unwrap_or("?")
            )),
            if c.in_sync {
                "running in the dataplane"
            } else {
                "NOT running in the dataplane"
            },
            c.log,
            c.records_written
        )?;
        if let Some(e) = &c.last_error {
            outln!("last error: {e}")?;
        }
    }
    if let Some(d) = &r.dataplane {
        outln!()?;
        out!("{}", d.render())?;
    }
    Ok(ExitCode::SUCCESS)
}

fn flows(socket: &std::path::Path, filter: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let r = ctl(socket, &daemon::CtlRequest::Status)?;
    let dp = r.dataplane.context("the dataplane is not reachable")?;
    let keep = |f: &loupe_dataplane::flow::FlowSummary| {
        let Some(q) = filter else { return true };
        let d = f.decision.clone().unwrap_or_default();
        [
            f.client.as_str(),
            f.server.as_str(),
            d.state.as_str(),
            d.rule.as_deref().unwrap_or(""),
            d.sni.as_deref().unwrap_or(""),
            d.action.map_or("", |a| a.label()),
        ]
        .iter()
        .any(|s| s.contains(q))
    };
    let list: Vec<_> = dp
        .workers
        .iter()
        .flat_map(|w| &w.flows)
        .filter(|f| keep(f))
        .collect();
    if json {
        outln!("{}", serde_json::to_string_pretty(&list)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{:<46} {:<46} {:<9} {:<10} {:<24} {:<28} {:>12} {:>12} {:>8}",
        "client",
        "server",
        "state",
        "action",
        "rule",
        "server name",
        "bytes c->s",
        "bytes s->c",
        "age s"
    )?;
    for f in &list {
        let d = f.decision.clone().unwrap_or_default();
        let (c2s, s2c) = if d.state == "split" {
            (d.relayed_c2s, d.relayed_s2c)
        } else {
            (f.inside.bytes, f.outside.bytes)
        };
        outln!(
            "{:<46} {:<46} {:<9} {:<10} {:<24} {:<28} {:>12} {:>12} {:>8.1}",
            f.client,
            f.server,
            if d.state.is_empty() {
                "observed"
            } else {
                &d.state
            },
            d.action.map_or("-", |a| a.label()),
            d.rule.as_deref().unwrap_or("-"),
            d.sni.as_deref().unwrap_or("-"),
            c2s,
            s2c,
            f.age_ms as f64 / 1000.0
        )?;
    }
    outln!("{} flow(s)", list.len())?;
    Ok(ExitCode::SUCCESS)
}

fn policy_check(
    file: &std::path::Path,
    json: bool,
    keys: Option<&hsm::HsmArgs>,
) -> anyhow::Result<ExitCode> {
    let checked = match keys {
        Some(hsm) => policy::check_file_keys(file, &hsm::key_check(hsm)),
        None => policy::check_file(file),
    }
    .with_context(|| format!("cannot read the policy {}", file.display()))?;
    print_diagnostics(&checked.diagnostics);
    let Some(p) = checked.policy else {
        eprintln!(
            "{}: {} error(s); the policy was not compiled",
            file.display(),
            checked.errors()
        );
        return Ok(ExitCode::FAILURE);
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&p)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let st = p.steering().map_err(anyhow::Error::msg)?;
    outln!(
        "{}: OK: {} rules, default {}, {} profiles, {} server profiles{}, {} categories; \
         digest {}",
        file.display(),
        p.rules.len(),
        p.default_action.label(),
        p.profiles.len(),
        p.server_profiles.len(),
        if keys.is_some() && !p.server_profiles.is_empty() {
            " (keys checked on the token)"
        } else {
            ""
        },
        p.categories.len(),
        &p.digest[..12]
    )?;
    let text = |ps: &[loupe_dataplane::config::Prefix]| {
        ps.iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    outln!(
        "steering: tcp ports {:?}, server prefixes [{}], exempt [{}]",
        st.ports,
        text(&st.prefixes),
        text(&st.exempt)
    )?;
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
                outln!("{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                out!("{}", report.render())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca { hsm, command } => hsm::ca(&hsm, command),
        Command::Key { hsm, command } => hsm::key(&hsm, command),
        Command::Audit { hsm, command } => hsm::audit(&hsm, command),
        Command::Keylog { hsm, command } => hsm::keylog(&hsm, command),
        Command::Policy { command } => match command {
            PolicyCommand::Check {
                file,
                json,
                keys,
                hsm,
            } => policy_check(&file, json, keys.then_some(&hsm)),
            PolicyCommand::Apply { file } => {
                let r = ctl(&cli.socket, &daemon::apply_request(&file)?)?;
                outln!(
                    "applied {}: the dataplane runs policy version {}",
                    file.display(),
                    r.version.unwrap_or_default()
                )?;
                Ok(ExitCode::SUCCESS)
            }
            PolicyCommand::Show { json } => {
                let r = ctl(
                    &cli.socket,
                    &daemon::CtlRequest::PolicyShow { compiled: json },
                )?;
                if json {
                    outln!("{}", serde_json::to_string_pretty(&r.policy)?)?;
                } else {
                    out!("{}", r.policy_text.context("no policy in the answer")?)?;
                }
                Ok(ExitCode::SUCCESS)
            }
        },
        Command::Decrypt {
            command: DecryptCommand::Exclusions { clear, json },
        } => {
            let r = ctl(&cli.socket, &daemon::CtlRequest::Exclusions { clear })?;
            let list = r.exclusions.unwrap_or_default();
            if json {
                outln!("{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                outln!(
                    "{:<32} {:<30} {:<12} {:<16} {:>9} {:>6}  reason",
                    "server name",
                    "server",
                    "profile",
                    "client",
                    "expires",
                    "hits"
                )?;
                for e in &list {
                    let server = std::net::SocketAddr::new(e.site.server, e.site.port);
                    outln!(
                        "{:<32} {:<30} {:<12} {:<16} {:>8}s {:>6}  {}",
                        e.site.sni.as_deref().unwrap_or("(none)"),
                        server.to_string(),
                        e.site.profile,
                        e.client.map_or("(every client)".into(), |c| c.to_string()),
                        e.expires_in_s,
                        e.hits,
                        e.reason
                    )?;
                }
                if clear {
                    outln!("cleared {} exclusion(s)", list.len())?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => status(&cli.socket, json),
        Command::Flows { filter, json } => flows(&cli.socket, filter.as_deref(), json),
        Command::Log {
            command: LogCommand::Tail { lines },
        } => {
            let r = ctl(&cli.socket, &daemon::CtlRequest::LogTail { lines })?;
            for l in r.lines {
                outln!("{l}")?;
            }
            // Fewer lines than asked, for a reason the user must hear.
            match r.error {
                Some(e) => {
                    eprintln!("loupe: {e}");
                    Ok(ExitCode::FAILURE)
                }
                None => Ok(ExitCode::SUCCESS),
            }
        }
        Command::Daemon(args) => {
            let cfg = args.config(cli.socket)?;
            daemon::run(cfg)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Standard output was closed by its reader (`loupe policy show | head
/// -1`): the rest is not wanted, and the command ends quietly.
#[derive(Debug)]
struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// The result of a write to standard output, for [`outln!`].
fn stdout_result(r: std::io::Result<()>) -> anyhow::Result<()> {
    r.map_err(|e| match e.kind() {
        std::io::ErrorKind::BrokenPipe => anyhow::Error::new(StdoutClosed),
        _ => anyhow::Error::new(e).context("cannot write to standard output"),
    })
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<StdoutClosed>().is_some() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loupe: {e:#}");
            ExitCode::FAILURE
        }
    }
}
