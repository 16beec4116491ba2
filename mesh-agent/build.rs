//! Builds the kernel programs (`mesh-ebpf`) for the BPF target with the
//! nightly toolchain and bpf-linker, so the agent can embed the object.
//! `cargo xtask setup` installs both.
//!
//! The build itself is xtask/src/ebpf_build.rs, shared with `cargo xtask`
//! (which runs it first, as one progress line). It is quiet on success but
//! for the kernel crates' real warnings; `MESH_EBPF_VERBOSE=1` (set by
//! `cargo xtask … -v`) relays all of its output.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

#[path = "../xtask/src/ebpf_build.rs"]
mod ebpf_build;

fn main() -> Result<()> {
    git_commit();
    kernel_programs()
}

fn kernel_programs() -> Result<()> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .parent()
        .context("mesh-agent has a parent directory")?;
    // Nothing tells a build script when these change but watching them.
    for dir in ["mesh-ebpf", "mesh-common"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.lock").display()
    );
    println!("cargo:rerun-if-env-changed=MESH_EBPF_VERBOSE");
    let verbose = std::env::var_os("MESH_EBPF_VERBOSE").is_some_and(|v| v == "1");

    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR is not set")?);
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH")?;
    let big_endian = std::env::var("CARGO_CFG_TARGET_ENDIAN").is_ok_and(|e| e == "big");
    let built = ebpf_build::build(
        workspace,
        &ebpf_target_dir(&out_dir),
        &arch,
        big_endian,
        verbose.then_some(relay as fn(&str)),
    )?;
    for warning in &built.warnings {
        for line in warning.lines() {
            println!("cargo:warning={line}");
        }
    }
    let dst = out_dir.join(ebpf_build::OBJECT);
    std::fs::copy(&built.object, &dst)
        .with_context(|| format!("copying {} to {}", built.object.display(), dst.display()))?;
    Ok(())
}

fn relay(line: &str) {
    println!("cargo:warning={line}");
}

/// The kernel programs' target directory, inside cargo's own: the first
/// ancestor of OUT_DIR that cargo tagged as its cache (CACHEDIR.TAG), which
/// is what xtask finds through `cargo metadata`; OUT_DIR itself otherwise.
fn ebpf_target_dir(out_dir: &Path) -> PathBuf {
    let cargo_target = out_dir
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .unwrap_or(out_dir);
    ebpf_build::target_dir(cargo_target)
}

/// Hands the commit being built to the agent as `MESH_GIT_COMMIT` (shown by
/// the `mesh_build_info` metric); nothing outside a git checkout.
fn git_commit() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .filter(|text| !text.is_empty())
    };
    let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return;
    };
    println!("cargo:rustc-env=MESH_GIT_COMMIT={commit}");
    // Rebuild when HEAD moves: HEAD itself, and the branch it points at.
    let mut watched = vec!["HEAD".to_owned()];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            let path = std::path::Path::new(dir).join(path);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}
