//! The bare mechanism as a peer of the same-node scenario: the least
//! sock_ops + sk_msg program (`xtask/bare-redirect`), built for BPF here and
//! attached by this process to a cgroup the scenario made. It shows how
//! close mesh's redirect comes to what the kernel mechanism alone gives, in
//! the same run.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aya::Ebpf;
use aya::maps::{MapData, SockHash};
use aya::programs::{CgroupAttachMode, SkMsg, SockOps};

use super::env::Cgroup;
use crate::util::{self, step};

const PACKAGE: &str = "bare-redirect";

/// The programs in the object: sock_ops, then sk_msg.
pub const PROGRAMS: [&str; 2] = ["bare_sockops", "bare_msg"];

/// Builds the object (cargo skips it when nothing changed) and returns its
/// path. The same recipe as mesh-agent/build.rs uses for mesh-ebpf.
pub fn build() -> Result<PathBuf> {
    step("bench: building the bare sock_ops + sk_msg redirect program (BPF)");
    let target_dir = util::target_dir()?.join(PACKAGE);
    let arch = format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH);
    let rustflags = [arch.as_str(), "-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f");
    util::run(
        util::cargo_nightly()
            .args(["build", "--package", PACKAGE, "--bins", "--release"])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .arg("--target-dir")
            .arg(&target_dir)
            .env("CARGO_ENCODED_RUSTFLAGS", rustflags),
    )?;
    Ok(target_dir.join("bpfel-unknown-none/release").join(PACKAGE))
}

/// The programs, attached to a cgroup; detached when dropped (the sock_ops
/// link and the sockhash close with the object).
pub struct BareRedirect {
    _ebpf: Ebpf,
}

impl BareRedirect {
    pub fn attach(object: &Path, cgroup: &Cgroup) -> Result<Self> {
        let mut ebpf =
            Ebpf::load_file(object).with_context(|| format!("loading {}", object.display()))?;
        let socks = {
            let map = ebpf.map("BARE_SOCKS").context("no BARE_SOCKS map")?;
            let socks: SockHash<&MapData, [u8; 12]> = map.try_into()?;
            socks.fd().try_clone()?
        };
        let msg: &mut SkMsg = ebpf
            .program_mut(PROGRAMS[1])
            .context("no bare_msg program")?
            .try_into()?;
        msg.load().context("loading bare_msg")?;
        msg.attach(&socks).context("attaching bare_msg")?;
        let ops: &mut SockOps = ebpf
            .program_mut(PROGRAMS[0])
            .context("no bare_sockops program")?
            .try_into()?;
        ops.load().context("loading bare_sockops")?;
        let dir = File::open(cgroup.path())
            .with_context(|| format!("opening {}", cgroup.path().display()))?;
        ops.attach(dir, CgroupAttachMode::Single)
            .context("attaching bare_sockops")?;
        Ok(BareRedirect { _ebpf: ebpf })
    }
}
