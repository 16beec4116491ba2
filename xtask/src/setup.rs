//! `cargo xtask setup`: installs what a fresh Debian machine lacks to build
//! and test mesh, and checks what the kernel-facing tests assume of the host
//! (see `host`). Every check is cheap and runs without root, so a second run
//! finishes in a fraction of a second.

use std::process::Command;
use std::time::Instant;

use anyhow::{Result, bail};

use crate::util::{self, step};

const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "iproute2",
    // The tunnel tests capture the wire between namespace nodes.
    "tcpdump",
];
/// kubectl 1.20, the client nobody here wrote that proves the test API
/// server faithful (tests/tests/kube_api.rs). Installed only when no
/// kubectl is on PATH: another package's (Google Cloud SDK's `kubectl`)
/// owns /usr/bin/kubectl, and Debian's would conflict with it.
const KUBECTL_PACKAGE: &str = "kubernetes-client";
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    let start = Instant::now();
    // What is already there gets one line for all, not one each.
    let mut present = Vec::new();
    nightly(&mut present)?;
    // LLVM first: bpf-linker links against it.
    let mut packages = APT_PACKAGES.to_vec();
    if util::on_path("kubectl").is_some() {
        present.push("kubectl".into());
    } else {
        packages.push(KUBECTL_PACKAGE);
    }
    apt_packages(&packages, &mut present)?;
    bpf_linker(&mut present)?;
    nextest(&mut present)?;
    if !present.is_empty() {
        step(format!("setup: already installed: {}", present.join(", ")));
    }
    crate::host::check()?;
    step(format!("setup: done in {:.2?}", start.elapsed()));
    Ok(())
}

/// The eBPF crate builds with nightly and `-Z build-std=core`, hence rust-src.
fn nightly(present: &mut Vec<String>) -> Result<()> {
    if util::on_path("rustup").is_none() {
        bail!("rustup is not on PATH; install it from https://rustup.rs, then run setup again");
    }
    let mut list = Command::new("rustup");
    list.args(["component", "list", "--toolchain", "nightly", "--installed"]);
    let Some(components) = util::probe(&mut list) else {
        step("setup: rustup toolchain nightly ... missing, installing");
        util::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
            // `cargo xtask lint` runs nightly clippy on the eBPF crate.
            "--component",
            "clippy",
        ]))?;
        return Ok(());
    };
    present.push("nightly".into());
    // Listed as `rust-src` (no target suffix); accept either form.
    if components
        .lines()
        .any(|c| c == "rust-src" || c.starts_with("rust-src-"))
    {
        present.push("rust-src".into());
    } else {
        step("setup: nightly rust-src ... missing, installing");
        util::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn apt_packages(packages: &[&'static str], present: &mut Vec<String>) -> Result<()> {
    // One dpkg-query for all packages; it prints the known ones and exits
    // non-zero if any is unknown, so read stdout regardless of the status.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\n"])
        .args(packages)
        .output();
    let out = match out {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
        Err(e) => bail!("could not run dpkg-query ({e}); setup expects Debian/Ubuntu"),
    };
    let missing = missing_packages(packages, &out);
    for pkg in packages.iter().filter(|p| !missing.contains(p)) {
        present.push((*pkg).into());
    }
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !util::is_root() {
        bail!(
            "missing Debian packages: {list}. Installing them needs root; run\n    \
             sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y {list}\n\
             then `cargo xtask setup` again"
        );
    }
    step(format!("setup: installing {list}"));
    util::run(Command::new("apt-get").arg("update"))?;
    util::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y"])
            .args(&missing),
    )
}

/// The packages dpkg does not list as "install ok installed" (a removed
/// package can linger as "deinstall ok config-files").
fn missing_packages(packages: &[&'static str], dpkg_output: &str) -> Vec<&'static str> {
    packages
        .iter()
        .copied()
        .filter(|pkg| {
            !dpkg_output.lines().any(|l| {
                l.strip_prefix(pkg)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .is_some_and(|status| status == "install ok installed")
            })
        })
        .collect()
}

/// bpf-linker must be built against the same LLVM major as nightly rustc.
fn bpf_linker(present: &mut Vec<String>) -> Result<()> {
    let version = util::probe(Command::new("bpf-linker").arg("--version"));
    if version
        .as_deref()
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        present.push(format!("bpf-linker {BPF_LINKER_VERSION}"));
        return Ok(());
    }
    step(format!(
        "installing bpf-linker {BPF_LINKER_VERSION} (takes ~2 min; found: {})",
        version.as_deref().map_or("none", str::trim)
    ));
    util::run(
        util::cargo()
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--locked", "--no-default-features", "--features", "llvm-22"]),
    )
}

fn nextest(present: &mut Vec<String>) -> Result<()> {
    if util::on_path("cargo-nextest").is_some() {
        present.push("cargo-nextest".into());
        return Ok(());
    }
    step("installing cargo-nextest (takes a few minutes)");
    util::run(util::cargo().args(["install", "cargo-nextest", "--locked"]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_dpkg_status() {
        let out = "llvm-22-dev install ok installed\n\
                   libpolly-22-dev deinstall ok config-files\n";
        assert_eq!(
            missing_packages(APT_PACKAGES, out),
            ["libpolly-22-dev", "iproute2", "tcpdump"]
        );
        let out = "kubernetes-client install ok installed\n";
        assert!(missing_packages(&[KUBECTL_PACKAGE], out).is_empty());
        assert_eq!(missing_packages(&[KUBECTL_PACKAGE], ""), [KUBECTL_PACKAGE]);
    }
}
