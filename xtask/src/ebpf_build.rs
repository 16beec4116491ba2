//! Building the kernel programs (`mesh-ebpf`) for the BPF target with the
//! nightly toolchain and bpf-linker. The one definition of that build:
//! `mesh-agent/build.rs` includes this file to embed the object, and
//! `cargo xtask` runs the same build first, as one timed progress line, so the
//! build script then finds it fresh in the shared target directory.
//!
//! The inner cargo's output is captured: a success shows only the programs'
//! own warnings, a failure shows everything (as does `echo`, for `-v`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The package and its one binary (the object the agent embeds).
pub const PACKAGE: &str = "mesh-ebpf";
pub const OBJECT: &str = "mesh";

/// What a successful build produced.
pub struct Built {
    /// The linked BPF object.
    pub object: PathBuf,
    /// Rendered warnings of the kernel crates and of cargo itself.
    pub warnings: Vec<String>,
}

/// Where the kernel programs build: `ebpf/` in cargo's target directory.
/// Shared by the build script and xtask so that either finds the other's
/// build fresh.
pub fn target_dir(cargo_target_dir: &Path) -> PathBuf {
    cargo_target_dir.join("ebpf")
}

/// Builds `mesh-ebpf` of `workspace` into `target_dir` for the BPF target
/// of `arch`'s endianness. `echo` gets every line of output as it comes.
pub fn build(
    workspace: &Path,
    target_dir: &Path,
    arch: &str,
    big_endian: bool,
    echo: Option<fn(&str)>,
) -> Result<Built> {
    let target = if big_endian {
        "bpfeb-unknown-none"
    } else {
        "bpfel-unknown-none"
    };
    let arch = if arch.starts_with("riscv64") {
        "riscv64"
    } else {
        arch
    };
    // `rustup run nightly` (not `cargo +nightly`): the variables an outer
    // cargo exports would otherwise pin the toolchain to stable.
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--package", PACKAGE])
        .args(["--bins", "--release", "--message-format=json"])
        .args(["--target", target, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(workspace.join(PACKAGE))
        // One argument per \x1f: the cfg aya-ebpf reads, and BTF for the loader.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        )
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // What an outer cargo gives a build script (or `cargo run` a binary)
    // must not leak in: the inner build scripts' `rerun-if-env-changed=HOST`
    // and the like would then see a change between a run from build.rs and
    // one from xtask, and each would rebuild what the other just built.
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(leaked_from_outer_cargo) {
            cmd.env_remove(key);
        }
    }
    let shown = format!("{cmd:?}");
    let mut child = cmd.spawn().with_context(|| {
        format!("could not start `{shown}`; is rustup installed? (`cargo xtask setup`)")
    })?;

    // Cargo's own lines (progress, its warnings, errors) come on stderr.
    let stderr = child.stderr.take().context("stderr is piped")?;
    let stderr = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(echo) = echo {
                echo(&line);
            }
            lines.push(line);
        }
        lines
    });

    // Compiler messages and artifacts come on stdout, one JSON per line.
    let stdout = child.stdout.take().context("stdout is piped")?;
    let mut log = Vec::new();
    let mut warnings = Vec::new();
    let mut object = None;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else {
            if let Some(echo) = echo {
                echo(&line);
            }
            log.push(line);
            continue;
        };
        match message["reason"].as_str() {
            Some("compiler-message") => {
                let rendered = message["message"]["rendered"].as_str().unwrap_or_default();
                let rendered = rendered.trim_end().to_owned();
                if let Some(echo) = echo {
                    rendered.lines().for_each(echo);
                }
                if message["message"]["level"] == "warning" {
                    warnings.push(rendered.clone());
                }
                log.push(rendered);
            }
            Some("compiler-artifact") if message["target"]["name"] == OBJECT => {
                object = message["executable"].as_str().map(PathBuf::from);
            }
            _ => {}
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    let cargo_lines = stderr.join().unwrap_or_default();

    if !status.success() {
        let mut all = cargo_lines;
        all.extend(log);
        bail!(
            "building the kernel programs failed ({status}): `{shown}`\n{}\n\
             (missing nightly or bpf-linker? `cargo xtask setup` installs them)",
            all.join("\n")
        );
    }
    // Cargo's own warnings (a bad config, say), but not its per-crate
    // "generated N warnings" summaries of the messages above.
    warnings.extend(
        cargo_lines
            .into_iter()
            .filter(|l| l.starts_with("warning:") && !l.contains(" generated ")),
    );
    let object = object.with_context(|| {
        format!(
            "`{shown}` succeeded but reported no `{OBJECT}` binary; its output:\n{}",
            log.join("\n")
        )
    })?;
    Ok(Built { object, warnings })
}

fn leaked_from_outer_cargo(key: &str) -> bool {
    const EXACT: &[&str] = &[
        "HOST",
        "TARGET",
        "OUT_DIR",
        "NUM_JOBS",
        "OPT_LEVEL",
        "DEBUG",
        "PROFILE",
        "RUSTC_LINKER",
        "RUSTDOC",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
    ];
    const PREFIXES: &[&str] = &[
        "CARGO_CFG_",
        "CARGO_FEATURE_",
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
    ];
    EXACT.contains(&key) || PREFIXES.iter().any(|p| key.starts_with(p))
}
