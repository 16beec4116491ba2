//! SPIFFE IDs, parsed strictly after the SPIFFE-ID specification: scheme
//! `spiffe`, a trust domain of lowercase letters, digits, `.`, `-` and `_`,
//! then a path of non-empty segments of letters, digits, `.`, `-` and `_`
//! (no `.` or `..` segment, no trailing `/`). No percent-encoding, port,
//! userinfo, query or fragment: such input comes from certificates and
//! request headers, so anything unusual is refused, never normalised.

use std::{fmt, str::FromStr};

use super::IdentityError;

const SCHEME: &str = "spiffe://";
/// The specification's limits: 255 bytes of trust domain, 2048 of URI.
const MAX_TRUST_DOMAIN: usize = 255;
const MAX_ID: usize = 2048;

/// A validated SPIFFE ID: a trust domain and a (possibly empty) path.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole ID, `spiffe://<td><path>`.
    id: String,
    /// Where the path starts in `id`.
    path_at: usize,
}

impl SpiffeId {
    /// `spiffe://<trust_domain>/node/<node>`, the identity of a node agent.
    pub fn node(trust_domain: &str, node: &str) -> Result<SpiffeId, IdentityError> {
        let text = format!("{SCHEME}{trust_domain}/node/{node}");
        check_trust_domain(trust_domain).map_err(|why| invalid(&text, why))?;
        let id: SpiffeId = text.parse()?;
        match id.node_name() {
            Some(_) => Ok(id),
            None => Err(invalid(&text, "a node name is one path segment (no '/')")),
        }
    }

    /// `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
    pub fn workload(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, IdentityError> {
        let text = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        check_trust_domain(trust_domain).map_err(|why| invalid(&text, why))?;
        let id: SpiffeId = text.parse()?;
        match id.workload_parts() {
            Some(_) => Ok(id),
            None => Err(invalid(
                &text,
                "namespace and service account are one path segment each (no '/')",
            )),
        }
    }

    /// `spiffe://<trust_domain>` (no path): the trust domain's own ID, the
    /// one the mesh CA certificate carries.
    pub fn trust_domain_id(trust_domain: &str) -> Result<SpiffeId, IdentityError> {
        let text = format!("{SCHEME}{trust_domain}");
        check_trust_domain(trust_domain).map_err(|why| invalid(&text, why))?;
        text.parse()
    }

    pub fn trust_domain(&self) -> &str {
        &self.id[SCHEME.len()..self.path_at]
    }

    /// The path, `""` or starting with `/`.
    pub fn path(&self) -> &str {
        &self.id[self.path_at..]
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The node name of a `/node/<name>` ID.
    pub fn node_name(&self) -> Option<&str> {
        match self.segments().as_slice() {
            ["node", name] => Some(name),
            _ => None,
        }
    }

    /// (namespace, service account) of a `/ns/<ns>/sa/<sa>` ID.
    pub fn workload_parts(&self) -> Option<(&str, &str)> {
        match self.segments().as_slice() {
            ["ns", ns, "sa", sa] => Some((ns, sa)),
            _ => None,
        }
    }

    fn segments(&self) -> Vec<&str> {
        match self.path().strip_prefix('/') {
            Some(rest) => rest.split('/').collect(),
            None => Vec::new(),
        }
    }
}

/// A bounded, escaped copy of hostile input for error messages: no control
/// characters or unbounded length ever reach a log line.
pub(crate) fn sanitize(input: &str) -> String {
    const MAX: usize = 80;
    let mut out: String = input
        .chars()
        .take(MAX)
        .flat_map(char::escape_debug)
        .collect();
    if input.chars().count() > MAX {
        out.push_str("...");
    }
    out
}

fn invalid(input: &str, why: &'static str) -> IdentityError {
    IdentityError::InvalidSpiffeId {
        input: sanitize(input),
        why,
    }
}

fn trust_domain_char(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

fn path_char(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

/// Why a trust domain name is not valid, if it is not.
pub(crate) fn check_trust_domain(td: &str) -> Result<(), &'static str> {
    if td.is_empty() {
        return Err("the trust domain is empty");
    }
    if td.len() > MAX_TRUST_DOMAIN {
        return Err("the trust domain is longer than 255 bytes");
    }
    if let Some(b) = td.bytes().find(|b| !trust_domain_char(*b)) {
        return Err(match b {
            b'A'..=b'Z' => "the trust domain must be lowercase",
            b':' => "a port is not allowed in the trust domain",
            b'@' => "userinfo is not allowed in the trust domain",
            b'%' => "percent-encoding is not allowed",
            b'?' => "a query is not allowed",
            b'#' => "a fragment is not allowed",
            _ => "the trust domain may hold only a-z, 0-9, '.', '-' and '_'",
        });
    }
    Ok(())
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.len() > MAX_ID {
            return Err(invalid(input, "longer than 2048 bytes"));
        }
        let Some(rest) = input.strip_prefix(SCHEME) else {
            return Err(invalid(input, "the scheme must be spiffe:// (lowercase)"));
        };
        let td_end = rest.find('/').unwrap_or(rest.len());
        let (td, path) = rest.split_at(td_end);
        check_trust_domain(td).map_err(|why| invalid(input, why))?;
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                match segment {
                    "" => return Err(invalid(input, "empty path segment (// or a trailing /)")),
                    "." | ".." => {
                        return Err(invalid(input, "'.' and '..' segments are not allowed"));
                    }
                    _ => {}
                }
                if let Some(b) = segment.bytes().find(|b| !path_char(*b)) {
                    return Err(invalid(
                        input,
                        match b {
                            b'%' => "percent-encoding is not allowed",
                            b'?' => "a query is not allowed",
                            b'#' => "a fragment is not allowed",
                            _ => "a path segment may hold only letters, digits, '.', '-' and '_'",
                        },
                    ));
                }
            }
        }
        Ok(SpiffeId {
            id: input.to_owned(),
            path_at: SCHEME.len() + td_end,
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.id)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_ids_parse_and_split() {
        let node: SpiffeId = "spiffe://cluster.local/node/worker-1".parse().unwrap();
        assert_eq!(node.trust_domain(), "cluster.local");
        assert_eq!(node.path(), "/node/worker-1");
        assert_eq!(node.node_name(), Some("worker-1"));
        assert_eq!(node.workload_parts(), None);
        assert_eq!(node.to_string(), "spiffe://cluster.local/node/worker-1");

        let wl: SpiffeId = "spiffe://example.org/ns/default/sa/web".parse().unwrap();
        assert_eq!(wl.workload_parts(), Some(("default", "web")));
        assert_eq!(wl.node_name(), None);

        let td: SpiffeId = "spiffe://my_td-1.x".parse().unwrap();
        assert_eq!(td.trust_domain(), "my_td-1.x");
        assert_eq!(td.path(), "");
        assert_eq!(td.node_name(), None);

        for good in [
            "spiffe://a/b",
            "spiffe://a/B.c-D_e/f",
            "spiffe://a/.../x", // only '.' and '..' are special
            "spiffe://1.2.3.4/node/n",
        ] {
            assert!(good.parse::<SpiffeId>().is_ok(), "{good}");
        }

        assert_eq!(
            SpiffeId::node("cluster.local", "n1").unwrap().as_str(),
            "spiffe://cluster.local/node/n1"
        );
        assert_eq!(
            SpiffeId::workload("td", "ns1", "sa1")
                .unwrap()
                .workload_parts(),
            Some(("ns1", "sa1"))
        );
        // Other shapes are valid IDs but neither node nor workload.
        let odd: SpiffeId = "spiffe://td/node/a/b".parse().unwrap();
        assert_eq!(odd.node_name(), None);
        let odd: SpiffeId = "spiffe://td/ns/a/sa".parse().unwrap();
        assert_eq!(odd.workload_parts(), None);
    }

    #[test]
    fn hostile_ids_are_refused_with_a_reason() {
        let long_path = format!("spiffe://td/{}", "a".repeat(2100));
        let long_td = format!("spiffe://{}/x", "a".repeat(256));
        let cases: &[(&str, &str)] = &[
            ("", "scheme"),
            ("http://td/node/a", "scheme"),
            ("SPIFFE://td/node/a", "scheme"),
            ("spiffe:/td/node/a", "scheme"),
            ("spiffe://", "empty"),
            ("spiffe:///node/a", "empty"),
            ("spiffe://Cluster.local/node/a", "lowercase"),
            ("spiffe://td:8443/node/a", "port"),
            ("spiffe://user@td/node/a", "userinfo"),
            ("spiffe://td/node/a?x=1", "query"),
            ("spiffe://td/node/a#frag", "fragment"),
            ("spiffe://td?x/node/a", "query"),
            ("spiffe://td/node/%61", "percent"),
            ("spiffe://t%64/node/a", "percent"),
            ("spiffe://td/node/../x", "'..'"),
            ("spiffe://td/./node", "'..'"),
            ("spiffe://td/node//a", "empty path segment"),
            ("spiffe://td/node/a/", "empty path segment"),
            ("spiffe://td/", "empty path segment"),
            ("spiffe://td/node/a\r\nx-evil: 1", "path segment"),
            ("spiffe://td/node/a\0", "path segment"),
            ("spiffe://td\n/node/a", "only a-z"),
            ("spiffe://td/node/a b", "path segment"),
            ("spiffe://td/node/é", "path segment"),
            ("spiffe://td\\x/node", "only a-z"),
            (long_path.as_str(), "2048"),
            (long_td.as_str(), "255"),
        ];
        for (input, why) in cases {
            let err = input
                .parse::<SpiffeId>()
                .expect_err(&format!("{input:?} must be refused"));
            let text = err.to_string();
            assert!(text.contains(why), "{input:?}: {text}");
            assert_eq!(err.reason(), "invalid_spiffe_id");
            assert!(
                !text.contains('\r') && !text.contains('\n') && !text.contains('\0'),
                "control characters must not reach the message: {text:?}"
            );
            assert!(text.len() < 400, "bounded message: {}", text.len());
        }
        assert!(SpiffeId::node("td", "a/b").is_err());
        assert!(SpiffeId::node("td/x", "a").is_err());
        assert!(SpiffeId::trust_domain_id("td/x").is_err());
        assert!(SpiffeId::trust_domain_id("td").unwrap().path().is_empty());
        assert!(SpiffeId::workload("td", "ns/sa", "x").is_err());
        assert!(SpiffeId::node("TD", "a").is_err());
        assert!(SpiffeId::node("td", "").is_err());
        assert!(SpiffeId::workload("td", "..", "sa").is_err());
    }

    #[test]
    fn serde_round_trip_and_refusal() {
        let id = SpiffeId::node("cluster.local", "n").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://cluster.local/node/n\"");
        let back: SpiffeId = serde_json::from_str(&json).unwrap();
        assert_eq!(back, id);
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://x/node/a?b\"").is_err());
    }
}
