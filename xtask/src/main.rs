//! `cargo xtask …`: everything a person runs to set up, build, test, lint and
//! demo mesh. Each subcommand lives in its own module.

mod bench;
mod demo;
mod ebpf_build;
mod fresh;
mod host;
mod lint;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Set up, test, lint and demo mesh"
)]
struct Cli {
    /// Show the full output of steps that are quiet when they succeed
    /// (the kernel programs' build).
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need; skips what is there.
    Setup,
    /// Set up, build, and run every test with cargo-nextest (needs root).
    Test(test::TestArgs),
    /// cargo fmt --check, clippy on the workspace, clippy on the eBPF crate.
    Lint,
    /// Apply cargo fmt to the whole workspace.
    Fmt,
    /// Run the agent on examples/mesh.yaml and send connections through it,
    /// then two namespace nodes and the mTLS tunnel between them (needs root).
    Demo(demo::DemoArgs),
    /// Benchmark mesh against iptables, nftables, HAProxy and stunnel (needs root).
    Bench(bench::BenchArgs),
    /// The benchmark's load generator, run by `bench` inside its namespaces.
    #[command(hide = true)]
    BenchClient(bench::ClientArgs),
    /// The benchmark's backends, run by `bench` inside its namespaces.
    #[command(hide = true)]
    BenchServer(bench::ServerArgs),
    /// The demo's client, run by `demo` inside the demo cgroup.
    #[command(hide = true)]
    DemoClient(demo::ClientArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    util::set_verbose(cli.verbose);
    let result = match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Test(args) => test::run(args),
        Cmd::Lint => lint::run(),
        Cmd::Fmt => lint::fmt(),
        Cmd::Demo(args) => demo::run(args),
        Cmd::DemoClient(args) => demo::client(args),
        Cmd::Bench(args) => bench::run(args),
        Cmd::BenchClient(args) => bench::client(args),
        Cmd::BenchServer(args) => bench::server(args),
    };
    // Errors here are for people: the message and its causes, no backtrace.
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
