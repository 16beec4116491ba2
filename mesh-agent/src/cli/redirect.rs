//! `meshctl redirect [on|off]`: same-node redirect's switch and counters.

use std::path::Path;

use clap::ValueEnum;

use super::table::Table;
use crate::admin::{self, AdminClientError, RedirectResponse, SetRedirectRequest};

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// Shows the state, after switching it when asked.
pub async fn execute(
    socket: &Path,
    switch: Option<Switch>,
) -> Result<RedirectResponse, AdminClientError> {
    match switch {
        None => admin::get(socket, admin::PATH_REDIRECT).await,
        Some(s) => {
            let body = SetRedirectRequest {
                enabled: s == Switch::On,
            };
            admin::post(socket, admin::PATH_REDIRECT, &body).await
        }
    }
}

fn list_or_none<T: std::fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "(none)".to_owned();
    }
    let items: Vec<String> = items.iter().map(ToString::to_string).collect();
    items.join(", ")
}

pub fn render(r: &RedirectResponse) -> String {
    let c = &r.counters;
    let mut t = Table::new(["FIELD", "VALUE"]);
    t.row(["enabled", &r.enabled.to_string()]);
    t.row(["sockets in map", &r.sockets_in_map.to_string()]);
    t.row([
        "sockets added / failed / skipped",
        &format!(
            "{} / {} / {}",
            c.sockets_added, c.sockets_failed, c.sockets_skipped
        ),
    ]);
    t.row([
        "redirected msgs / bytes",
        &format!("{} / {}", c.msgs_redirected, c.bytes_redirected),
    ]);
    t.row([
        "fallback msgs / bytes",
        &format!("{} / {}", c.msgs_fallback, c.bytes_fallback),
    ]);
    let addrs: Vec<String> = r.local_addresses.iter().map(|a| a.to_string()).collect();
    t.row([
        "local addresses",
        &if addrs.is_empty() {
            "(loopback only)".to_owned()
        } else {
            format!("loopback, {}", addrs.join(", "))
        },
    ]);
    t.row(["workload namespaces", &r.workload_namespaces.to_string()]);
    t.row(["excluded ports", &list_or_none(&r.exclude_ports)]);
    t.row(["excluded endpoints", &list_or_none(&r.excluded_endpoints)]);
    if !r.ambiguous_addresses.is_empty() {
        let amb: Vec<String> = r
            .ambiguous_addresses
            .iter()
            .map(|a| a.to_string())
            .collect();
        t.row(["ambiguous (not local)", &amb.join(", ")]);
    }
    t.render()
}
