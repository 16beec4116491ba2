//! `meshctl certs`: the identities this node holds, their validity and the
//! state of their reloads.

use std::time::{SystemTime, UNIX_EPOCH};

use super::table::Table;
use crate::admin::CertsResponse;
use crate::identity::ca::format_unix;

pub fn render(r: &CertsResponse) -> String {
    if r.identities.is_empty() {
        return format!(
            "node {}: no identity (no --identity-dir); the tunnel is off\n",
            r.node
        );
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut t = Table::new([
        "KIND",
        "SPIFFE ID",
        "SERIAL",
        "NOT AFTER",
        "LEFT",
        "GENERATION",
        "LAST RELOAD",
        "STATE",
    ]);
    for id in &r.identities {
        let state = if id.reload.last_error.is_some() {
            "reload failing"
        } else if id.cert.not_after <= now {
            "expired"
        } else {
            "ok"
        };
        t.row([
            id.kind.as_str(),
            &id.cert.spiffe_id.to_string(),
            &id.cert.serial,
            &format_unix(id.cert.not_after),
            &left(id.cert.not_after - now),
            &id.cert.generation.to_string(),
            &id.reload
                .last_reload_unix
                .map_or("-".to_owned(), |at| ago(now - at)),
            state,
        ]);
    }
    let mut out = format!("node {}\n\n{}", r.node, t.render());
    if !r.workloads.is_empty() {
        let mut w = Table::new([
            "WORKLOAD",
            "SPIFFE ID (claimed per stream)",
            "CGROUP",
            "PEERS BELIEVE IT",
        ]);
        for s in &r.workloads {
            w.row([
                s.workload.as_str(),
                &s.spiffe_id,
                &s.cgroup,
                if s.claimable {
                    "yes"
                } else {
                    "no: `workloads:` names no node for it (401 not_hosted)"
                },
            ]);
        }
        out.push('\n');
        out.push_str(&w.render());
    }
    for id in &r.identities {
        out.push_str(&format!("\n{}\n", id.cert.spiffe_id));
        out.push_str(&format!("  subject:     {}\n", id.cert.subject));
        out.push_str(&format!("  issuer:      {}\n", id.cert.issuer));
        out.push_str(&format!(
            "  valid:       {} .. {}\n",
            format_unix(id.cert.not_before),
            format_unix(id.cert.not_after)
        ));
        out.push_str(&format!("  files:       {}\n", id.cert.dir.display()));
        out.push_str(&format!(
            "  bundle:      {} root(s)\n",
            id.cert.bundle_roots
        ));
        for subject in &id.cert.bundle_subjects {
            out.push_str(&format!("                {subject}\n"));
        }
        out.push_str(&format!(
            "  reloads:     {} ok, {} failed\n",
            id.reload.reloads_ok, id.reload.reloads_failed
        ));
        if let Some(error) = &id.reload.last_error {
            let reason = id.reload.last_error_reason.as_deref().unwrap_or("?");
            let when = id
                .reload
                .last_error_unix
                .map_or(String::new(), |at| format!(", {}", ago(now - at)));
            out.push_str(&format!("  last error:  [{reason}{when}] {error}\n"));
            let retry = id
                .reload
                .next_retry_unix
                .map_or("on the next change of the files".to_owned(), |at| {
                    format!("in {} (and on the next change)", left(at - now))
                });
            out.push_str(&format!("  next retry:  {retry}\n"));
        }
    }
    out
}

fn left(secs: i64) -> String {
    match secs {
        s if s < 0 => "expired".to_owned(),
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h{}m", s / 3600, s % 3600 / 60),
    }
}

fn ago(secs: i64) -> String {
    match secs.max(0) {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s => format!("{}h{}m ago", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{CertInfo, HeldIdentity, ReloadStatus, SpiffeId};

    #[test]
    fn shows_each_identity_and_a_failing_reload() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let id = HeldIdentity {
            kind: "node".into(),
            cert: CertInfo {
                spiffe_id: "spiffe://mesh.test/node/a".parse::<SpiffeId>().unwrap(),
                serial: "01:02".into(),
                subject: "CN=a".into(),
                issuer: "CN=mesh root CA".into(),
                not_before: now - 10,
                not_after: now + 3600,
                bundle_roots: 2,
                bundle_subjects: vec!["CN=old root".into(), "CN=new root".into()],
                dir: "/etc/mesh/identity".into(),
                generation: 3,
            },
            expires_in_secs: 3600,
            reload: ReloadStatus {
                last_reload_unix: Some(now - 5),
                reloads_ok: 2,
                reloads_failed: 1,
                last_error: Some("cert.pem: holds no certificate".into()),
                last_error_reason: Some("bad_file".into()),
                last_error_unix: Some(now),
                failures: 1,
                next_retry_unix: Some(now + 2),
            },
        };
        let text = render(&CertsResponse {
            node: "a".into(),
            identities: vec![id],
            workloads: vec![crate::admin::SpokenIdentity {
                workload: "frontend".into(),
                spiffe_id: "spiffe://mesh.test/ns/default/sa/frontend".into(),
                cgroup: "/sys/fs/cgroup/f".into(),
                claimable: false,
            }],
        });
        for want in [
            "spiffe://mesh.test/ns/default/sa/frontend",
            "401 not_hosted",
            "spiffe://mesh.test/node/a",
            "01:02",
            "reload failing",
            "CN=new root",
            "[bad_file",
            "cert.pem: holds no certificate",
            "next retry:  in ",
            "2 ok, 1 failed",
        ] {
            assert!(text.contains(want), "{want:?} missing in\n{text}");
        }
        let none = render(&CertsResponse {
            node: "a".into(),
            identities: vec![],
            workloads: vec![],
        });
        assert!(none.contains("no identity"), "{none}");
    }
}
