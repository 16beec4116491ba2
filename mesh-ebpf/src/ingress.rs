//! `cgroup_skb/ingress`: strict mTLS enforced on the destination node.
//!
//! Every packet delivered to a socket of the cgroup passes here. A TCP
//! packet to a local backend of a strict or permissive service
//! (`MESH_INBOUND`) from an address that is not this node's (not loopback,
//! not in `MESH_NODE_ADDRS`) came from another node in plaintext: the
//! tunnel's own connection to the backend starts on this node. Strict: the
//! packet is dropped, every one of them, so no plaintext byte reaches the
//! backend (the peer's SYN goes unanswered). Permissive: passed. Its SYN is
//! counted per service (`MESH_IN_STATS`), a retransmitted SYN once.

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};
use mesh_common::{
    FAMILY_V4, FAMILY_V6, INBOUND_FLAG_STRICT, InboundKey, InboundValue, LocalAddrKey, SynKey,
};

use crate::{
    maps::{MESH_IN_STATS, MESH_IN_SYN, MESH_INBOUND, MESH_NODE_ADDRS},
    redirect_maps::MESH_LOCAL_ADDR,
};

const PASS: i32 = 1;
const DROP: i32 = 0;

const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// IPv6 extension headers walked before giving up on finding TCP.
const MAX_EXT_HEADERS: usize = 6;

#[cgroup_skb(ingress)]
pub fn mesh_ingress(ctx: SkBuffContext) -> i32 {
    try_ingress(&ctx).unwrap_or(PASS)
}

/// The addresses of a TCP packet and where its TCP header starts.
struct Packet {
    family: u8,
    saddr: [u32; 4],
    daddr: [u32; 4],
    tcp: usize,
}

/// None: not a packet of ours (not TCP, not to a listed backend, or cut
/// short), so it passes.
#[inline(always)]
fn try_ingress(ctx: &SkBuffContext) -> Option<i32> {
    // The program sees the packet from its network header on.
    let first: u8 = ctx.load(0).ok()?;
    let p = match first >> 4 {
        4 => ipv4(ctx, first)?,
        6 => ipv6(ctx)?,
        _ => return None,
    };
    // Source and destination port, network order, as the agent writes them.
    let ports: [u16; 2] = ctx.load(p.tcp).ok()?;
    let key = InboundKey {
        addr: p.daddr,
        port: ports[1],
        family: p.family,
        _pad: 0,
    };
    let backend = unsafe { MESH_INBOUND.get(key) }?;
    if from_this_node(&p) {
        return None;
    }
    let strict = backend.flags & INBOUND_FLAG_STRICT != 0;
    let flags: u8 = ctx.load(p.tcp + 13).ok()?;
    if flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        count_syn(ctx, &p, ports, backend, strict);
    }
    Some(if strict { DROP } else { PASS })
}

#[inline(always)]
fn ipv4(ctx: &SkBuffContext, first: u8) -> Option<Packet> {
    let header = usize::from(first & 0x0f) * 4;
    if header < 20 {
        return None;
    }
    let proto: u8 = ctx.load(9).ok()?;
    if proto != IPPROTO_TCP {
        return None;
    }
    let saddr: u32 = ctx.load(12).ok()?;
    let daddr: u32 = ctx.load(16).ok()?;
    Some(Packet {
        family: FAMILY_V4,
        saddr: [saddr, 0, 0, 0],
        daddr: [daddr, 0, 0, 0],
        tcp: header,
    })
}

#[inline(always)]
fn ipv6(ctx: &SkBuffContext) -> Option<Packet> {
    let mut next: u8 = ctx.load(6).ok()?;
    let saddr: [u32; 4] = ctx.load(8).ok()?;
    let daddr: [u32; 4] = ctx.load(24).ok()?;
    let mut off = 40usize;
    for _ in 0..MAX_EXT_HEADERS {
        if next == IPPROTO_TCP {
            return Some(Packet {
                family: FAMILY_V6,
                saddr,
                daddr,
                tcp: off,
            });
        }
        // Every extension header starts with (next header, length).
        let ext: [u8; 2] = ctx.load(off).ok()?;
        off += match next {
            // Hop-by-hop, routing, destination options: 8-byte units past the first 8.
            0 | 43 | 60 => (usize::from(ext[1]) + 1) * 8,
            // Fragment: fixed size.
            44 => 8,
            // Authentication header: 4-byte units, minus 2.
            51 => (usize::from(ext[1]) + 2) * 4,
            _ => return None,
        };
        next = ext[0];
    }
    None
}

/// Loopback, an address the agent listed as this node's, or one that
/// same-node redirect knows as local (the addresses of the network
/// namespaces the cgroup's processes live in: client pods of this node
/// that are nobody's backend).
#[inline(always)]
fn from_this_node(p: &Packet) -> bool {
    let loopback = if p.family == FAMILY_V4 {
        // The first byte in memory is the first of the address.
        p.saddr[0] & 0xff == 127
    } else {
        p.saddr == [0, 0, 0, u32::from_be(1)]
    };
    if loopback {
        return true;
    }
    let key = LocalAddrKey {
        addr: p.saddr,
        family: p.family,
        _pad: [0; 3],
    };
    unsafe { MESH_NODE_ADDRS.get(key).is_some() || MESH_LOCAL_ADDR.get(key).is_some() }
}

/// Counts a connection attempt once: a SYN with the initial sequence number
/// already recorded for its 4-tuple is a retransmission.
#[inline(always)]
fn count_syn(
    ctx: &SkBuffContext,
    p: &Packet,
    ports: [u16; 2],
    backend: &InboundValue,
    strict: bool,
) {
    let Ok(seq) = ctx.load::<u32>(p.tcp + 4) else {
        return;
    };
    let key = SynKey {
        saddr: p.saddr,
        daddr: p.daddr,
        sport: ports[0],
        dport: ports[1],
        family: p.family,
        _pad: [0; 3],
    };
    if unsafe { MESH_IN_SYN.get(key) } == Some(&seq) {
        return;
    }
    let _ = MESH_IN_SYN.insert(key, seq, 0);
    if let Some(stats) = MESH_IN_STATS.get_ptr_mut(backend.service_id) {
        // SAFETY: a per-CPU slot of this CPU, nothing else writes it now.
        unsafe {
            if strict {
                (*stats).refused += 1;
            } else {
                (*stats).accepted += 1;
            }
        }
    }
}
