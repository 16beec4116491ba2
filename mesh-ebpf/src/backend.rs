//! Service lookup and backend selection, shared by every connect hook.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use mesh_common::{BackendValue, ServiceKey, ServiceValue, SlotKey};

use crate::maps::{
    MESH_BACKENDS, MESH_BE_STATS, MESH_CONFIG, MESH_SERVICES, MESH_SLOTS, MESH_SVC_STATS,
};

/// What the program decided for one connect.
pub enum Decision {
    /// A service with no usable backend: fail the connect at once.
    NoBackend,
    Forward(BackendValue),
}

/// True for sockets the agent marked as its own (health checks, tunnels).
#[inline(always)]
pub fn is_agent_socket(mark: u32) -> bool {
    match MESH_CONFIG.get(0) {
        Some(cfg) => cfg.agent_mark != 0 && mark == cfg.agent_mark,
        None => false,
    }
}

#[inline(always)]
pub fn lookup_service(key: &ServiceKey) -> Option<ServiceValue> {
    unsafe { MESH_SERVICES.get(key).copied() }
}

/// Weighted random choice: the agent wrote `slot_count` slots, each backend
/// holding slots in proportion to its weight, so a uniform slot is a
/// weighted backend.
#[inline(always)]
pub fn select_backend(svc: &ServiceValue) -> Decision {
    if svc.slot_count == 0 {
        return Decision::NoBackend;
    }
    let slot = unsafe { bpf_get_prandom_u32() } % svc.slot_count;
    let slot_key = SlotKey {
        service_id: svc.service_id,
        generation: svc.generation,
        slot,
    };
    let Some(backend_id) = (unsafe { MESH_SLOTS.get(slot_key).copied() }) else {
        return Decision::NoBackend;
    };
    match unsafe { MESH_BACKENDS.get(backend_id).copied() } {
        Some(backend) => {
            count_backend_connection(backend_id);
            Decision::Forward(backend)
        }
        None => Decision::NoBackend,
    }
}

#[inline(always)]
fn count_backend_connection(backend_id: u32) {
    if let Some(stats) = MESH_BE_STATS.get_ptr_mut(backend_id) {
        unsafe { (*stats).connections += 1 };
    }
}

#[inline(always)]
pub fn count_service(svc: &ServiceValue, forwarded: bool) {
    if let Some(stats) = MESH_SVC_STATS.get_ptr_mut(svc.service_id) {
        unsafe {
            if forwarded {
                (*stats).connections += 1;
            } else {
                (*stats).no_backend += 1;
            }
        }
    }
}
