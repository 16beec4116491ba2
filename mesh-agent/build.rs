//! Builds the kernel programs (`mesh-ebpf`) for the BPF target with the
//! nightly toolchain and bpf-linker, so the agent can embed the object.
//! `cargo xtask setup` installs both.

fn main() -> anyhow::Result<()> {
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
