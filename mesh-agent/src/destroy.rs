//! Destroying the established sockets of a removed backend, so clients see
//! an error at once and reconnect instead of waiting on a peer that is gone.
//!
//! The sockets live in the clients' network namespaces (each pod has its
//! own), so the agent visits every namespace that a process of its cgroup
//! lives in, lists sockets there with sock_diag and destroys, with
//! `SOCK_DESTROY`, those whose peer is the removed backend and which the
//! kernel balanced (their cookie is in `MESH_REV_NAT`); a direct connection
//! to the same address is left alone.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use aya::maps::{HashMap, MapData};
use mesh_common::{FAMILY_V4, RevNatKey, RevNatValue};

use crate::reconcile::{RemovedBackend, ip_from_words};

#[derive(Debug, thiserror::Error)]
pub enum DestroyError {
    #[error("cannot enter network namespace of pid {pid}: {source}")]
    Netns {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("sock_diag failed: {0}")]
    Netlink(#[source] io::Error),
}

/// Destroys, in every network namespace of `cgroup`'s processes, the balanced
/// sockets connected to one of `removed`. Returns how many were destroyed.
pub fn destroy_sockets(
    cgroup: &Path,
    removed: &[RemovedBackend],
    rev_nat: &HashMap<MapData, RevNatKey, RevNatValue>,
) -> Result<usize, DestroyError> {
    let targets: BTreeSet<(SocketAddr, u8)> = removed
        .iter()
        .filter(|r| r.destroy_sockets)
        .map(|r| (r.addr, r.proto))
        .collect();
    if targets.is_empty() {
        return Ok(0);
    }
    let addrs: BTreeSet<SocketAddr> = targets.iter().map(|(a, _)| *a).collect();
    let cookies: BTreeSet<u64> = rev_nat
        .keys()
        .filter_map(Result::ok)
        .filter(|k| {
            let addr = SocketAddr::new(ip_from_words(k.family, k.addr), u16::from_be(k.port));
            addrs.contains(&addr)
        })
        .map(|k| k.cookie)
        .collect();
    if cookies.is_empty() {
        return Ok(0);
    }
    let mut destroyed = 0;
    for pid in one_pid_per_netns(cgroup) {
        let (targets, cookies) = (targets.clone(), cookies.clone());
        // setns changes only the calling thread; a thread of its own keeps
        // the agent's other threads in the host namespace.
        destroyed += std::thread::spawn(move || -> Result<usize, DestroyError> {
            enter_netns(pid)?;
            let diag = SockDiag::open().map_err(DestroyError::Netlink)?;
            let mut n = 0;
            for &proto in &targets.iter().map(|(_, p)| *p).collect::<BTreeSet<u8>>() {
                for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
                    for socket in diag
                        .dump(family, proto, STATES)
                        .map_err(DestroyError::Netlink)?
                    {
                        if cookies.contains(&socket.cookie())
                            && targets.contains(&(socket.peer(), proto))
                            && diag.destroy(family, proto, &socket).is_ok()
                        {
                            n += 1;
                        }
                    }
                }
            }
            Ok(n)
        })
        .join()
        .expect("destroy thread does not panic")?;
    }
    Ok(destroyed)
}

/// Cookies of the TCP sockets of `cgroup`'s network namespaces that have
/// not closed yet (sock_ops will still see their `TCP_CLOSE`): the upgrade
/// (`migrate`) uses it to tell live sockets from closed ones.
pub fn open_tcp_cookies(cgroup: &Path) -> Result<BTreeSet<u64>, DestroyError> {
    let mut cookies = BTreeSet::new();
    for pid in one_pid_per_netns(cgroup) {
        cookies.extend(
            std::thread::spawn(move || -> Result<Vec<u64>, DestroyError> {
                enter_netns(pid)?;
                let diag = SockDiag::open().map_err(DestroyError::Netlink)?;
                let mut cookies = Vec::new();
                for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
                    let sockets = diag
                        .dump(family, libc::IPPROTO_TCP as u8, NOT_CLOSED)
                        .map_err(DestroyError::Netlink)?;
                    cookies.extend(sockets.iter().map(DiagMsg::cookie));
                }
                Ok(cookies)
            })
            .join()
            .expect("sock_diag thread does not panic")?,
        );
    }
    Ok(cookies)
}

/// Walks the cgroup subtree and keeps one pid per network namespace.
pub(crate) fn one_pid_per_netns(cgroup: &Path) -> Vec<u32> {
    let mut by_netns: BTreeMap<(u64, u64), u32> = BTreeMap::new();
    let mut dirs = vec![cgroup.to_owned()];
    while let Some(dir) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                if let Ok(ns) = std::fs::metadata(format!("/proc/{pid}/ns/net")) {
                    by_netns.entry((ns.dev(), ns.ino())).or_insert(pid);
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    by_netns.into_values().collect()
}

/// The network-namespace cookie of the first process in `cgroup` (or below),
/// if it has one.
pub fn netns_cookie_of_cgroup(cgroup: &Path) -> Option<u64> {
    let pid = *one_pid_per_netns(cgroup).first()?;
    std::thread::spawn(move || {
        enter_netns(pid).ok()?;
        crate::events::own_netns_cookie().ok()
    })
    .join()
    .ok()
    .flatten()
}

pub(crate) fn enter_netns(pid: u32) -> Result<(), DestroyError> {
    let fail = |source| DestroyError::Netns { pid, source };
    let ns = File::open(format!("/proc/{pid}/ns/net")).map_err(fail)?;
    // SAFETY: a valid namespace fd; affects only this thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(fail(io::Error::last_os_error()));
    }
    Ok(())
}

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// Every TCP state but LISTEN: a listener has no peer to lose.
const STATES: u32 = !(1 << 10);
/// Full sockets not yet through `TCP_CLOSE`: every state but TIME_WAIT (6),
/// CLOSE (7), LISTEN (10) and NEW_SYN_RECV (12).
const NOT_CLOSED: u32 = STATES & !(1 << 6 | 1 << 7 | 1 << 12);

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct inet_diag_sockid`: ports and addresses in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Request {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// The head of `struct inet_diag_msg`, which is all that is read.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
}

impl DiagMsg {
    fn cookie(&self) -> u64 {
        u64::from(self.id.cookie[0]) | (u64::from(self.id.cookie[1]) << 32)
    }

    /// The peer, with IPv4-mapped IPv6 shown as IPv4 (as the maps hold it).
    fn peer(&self) -> SocketAddr {
        let port = u16::from_be(self.id.dport);
        let ip = if self.family == libc::AF_INET as u8 {
            ip_from_words(FAMILY_V4, self.id.dst)
        } else {
            match ip_from_words(mesh_common::FAMILY_V6, self.id.dst) {
                IpAddr::V6(v6) => v6.to_canonical(),
                v4 => v4,
            }
        };
        SocketAddr::new(ip, port)
    }
}

struct SockDiag {
    fd: OwnedFd,
}

impl SockDiag {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket call; the fd is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just created, not owned elsewhere.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn send(&self, kind: u16, flags: u16, request: Request) -> io::Result<()> {
        #[repr(C)]
        struct Message {
            header: NlMsgHdr,
            request: Request,
        }
        let message = Message {
            header: NlMsgHdr {
                len: size_of::<Message>() as u32,
                kind,
                flags,
                ..Default::default()
            },
            request,
        };
        // SAFETY: sends the bytes of a plain repr(C) value.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                (&raw const message).cast(),
                size_of::<Message>(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Calls `each` for every netlink message until the dump or ack ends.
    fn receive(
        &self,
        mut each: impl FnMut(&NlMsgHdr, &[u8]) -> io::Result<bool>,
    ) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: receives into a buffer we own.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= size_of::<NlMsgHdr>() {
                // SAFETY: enough bytes for a header; read unaligned.
                let header: NlMsgHdr = unsafe { std::ptr::read_unaligned(rest.as_ptr().cast()) };
                let len = header.len as usize;
                if len < size_of::<NlMsgHdr>() || len > rest.len() {
                    return Err(io::Error::other("truncated netlink message"));
                }
                let body = &rest[size_of::<NlMsgHdr>()..len];
                if header.kind == NLMSG_DONE {
                    return Ok(());
                }
                if !each(&header, body)? {
                    return Ok(());
                }
                rest = &rest[(len + 3) & !3..];
            }
        }
    }

    fn dump(&self, family: u8, protocol: u8, states: u32) -> io::Result<Vec<DiagMsg>> {
        let request = Request {
            family,
            protocol,
            states,
            ..Default::default()
        };
        self.send(
            SOCK_DIAG_BY_FAMILY,
            (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            request,
        )?;
        let mut sockets = Vec::new();
        self.receive(|header, body| {
            if header.kind == NLMSG_ERROR {
                return Err(netlink_error(body));
            }
            if body.len() >= size_of::<DiagMsg>() {
                // SAFETY: enough bytes for the message head.
                sockets.push(unsafe { std::ptr::read_unaligned(body.as_ptr().cast()) });
            }
            Ok(true)
        })?;
        Ok(sockets)
    }

    fn destroy(&self, family: u8, protocol: u8, socket: &DiagMsg) -> io::Result<()> {
        let request = Request {
            family,
            protocol,
            states: STATES,
            id: socket.id,
            ..Default::default()
        };
        self.send(
            SOCK_DESTROY,
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            request,
        )?;
        let mut result = Ok(());
        self.receive(|header, body| {
            if header.kind == NLMSG_ERROR {
                result = match netlink_error(body) {
                    e if e.raw_os_error() == Some(0) => Ok(()),
                    e => Err(e),
                };
            }
            Ok(false)
        })?;
        result
    }
}

/// The errno of an NLMSG_ERROR body (0 for an ack).
fn netlink_error(body: &[u8]) -> io::Error {
    let code = body
        .get(..4)
        .map_or(-libc::EIO, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    io::Error::from_raw_os_error(-code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn layouts_match_the_kernel() {
        assert_eq!(size_of::<SockId>(), 48);
        assert_eq!(size_of::<Request>(), 56);
        assert_eq!(size_of::<NlMsgHdr>(), 16);
    }

    /// sock_diag finds a real socket by its peer, and SOCK_DESTROY aborts it.
    #[test]
    fn lists_and_destroys_a_real_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = TcpStream::connect(server).unwrap();
        let (_accepted, _) = listener.accept().unwrap();
        let local = client.local_addr().unwrap();

        let diag = SockDiag::open().unwrap();
        let tcp = libc::IPPROTO_TCP as u8;
        let ours: Vec<DiagMsg> = diag
            .dump(libc::AF_INET as u8, tcp, STATES)
            .unwrap()
            .into_iter()
            .filter(|s| s.peer() == server && u16::from_be(s.id.sport) == local.port())
            .collect();
        assert_eq!(ours.len(), 1, "the client socket is listed once");
        diag.destroy(libc::AF_INET as u8, tcp, &ours[0]).unwrap();

        let mut buf = [0u8; 1];
        let err = std::io::Read::read(&mut &client, &mut buf).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED));
    }
}
