//! A reader for the plainest form of one `services:` item, the form that
//! generated configs and most hand-written ones use:
//!
//! ```yaml
//!   - name: web
//!     vip: 10.96.0.1
//!     port: 80
//!     mtls: strict
//!     backends: [{address: 10.0.0.1, port: 8080, node: a}, {address: 10.0.0.2, port: 8080, node: b}]
//! ```
//!
//! Block mapping of plain scalars, `backends` as a one-line flow sequence of
//! flow mappings. It builds the same `RawService` the YAML library would and
//! the same validation runs on it. Anything it is not sure about (quotes,
//! nested mappings, policies, health checks, values that YAML might read as
//! another type, odd spacing) makes it give up, and the item goes through
//! the YAML library instead: it never decides differently, it only decides
//! faster (tens of times: the library spends ~60 µs on such an item).

use serde_saphyr::{Location, Spanned};

use super::raw::{Int, RawBackend, RawService};

fn spanned<T>(value: T) -> Spanned<T> {
    Spanned::new(value, Location::UNKNOWN, Location::UNKNOWN)
}

/// A plain scalar that YAML reads as a string and that needs no quoting:
/// letters, digits and `.`, `-`, `_`, `:` `/` (IP addresses, names), not a
/// number, boolean or null in any YAML schema.
fn plain_string(v: &str) -> Option<String> {
    let ok = !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:/".contains(&b))
        && v.as_bytes()[0].is_ascii_alphanumeric()
        && !v.ends_with(':')
        && !v.contains(": ")
        && v.parse::<f64>().is_err()
        && v.parse::<i128>().is_err()
        && !matches!(
            v.to_ascii_lowercase().as_str(),
            "null" | "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "inf" | "nan"
        )
        && !v.starts_with("0x")
        && !v.starts_with("0o")
        && !v.starts_with("0b");
    ok.then(|| v.to_owned())
}

/// Decimal digits without sign or leading zero.
fn plain_int(v: &str) -> Option<Int> {
    if v.is_empty() || v.len() > 18 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if v.len() > 1 && v.starts_with('0') {
        return None;
    }
    v.parse::<i128>().ok().map(Int::Value)
}

fn plain_bool(v: &str) -> Option<bool> {
    match v {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// Sets `slot` once; a second time means a duplicate key (let the library
/// report it).
fn set<T>(slot: &mut Option<T>, value: Option<T>) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value?);
    Some(())
}

/// `value` without a trailing ` # comment`, or None if it has other
/// spacing the library might read differently.
fn scalar(v: &str) -> Option<&str> {
    let v = match v.find(" #") {
        Some(i) => &v[..i],
        None => v,
    };
    let v = v.trim_end_matches(' ');
    (!v.is_empty() && !v.contains(' ') && !v.contains('#')).then_some(v)
}

/// `[{k: v, ...}, ...]`, all on one line.
fn backends(v: &str) -> Option<Vec<Spanned<RawBackend>>> {
    let v = match v.rfind(']') {
        Some(i) => {
            let after = v[i + 1..].trim_start_matches(' ');
            if !(after.is_empty() || after.starts_with('#')) {
                return None;
            }
            &v[..=i]
        }
        None => return None,
    };
    let inner = v.strip_prefix('[')?.strip_suffix(']')?.trim_matches(' ');
    let mut out = Vec::new();
    if inner.is_empty() {
        return Some(out);
    }
    let mut rest = inner;
    loop {
        let body_end = rest.find('}')?;
        let body = rest.strip_prefix('{')?.get(..body_end - 1)?;
        if body.contains(['{', '[', ']', '\'', '"', '#', '&', '*', '!', '|', '>']) {
            return None;
        }
        let mut b = RawBackend {
            address: None,
            port: None,
            weight: None,
            state: None,
            node: None,
        };
        for entry in body.split(',') {
            let (key, value) = entry.split_once(": ")?;
            let key = key.trim_matches(' ');
            let value = value.trim_matches(' ');
            if value.contains(' ') || value.contains(':') && key != "address" {
                return None;
            }
            match key {
                "address" => set(&mut b.address, plain_string(value).map(spanned))?,
                "port" => set(&mut b.port, plain_int(value).map(spanned))?,
                "weight" => set(&mut b.weight, plain_int(value).map(spanned))?,
                "state" => set(&mut b.state, plain_string(value).map(spanned))?,
                "node" => set(&mut b.node, plain_string(value).map(spanned))?,
                _ => return None,
            }
        }
        out.push(spanned(b));
        rest = &rest[body_end + 1..];
        if rest.is_empty() {
            return Some(out);
        }
        rest = rest.strip_prefix(',')?.trim_start_matches(' ');
        if !rest.starts_with('{') {
            return None;
        }
    }
}

/// One item as the YAML library would read it, or None when unsure.
pub(super) fn item(text: &str) -> Option<Spanned<RawService>> {
    let mut raw = RawService {
        name: None,
        vip: None,
        port: None,
        protocol: None,
        algorithm: None,
        allow_empty: None,
        drain_timeout_seconds: None,
        destroy_on_removal: None,
        health_check: None,
        outlier_detection: None,
        panic_mode: None,
        affinity: None,
        affinity_timeout_seconds: None,
        policy: None,
        same_node_redirect: None,
        mtls: None,
        backends: None,
    };
    let mut key_indent = None;
    let mut first = true;
    for line in text.lines() {
        let indent = line.bytes().take_while(|&b| b == b' ').count();
        let rest = &line[indent..];
        if rest.is_empty() || rest.starts_with('#') {
            continue;
        }
        let entry = if first {
            first = false;
            let entry = rest.strip_prefix("- ")?;
            let extra = entry.bytes().take_while(|&b| b == b' ').count();
            key_indent = Some(indent + 2 + extra);
            &entry[extra..]
        } else {
            if Some(indent) != key_indent {
                return None;
            }
            rest
        };
        let (key, value) = entry.split_once(": ")?;
        if key.contains([' ', '"', '\'', '{', '[', '?', '-', '#']) && key != "panic_mode" {
            return None;
        }
        let value = value.trim_start_matches(' ');
        if value.starts_with(['\'', '"', '{', '&', '*', '!', '|', '>', '%', '@', '`']) {
            return None;
        }
        match key {
            "name" => set(&mut raw.name, plain_string(scalar(value)?).map(spanned))?,
            "vip" => set(&mut raw.vip, plain_string(scalar(value)?).map(spanned))?,
            "port" => set(&mut raw.port, plain_int(scalar(value)?).map(spanned))?,
            "protocol" => set(&mut raw.protocol, plain_string(scalar(value)?).map(spanned))?,
            "algorithm" => set(
                &mut raw.algorithm,
                plain_string(scalar(value)?).map(spanned),
            )?,
            "panic_mode" => set(
                &mut raw.panic_mode,
                plain_string(scalar(value)?).map(spanned),
            )?,
            "mtls" => set(&mut raw.mtls, plain_string(scalar(value)?).map(spanned))?,
            "allow_empty" => set(&mut raw.allow_empty, plain_bool(scalar(value)?))?,
            "destroy_on_removal" => set(&mut raw.destroy_on_removal, plain_bool(scalar(value)?))?,
            "affinity" => set(&mut raw.affinity, plain_bool(scalar(value)?))?,
            "same_node_redirect" => set(&mut raw.same_node_redirect, plain_bool(scalar(value)?))?,
            "drain_timeout_seconds" => set(
                &mut raw.drain_timeout_seconds,
                plain_int(scalar(value)?).map(spanned),
            )?,
            "affinity_timeout_seconds" => set(
                &mut raw.affinity_timeout_seconds,
                plain_int(scalar(value)?).map(spanned),
            )?,
            "backends" if value.starts_with('[') => {
                set(&mut raw.backends, backends(value).map(spanned))?
            }
            _ => return None,
        }
    }
    if first {
        return None;
    }
    Some(spanned(raw))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;
    use crate::state::{Mesh, MtlsMode, Node};

    /// Two nodes, `node-a` and `web`, and the default mode `mode`.
    fn mesh(mode: MtlsMode) -> Mesh {
        let node = |name: &str, last: u8| Node {
            name: name.into(),
            address: std::net::IpAddr::from([10, 0, 0, last]),
            tunnel_port: 15008,
        };
        Mesh {
            default_mtls: mode,
            nodes: vec![node("node-a", 1), node("web", 2)],
        }
    }

    /// What the item reads as through the YAML library and validation.
    fn slow_in(text: &str, mesh: &Mesh) -> Option<crate::state::Service> {
        let raw: Vec<Spanned<RawService>> =
            serde_saphyr::from_str_with_options(text, super::super::parse_options()).ok()?;
        let [raw] = <[_; 1]>::try_from(raw).ok()?;
        super::super::service(raw, &HashSet::new(), mesh)
            .ok()
            .map(|s| s.0)
    }

    fn fast_in(text: &str, mesh: &Mesh) -> Option<Option<crate::state::Service>> {
        item(text).map(|raw| {
            super::super::service(raw, &HashSet::new(), mesh)
                .ok()
                .map(|s| s.0)
        })
    }

    fn slow(text: &str) -> Option<crate::state::Service> {
        slow_in(text, &mesh(MtlsMode::Permissive))
    }

    fn fast(text: &str) -> Option<Option<crate::state::Service>> {
        fast_in(text, &mesh(MtlsMode::Permissive))
    }

    #[test]
    fn reads_the_plain_form() {
        let text = "  - name: s000001\n    vip: 10.96.0.2\n    port: 80\n    backends: [{address: 10.200.0.1, port: 8080}, {address: 10.200.0.2, port: 8080, weight: 3}]\n";
        let got = fast(text).expect("plain").expect("valid");
        assert_eq!(Some(got.clone()), slow(text));
        assert_eq!(got.backends[1].weight, 3);
    }

    #[test]
    fn reads_mtls_modes_and_backend_nodes() {
        let text = "  - name: web\n    vip: 10.96.0.2\n    port: 80\n    mtls: strict\n    backends: [{address: 10.200.0.1, port: 8080, node: node-a}, {node: web, address: 10.200.0.2, port: 8080}]\n";
        let got = fast(text).expect("plain").expect("valid");
        assert_eq!(Some(got.clone()), slow(text));
        assert_eq!(got.mtls, Some(MtlsMode::Strict));
        let nodes: Vec<_> = got.backends.iter().map(|b| b.node.as_deref()).collect();
        assert_eq!(nodes, [Some("node-a"), Some("web")]);
        // Refused alike: an unknown node; strict with a backend that names none.
        let unknown = text.replace("node: web", "node: node-b");
        assert_eq!(fast(&unknown), Some(None));
        assert_eq!(slow(&unknown), None);
        let nameless = text.replace(", node: node-a", "");
        assert_eq!(fast(&nameless), Some(None));
        assert_eq!(slow(&nameless), None);
        // Strict by the mesh default alone.
        let by_default = nameless.replace("    mtls: strict\n", "");
        let strict = mesh(MtlsMode::Strict);
        assert_eq!(fast_in(&by_default, &strict), Some(None));
        assert!(fast(&by_default).expect("plain").is_some());
    }

    #[test]
    fn gives_up_on_anything_else() {
        for text in [
            "  - name: 'web'\n    vip: 10.96.0.2\n    port: 80\n    backends: []\n",
            "  - name: web\n    vip: 10.96.0.2\n    port: 0x50\n    backends: []\n",
            "  - name: web\n    vip: 10.96.0.2\n    port: 080\n    backends: []\n",
            "  - name: true\n    vip: 10.96.0.2\n    port: 80\n    backends: []\n",
            "  - name: web\n    policy: {default: deny}\n",
            "  - name: web\n    backends:\n      - address: 1.2.3.4\n",
            "  - name: web\n     vip: 10.96.0.2\n",
            "  - name: web\n    name: web2\n",
            "  - name: web\n    colour: red\n",
        ] {
            assert!(item(text).is_none(), "{text:?}");
        }
    }

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("80".to_owned()),
            Just("0".to_owned()),
            Just("080".to_owned()),
            Just("65536".to_owned()),
            Just("-1".to_owned()),
            Just("1.5".to_owned()),
            Just("1e3".to_owned()),
            Just("true".to_owned()),
            Just("null".to_owned()),
            Just("~".to_owned()),
            Just("web".to_owned()),
            Just("Web".to_owned()),
            Just("10.96.0.1".to_owned()),
            Just("fd00::1".to_owned()),
            Just("'10.0.0.1'".to_owned()),
            Just("a b".to_owned()),
            Just("x # c".to_owned()),
            Just("maglev".to_owned()),
            Just("udp".to_owned()),
            Just("draining".to_owned()),
            Just("strict".to_owned()),
            Just("permissive".to_owned()),
            Just("disabled".to_owned()),
            Just("node-a".to_owned()),
            Just("[]".to_owned()),
            "[a-z0-9.:-]{1,12}",
        ]
    }

    fn key() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "name",
            "vip",
            "port",
            "protocol",
            "algorithm",
            "allow_empty",
            "affinity",
            "same_node_redirect",
            "drain_timeout_seconds",
            "panic_mode",
            "mtls",
            "weight",
        ])
    }

    fn mode() -> impl Strategy<Value = MtlsMode> {
        prop::sample::select(vec![
            MtlsMode::Strict,
            MtlsMode::Permissive,
            MtlsMode::Disabled,
        ])
    }

    proptest! {
        /// Whenever the fast reader answers, the YAML library and the same
        /// validation answer the same.
        #[test]
        fn agrees_with_the_yaml_library(
            entries in prop::collection::vec((key(), value()), 0..6),
            backends in prop::collection::vec(
                (value(), value(), prop::option::of(value()), prop::option::of(value())),
                0..4,
            ),
            spaces in 0usize..3,
            default_mtls in mode(),
        ) {
            let mesh = mesh(default_mtls);
            let mut text = String::from("  - name: web\n    vip: 10.96.0.1\n");
            for (k, v) in &entries {
                text += &format!("    {k}: {v}\n");
            }
            let pad = " ".repeat(spaces);
            let list: Vec<String> = backends
                .iter()
                .map(|(a, p, w, n)| {
                    let w = w.as_ref().map(|w| format!(", weight: {w}")).unwrap_or_default();
                    let n = n.as_ref().map(|n| format!(", node: {n}")).unwrap_or_default();
                    format!("{{address: {a},{pad}port: {p}{w}{n}}}")
                })
                .collect();
            text += &format!("    backends: [{}]\n", list.join(", "));
            if let Some(fast) = fast_in(&text, &mesh) {
                prop_assert_eq!(fast, slow_in(&text, &mesh), "{}", text);
            }
        }
    }
}
