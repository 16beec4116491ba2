//! The read-only view when no agent answers: what the pinned maps say the
//! kernel is doing right now. Names live only in the agent, so services are
//! shown by VIP and backends by address.

use std::net::SocketAddr;
use std::path::Path;

use mesh_common::{PROTO_TCP, SCHEMA_VERSION};

use super::{CliError, Output, table::Table};
use crate::admin::AdminClientError;
use crate::bpf::Maps;
use crate::reconcile::ip_from_words;

#[derive(serde::Serialize)]
struct OfflineService {
    frontend: String,
    protocol: &'static str,
    service_id: u32,
    slots: u32,
    connections: u64,
    no_backend: u64,
    backends: Vec<OfflineBackend>,
}

#[derive(serde::Serialize)]
struct OfflineBackend {
    address: String,
    active: bool,
    connections: u64,
    live: u64,
}

fn open(bpffs: &Path, unreachable: &AdminClientError) -> Result<Maps, CliError> {
    let dir = bpffs.join(format!("v{SCHEMA_VERSION}/maps"));
    Maps::from_pins(&dir).map_err(|e| {
        CliError::Offline(format!(
            "{unreachable}; and no pinned maps to read at {}: {e}",
            dir.display()
        ))
    })
}

fn banner(bpffs: &Path, unreachable: &AdminClientError) -> CliError {
    CliError::Offline(format!(
        "{unreachable}; the view above is read-only, from the maps pinned at {} (programs stay attached while no agent runs)",
        bpffs.display()
    ))
}

fn read(maps: &Maps) -> Vec<OfflineService> {
    let backends: Vec<_> = maps.backends.iter().filter_map(Result::ok).collect();
    let mut services: Vec<OfflineService> = maps
        .services
        .iter()
        .filter_map(Result::ok)
        .map(|(key, value)| {
            let stats = maps.service_stats(value.service_id);
            OfflineService {
                frontend: SocketAddr::new(
                    ip_from_words(key.family, key.addr),
                    u16::from_be(key.port),
                )
                .to_string(),
                protocol: if key.proto == PROTO_TCP { "tcp" } else { "udp" },
                service_id: value.service_id,
                slots: value.slot_count,
                connections: stats.connections + stats.udp_flows,
                no_backend: stats.no_backend,
                backends: backends
                    .iter()
                    .filter(|(_, b)| b.service_id == value.service_id)
                    .map(|(id, b)| OfflineBackend {
                        address: SocketAddr::new(
                            ip_from_words(b.family, b.addr),
                            u16::from_be(b.port),
                        )
                        .to_string(),
                        active: b.state == mesh_common::BACKEND_ACTIVE,
                        connections: {
                            let s = maps.backend_stats(*id);
                            s.connections + s.udp_flows
                        },
                        live: maps.backend_active(*id),
                    })
                    .collect(),
            }
        })
        .collect();
    services.sort_by(|a, b| a.frontend.cmp(&b.frontend));
    services
}

/// `meshctl services` without an agent.
pub fn services(
    bpffs: &Path,
    out: Output,
    unreachable: AdminClientError,
) -> Result<String, CliError> {
    let maps = open(bpffs, &unreachable)?;
    let services = read(&maps);
    let text = super::render(out, &services, |services| {
        let mut t = Table::new([
            "FRONTEND",
            "SERVICE ID",
            "SLOTS",
            "BACKEND",
            "ACTIVE",
            "CONNECTIONS",
            "LIVE",
        ]);
        for s in services {
            let frontend = format!("{}/{}", s.frontend, s.protocol);
            for (i, b) in s.backends.iter().enumerate() {
                let first = i == 0;
                t.row([
                    if first { &frontend } else { "" },
                    &if first {
                        s.service_id.to_string()
                    } else {
                        String::new()
                    },
                    &if first {
                        s.slots.to_string()
                    } else {
                        String::new()
                    },
                    &b.address,
                    &b.active.to_string(),
                    &b.connections.to_string(),
                    &b.live.to_string(),
                ]);
            }
        }
        t.render()
    })?;
    print!("{text}");
    Err(banner(bpffs, &unreachable))
}

/// `meshctl status` without an agent.
pub fn status(bpffs: &Path, unreachable: AdminClientError) -> Result<String, CliError> {
    let maps = open(bpffs, &unreachable)?;
    let services = read(&maps);
    let links = bpffs.join(format!("v{SCHEMA_VERSION}/links"));
    let programs: Vec<String> = std::fs::read_dir(&links)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut t = Table::new(["FIELD", "VALUE"]);
    t.row(["agent", "not running (read-only view from pinned maps)"]);
    t.row(["programs attached", &programs.join(", ")]);
    t.row(["services", &services.len().to_string()]);
    print!("{}", t.render());
    Err(banner(bpffs, &unreachable))
}
