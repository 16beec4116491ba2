//! mesh-bulk: byte-exact data-path scenarios for same-node redirect (see
//! mesh_tests::bulk). Prints one JSON object (mesh_tests::BulkReport).
//!
//! mesh-bulk local  --scenario S [--bind IP:PORT] [--target IP:PORT] [--bytes N] [--conns N] [--timeout-ms T] [--mptcp neither|client|server|both]
//! mesh-bulk serve  --scenario S --bind IP:PORT [--conns N] [--timeout-ms T] [--hold-until FILE]
//! mesh-bulk client --scenario S --target IP:PORT [--bytes N] [--conns N] [--timeout-ms T]
//!
//! `serve` prints "listening IP:PORT" on stderr once bound. Non-loopback
//! addresses are refused in the host's network namespace.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use mesh_tests::bulk::{self, Params, Scenario};

const USAGE: &str = "usage: mesh-bulk local|serve|client --scenario S [--bind A] [--target A] [--bytes N] [--conns N] [--timeout-ms T] [--hold-until FILE] [--mptcp neither|client|server|both]";

fn main() -> ExitCode {
    match run() {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mesh-bulk: {e:#}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<String> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_default();
    let mut scenario = None;
    let mut bind: SocketAddr = "127.0.0.1:0".parse()?;
    let mut target = None::<SocketAddr>;
    let mut p = Params::default();
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--scenario" => {
                scenario = Some(
                    Scenario::parse(&value)
                        .ok_or_else(|| anyhow::anyhow!("unknown scenario {value}"))?,
                )
            }
            "--bind" => bind = value.parse()?,
            "--target" => target = Some(value.parse()?),
            "--bytes" => p.bytes = value.parse()?,
            "--conns" => p.conns = value.parse()?,
            "--timeout-ms" => p.timeout = Duration::from_millis(value.parse()?),
            "--hold-until" => p.hold_until = Some(value.into()),
            "--mptcp" => {
                p.mptcp = bulk::Mptcp::parse(&value)
                    .ok_or_else(|| anyhow::anyhow!("--mptcp takes neither|client|server|both"))?
            }
            _ => anyhow::bail!("unknown flag {flag}"),
        }
    }
    let sc = scenario.ok_or_else(|| anyhow::anyhow!("--scenario is required"))?;
    bulk::raise_fd_limit();
    let report = match mode.as_str() {
        "local" => bulk::run_local(sc, bind, target, &p)?,
        "serve" => {
            if !bulk::target_allowed(&bind) {
                anyhow::bail!("{bind} is not loopback and this is the host's network namespace");
            }
            let listener = bulk::listen(bind, p.mptcp.server())?;
            eprintln!("listening {}", listener.local_addr()?);
            if sc == Scenario::Epoll {
                bulk::serve_epoll(listener, &p)?
            } else {
                let (s, _) = bulk::accept_within(&listener, p.timeout)?;
                bulk::serve_one(sc, s, &p)?
            }
        }
        "client" => {
            let target = target.ok_or_else(|| anyhow::anyhow!("--target is required"))?;
            if !bulk::target_allowed(&target) {
                anyhow::bail!("{target} is not loopback and this is the host's network namespace");
            }
            if sc == Scenario::Epoll {
                bulk::client_epoll(target, &p)?
            } else {
                bulk::client_one(sc, target, &p)?
            }
        }
        other => anyhow::bail!("unknown mode {other:?}"),
    };
    Ok(serde_json::to_string(&report)?)
}
