//! List requests with the real server's resourceVersion semantics: which
//! version a list is read at, paging over one consistent snapshot with
//! continue tokens, 410 for compacted versions, and selectors.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::Bound;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::kinds::KINDS;
use super::query::Query;
use super::selector::{FieldSelector, LabelSelector};
use super::status::Failure;
use super::store::{Key, Object, Store};

/// Which objects a list or watch wants: a namespace, labels, fields.
#[derive(Debug)]
pub(crate) struct Selection {
    pub namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Selection {
    pub fn from_query(
        kind: usize,
        namespace: Option<&str>,
        query: &Query,
    ) -> Result<Selection, Failure> {
        let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or_default())
            .map_err(|e| Failure::bad_request(e.to_string()))?;
        let supported = KINDS[kind].field_labels();
        let fields =
            FieldSelector::parse(query.get("fieldSelector").unwrap_or_default(), &supported)
                .map_err(|e| Failure::bad_request(e.to_string()))?;
        Ok(Selection {
            namespace: namespace.map(str::to_owned),
            labels,
            fields,
        })
    }

    pub fn matches(&self, object: &Object) -> bool {
        self.namespace.as_ref().is_none_or(|ns| *ns == object.key.0)
            && self.labels.matches(&object.labels)
            && self.fields.matches(&object.fields)
    }

    /// Whether selectors (not only a namespace) filter the objects.
    fn filters(&self) -> bool {
        !self.labels.is_empty() || !self.fields.is_empty()
    }
}

/// The version a list is read at.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ReadAt {
    /// No resourceVersion: the latest (a consistent read).
    Latest,
    /// resourceVersion=0: any version; the watch cache serves it whole,
    /// ignoring `limit`.
    Any,
    /// At least this version; the server answers with its latest.
    NotOlderThan(u64),
    /// Exactly this version, rebuilt from history.
    Exact(u64),
}

/// An opaque continue token: the snapshot's version and the last key sent
/// (version -1: continue at the latest, after that snapshot was compacted).
#[derive(Debug, Serialize, Deserialize)]
struct Continue {
    v: String,
    rv: i64,
    ns: String,
    name: String,
}

fn encode_continue(rv: i64, key: &Key) -> String {
    let token = Continue {
        v: "meta.k8s.io/v1".into(),
        rv,
        ns: key.0.clone(),
        name: key.1.clone(),
    };
    let json = serde_json::to_string(&token).unwrap_or_default();
    json.bytes().fold(String::new(), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    })
}

fn decode_continue(token: &str) -> Option<Continue> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    let token: Continue = serde_json::from_slice(&bytes?).ok()?;
    (token.v == "meta.k8s.io/v1" && token.rv != 0).then_some(token)
}

fn parse_version(raw: &str) -> Result<u64, Failure> {
    raw.parse().map_err(|_| {
        Failure::bad_request(format!(
            "resourceVersion {raw:?} is invalid: it must be a non-negative integer"
        ))
    })
}

/// Answers a list: the `{Kind}List` JSON, or the failure the real server
/// gives for these options.
pub(crate) fn list(
    store: &Store,
    kind: usize,
    selection: &Selection,
    query: &Query,
) -> Result<String, Failure> {
    let version = query.non_empty("resourceVersion");
    let version_match = query.non_empty("resourceVersionMatch");
    let continue_token = query.non_empty("continue");
    let limit = match query.non_empty("limit") {
        None => 0,
        Some(raw) => raw
            .parse::<i64>()
            .map_err(|_| Failure::bad_request(format!("limit {raw:?} is not an integer")))?,
    };
    let limit = usize::try_from(limit).unwrap_or(0);

    if query.get("sendInitialEvents").is_some() {
        return Err(Failure::invalid_options(
            "sendInitialEvents",
            "sendInitialEvents is forbidden for list",
        ));
    }
    if let Some(m) = version_match {
        if version.is_none() {
            return Err(Failure::invalid_options(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden unless resourceVersion is provided",
            ));
        }
        if continue_token.is_some() {
            return Err(Failure::invalid_options(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden when continue is provided",
            ));
        }
        if m != "Exact" && m != "NotOlderThan" {
            return Err(Failure::invalid_options(
                "resourceVersionMatch",
                &format!(
                    "unsupported value {m:?}: supported values: \"Exact\", \"NotOlderThan\", \"\""
                ),
            ));
        }
        if m == "Exact" && version == Some("0") {
            return Err(Failure::invalid_options(
                "resourceVersionMatch",
                "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
            ));
        }
    }

    let mut start: Option<Key> = None;
    let read_at = if let Some(token) = continue_token {
        if version.is_some_and(|v| v != "0") {
            return Err(Failure::bad_request(
                "specifying resource version is not allowed when using continue".into(),
            ));
        }
        let token = decode_continue(token).ok_or_else(|| {
            Failure::bad_request(format!(
                "invalid continue token {token:?}: not one this server issued"
            ))
        })?;
        start = Some((token.ns, token.name));
        match u64::try_from(token.rv) {
            Ok(rv) => ReadAt::Exact(rv),
            Err(_) => ReadAt::Latest,
        }
    } else {
        match (version, version_match) {
            (None, _) => ReadAt::Latest,
            (Some(v), Some("Exact")) => ReadAt::Exact(parse_version(v)?),
            (Some("0"), _) => ReadAt::Any,
            (Some(v), Some(_)) => ReadAt::NotOlderThan(parse_version(v)?),
            // Legacy: a version with a limit and no match means Exact.
            (Some(v), None) if limit > 0 => ReadAt::Exact(parse_version(v)?),
            (Some(v), None) => ReadAt::NotOlderThan(parse_version(v)?),
        }
    };

    let current = store.resource_version();
    let (at, limit) = match read_at {
        ReadAt::Latest => (None, limit),
        ReadAt::Any => (None, 0),
        ReadAt::NotOlderThan(v) | ReadAt::Exact(v) if v > current => {
            return Err(Failure::too_large(v, current));
        }
        ReadAt::NotOlderThan(_) => (None, limit),
        ReadAt::Exact(v) => (Some(v), limit),
    };
    let objects = store.snapshot(kind, at).map_err(|_| match &start {
        Some(key) => Failure::continue_expired(encode_continue(-1, key)),
        None => Failure::expired("The resourceVersion for the provided list is too old.".into()),
    })?;
    let list_version = at.unwrap_or(current);
    let page = page(&objects, selection, start.as_ref(), limit);

    let spec = &KINDS[kind];
    let mut out = String::with_capacity(256 + page.items.len());
    let _ = write!(
        out,
        "{{\"kind\":\"{}\",\"apiVersion\":\"{}\",\"metadata\":{{\"resourceVersion\":\"{list_version}\"",
        spec.list_kind(),
        spec.api_version()
    );
    if let Some(last) = &page.continue_after {
        let token = encode_continue(i64::try_from(list_version).unwrap_or(i64::MAX), last);
        let _ = write!(out, ",\"continue\":\"{token}\"");
        if let Some(n) = page.remaining {
            let _ = write!(out, ",\"remainingItemCount\":{n}");
        }
    }
    out.push_str("},\"items\":");
    out.push_str(&page.items);
    out.push('}');
    Ok(out)
}

struct Page {
    /// The JSON array of items.
    items: String,
    /// Set when more may follow: the last key of this page.
    continue_after: Option<Key>,
    /// How many objects follow, when no selector filters them.
    remaining: Option<usize>,
}

/// Up to `limit` (0: all) matching objects after `start`, in key order.
fn page(
    objects: &BTreeMap<Key, Arc<Object>>,
    selection: &Selection,
    start: Option<&Key>,
    limit: usize,
) -> Page {
    let lower = match (start, &selection.namespace) {
        (Some(key), _) => Bound::Excluded(key.clone()),
        (None, Some(ns)) => Bound::Included((ns.clone(), String::new())),
        (None, None) => Bound::Unbounded,
    };
    let in_namespace = |key: &Key| selection.namespace.as_ref().is_none_or(|ns| *ns == key.0);
    let mut range = objects
        .range((lower, Bound::Unbounded))
        .take_while(|(key, _)| in_namespace(key));

    let mut items = String::from("[");
    let mut count = 0;
    let mut last: Option<&Key> = None;
    for (key, object) in range.by_ref() {
        if !selection.matches(object) {
            continue;
        }
        if count > 0 {
            items.push(',');
        }
        object.write_item(&mut items);
        count += 1;
        last = Some(key);
        if limit > 0 && count == limit {
            break;
        }
    }
    items.push(']');

    let mut continue_after = None;
    let mut remaining = None;
    if limit > 0 && count == limit {
        // As etcd does: more keys in range means a token, even when none
        // of them will match the selectors.
        let rest = if selection.filters() {
            usize::from(range.next().is_some())
        } else {
            range.count()
        };
        if rest > 0 {
            continue_after = last.cloned();
            remaining = (!selection.filters()).then_some(rest);
        }
    }
    Page {
        items,
        continue_after,
        remaining,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip() {
        let key = ("ns".to_owned(), "web".to_owned());
        let token = decode_continue(&encode_continue(42, &key)).unwrap();
        assert_eq!(
            (token.rv, token.ns.as_str(), token.name.as_str()),
            (42, "ns", "web")
        );
        assert!(decode_continue("zz").is_none());
        assert!(decode_continue("").is_none());
    }
}
