//! Kernel-side debug logs (aya-log) at the balancing decisions.
//!
//! Every function checks `CONFIG_FLAG_DEBUG_LOG` first, before touching the
//! log ring buffer: with the switch off a decision pays one load-free branch
//! per site (the config is already on the stack). The agent forwards the
//! records into its own log (`mesh-agent run --kernel-debug-log on`,
//! `meshctl debug-log on|off`). With `--kernel-debug-log never` the agent
//! loads the programs with `MESH_LOG_SITES` = 0, and the verifier removes
//! every site as dead code: the benchmark compares the two.

use aya_ebpf::programs::SockAddrContext;
use aya_log_ebpf::debug;
use mesh_common::{CONFIG_FLAG_DEBUG_LOG, ConfigValue};

/// Log target the agent recognises and shows as `mesh_kernel`.
const TARGET: &str = "mesh_kernel";

/// Set by the agent at load time, in read-only global data that the kernel
/// freezes: the verifier knows its value, so it removes the log sites when
/// 0 and, when 1, turns the test into a plain jump (the load stays).
#[unsafe(no_mangle)]
static MESH_LOG_SITES: u8 = 1;

#[inline(always)]
fn on(config: &ConfigValue) -> bool {
    // A volatile read, so that the compiler does not fold the default in.
    let sites = unsafe { core::ptr::read_volatile(&raw const MESH_LOG_SITES) };
    sites != 0 && config.flags & CONFIG_FLAG_DEBUG_LOG != 0
}

#[inline(always)]
pub fn forwarded(
    ctx: &SockAddrContext,
    config: &ConfigValue,
    service_id: u32,
    backend_id: u32,
    slot: u32,
    affinity_hit: bool,
) {
    if on(config) {
        debug!(
            ctx,
            target: TARGET,
            "service {} hit: backend {} slot {} affinity {}",
            service_id,
            backend_id,
            slot,
            affinity_hit as u8
        );
    }
}

#[inline(always)]
pub fn denied(ctx: &SockAddrContext, config: &ConfigValue, service_id: u32, identity: u32) {
    if on(config) {
        debug!(
            ctx,
            target: TARGET,
            "service {} denied by policy: identity {}",
            service_id,
            identity
        );
    }
}

#[inline(always)]
pub fn no_backend(ctx: &SockAddrContext, config: &ConfigValue, service_id: u32, slots: u32) {
    if on(config) {
        debug!(
            ctx,
            target: TARGET,
            "service {} has no usable backend (slots {}): refused",
            service_id,
            slots
        );
    }
}

#[inline(always)]
pub fn generation_retry(
    ctx: &SockAddrContext,
    config: &ConfigValue,
    service_id: u32,
    seen: u32,
    fresh: u32,
) {
    if on(config) {
        debug!(
            ctx,
            target: TARGET,
            "service {} generation {} changed under the read: retried with {}",
            service_id,
            seen,
            fresh
        );
    }
}
