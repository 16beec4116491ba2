//! Small helpers shared by the subcommands: progress lines, running commands
//! with an echo of what runs, and a few facts about the machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

/// Prints a progress line; every step a person waits on gets one.
pub fn step(msg: impl std::fmt::Display) {
    println!("==> {msg}");
}

static VERBOSE: AtomicBool = AtomicBool::new(false);

/// `-v`: show the full output of steps that are quiet when they succeed.
pub fn set_verbose(on: bool) {
    VERBOSE.store(on, Ordering::Relaxed);
}

pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// Builds the kernel programs as one timed progress line (their full
/// output only with `-v` or on failure), so that the cargo build after it
/// finds them fresh. Real warnings are shown by that build's build script.
pub fn build_kernel_programs() -> Result<()> {
    let verbose = verbose();
    let what = "building kernel programs (nightly, bpf-linker)";
    if verbose {
        step(format!("{what}:"));
    } else {
        print!("==> {what} ... ");
        let _ = std::io::Write::flush(&mut std::io::stdout());
    }
    let start = std::time::Instant::now();
    let built = crate::ebpf_build::build(
        &workspace_root(),
        &crate::ebpf_build::target_dir(&target_dir()?),
        std::env::consts::ARCH,
        cfg!(target_endian = "big"),
        verbose.then_some(echo_indented as fn(&str)),
    );
    if built.is_err() && !verbose {
        println!("failed");
    }
    let built = built?;
    let warnings = match built.warnings.len() {
        0 => String::new(),
        1 => ", 1 warning (shown by the build below)".into(),
        n => format!(", {n} warnings (shown by the build below)"),
    };
    let done = format!("done in {:.1} s{warnings}", start.elapsed().as_secs_f64());
    if verbose {
        step(format!("{what}: {done}: {}", built.object.display()));
    } else {
        println!("{done}");
    }
    Ok(())
}

fn echo_indented(line: &str) {
    println!("    {line}");
}

/// `cargo`, with mesh-agent's build script told to relay the kernel
/// build's output under `-v`. Unset otherwise, as for a plain `cargo build`:
/// a change of it reruns that script, and so rebuilds the agent.
pub fn cargo_build() -> Command {
    let mut cmd = cargo();
    if verbose() {
        cmd.env("MESH_EBPF_VERBOSE", "1");
    }
    cmd
}

/// The workspace root: xtask lives one level below it.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// `cargo`, the same one that runs us when called through `cargo xtask`.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// `cargo +nightly` through the rustup proxy. The variables `cargo run`
/// exports would otherwise pin the nested cargo to the stable toolchain.
pub fn cargo_nightly() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly")
        .current_dir(workspace_root())
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("CARGO");
    cmd
}

/// The command line as a person would type it, for echoing and errors.
pub fn display(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), v?.to_string_lossy())))
        .collect();
    // $CARGO is a long toolchain path; people know it as `cargo`.
    let program = cmd.get_program();
    if std::env::var_os("CARGO").is_some_and(|c| c == program) {
        parts.push("cargo".into());
    } else {
        parts.push(program.to_string_lossy().into_owned());
    }
    parts.extend(cmd.get_args().map(|a| {
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            format!("'{a}'")
        } else {
            a.into_owned()
        }
    }));
    parts.join(" ")
}

/// Runs a command with inherited stdio, echoing it first; fails on non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    println!("    $ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs a command quietly and returns its stdout, or None if it could not
/// start or exited non-zero (used for checks, where "absent" is an answer).
pub fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Finds an executable on PATH without running it (checks must be fast).
pub fn on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Cargo's target directory (honours CARGO_TARGET_DIR and config files).
pub fn target_dir() -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["metadata", "--format-version", "1", "--no-deps"]);
    let out = cmd.output().context("could not run `cargo metadata`")?;
    if !out.status.success() {
        bail!(
            "`cargo metadata` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("`cargo metadata` printed invalid JSON")?;
    let dir = meta["target_directory"]
        .as_str()
        .context("`cargo metadata` has no target_directory")?;
    Ok(PathBuf::from(dir))
}

/// The cgroup v2 mount: /sys/fs/cgroup on most machines, but not all.
pub fn cgroup2_mount() -> Result<PathBuf> {
    find_cgroup2(&mountinfo()?).context(
        "no cgroup2 filesystem is mounted (see /proc/self/mountinfo); \
         mount one with `mount -t cgroup2 none /sys/fs/cgroup`",
    )
}

/// Every mount point whose filesystem type is `fstype`, in mount order.
pub fn mounts_of_type(fstype: &str) -> Result<Vec<PathBuf>> {
    Ok(parse_mounts(&mountinfo()?)
        .filter(|(_, t)| *t == fstype)
        .map(|(path, _)| path)
        .collect())
}

fn mountinfo() -> Result<String> {
    std::fs::read_to_string("/proc/self/mountinfo").context("could not read /proc/self/mountinfo")
}

fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    parse_mounts(mountinfo).find_map(|(path, fstype)| (fstype == "cgroup2").then_some(path))
}

/// (mount point, filesystem type) of each line of /proc/self/mountinfo.
fn parse_mounts(mountinfo: &str) -> impl Iterator<Item = (PathBuf, &str)> {
    // Fields: id parent dev root mount-point options [optional…] - fstype source super-options
    mountinfo.lines().filter_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split(' ').next()?;
        Some((
            PathBuf::from(unescape_mountinfo(left.split(' ').nth(4)?)),
            fstype,
        ))
    })
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        match rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            Some(b) => {
                out.push(b as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out + rest
}

/// SIGTERM, then SIGKILL after 3 s. Only children we spawned and have not
/// reaped are signalled, so the PID cannot belong to anyone else.
pub fn stop_child(name: &str, mut child: std::process::Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    eprintln!("warning: {name} did not exit after SIGTERM; sending SIGKILL");
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_among_v1_hierarchies() {
        let info = "\
35 25 0:30 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
41 35 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
42 35 0:39 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu";
        assert_eq!(
            find_cgroup2(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(find_cgroup2("35 25 0:30 / /x rw - tmpfs tmpfs rw"), None);
    }

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_mountinfo(r"/mnt/my\040cgroup"), "/mnt/my cgroup");
        assert_eq!(unescape_mountinfo(r"/a\134b\x"), r"/a\b\x");
    }
}
