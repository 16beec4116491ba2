//! `meshctl tunnels`: this node's identity and its tunnel connections.

use std::time::{SystemTime, UNIX_EPOCH};

use super::table::Table;
use crate::admin::TunnelsResponse;
use crate::identity::ca::format_unix;

pub fn render(r: &TunnelsResponse) -> String {
    let mut out = String::new();
    let Some(cert) = r.certificate.as_ref().filter(|_| r.enabled) else {
        return format!(
            "node {}: tunnel off (no --identity-dir); strict services' backends on other nodes are refused\n",
            r.node
        );
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    out.push_str(&format!(
        "node {} as {}, certificate {} expires {} (in {})\n\n",
        r.node,
        cert.spiffe_id,
        cert.serial,
        format_unix(cert.not_after),
        human_secs(cert.not_after - now)
    ));
    let mut t = Table::new([
        "PEER",
        "CONN",
        "DIR",
        "ADDRESS",
        "AGE",
        "STREAMS",
        "SENT",
        "RECEIVED",
        "CERT EXPIRES",
    ]);
    if r.peers.is_empty() {
        t.row(["(none)", "-", "-", "-", "-", "-", "-", "-", "-"]);
    }
    for peer in &r.peers {
        t.row([
            peer.node.as_str(),
            &format!("{} conns", peer.connections),
            "",
            "",
            "",
            &peer.streams.to_string(),
            &bytes(peer.bytes_sent),
            &bytes(peer.bytes_received),
            "",
        ]);
        for c in &peer.conns {
            let expires = c
                .local_cert_not_after_unix
                .map_or("-".to_owned(), |at| human_secs(at as i64 - now));
            let direction = if let Some(why) = &c.retired {
                format!("{:?} (retired: {why})", c.direction).to_lowercase()
            } else if c.draining {
                format!("{:?} (draining)", c.direction).to_lowercase()
            } else {
                format!("{:?}", c.direction).to_lowercase()
            };
            t.row([
                "",
                &format!("#{}", c.id),
                &direction,
                &c.peer_addr.to_string(),
                &human_secs(c.age_secs as i64),
                &c.streams.to_string(),
                &bytes(c.bytes_sent),
                &bytes(c.bytes_received),
                &format!("in {expires}"),
            ]);
        }
    }
    out.push_str(&t.render());
    out
}

fn human_secs(secs: i64) -> String {
    match secs {
        s if s < 0 => "expired".to_owned(),
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h{}m", s / 3600, s % 3600 / 60),
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n < 10 * 1024 => format!("{n} B"),
        n if n < 10 * 1024 * 1024 => format!("{} KiB", n / 1024),
        n => format!("{} MiB", n / (1024 * 1024)),
    }
}
