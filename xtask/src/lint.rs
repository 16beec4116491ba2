//! `cargo xtask lint` and `cargo xtask fmt`.

use anyhow::{Result, bail};

use crate::util::{self, step};

pub fn run() -> Result<()> {
    // Run every check even when one fails, so one run shows all problems.
    let mut failed = Vec::new();

    step("lint: cargo fmt --check");
    if let Err(e) = util::run(util::cargo().args(["fmt", "--all", "--check"])) {
        eprintln!("{e:#}");
        failed.push("rustfmt (fix with `cargo xtask fmt`)");
    }

    // mesh-ebpf is not a host crate (no_std, panic=abort only on BPF), so it
    // is left out here and linted on its own target below (bare-redirect
    // builds on the host as an empty binary, and is linted on both).
    step("lint: clippy on the workspace");
    if let Err(e) = util::run(util::cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "mesh-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])) {
        eprintln!("{e:#}");
        failed.push("clippy (workspace)");
    }

    // The BPF crates: mesh's programs and the bench's bare redirect.
    for krate in ["mesh-ebpf", "xtask/bare-redirect"] {
        step(format!(
            "lint: clippy on {krate} for bpfel-unknown-none (nightly)"
        ));
        let mut ebpf = util::cargo_nightly();
        ebpf.current_dir(util::workspace_root().join(krate)).args([
            "clippy",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
            "--",
            "-D",
            "warnings",
        ]);
        if let Err(e) = util::run(&mut ebpf) {
            eprintln!("{e:#}");
            failed.push(krate);
        }
    }

    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join(", "));
    }
    step("lint: clean");
    Ok(())
}

pub fn fmt() -> Result<()> {
    step("fmt: cargo fmt --all");
    util::run(util::cargo().args(["fmt", "--all"]))
}
