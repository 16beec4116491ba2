//! `cargo xtask test`: set up, build, and run every test with cargo-nextest;
//! with `--fresh`, do that in a fresh clone of HEAD (see `fresh`).

use anyhow::{Result, bail};
use clap::Args;

use crate::util::{self, step};

#[derive(Args)]
pub struct TestArgs {
    /// Run the suite as on a fresh machine: clone HEAD into a temporary
    /// directory and test it there, with bpffs unmounted in a private mount
    /// namespace (the host's mounts and others' runs are left alone).
    #[arg(long)]
    fresh: bool,
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
    if args.fresh {
        return crate::fresh::run(&args.nextest_args);
    }
    crate::setup::run()?;

    // Builds the default members: mesh-ebpf only builds for the BPF target
    // (mesh-agent's build.rs does that), so it is left out.
    util::build_kernel_programs()?;
    step("test: building the workspace's binaries");
    util::run(util::cargo_build().args([
        "build",
        "--workspace",
        "--exclude",
        "mesh-ebpf",
        "--bins",
    ]))?;

    step("test: running the tests with cargo-nextest");
    util::run(
        util::cargo_build()
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
