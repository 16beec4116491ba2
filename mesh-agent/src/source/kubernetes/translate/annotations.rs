//! Mesh settings of a Service from its `mesh.dev/*` annotations, checked
//! with the bounds and spellings of the config file (`config.rs`).

use std::collections::BTreeMap;

use super::Problem;
use crate::state::{Algorithm, CheckKind, HealthCheck, MtlsMode};

pub(super) const PREFIX: &str = "mesh.dev/";
pub(super) const ALGORITHM: &str = "mesh.dev/algorithm";
pub(super) const MTLS: &str = "mesh.dev/mtls";
pub(super) const HEALTH_CHECK: &str = "mesh.dev/health-check";
pub(super) const HEALTH_CHECK_INTERVAL_MS: &str = "mesh.dev/health-check-interval-ms";
pub(super) const HEALTH_CHECK_TIMEOUT_MS: &str = "mesh.dev/health-check-timeout-ms";
pub(super) const HEALTH_CHECK_EXPECTED_STATUS: &str = "mesh.dev/health-check-expected-status";
pub(super) const DRAIN_TIMEOUT_SECONDS: &str = "mesh.dev/drain-timeout-seconds";
pub(super) const SAME_NODE_REDIRECT: &str = "mesh.dev/same-node-redirect";

/// Every `mesh.dev/*` annotation mesh reads; any other is an error.
pub const KNOWN_ANNOTATIONS: &[&str] = &[
    ALGORITHM,
    MTLS,
    HEALTH_CHECK,
    HEALTH_CHECK_INTERVAL_MS,
    HEALTH_CHECK_TIMEOUT_MS,
    HEALTH_CHECK_EXPECTED_STATUS,
    DRAIN_TIMEOUT_SECONDS,
    SAME_NODE_REDIRECT,
];

/// The settings a Service's annotations give; each as the config file's
/// default when its annotation is absent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Settings {
    pub algorithm: Algorithm,
    /// `None`: the mesh's default mode.
    pub mtls: Option<MtlsMode>,
    pub health_check: Option<HealthCheck>,
    pub drain_timeout_s: u32,
    pub same_node_redirect: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Weighted,
            mtls: None,
            health_check: None,
            drain_timeout_s: 0,
            same_node_redirect: true,
        }
    }
}

pub(super) fn settings(
    annotations: Option<&BTreeMap<String, String>>,
) -> Result<Settings, Problem> {
    let Some(annotations) = annotations else {
        return Ok(Settings::default());
    };
    if let Some(key) = annotations
        .keys()
        .find(|key| key.starts_with(PREFIX) && !KNOWN_ANNOTATIONS.contains(&key.as_str()))
    {
        return Err(Problem::UnknownAnnotation { key: key.clone() });
    }
    let get = |key: &'static str| annotations.get(key).map(|value| (key, value.as_str()));
    let mut settings = Settings::default();
    if let Some((key, value)) = get(ALGORITHM) {
        // The model's own spellings, as the config file accepts them.
        settings.algorithm = [Algorithm::Weighted, Algorithm::Maglev, Algorithm::LeastConn]
            .into_iter()
            .find(|a| a.to_string() == value)
            .ok_or_else(|| bad(key, value, "weighted, maglev, least-conn"))?;
    }
    if let Some((key, value)) = get(MTLS) {
        settings.mtls = Some(
            [MtlsMode::Strict, MtlsMode::Permissive, MtlsMode::Disabled]
                .into_iter()
                .find(|m| m.to_string() == value)
                .ok_or_else(|| bad(key, value, "strict, permissive, disabled"))?,
        );
    }
    settings.health_check = health_check(&get)?;
    if let Some((key, value)) = get(DRAIN_TIMEOUT_SECONDS) {
        settings.drain_timeout_s = bounded(key, value, 0..=3_600, "0 to 3600 seconds")?;
    }
    if let Some((key, value)) = get(SAME_NODE_REDIRECT) {
        settings.same_node_redirect = match value {
            "true" => true,
            "false" => false,
            _ => return Err(bad(key, value, "true, false")),
        };
    }
    Ok(settings)
}

/// `mesh.dev/health-check` (`tcp`, `http`, `http:<path>` or `none`) and
/// the annotations that tune it. Thresholds and jitter are the config
/// file's defaults.
fn health_check<'a>(
    get: &impl Fn(&'static str) -> Option<(&'static str, &'a str)>,
) -> Result<Option<HealthCheck>, Problem> {
    const KINDS: &str = "tcp, http (GET /), http:<path> such as http:/healthz, none";
    let kind = match get(HEALTH_CHECK) {
        None | Some((_, "none")) => None,
        Some((_, "tcp")) => Some(None),
        Some((_, "http")) => Some(Some("/")),
        Some((key, value)) => match value.strip_prefix("http:") {
            Some(path) if valid_path(path) => Some(Some(path)),
            Some(_) => {
                return Err(bad(
                    key,
                    value,
                    "http:<path> with a path that starts with '/' and is printable ASCII \
                     without spaces (percent-encode the rest)",
                ));
            }
            None => return Err(bad(key, value, KINDS)),
        },
    };
    // Tuning without a check is a mistake worth saying, not ignoring.
    let Some(http_path) = kind else {
        for key in [
            HEALTH_CHECK_INTERVAL_MS,
            HEALTH_CHECK_TIMEOUT_MS,
            HEALTH_CHECK_EXPECTED_STATUS,
        ] {
            if get(key).is_some() {
                return Err(Problem::AnnotationWithout {
                    key,
                    needs: "there is no health check",
                    remedy: "add mesh.dev/health-check (tcp or http:<path>) or remove it",
                });
            }
        }
        return Ok(None);
    };
    let interval_ms = match get(HEALTH_CHECK_INTERVAL_MS) {
        Some((key, value)) => bounded(key, value, 10..=3_600_000, "10 to 3600000 ms")?,
        None => 5_000,
    };
    let timeout_ms = match get(HEALTH_CHECK_TIMEOUT_MS) {
        Some((key, value)) => bounded(key, value, 1..=60_000, "1 to 60000 ms")?,
        None => interval_ms.min(1_000),
    };
    if timeout_ms > interval_ms {
        return Err(Problem::TimeoutOverInterval {
            timeout: timeout_ms,
            interval: interval_ms,
        });
    }
    let expected = get(HEALTH_CHECK_EXPECTED_STATUS);
    let kind = match http_path {
        Some(path) => CheckKind::Http {
            path: path.to_owned(),
            expected_status: match expected {
                Some((key, value)) => {
                    bounded(key, value, 100..=599, "an HTTP status from 100 to 599")? as u16
                }
                None => 200,
            },
        },
        None if expected.is_some() => {
            return Err(Problem::AnnotationWithout {
                key: HEALTH_CHECK_EXPECTED_STATUS,
                needs: "the health check is tcp",
                remedy: "use mesh.dev/health-check: http:<path> or remove it",
            });
        }
        None => CheckKind::Tcp,
    };
    Ok(Some(HealthCheck {
        kind,
        interval_ms,
        timeout_ms,
        healthy_threshold: 2,
        unhealthy_threshold: 3,
        jitter_percent: 10,
    }))
}

/// A path the probe can put in its request line as it is: it starts with
/// '/', and holds only printable ASCII without spaces (no CR, LF or NUL
/// to split the request, no space to end it early).
fn valid_path(path: &str) -> bool {
    path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic())
}

/// A whole number in `range`, written in decimal digits only.
fn bounded(
    key: &'static str,
    value: &str,
    range: std::ops::RangeInclusive<u32>,
    accepted: &'static str,
) -> Result<u32, Problem> {
    if !value.is_empty()
        && value.bytes().all(|b| b.is_ascii_digit())
        && let Ok(n) = value.parse::<u32>()
        && range.contains(&n)
    {
        return Ok(n);
    }
    Err(bad(key, value, accepted))
}

fn bad(key: &'static str, value: &str, accepted: &'static str) -> Problem {
    Problem::BadAnnotation {
        key,
        value: value.to_owned(),
        accepted,
    }
}
