//! Builds the kernel programs (`mesh-ebpf`) for the BPF target with the
//! nightly toolchain and bpf-linker, so the agent can embed the object.
//! `cargo xtask setup` installs both.

fn main() -> anyhow::Result<()> {
    git_commit();
    let ebpf_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../mesh-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "mesh-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
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
