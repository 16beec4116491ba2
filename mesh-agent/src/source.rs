//! Where the desired state comes from: the one interface the agent's loop
//! consumes. A source yields changes of the desired model (`Update`s); the
//! loop applies them and commits, and never knows which source it runs.
//!
//! - `file` (the default): the YAML file or directory of `config/`.
//! - `kubernetes`: Services, EndpointSlices, Pods and this Node from the
//!   Kubernetes API (kube-rs watchers).

pub mod file;
pub mod kubernetes;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{ConfigError, Scope};
use crate::state::ServiceSet;

pub use crate::config::Update;
pub use file::{FileChanges, FileSource};
pub use kubernetes::{KubeChanges, KubeError, KubeOptions, KubeSource, ViewHandle};

/// Which source to run, and how (`--source`).
#[derive(Clone, Debug)]
pub enum SourceOptions {
    /// A YAML file or a directory of them; changes are noticed with inotify
    /// (when `inotify`) and a poll every `interval`.
    File {
        path: PathBuf,
        inotify: bool,
        interval: Duration,
    },
    /// The Kubernetes API.
    Kubernetes(KubeOptions),
}

/// The source the agent runs: what it said last, and what was committed.
// One per agent: boxing the larger variant would only add noise.
#[allow(clippy::large_enum_variant)]
pub enum Source {
    File(FileSource),
    Kubernetes(KubeSource),
}

/// How the agent's loop learns that the source may have changed. The loop
/// owns it, apart from the source, so waiting never holds the agent's lock.
pub enum Changes {
    File(FileChanges),
    Kubernetes(KubeChanges),
}

/// Something in the source may have changed; what to read again.
pub struct Changed(Scope);

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("kubernetes: {0}")]
    Kubernetes(#[from] KubeError),
}

impl Source {
    /// Opens the source and reads it for the first time (Kubernetes: waits
    /// until every kind has been listed). An error here is fatal: there is
    /// no earlier state to keep serving.
    pub async fn open(
        opts: &SourceOptions,
        metrics: &crate::metrics::Metrics,
    ) -> Result<(Self, Update), SourceError> {
        match opts {
            SourceOptions::File {
                path,
                inotify,
                interval,
            } => {
                let (source, first) = FileSource::open(path, *inotify, *interval)?;
                Ok((Self::File(source), first))
            }
            SourceOptions::Kubernetes(kube) => {
                let (source, first) = KubeSource::open(kube, metrics.kubernetes.clone()).await?;
                metrics.add_readiness_check(Box::new(source.readiness()));
                Ok((Self::Kubernetes(source), first))
            }
        }
    }

    /// Starts noticing changes.
    pub fn changes(&self) -> std::io::Result<Changes> {
        match self {
            Self::File(s) => Ok(Changes::File(s.changes()?)),
            Self::Kubernetes(s) => Ok(Changes::Kubernetes(s.changes())),
        }
    }

    /// The last state committed: what the kernel was built from.
    pub fn current(&self) -> &ServiceSet {
        match self {
            Self::File(s) => s.current(),
            Self::Kubernetes(s) => s.current(),
        }
    }

    /// Makes `update` the committed state (after the agent applied it).
    pub fn commit(&mut self, update: Update) {
        match self {
            Self::File(s) => s.commit(update),
            Self::Kubernetes(s) => s.commit(update),
        }
    }

    /// How to ask for the source's own view of every service, where it has
    /// one apart from what the agent accepted (Kubernetes), and the
    /// services whose change is on its way.
    pub fn view(&self) -> Option<(ViewHandle, BTreeSet<String>)> {
        match self {
            Self::File(_) => None,
            Self::Kubernetes(s) => Some((s.views(), s.in_flight())),
        }
    }

    /// What `meshctl status` shows as the configuration's origin.
    pub fn describe(&self) -> String {
        match self {
            Self::File(s) => s.path().display().to_string(),
            Self::Kubernetes(_) => "kubernetes".to_owned(),
        }
    }

    /// How the source differs from the committed state now (None: nothing
    /// worth an apply), or why what it holds is refused.
    pub fn load(&mut self, changed: &Changed) -> Option<Result<Update, SourceError>> {
        match self {
            Self::File(s) => s.load(&changed.0).map(|r| r.map_err(SourceError::from)),
            Self::Kubernetes(s) => Some(Ok(s.load())),
        }
    }
}

impl Changes {
    /// Waits until the source may have changed. Cancel-safe.
    pub async fn next(&mut self) -> Changed {
        match self {
            Self::File(c) => Changed(c.next().await),
            Self::Kubernetes(c) => {
                c.next().await;
                Changed(Scope::All)
            }
        }
    }
}
