//! `loupe-harness up NAME | down NAME | sweep`: the test harness for scripts
//! (the demo, benchmarks, manual poking). `up` leaves the namespaces
//! NAME-client, NAME-engine, NAME-server in place; `down` removes them and
//! everything in them; `sweep` removes namespaces of dead test processes.

use std::process::ExitCode;

use loupe_tests::{harness::sweep_stale, Harness, HarnessConfig};

fn usage() -> ExitCode {
    eprintln!("usage: loupe-harness up NAME [--offloads] [--mirror] | down NAME | sweep");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["up", name, rest @ ..] => {
            let cfg = HarnessConfig {
                offloads: rest.contains(&"--offloads"),
                mirror: rest.contains(&"--mirror"),
                ..Default::default()
            };
            Harness::create(name, cfg).map(|mut h| {
                h.keep();
                println!(
                    "harness {name} up: namespaces {} {} {}",
                    h.client.name, h.engine.name, h.server.name
                );
            })
        }
        ["down", name] => Harness::adopt(name).destroy(),
        ["sweep"] => {
            for n in sweep_stale() {
                println!("removed stale namespace {n}");
            }
            Ok(())
        }
        _ => return usage(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loupe-harness: {e:#}");
            ExitCode::FAILURE
        }
    }
}
