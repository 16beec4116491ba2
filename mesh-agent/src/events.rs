//! Decision events from the kernel's ring buffer, and how they are shown.

use std::collections::HashMap;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use aya::maps::{MapData, RingBuf};
use mesh_common::{
    ALGORITHM_LEAST_CONN, ALGORITHM_MAGLEV, EVENT_DENIED, EVENT_FORWARDED, Event, PROTO_TCP,
};
use tokio::io::unix::AsyncFd;

use crate::admin::EventView;
use crate::reconcile::Reconciler;

/// Which events `/v1/events` returns.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    pub service: Option<String>,
    /// Network-namespace cookie or cgroup id of the client.
    pub client: Option<u64>,
    /// Only events with a larger sequence number (for following).
    pub after: Option<u64>,
    pub limit: usize,
}

/// The kernel's event ring, shared by the reader task and by queries that
/// must see every decision made before they were asked.
pub type Ring = std::sync::Arc<std::sync::Mutex<RingBuf<MapData>>>;

/// Waits for events; the ring itself sits behind `Ring`'s lock so a query
/// can drain it too (`drain_into`).
pub struct Reader {
    ready: AsyncFd<OwnedFd>,
    ring: Ring,
}

impl Reader {
    pub fn new(ring: RingBuf<MapData>) -> std::io::Result<Self> {
        use std::os::fd::AsFd as _;
        // Readiness is watched on a duplicate of the ring's fd (the same
        // open map), so the ring can live behind a lock.
        let fd = ring.as_fd().try_clone_to_owned()?;
        // SAFETY: the fd is owned and moved into the AsyncFd, so it stays
        // open exactly as long as it is registered.
        let ready = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        Ok(Self {
            ready,
            ring: std::sync::Arc::new(std::sync::Mutex::new(ring)),
        })
    }

    pub fn ring(&self) -> Ring {
        self.ring.clone()
    }

    /// Waits until events may be ready: a wakeup from the kernel, or
    /// `POLL_INTERVAL`, since the programs do not wake the reader for each
    /// event (see `EVENTS_WAKEUP_BYTES`).
    pub async fn wait(&mut self) -> std::io::Result<()> {
        if let Ok(guard) = tokio::time::timeout(POLL_INTERVAL, self.ready.readable()).await {
            guard?.clear_ready();
        }
        Ok(())
    }
}

/// Takes every event waiting in the ring and hands the batch to `record`
/// while still holding the ring, so batches are recorded in kernel order.
pub fn drain_into(ring: &Ring, record: impl FnOnce(Vec<Event>)) {
    let mut ring = ring
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let batch = drain(&mut ring);
    if !batch.is_empty() {
        record(batch);
    }
}

/// How long an event may wait in the ring before the agent reads it.
const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

fn drain(ring: &mut RingBuf<MapData>) -> Vec<Event> {
    let mut batch = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() >= size_of::<Event>() {
            // SAFETY: the kernel wrote an `Event` (plain integers); the
            // read is unaligned-safe.
            batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) });
        }
    }
    batch
}

/// This process's network-namespace cookie (`SO_NETNS_COOKIE`), which the
/// programs use to tell host-network clients apart by cgroup.
pub fn own_netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain socket calls on an fd we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut cookie = 0u64;
        let mut len = size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        );
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(cookie)
    }
}

/// Names for the ids in events, from the reconciler's record.
pub struct Names<'a> {
    reconciler: &'a Reconciler,
    services: HashMap<u32, &'a str>,
    backends: HashMap<u32, String>,
    /// Monotonic clock minus wall clock, to date kernel timestamps.
    boot_offset_ms: i128,
}

impl<'a> Names<'a> {
    pub fn new(reconciler: &'a Reconciler) -> Self {
        let mut services = HashMap::new();
        let mut backends = HashMap::new();
        for (_, svc) in reconciler.services() {
            services.insert(svc.id(), svc.name.as_str());
            for (&(ip, port), &id) in svc.backends.iter() {
                backends.insert(id, std::net::SocketAddr::new(ip, port).to_string());
            }
        }
        Self {
            reconciler,
            services,
            backends,
            boot_offset_ms: unix_ms() - monotonic_ms(),
        }
    }

    pub fn view(&self, seq: u64, e: &Event) -> EventView {
        let forwarded = e.verdict == EVENT_FORWARDED;
        EventView {
            seq,
            unix_ms: (self.boot_offset_ms + i128::from(e.timestamp_ns / 1_000_000)).max(0) as u64,
            service: self
                .services
                .get(&e.service_id)
                .map_or_else(|| format!("#{}", e.service_id), |s| s.to_string()),
            protocol: if e.proto == PROTO_TCP { "tcp" } else { "udp" }.to_owned(),
            verdict: match e.verdict {
                EVENT_FORWARDED => "forwarded",
                EVENT_DENIED => "denied",
                _ => "no-backend",
            }
            .to_owned(),
            backend: forwarded.then(|| {
                self.backends
                    .get(&e.backend_id)
                    .cloned()
                    .unwrap_or_else(|| format!("#{}", e.backend_id))
            }),
            algorithm: match e.algorithm {
                ALGORITHM_MAGLEV => "maglev",
                ALGORITHM_LEAST_CONN => "least-conn",
                _ => "weighted",
            }
            .to_owned(),
            slot: (forwarded && e.affinity_hit == 0).then_some(e.slot),
            affinity_hit: e.affinity_hit != 0,
            cgroup_id: e.cgroup_id,
            client: e.client,
            identity: (e.identity != 0).then(|| {
                self.reconciler
                    .identity_name(e.identity)
                    .map_or_else(|| format!("#{}", e.identity), str::to_owned)
            }),
        }
    }
}

fn unix_ms() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i128)
}

fn monotonic_ms() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer. bpf_ktime_get_ns() is CLOCK_MONOTONIC.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    i128::from(ts.tv_sec) * 1000 + i128::from(ts.tv_nsec) / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_namespace_cookie() {
        let a = own_netns_cookie().unwrap();
        assert_ne!(a, 0);
        assert_eq!(a, own_netns_cookie().unwrap(), "stable within a namespace");
    }
}
