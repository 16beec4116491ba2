//! mesh's kernel programs. Each attach point has its own module with a thin
//! entry point; shared logic lives in small library modules.
//!
//! Everything is gated on the BPF target so that workspace-wide host builds
//! (`cargo build --workspace`, clippy, rust-analyzer) see an empty binary
//! instead of failing; the real build is `mesh-agent/build.rs`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Atomic adds on map values (live-connection counts) need the intrinsic.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod connect;
#[cfg(target_arch = "bpf")]
mod debug_log;
#[cfg(target_arch = "bpf")]
mod getpeername;
// Strict mTLS on the destination node (cgroup_skb/ingress).
#[cfg(target_arch = "bpf")]
mod ingress;
#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod recvmsg;
#[cfg(target_arch = "bpf")]
mod sendmsg;
#[cfg(target_arch = "bpf")]
mod sock_addr;
#[cfg(target_arch = "bpf")]
mod sockops;
// Same-node redirect (sock_ops + sk_msg over a sockhash).
#[cfg(target_arch = "bpf")]
mod redirect;
#[cfg(target_arch = "bpf")]
mod redirect_maps;
#[cfg(target_arch = "bpf")]
mod redirect_msg;
#[cfg(target_arch = "bpf")]
mod redirect_sockops;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach a panic, so this is
    // never executed; it only satisfies `no_std`.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!(
        "mesh-ebpf is built for the BPF target by mesh-agent/build.rs; it does not run on the host"
    );
}
