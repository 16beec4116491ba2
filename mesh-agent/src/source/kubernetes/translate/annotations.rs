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

#[cfg(test)]
mod tests {
    use super::super::fixtures::{port, service};
    use super::super::{ThisNode, translate};
    use super::*;

    /// The settings of a Service annotated with `pairs`, through the whole
    /// translation.
    fn translated(pairs: &[(&str, &str)]) -> Result<Settings, String> {
        let mut svc = service("shop", "web", &["10.96.0.10"], &[port(None, "TCP", 80)]);
        svc.metadata.annotations = Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        let node = ThisNode {
            name: "node-a",
            zone: None,
        };
        let services = translate(&svc, [], &node).map_err(|e| e.to_string())?;
        let s = &services[0];
        Ok(Settings {
            algorithm: s.algorithm,
            mtls: s.mtls,
            health_check: s.health_check.clone(),
            drain_timeout_s: s.drain_timeout_s,
            same_node_redirect: s.same_node_redirect,
        })
    }

    fn check(kind: CheckKind, interval_ms: u32, timeout_ms: u32) -> Option<HealthCheck> {
        Some(HealthCheck {
            kind,
            interval_ms,
            timeout_ms,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            jitter_percent: 10,
        })
    }

    fn http(path: &str, expected_status: u16) -> CheckKind {
        CheckKind::Http {
            path: path.into(),
            expected_status,
        }
    }

    #[test]
    fn accepted_values() {
        let defaults = Settings::default();
        let table: Vec<(Vec<(&str, &str)>, Settings)> = vec![
            (vec![], defaults.clone()),
            // Annotations of others are none of mesh's business.
            (
                vec![("example.com/owner", "team-a"), ("mesh.dev.example/x", "1")],
                defaults.clone(),
            ),
            (
                vec![(ALGORITHM, "weighted")],
                Settings {
                    algorithm: Algorithm::Weighted,
                    ..defaults.clone()
                },
            ),
            (
                vec![(ALGORITHM, "maglev")],
                Settings {
                    algorithm: Algorithm::Maglev,
                    ..defaults.clone()
                },
            ),
            (
                vec![(ALGORITHM, "least-conn")],
                Settings {
                    algorithm: Algorithm::LeastConn,
                    ..defaults.clone()
                },
            ),
            (
                vec![(MTLS, "strict")],
                Settings {
                    mtls: Some(MtlsMode::Strict),
                    ..defaults.clone()
                },
            ),
            (
                vec![(MTLS, "permissive")],
                Settings {
                    mtls: Some(MtlsMode::Permissive),
                    ..defaults.clone()
                },
            ),
            (
                vec![(MTLS, "disabled")],
                Settings {
                    mtls: Some(MtlsMode::Disabled),
                    ..defaults.clone()
                },
            ),
            (
                vec![(HEALTH_CHECK, "tcp")],
                Settings {
                    health_check: check(CheckKind::Tcp, 5_000, 1_000),
                    ..defaults.clone()
                },
            ),
            (
                vec![(HEALTH_CHECK, "http")],
                Settings {
                    health_check: check(http("/", 200), 5_000, 1_000),
                    ..defaults.clone()
                },
            ),
            (
                vec![(HEALTH_CHECK, "http:/healthz?full=1")],
                Settings {
                    health_check: check(http("/healthz?full=1", 200), 5_000, 1_000),
                    ..defaults.clone()
                },
            ),
            (vec![(HEALTH_CHECK, "none")], defaults.clone()),
            (
                vec![
                    (HEALTH_CHECK, "http:/ready"),
                    (HEALTH_CHECK_INTERVAL_MS, "2000"),
                    (HEALTH_CHECK_TIMEOUT_MS, "1500"),
                    (HEALTH_CHECK_EXPECTED_STATUS, "204"),
                ],
                Settings {
                    health_check: check(http("/ready", 204), 2_000, 1_500),
                    ..defaults.clone()
                },
            ),
            // The bounds themselves; the timeout defaults to the interval
            // when that is under a second.
            (
                vec![(HEALTH_CHECK, "tcp"), (HEALTH_CHECK_INTERVAL_MS, "10")],
                Settings {
                    health_check: check(CheckKind::Tcp, 10, 10),
                    ..defaults.clone()
                },
            ),
            (
                vec![
                    (HEALTH_CHECK, "tcp"),
                    (HEALTH_CHECK_INTERVAL_MS, "3600000"),
                    (HEALTH_CHECK_TIMEOUT_MS, "60000"),
                ],
                Settings {
                    health_check: check(CheckKind::Tcp, 3_600_000, 60_000),
                    ..defaults.clone()
                },
            ),
            (
                vec![
                    (HEALTH_CHECK, "http"),
                    (HEALTH_CHECK_TIMEOUT_MS, "1"),
                    (HEALTH_CHECK_EXPECTED_STATUS, "599"),
                ],
                Settings {
                    health_check: check(http("/", 599), 5_000, 1),
                    ..defaults.clone()
                },
            ),
            (
                vec![(DRAIN_TIMEOUT_SECONDS, "0")],
                Settings {
                    drain_timeout_s: 0,
                    ..defaults.clone()
                },
            ),
            (
                vec![(DRAIN_TIMEOUT_SECONDS, "3600")],
                Settings {
                    drain_timeout_s: 3_600,
                    ..defaults.clone()
                },
            ),
            (
                vec![(SAME_NODE_REDIRECT, "false")],
                Settings {
                    same_node_redirect: false,
                    ..defaults.clone()
                },
            ),
            (
                vec![(SAME_NODE_REDIRECT, "true")],
                Settings {
                    same_node_redirect: true,
                    ..defaults.clone()
                },
            ),
        ];
        for (pairs, expected) in table {
            assert_eq!(translated(&pairs), Ok(expected), "{pairs:?}");
        }
        // Every known annotation at once.
        let all = translated(&[
            (ALGORITHM, "maglev"),
            (MTLS, "permissive"),
            (HEALTH_CHECK, "http:/healthz"),
            (HEALTH_CHECK_INTERVAL_MS, "1000"),
            (HEALTH_CHECK_TIMEOUT_MS, "200"),
            (HEALTH_CHECK_EXPECTED_STATUS, "200"),
            (DRAIN_TIMEOUT_SECONDS, "30"),
            (SAME_NODE_REDIRECT, "false"),
        ]);
        assert_eq!(
            all,
            Ok(Settings {
                algorithm: Algorithm::Maglev,
                mtls: Some(MtlsMode::Permissive),
                health_check: check(http("/healthz", 200), 1_000, 200),
                drain_timeout_s: 30,
                same_node_redirect: false,
            })
        );
    }

    /// Each rejected value: the message names the Service, the annotation
    /// and the value (escaped), and says what is accepted.
    #[test]
    fn rejected_values() {
        let known = KNOWN_ANNOTATIONS.join(", ");
        let path_rule = "http:<path> with a path that starts with '/' and is printable ASCII \
                         without spaces (percent-encode the rest)";
        let kinds = "tcp, http (GET /), http:<path> such as http:/healthz, none";
        let table: Vec<(Vec<(&str, &str)>, String)> = vec![
            (
                vec![("mesh.dev/algorithim", "maglev")],
                format!(
                    "annotation \"mesh.dev/algorithim\" is not one mesh knows; remove it or fix \
                     its spelling (known: {known})"
                ),
            ),
            (
                vec![(ALGORITHM, "round-robin")],
                "annotation mesh.dev/algorithm is \"round-robin\"; accepted: weighted, maglev, \
                 least-conn"
                    .into(),
            ),
            (
                vec![(ALGORITHM, "Maglev")],
                "annotation mesh.dev/algorithm is \"Maglev\"; accepted: weighted, maglev, \
                 least-conn"
                    .into(),
            ),
            (
                vec![(MTLS, "mutual")],
                "annotation mesh.dev/mtls is \"mutual\"; accepted: strict, permissive, disabled"
                    .into(),
            ),
            (
                vec![(HEALTH_CHECK, "grpc")],
                format!("annotation mesh.dev/health-check is \"grpc\"; accepted: {kinds}"),
            ),
            (
                vec![(HEALTH_CHECK, "http:healthz")],
                format!(
                    "annotation mesh.dev/health-check is \"http:healthz\"; accepted: {path_rule}"
                ),
            ),
            (
                vec![(HEALTH_CHECK, "http:/a\r\nHost: evil")],
                format!(
                    "annotation mesh.dev/health-check is \"http:/a\\r\\nHost: evil\"; \
                     accepted: {path_rule}"
                ),
            ),
            (
                vec![(HEALTH_CHECK, "http:/a\0b")],
                format!(
                    "annotation mesh.dev/health-check is \"http:/a\\0b\"; accepted: {path_rule}"
                ),
            ),
            (
                vec![(HEALTH_CHECK, "http:/a b")],
                format!("annotation mesh.dev/health-check is \"http:/a b\"; accepted: {path_rule}"),
            ),
            (
                vec![(HEALTH_CHECK, "http:/caf\u{e9}")],
                format!(
                    "annotation mesh.dev/health-check is \"http:/caf\u{e9}\"; accepted: {path_rule}"
                ),
            ),
            (
                vec![(HEALTH_CHECK, "tcp"), (HEALTH_CHECK_INTERVAL_MS, "9")],
                "annotation mesh.dev/health-check-interval-ms is \"9\"; accepted: 10 to 3600000 ms"
                    .into(),
            ),
            (
                vec![(HEALTH_CHECK, "tcp"), (HEALTH_CHECK_INTERVAL_MS, "3600001")],
                "annotation mesh.dev/health-check-interval-ms is \"3600001\"; accepted: 10 to \
                 3600000 ms"
                    .into(),
            ),
            (
                vec![(HEALTH_CHECK, "tcp"), (HEALTH_CHECK_INTERVAL_MS, "5s")],
                "annotation mesh.dev/health-check-interval-ms is \"5s\"; accepted: 10 to 3600000 \
                 ms"
                .into(),
            ),
            (
                vec![(HEALTH_CHECK, "tcp"), (HEALTH_CHECK_TIMEOUT_MS, "0")],
                "annotation mesh.dev/health-check-timeout-ms is \"0\"; accepted: 1 to 60000 ms"
                    .into(),
            ),
            (
                vec![(HEALTH_CHECK, "tcp"), (HEALTH_CHECK_TIMEOUT_MS, "+5")],
                "annotation mesh.dev/health-check-timeout-ms is \"+5\"; accepted: 1 to 60000 ms"
                    .into(),
            ),
            (
                vec![
                    (HEALTH_CHECK, "tcp"),
                    (HEALTH_CHECK_INTERVAL_MS, "100"),
                    (HEALTH_CHECK_TIMEOUT_MS, "200"),
                ],
                "annotation mesh.dev/health-check-timeout-ms is 200 ms, longer than the check \
                 interval of 100 ms; a check must end before the next one starts, so lower the \
                 timeout or raise mesh.dev/health-check-interval-ms"
                    .into(),
            ),
            (
                vec![(HEALTH_CHECK, "http"), (HEALTH_CHECK_EXPECTED_STATUS, "99")],
                "annotation mesh.dev/health-check-expected-status is \"99\"; accepted: an HTTP \
                 status from 100 to 599"
                    .into(),
            ),
            (
                vec![
                    (HEALTH_CHECK, "http"),
                    (HEALTH_CHECK_EXPECTED_STATUS, "600"),
                ],
                "annotation mesh.dev/health-check-expected-status is \"600\"; accepted: an HTTP \
                 status from 100 to 599"
                    .into(),
            ),
            (
                vec![(HEALTH_CHECK, "tcp"), (HEALTH_CHECK_EXPECTED_STATUS, "200")],
                "annotation mesh.dev/health-check-expected-status is set, but the health check \
                 is tcp; use mesh.dev/health-check: http:<path> or remove it"
                    .into(),
            ),
            (
                vec![(HEALTH_CHECK_INTERVAL_MS, "1000")],
                "annotation mesh.dev/health-check-interval-ms is set, but there is no health \
                 check; add mesh.dev/health-check (tcp or http:<path>) or remove it"
                    .into(),
            ),
            (
                vec![(HEALTH_CHECK, "none"), (HEALTH_CHECK_TIMEOUT_MS, "100")],
                "annotation mesh.dev/health-check-timeout-ms is set, but there is no health \
                 check; add mesh.dev/health-check (tcp or http:<path>) or remove it"
                    .into(),
            ),
            (
                vec![(DRAIN_TIMEOUT_SECONDS, "3601")],
                "annotation mesh.dev/drain-timeout-seconds is \"3601\"; accepted: 0 to 3600 \
                 seconds"
                    .into(),
            ),
            (
                vec![(DRAIN_TIMEOUT_SECONDS, "-1")],
                "annotation mesh.dev/drain-timeout-seconds is \"-1\"; accepted: 0 to 3600 seconds"
                    .into(),
            ),
            (
                vec![(DRAIN_TIMEOUT_SECONDS, "")],
                "annotation mesh.dev/drain-timeout-seconds is \"\"; accepted: 0 to 3600 seconds"
                    .into(),
            ),
            (
                vec![(DRAIN_TIMEOUT_SECONDS, "99999999999")],
                "annotation mesh.dev/drain-timeout-seconds is \"99999999999\"; accepted: 0 to \
                 3600 seconds"
                    .into(),
            ),
            (
                vec![(SAME_NODE_REDIRECT, "yes")],
                "annotation mesh.dev/same-node-redirect is \"yes\"; accepted: true, false".into(),
            ),
            (
                vec![(SAME_NODE_REDIRECT, "True")],
                "annotation mesh.dev/same-node-redirect is \"True\"; accepted: true, false".into(),
            ),
        ];
        for (pairs, message) in table {
            let got = translated(&pairs).expect_err(&format!("{pairs:?} is rejected"));
            assert_eq!(got, format!("Service shop/web: {message}"), "{pairs:?}");
        }
    }
}
