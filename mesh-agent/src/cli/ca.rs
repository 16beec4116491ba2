//! `meshctl ca`: the mesh CA on the operator's machine. `init` makes the
//! root, `issue` signs a node certificate into a directory the agent loads
//! (`--identity-dir`; in Kubernetes the node's `/etc/mesh/identity`), `show` describes either kind
//! of directory. Private keys are written 0600 and never printed.

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use clap::Subcommand;

use super::{CliError, Output, render};
use crate::identity::ca::{self, CertSummary, Subject, Validity};
use crate::identity::{IdentityError, NodeCredentials, SpiffeId};

#[derive(Subcommand, Debug)]
pub(super) enum CaCommand {
    /// Create the mesh root CA (ca.pem, ca-key.pem). Run it on the operator's
    /// machine: the root key never goes to a node.
    Init {
        /// Where to write ca.pem and ca-key.pem (created 0700 if missing).
        #[arg(long)]
        dir: PathBuf,
        /// The SPIFFE trust domain, e.g. cluster.local.
        #[arg(long)]
        trust_domain: String,
        /// Lifetime of the root.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Replace an existing CA (everything it issued stops being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate into OUT (cert.pem, key.pem, bundle.pem),
    /// replacing what is there: also how a node's identity is rotated.
    Issue {
        /// The directory `ca init` wrote.
        #[arg(long)]
        ca_dir: PathBuf,
        /// A node certificate: spiffe://<td>/node/NODE.
        #[arg(
            long,
            required_unless_present = "spiffe_id",
            conflicts_with = "spiffe_id"
        )]
        node: Option<String>,
        /// Any SPIFFE ID of the CA's trust domain.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// The identity directory to write.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime from now (notBefore is set 5 minutes back for clock skew).
        #[arg(long, default_value_t = 24, conflicts_with = "not_after_unix")]
        hours: u64,
        /// Testing only: an explicit notBefore, Unix seconds.
        #[arg(long, requires = "not_after_unix", hide = true)]
        not_before_unix: Option<u64>,
        /// Testing only: an explicit notAfter, Unix seconds (may lie in the past).
        #[arg(long, hide = true)]
        not_after_unix: Option<u64>,
        /// Testing only: sign a --spiffe-id of another trust domain (which
        /// every agent refuses).
        #[arg(long, hide = true, requires = "spiffe_id")]
        foreign_trust_domain: bool,
    },
    /// Describe a CA directory (ca.pem) or an identity directory (cert.pem,
    /// bundle.pem), and whether the agent would accept the latter.
    Show {
        #[arg(long)]
        dir: PathBuf,
    },
}

/// What `show` prints.
#[derive(serde::Serialize)]
struct ShowView {
    dir: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca: Option<CertSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<IdentityView>,
}

#[derive(serde::Serialize)]
struct IdentityView {
    cert: CertSummary,
    bundle: Vec<CertSummary>,
    /// "ok", or why the agent would refuse these files.
    status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
}

pub(super) fn execute(command: &CaCommand, out: Output) -> Result<String, CliError> {
    match command {
        CaCommand::Init {
            dir,
            trust_domain,
            days,
            force,
        } => {
            let summary = ca::init(&ca::InitOptions {
                dir: dir.clone(),
                trust_domain: trust_domain.clone(),
                days: *days,
                force: *force,
            })?;
            render(out, &summary, |s| {
                format!(
                    "mesh CA for trust domain {} (serial {}, valid until {})\n  \
                     certificate {}\n  private key {} (0600: keep it off the nodes)\n",
                    s.trust_domain,
                    s.serial,
                    utc(s.not_after),
                    s.cert.display(),
                    s.key.display()
                )
            })
        }
        CaCommand::Issue {
            ca_dir,
            node,
            spiffe_id,
            out: out_dir,
            hours,
            not_before_unix,
            not_after_unix,
            foreign_trust_domain,
        } => {
            let subject = match (node, spiffe_id) {
                (Some(node), _) => Subject::Node(node.clone()),
                (None, Some(id)) if *foreign_trust_domain => Subject::ForeignId(id.parse()?),
                (None, Some(id)) => Subject::Id(id.parse::<SpiffeId>()?),
                (None, None) => {
                    return Err(IdentityError::Ca {
                        what: "issue without a subject",
                        detail: "pass --node NAME or --spiffe-id ID".into(),
                    }
                    .into());
                }
            };
            let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(secs);
            let validity = match not_after_unix {
                Some(not_after) => Validity {
                    not_before: not_before_unix
                        .map(at)
                        .unwrap_or_else(|| Validity::from_now(Duration::ZERO).not_before),
                    not_after: at(*not_after),
                },
                None => Validity::from_now(Duration::from_secs(hours.saturating_mul(3600))),
            };
            let issued = ca::issue(&ca::IssueOptions {
                ca_dir: ca_dir.clone(),
                out: out_dir.clone(),
                subject,
                validity,
            })?;
            render(out, &issued, |i| {
                format!(
                    "issued {} (serial {}, valid {} to {})\n  {}\n  {} (0600)\n  {} ({} root{})\n",
                    i.spiffe_id,
                    i.serial,
                    utc(i.not_before),
                    utc(i.not_after),
                    i.cert.display(),
                    i.key.display(),
                    i.bundle.display(),
                    i.bundle_roots,
                    if i.bundle_roots == 1 { "" } else { "s" }
                )
            })
        }
        CaCommand::Show { dir } => {
            let view = show(dir)?;
            render(out, &view, render_show)
        }
    }
}

fn utc(secs: i64) -> String {
    crate::identity::ca::format_unix(secs)
}

fn show(dir: &Path) -> Result<ShowView, CliError> {
    let first = |path: &Path| -> Result<CertSummary, IdentityError> {
        Ok(ca::describe(path)?.into_iter().next().unwrap_or_default())
    };
    let ca_path = dir.join(ca::CA_CERT);
    let cert_path = dir.join(ca::CERT_FILE);
    let ca = match ca_path.exists() {
        true => Some(first(&ca_path)?),
        false => None,
    };
    let identity = match cert_path.exists() {
        false => None,
        true => {
            let (status, reason) = match NodeCredentials::load(dir) {
                Ok(_) => ("ok".to_owned(), None),
                Err(e) => (e.to_string(), Some(e.reason())),
            };
            Some(IdentityView {
                cert: first(&cert_path)?,
                bundle: ca::describe(&dir.join(ca::BUNDLE_FILE)).unwrap_or_default(),
                status,
                reason,
            })
        }
    };
    if ca.is_none() && identity.is_none() {
        return Err(IdentityError::BadFile {
            path: dir.to_owned(),
            problem: "holds neither ca.pem nor cert.pem".into(),
            hint: "point --dir at a `meshctl ca init` or `meshctl ca issue --out` directory",
        }
        .into());
    }
    Ok(ShowView {
        dir: dir.to_owned(),
        ca,
        identity,
    })
}

fn render_show(view: &ShowView) -> String {
    let block = |label: &str, c: &CertSummary| {
        format!(
            "{label}: {}\n  subject {}\n  issuer  {}\n  serial  {}\n  valid   {} to {}\n",
            c.spiffe_id
                .as_ref()
                .map_or("(no SPIFFE ID)".to_owned(), ToString::to_string),
            c.subject,
            c.issuer,
            c.serial,
            utc(c.not_before),
            utc(c.not_after)
        )
    };
    let mut text = String::new();
    if let Some(ca) = &view.ca {
        text += &block("CA", ca);
    }
    if let Some(id) = &view.identity {
        text += &block("certificate", &id.cert);
        text += &format!(
            "  bundle  {} root(s): {}\n  agent would load it: {}\n",
            id.bundle.len(),
            id.bundle
                .iter()
                .map(|r| r.subject.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            id.status
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::super::{Cli, Command};
    use super::*;

    fn run(args: &[&str]) -> Result<String, CliError> {
        let cli =
            Cli::try_parse_from(std::iter::once("meshctl").chain(args.iter().copied())).unwrap();
        match &cli.command {
            Command::Ca(command) => execute(command, cli.output),
            other => panic!("not a ca command: {other:?}"),
        }
    }

    #[test]
    fn init_issue_show_through_the_command_line() {
        let base = std::env::temp_dir().join(format!("mesh-cli-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (ca_dir, node_dir) = (base.join("ca"), base.join("n1"));
        let (ca_s, node_s) = (ca_dir.to_str().unwrap(), node_dir.to_str().unwrap());

        let text = run(&[
            "ca",
            "init",
            "--dir",
            ca_s,
            "--trust-domain",
            "cluster.local",
        ])
        .unwrap();
        assert!(text.contains("trust domain cluster.local"), "{text}");
        assert!(!text.contains("PRIVATE"), "{text}");
        let again = run(&[
            "ca",
            "init",
            "--dir",
            ca_s,
            "--trust-domain",
            "cluster.local",
        ]);
        assert!(matches!(again, Err(CliError::Identity(ref e)) if e.reason() == "exists"));

        let text = run(&[
            "ca", "issue", "--ca-dir", ca_s, "--node", "n1", "--out", node_s,
        ])
        .unwrap();
        assert!(text.contains("spiffe://cluster.local/node/n1"), "{text}");
        assert!(!text.contains("PRIVATE"), "{text}");
        let json = run(&["-o", "json", "ca", "show", "--dir", node_s]).unwrap();
        let view: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(view["identity"]["status"], "ok");
        assert_eq!(
            view["identity"]["cert"]["spiffe_id"],
            "spiffe://cluster.local/node/n1"
        );

        // An explicitly expired certificate, for tests of rejection.
        let past = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            - 3600;
        let (nb, na) = ((past - 3600).to_string(), past.to_string());
        run(&[
            "ca",
            "issue",
            "--ca-dir",
            ca_s,
            "--node",
            "n1",
            "--out",
            node_s,
            "--not-before-unix",
            &nb,
            "--not-after-unix",
            &na,
        ])
        .unwrap();
        let json = run(&["-o", "json", "ca", "show", "--dir", node_s]).unwrap();
        let view: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(view["identity"]["reason"], "expired");

        let err = run(&[
            "ca",
            "issue",
            "--ca-dir",
            ca_s,
            "--spiffe-id",
            "spiffe://x/y?z",
            "--out",
            node_s,
        ]);
        assert!(matches!(err, Err(CliError::Identity(ref e)) if e.reason() == "invalid_spiffe_id"));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
