//! `cargo xtask test`: set up, build, and run every test with cargo-nextest.

use anyhow::{Result, bail};
use clap::Args;

use crate::util::{self, step};

#[derive(Args)]
pub struct TestArgs {
    /// Extra arguments for `cargo nextest run`, after `--`.
    #[arg(last = true)]
    nextest_args: Vec<String>,
}

pub fn run(args: TestArgs) -> Result<()> {
    // Fail before a long build rather than in the middle of the tests.
    if !util::is_root() {
        bail!(
            "the tests load eBPF programs and make cgroups and network namespaces, so they \
             need root; run as root, e.g. `sudo -E env PATH=\"$PATH\" cargo xtask test`"
        );
    }
    crate::setup::run()?;

    // Builds the default members: mesh-ebpf only builds for the BPF target
    // (mesh-agent's build.rs does that), so it is left out.
    step("test: building the workspace's binaries");
    util::run(util::cargo().args(["build", "--workspace", "--exclude", "mesh-ebpf", "--bins"]))?;

    step("test: running the tests with cargo-nextest");
    util::run(
        util::cargo()
            .args([
                "nextest",
                "run",
                "--workspace",
                "--exclude",
                "mesh-ebpf",
                "--no-fail-fast",
            ])
            .args(&args.nextest_args),
    )?;
    step("test: all passed");
    Ok(())
}
