//! `meshctl authz check`: what a service's policy says of one identity, as
//! the service's destination nodes evaluate it for tunnel streams.

use clap::Subcommand;

use super::{encode, table::Table};
use crate::identity::AuthzCheck;

#[derive(Subcommand, Debug)]
pub(super) enum AuthzCommand {
    /// Whether streams from identity FROM may reach SERVICE.
    Check {
        /// A workload SPIFFE ID (spiffe://<td>/ns/<ns>/sa/<sa>) or a short
        /// identity name; leave it out for a client without an identity.
        #[arg(long)]
        from: Option<String>,
        /// The service's name.
        #[arg(long)]
        to: String,
        /// Also check that a stream from this node may claim FROM at all.
        #[arg(long)]
        node: Option<String>,
    },
}

impl AuthzCommand {
    /// The admin API path that answers it.
    pub(super) fn path(&self) -> String {
        let AuthzCommand::Check { from, to, node } = self;
        let mut path = format!("{}?service={}", crate::admin::PATH_AUTHZ, encode(to));
        if let Some(from) = from {
            path += &format!("&from={}", encode(from));
        }
        if let Some(node) = node {
            path += &format!("&node={}", encode(node));
        }
        path
    }
}

pub(super) fn render(c: &AuthzCheck) -> String {
    let mut t = Table::new(["FIELD", "VALUE"]);
    t.row(["service", &c.service]);
    t.row([
        "from",
        c.from.as_deref().unwrap_or("(no workload identity)"),
    ]);
    t.row(["verdict", if c.allowed { "ALLOW" } else { "DENY" }]);
    t.row(["policy", &c.reason]);
    let hosts = if c.hosted_by.is_empty() {
        "(no node: no peer may claim it)".to_owned()
    } else {
        c.hosted_by.join(", ")
    };
    t.row(["claimable from", &hosts]);
    if let Some(claim) = &c.claim_from_node {
        t.row([&format!("claim from {}", claim.node), &claim.reason]);
    }
    t.render()
}
