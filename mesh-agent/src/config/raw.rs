//! The file as written: serde structs that mirror the YAML. Every field is
//! optional and spanned so that `validate` can report what is missing or wrong
//! together with the line and column it came from.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use serde_saphyr::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub services: Option<Vec<Spanned<RawService>>>,
    pub workloads: Option<Vec<Spanned<RawWorkload>>>,
    pub mesh: Option<Spanned<RawMesh>>,
    pub nodes: Option<Spanned<Vec<Spanned<RawNode>>>>,
}

/// Mesh-wide settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMesh {
    pub mtls: Option<Spanned<String>>,
}

/// One node of the mesh, as the tunnel reaches its agent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    pub name: Option<Spanned<String>>,
    pub address: Option<Spanned<String>>,
    pub tunnel_port: Option<Spanned<Int>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub name: Option<Spanned<String>>,
    pub vip: Option<Spanned<String>>,
    pub port: Option<Spanned<Int>>,
    pub protocol: Option<Spanned<String>>,
    pub algorithm: Option<Spanned<String>>,
    pub allow_empty: Option<bool>,
    pub drain_timeout_seconds: Option<Spanned<Int>>,
    pub destroy_on_removal: Option<bool>,
    pub health_check: Option<Spanned<RawHealthCheck>>,
    pub outlier_detection: Option<Spanned<RawOutlier>>,
    pub panic_mode: Option<Spanned<String>>,
    pub affinity: Option<bool>,
    pub affinity_timeout_seconds: Option<Spanned<Int>>,
    pub policy: Option<Spanned<RawPolicy>>,
    pub same_node_redirect: Option<bool>,
    pub mtls: Option<Spanned<String>>,
    pub backends: Option<Spanned<Vec<Spanned<RawBackend>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealthCheck {
    #[serde(rename = "type")]
    pub kind: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub expected_status: Option<Spanned<Int>>,
    pub interval_ms: Option<Spanned<Int>>,
    pub timeout_ms: Option<Spanned<Int>>,
    pub healthy_threshold: Option<Spanned<Int>>,
    pub unhealthy_threshold: Option<Spanned<Int>>,
    pub jitter_percent: Option<Spanned<Int>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutlier {
    pub consecutive_failures: Option<Spanned<Int>>,
    pub ejection_ms: Option<Spanned<Int>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub default: Option<Spanned<String>>,
    pub allow: Option<Vec<Spanned<String>>>,
    pub deny: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorkload {
    pub name: Option<Spanned<String>>,
    pub cgroup: Option<Spanned<String>>,
    pub identity: Option<Spanned<String>>,
    pub node: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub address: Option<Spanned<String>>,
    pub port: Option<Spanned<Int>>,
    pub weight: Option<Spanned<Int>>,
    pub state: Option<Spanned<String>>,
    pub node: Option<Spanned<String>>,
}

/// An integer field as written. Accepting any scalar here, instead of `u16`,
/// lets validation say "port 70000 is out of range" rather than serde's
/// "invalid u16".
#[derive(Debug)]
pub(super) enum Int {
    Value(i128),
    /// Not a whole number; what was written, for the message.
    Other(String),
}

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(IntVisitor)
    }
}

struct IntVisitor;

impl Visitor<'_> for IntVisitor {
    type Value = Int;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an integer")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Int, E> {
        Ok(Int::Value(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Int, E> {
        Ok(Int::Value(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Int, E> {
        // The YAML layer hands integers beyond u64 over as floats; keep them
        // integers so they get the "out of range" message.
        if v.is_finite() && v.fract() == 0.0 && v.abs() >= 2f64.powi(63) {
            Ok(Int::Value(v as i128))
        } else {
            Ok(Int::Other(format!("{v:?}")))
        }
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Int, E> {
        Ok(Int::Other(v.to_string()))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Int, E> {
        Ok(Int::Other(format!("'{}'", v.escape_debug())))
    }
}
