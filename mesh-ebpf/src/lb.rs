//! The balancing decision shared by every hook that names a destination
//! (connect, sendmsg): service lookup, policy, algorithm, affinity, and the
//! bookkeeping that lets later hooks undo the rewrite.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_prandom_u32,
        bpf_ktime_get_ns,
    },
    programs::SockAddrContext,
};
use mesh_common::{
    ALGORITHM_LEAST_CONN, ALGORITHM_MAGLEV, AffinityKey, AffinityValue, BACKEND_ACTIVE,
    BACKEND_FLAG_TUNNEL, BackendId, BackendValue, CONFIG_EVENTS, ConfigValue, ConnValue,
    ECONNREFUSED, EPERM, EVENT_DENIED, EVENT_FORWARDED, EVENT_NO_BACKEND, EVENTS_WAKEUP_BYTES,
    Event, FAMILY_V4, FAMILY_V6, IDENTITY_UNKNOWN, PROTO_TCP, PROTO_UDP, PolicyKey, RevNatKey,
    RevNatValue, SERVICE_AFFINITY, SERVICE_DEFAULT_DENY, SERVICE_POLICY, ServiceKey, ServiceValue,
    SlotKey, SockLbKey, SockLbValue, TunnelValue, VERDICT_ALLOW, VERDICT_DENY,
};

use crate::{
    debug_log,
    maps::{
        MESH_ACTIVE, MESH_AFFINITY, MESH_BACKENDS, MESH_BE_HEALTH, MESH_BE_STATS, MESH_CONFIG,
        MESH_CONNS, MESH_EVENTS, MESH_POLICY, MESH_REV_NAT, MESH_SERVICES, MESH_SLOTS,
        MESH_SOCK_LB, MESH_SVC_STATS, MESH_TUN_PEND, MESH_WORKLOADS,
    },
    sock_addr::{self, Addr},
};

/// What the hook should do with the socket.
pub enum Outcome {
    /// Not a service (or the agent's own socket): leave it alone.
    Untouched,
    /// Fail the call with this errno.
    Refuse(i32),
    /// Send to this backend.
    Forward(Addr, u16),
}

/// How the destination was named.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// connect(): TCP, or a connected UDP socket.
    Connect,
    /// sendmsg() with an address on an unconnected UDP socket.
    UnconnectedSend,
}

/// Deepest cgroup level searched for a workload (pods nest containers).
const MAX_CGROUP_DEPTH: i32 = 8;

#[inline(always)]
pub fn balance(ctx: &SockAddrContext, dst: Addr, port: u16, call: Call) -> Outcome {
    let proto = match sock_addr::protocol(ctx) {
        6 => PROTO_TCP,
        17 => PROTO_UDP,
        _ => return Outcome::Untouched,
    };
    let key = ServiceKey {
        addr: dst.words,
        port,
        proto,
        family: dst.family,
    };
    let Some(svc) = (unsafe { MESH_SERVICES.get(key).copied() }) else {
        return Outcome::Untouched;
    };
    let config = config();
    if is_agent_mark(&config, sock_addr::socket_mark(ctx)) {
        return Outcome::Untouched;
    }
    let cookie = sock_addr::socket_cookie(ctx);
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let mut event = Event {
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id,
        service_id: svc.service_id,
        algorithm: svc.algorithm,
        proto,
        ..Default::default()
    };

    if svc.flags & SERVICE_POLICY != 0 {
        event.identity = identity(cgroup_id);
        if !allowed(event.identity, &svc) {
            count_service(svc.service_id, |s| s.denied += 1);
            event.verdict = EVENT_DENIED;
            debug_log::denied(ctx, &config, svc.service_id, event.identity);
            emit(&config, &event);
            return Outcome::Refuse(EPERM);
        }
    }

    // An unconnected UDP socket keeps the backend it was first given.
    let sock_lb_key = SockLbKey {
        cookie,
        service_id: svc.service_id,
        _pad: 0,
    };
    if call == Call::UnconnectedSend
        && let Some(sticky) = unsafe { MESH_SOCK_LB.get(sock_lb_key).copied() }
        && let Some(be) = usable_backend(sticky.backend_id, svc.service_id)
    {
        return Outcome::Forward(backend_addr(&be), be.port);
    }

    event.client = client_id(ctx, &config, cgroup_id);
    let Some(choice) = choose(&key, &svc, event.client) else {
        count_service(svc.service_id, |s| s.no_backend += 1);
        event.verdict = EVENT_NO_BACKEND;
        debug_log::no_backend(ctx, &config, svc.service_id, svc.slot_count);
        emit(&config, &event);
        return Outcome::Refuse(ECONNREFUSED);
    };
    if choice.generation != svc.generation {
        debug_log::generation_retry(
            ctx,
            &config,
            svc.service_id,
            svc.generation,
            choice.generation,
        );
    }
    let be = choice.backend;
    let remote = be.flags & BACKEND_FLAG_TUNNEL != 0;
    // A backend on another node behind mTLS: TCP goes to the local
    // agent's tunnel listener (never in plaintext); UDP, which HBONE does
    // not carry, goes directly and is counted.
    let (backend, backend_port) = if remote && proto == PROTO_TCP {
        let Some(listener) = tunnel_listener(&config, dst.family) else {
            count_service(svc.service_id, |s| s.no_backend += 1);
            event.verdict = EVENT_NO_BACKEND;
            emit(&config, &event);
            return Outcome::Refuse(ECONNREFUSED);
        };
        let pending = TunnelValue {
            cgroup_id,
            backend_addr: be.addr,
            service_id: svc.service_id,
            backend_id: choice.backend_id,
            identity: if svc.flags & SERVICE_POLICY != 0 {
                event.identity
            } else {
                identity(cgroup_id)
            },
            backend_port: be.port,
            family: be.family,
            _pad: 0,
        };
        let _ = MESH_TUN_PEND.insert(cookie, pending, 0);
        count_service(svc.service_id, |s| s.tunnelled += 1);
        listener
    } else {
        if remote {
            count_service(svc.service_id, |s| s.udp_direct_remote += 1);
        }
        (backend_addr(&be), be.port)
    };

    // Remember the VIP for getpeername()/recvmsg() on this socket.
    let rev_key = rev_nat_key(cookie, backend, backend_port);
    let vip = RevNatValue {
        addr: dst.words,
        port,
        family: dst.family,
        _pad: 0,
    };
    let _ = MESH_REV_NAT.insert(rev_key, vip, 0);

    let unconnected = call == Call::UnconnectedSend;
    if unconnected {
        let sticky = SockLbValue {
            backend_id: choice.backend_id,
            _pad: 0,
        };
        let _ = MESH_SOCK_LB.insert(sock_lb_key, sticky, 0);
    } else if proto == PROTO_TCP {
        let conn = ConnValue {
            backend_id: choice.backend_id,
            counted: 0,
        };
        let _ = MESH_CONNS.insert(cookie, conn, 0);
    }
    count_backend(choice.backend_id, unconnected);
    count_service(svc.service_id, |s| {
        if unconnected {
            s.udp_flows += 1
        } else {
            s.connections += 1
        }
    });
    event.backend_id = choice.backend_id;
    event.slot = choice.slot;
    event.affinity_hit = choice.affinity_hit as u8;
    event.verdict = EVENT_FORWARDED;
    debug_log::forwarded(
        ctx,
        &config,
        svc.service_id,
        choice.backend_id,
        choice.slot,
        choice.affinity_hit,
    );
    emit(&config, &event);
    Outcome::Forward(backend, backend_port)
}

/// The agent's outbound tunnel listener for a client of `family` (an IPv6
/// socket naming an IPv4 VIP counts as IPv4); None when this node has no
/// tunnel.
#[inline(always)]
fn tunnel_listener(config: &ConfigValue, family: u8) -> Option<(Addr, u16)> {
    if config.tunnel_port == 0 {
        return None;
    }
    let addr = if family == FAMILY_V6 {
        Addr {
            words: config.tunnel_v6,
            family: FAMILY_V6,
        }
    } else {
        Addr {
            words: [config.tunnel_v4, 0, 0, 0],
            family: FAMILY_V4,
        }
    };
    Some((addr, config.tunnel_port))
}

struct Choice {
    backend_id: u32,
    backend: BackendValue,
    slot: u32,
    affinity_hit: bool,
    /// The slot table generation it came from: not the one first read
    /// after a concurrent update. (A plain u32, not an Option: LLVM leaves a
    /// None's payload undefined, and the verifier refuses to copy it.)
    generation: u32,
}

#[inline(always)]
fn choose(key: &ServiceKey, svc: &ServiceValue, client: u64) -> Option<Choice> {
    let affinity_key = AffinityKey {
        service_id: svc.service_id,
        _pad: 0,
        client,
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let affinity = svc.flags & SERVICE_AFFINITY != 0;
    if affinity && let Some(entry) = MESH_AFFINITY.get_ptr_mut(affinity_key) {
        let entry = unsafe { &mut *entry };
        let timeout_ns = u64::from(svc.affinity_timeout_s) * 1_000_000_000;
        if now.wrapping_sub(entry.last_used_ns) < timeout_ns
            && let Some(backend) = usable_backend(entry.backend_id, svc.service_id)
        {
            entry.last_used_ns = now;
            return Some(Choice {
                backend_id: entry.backend_id,
                backend,
                slot: u32::MAX,
                affinity_hit: true,
                generation: svc.generation,
            });
        }
    }
    // A concurrent update may delete the generation this reader saw; the
    // service entry already points at a complete new one, so look again.
    let choice = match pick(svc, client) {
        Some(c) => c,
        None => {
            let fresh = unsafe { MESH_SERVICES.get(key).copied() }?;
            if fresh.generation == svc.generation {
                return None;
            }
            pick(&fresh, client)?
        }
    };
    if affinity {
        let entry = AffinityValue {
            backend_id: choice.backend_id,
            _pad: 0,
            last_used_ns: now,
        };
        let _ = MESH_AFFINITY.insert(affinity_key, entry, 0);
    }
    Some(choice)
}

#[inline(always)]
fn pick(svc: &ServiceValue, client: u64) -> Option<Choice> {
    if svc.slot_count == 0 {
        return None;
    }
    let slot = match svc.algorithm {
        ALGORITHM_MAGLEV => mesh_common::maglev_slot(client, svc.service_id, svc.slot_count),
        ALGORITHM_LEAST_CONN => {
            // Power of two choices: two distinct random slots, the backend
            // with fewer live connections wins.
            let a = random_below(svc.slot_count);
            let b = if svc.slot_count > 1 {
                (a + 1 + random_below(svc.slot_count - 1)) % svc.slot_count
            } else {
                a
            };
            let (id_a, id_b) = (slot_backend(svc, a)?, slot_backend(svc, b)?);
            if active(id_b) < active(id_a) { b } else { a }
        }
        _ => random_below(svc.slot_count),
    };
    let backend_id = slot_backend(svc, slot)?;
    let backend = usable_backend(backend_id, svc.service_id)?;
    Some(Choice {
        backend_id,
        backend,
        slot,
        affinity_hit: false,
        generation: svc.generation,
    })
}

#[inline(always)]
fn slot_backend(svc: &ServiceValue, slot: u32) -> Option<u32> {
    let key = SlotKey {
        service_id: svc.service_id,
        generation: svc.generation,
        slot,
    };
    unsafe { MESH_SLOTS.get(key).copied() }
}

/// A backend that exists, takes new connections and belongs to the service.
#[inline(always)]
fn usable_backend(id: u32, service_id: u32) -> Option<BackendValue> {
    let be = unsafe { MESH_BACKENDS.get(id).copied() }?;
    (be.state == BACKEND_ACTIVE && be.service_id == service_id).then_some(be)
}

#[inline(always)]
fn backend_addr(be: &BackendValue) -> Addr {
    Addr {
        words: be.addr,
        family: be.family,
    }
}

#[inline(always)]
fn active(backend_id: u32) -> u64 {
    MESH_ACTIVE.get(backend_id).copied().unwrap_or(0)
}

#[inline(always)]
fn random_below(n: u32) -> u32 {
    (unsafe { bpf_get_prandom_u32() }) % n
}

/// Pods have their own network namespace; host-network processes share the
/// host's, so they are told apart by cgroup.
#[inline(always)]
fn client_id(ctx: &SockAddrContext, config: &ConfigValue, cgroup_id: u64) -> u64 {
    let netns = sock_addr::netns_cookie(ctx);
    if netns == config.host_netns_cookie {
        cgroup_id
    } else {
        netns
    }
}

/// The workload identity of the calling task: its own cgroup, or the
/// nearest ancestor the agent registered (a pod's cgroup above its
/// containers').
#[inline(always)]
fn identity(cgroup_id: u64) -> u32 {
    if let Some(id) = unsafe { MESH_WORKLOADS.get(cgroup_id) } {
        return *id;
    }
    let mut level = MAX_CGROUP_DEPTH;
    while level > 0 {
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if ancestor != 0
            && let Some(id) = unsafe { MESH_WORKLOADS.get(ancestor) }
        {
            return *id;
        }
        level -= 1;
    }
    IDENTITY_UNKNOWN
}

#[inline(always)]
fn allowed(identity: u32, svc: &ServiceValue) -> bool {
    let key = PolicyKey {
        identity,
        service_id: svc.service_id,
    };
    match unsafe { MESH_POLICY.get(key) }.map(|v| v.verdict) {
        Some(VERDICT_ALLOW) => true,
        Some(VERDICT_DENY) => false,
        _ => svc.flags & SERVICE_DEFAULT_DENY == 0,
    }
}

/// True for sockets the agent marked as its own (health checks, tunnels).
#[inline(always)]
pub fn is_agent_socket(mark: u32) -> bool {
    is_agent_mark(&config(), mark)
}

#[inline(always)]
fn is_agent_mark(config: &ConfigValue, mark: u32) -> bool {
    config.agent_mark != 0 && mark == config.agent_mark
}

#[inline(always)]
fn config() -> ConfigValue {
    MESH_CONFIG.get(0).copied().unwrap_or_default()
}

/// Events wait in the ring for the agent's periodic read: waking it on
/// every connect would cost a self-IPI and a wakeup inside connect() (the
/// larger part of this program's run time when measured). Only a ring that
/// is filling up wakes the reader at once.
#[inline(always)]
fn emit(config: &ConfigValue, event: &Event) {
    if config.flags & CONFIG_EVENTS != 0 {
        let pending = MESH_EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
        let flags = if pending >= EVENTS_WAKEUP_BYTES {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        };
        let _ = MESH_EVENTS.output::<Event>(event, u64::from(flags));
    }
}

#[inline(always)]
fn count_backend(backend_id: u32, unconnected: bool) {
    if let Some(stats) = MESH_BE_STATS.get_ptr_mut(backend_id) {
        unsafe {
            if unconnected {
                (*stats).udp_flows += 1;
            } else {
                (*stats).connections += 1;
            }
        }
    }
}

#[inline(always)]
fn count_service(service_id: u32, update: impl FnOnce(&mut mesh_common::ServiceStats)) {
    if let Some(stats) = MESH_SVC_STATS.get_ptr_mut(service_id) {
        update(unsafe { &mut *stats });
    }
}

/// Moves a backend's live-connection count up or down by one, never below
/// zero. An atomic add whose result is unused (BPF `XADD`): the BPF target
/// has no atomic types in `core`, hence the intrinsic.
#[inline(always)]
pub fn adjust_active(backend_id: u32, increment: bool) {
    let Some(ptr) = MESH_ACTIVE.get_ptr_mut(backend_id) else {
        return;
    };
    let delta = if increment {
        1u64
    } else if unsafe { core::ptr::read_volatile(ptr) } > 0 {
        1u64.wrapping_neg()
    } else {
        return;
    };
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(ptr, delta) };
}

/// A connect to the backend got established: its failure streak ends.
#[inline(always)]
pub fn connect_succeeded(backend_id: u32) {
    if let Some(health) = MESH_BE_HEALTH.get_ptr_mut(backend_id) {
        unsafe { core::ptr::write_volatile(&raw mut (*health).consecutive_failures, 0) };
    }
}

/// A connect to the backend closed before it was established.
#[inline(always)]
pub fn connect_failed(backend_id: u32) {
    if let Some(health) = MESH_BE_HEALTH.get_ptr_mut(backend_id) {
        unsafe {
            atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(
                &raw mut (*health).consecutive_failures,
                1,
            );
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*health).failures, 1);
        }
    }
}

/// Finds the VIP a socket was sent to from the backend it sees as its peer.
#[inline(always)]
pub fn reverse(cookie: u64, peer: Addr, port: u16) -> Option<(Addr, u16)> {
    let key = RevNatKey {
        cookie,
        addr: peer.words,
        port,
        family: peer.family,
        _pad: [0; 5],
    };
    let vip = unsafe { MESH_REV_NAT.get(key).copied() }?;
    Some((
        Addr {
            words: vip.addr,
            family: vip.family,
        },
        vip.port,
    ))
}

/// The connection tracking entry of a balanced TCP socket.
#[inline(always)]
pub fn conn(cookie: u64) -> Option<*mut ConnValue> {
    MESH_CONNS.get_ptr_mut(cookie)
}

/// A balanced TCP socket closed: drop its tracking entry and its reverse
/// translation (getpeername() of a closed socket fails anyway). Left to the
/// LRU, dead entries would fill MESH_REV_NAT and make every later insert
/// evict. Keyed by the backend the socket was sent to; if a reload has
/// since given that backend id to another address, the entry stays for the
/// LRU to reclaim (keys carry the cookie, so no other socket is touched).
#[inline(always)]
pub fn forget_conn(cookie: u64, backend_id: BackendId) {
    if let Some(be) = unsafe { MESH_BACKENDS.get(backend_id) } {
        let peer = if be.flags & BACKEND_FLAG_TUNNEL != 0 {
            tunnel_listener(&config(), be.family)
        } else {
            Some((backend_addr(be), be.port))
        };
        if let Some((addr, port)) = peer {
            let _ = MESH_REV_NAT.remove(rev_nat_key(cookie, addr, port));
        }
    }
    let _ = MESH_CONNS.remove(cookie);
}

/// A socket's reverse-translation key: its cookie and where it was sent
/// (the peer getpeername() would otherwise show).
#[inline(always)]
fn rev_nat_key(cookie: u64, peer: Addr, port: u16) -> RevNatKey {
    RevNatKey {
        cookie,
        addr: peer.words,
        port,
        family: peer.family,
        _pad: [0; 5],
    }
}

/// A tunnelled socket got its source port (sock_ops, `TCP_CONNECT_CB`,
/// before the SYN leaves): the decision made at connect() is filed under
/// the 4-tuple the agent's accepted socket will see.
#[inline(always)]
pub fn tunnel_connecting(cookie: u64, key: impl FnOnce() -> Option<mesh_common::TunnelKey>) {
    if let Some(pending) = unsafe { MESH_TUN_PEND.get(cookie).copied() } {
        if let Some(key) = key() {
            let _ = crate::maps::MESH_TUN_ORIG.insert(key, pending, 0);
        }
        let _ = MESH_TUN_PEND.remove(cookie);
    }
}
