//! Checks for the API's strings that become cgroup path components or parts
//! of a SPIFFE ID. Anything the API hands us is input from outside: a UID
//! or container id must not be able to name a directory other than its own
//! (no `/`, `..`, NUL or control characters get through), and a namespace
//! or service account must be what Kubernetes itself allows.

use std::fmt;

/// Why a value was refused, in a few words (the caller says where).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub &'static str);

/// Longest UID accepted: a UUID is 36 characters, a static pod's hash 32.
const MAX_UID: usize = 64;
/// Longest container id accepted: containerd and CRI-O ids are 64.
const MAX_CONTAINER_ID: usize = 128;

/// A pod UID as the kubelet names cgroups by it: hex digits and dashes
/// (a UUID, as the API server assigns them).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodUid(String);

impl PodUid {
    pub fn parse(uid: &str) -> Result<PodUid, Rejected> {
        if uid.is_empty() {
            return Err(Rejected("it is empty"));
        }
        if uid.len() > MAX_UID {
            return Err(Rejected("it is longer than 64 characters"));
        }
        if !uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            return Err(Rejected("a pod UID holds only hex digits and '-'"));
        }
        if !uid.bytes().any(|b| b.is_ascii_hexdigit()) {
            return Err(Rejected("a pod UID holds hex digits"));
        }
        Ok(PodUid(uid.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The UID as the systemd driver spells it: `-` separates slice levels
    /// there, so the kubelet writes the UID's dashes as `_`.
    pub fn systemd_escaped(&self) -> String {
        self.0.replace('-', "_")
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The container runtimes whose cgroup names we know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Runtime {
    Containerd,
    CriO,
}

/// A container id from `status.containerStatuses[].containerID`
/// (`containerd://<hex>` or `cri-o://<hex>`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ContainerId {
    runtime: Runtime,
    id: String,
}

impl ContainerId {
    pub fn parse(container_id: &str) -> Result<ContainerId, Rejected> {
        let (runtime, id) = if let Some(id) = container_id.strip_prefix("containerd://") {
            (Runtime::Containerd, id)
        } else if let Some(id) = container_id.strip_prefix("cri-o://") {
            (Runtime::CriO, id)
        } else {
            return Err(Rejected(
                "only containerd:// and cri-o:// container ids are supported",
            ));
        };
        if id.is_empty() {
            return Err(Rejected("the id after the runtime is empty"));
        }
        if id.len() > MAX_CONTAINER_ID {
            return Err(Rejected("the id is longer than 128 characters"));
        }
        if !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(Rejected("a container id holds only lowercase hex digits"));
        }
        Ok(ContainerId {
            runtime,
            id: id.to_owned(),
        })
    }

    pub fn runtime(&self) -> Runtime {
        self.runtime
    }

    /// The id without its runtime prefix.
    pub fn hex(&self) -> &str {
        &self.id
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.runtime {
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
        };
        write!(f, "{scheme}://{}", self.id)
    }
}

/// An RFC 1123 label, as Kubernetes requires of namespace names: at most 63
/// lowercase letters, digits and '-', starting and ending with a letter or
/// digit.
pub fn dns_label(name: &str) -> Result<(), Rejected> {
    if name.is_empty() {
        return Err(Rejected("it is empty"));
    }
    if name.len() > 63 {
        return Err(Rejected("a DNS label is at most 63 characters"));
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = name.as_bytes();
    if !bytes.iter().all(|&b| alnum(b) || b == b'-') {
        return Err(Rejected(
            "a DNS label holds only lowercase letters, digits and '-'",
        ));
    }
    if !bytes.first().is_some_and(|&b| alnum(b)) || !bytes.last().is_some_and(|&b| alnum(b)) {
        return Err(Rejected(
            "a DNS label starts and ends with a letter or digit",
        ));
    }
    Ok(())
}

/// An RFC 1123 subdomain, as Kubernetes requires of pod and service-account
/// names: at most 253 characters, labels joined by '.'.
pub fn dns_subdomain(name: &str) -> Result<(), Rejected> {
    if name.is_empty() {
        return Err(Rejected("it is empty"));
    }
    if name.len() > 253 {
        return Err(Rejected("a DNS subdomain is at most 253 characters"));
    }
    for label in name.split('.') {
        dns_label(label).map_err(|_| {
            Rejected("a DNS subdomain is labels of lowercase letters, digits and '-' joined by '.'")
        })?;
    }
    Ok(())
}

/// A bounded, escaped copy of untrusted text for messages (the identity
/// module's: no control character or unbounded length reaches a log line).
pub(crate) use crate::identity::sanitize as escaped;

/// [`escaped`], in double quotes.
pub fn quoted(input: &str) -> String {
    format!("\"{}\"", escaped(input))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_hex_and_dashes_only() {
        for good in [
            "9ac48755-3968-48e4-b9dc-6d4b69f3bb42",
            "1858680E-B044-4FD5-9DD4-F137E30E2180",
            "8c8e3a2c4e1f0a7b9d6c5e4f3a2b1c0d",
        ] {
            assert_eq!(
                PodUid::parse(good).map(|u| u.to_string()),
                Ok(good.to_owned())
            );
        }
        for bad in [
            "",
            "..",
            "../../etc",
            "9ac48755/../x",
            "9ac48755\0",
            "9ac48755\n",
            "9ac48755_3968",
            "9ac48755.slice",
            "pod9ac48755",
            "----",
            " 9ac48755",
        ] {
            assert!(PodUid::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(PodUid::parse(&"a".repeat(65)).is_err());
    }

    #[test]
    fn the_systemd_driver_writes_uid_dashes_as_underscores() {
        let uid = PodUid::parse("9ac48755-3968-48e4-b9dc-6d4b69f3bb42").unwrap();
        assert_eq!(
            uid.systemd_escaped(),
            "9ac48755_3968_48e4_b9dc_6d4b69f3bb42"
        );
    }

    #[test]
    fn container_ids_name_their_runtime_and_are_hex() {
        let hex = "3baf66ee56a52a8765c3deb2444315411a888fa3e2f8f7ddd75e9ded3c34425e";
        let containerd = ContainerId::parse(&format!("containerd://{hex}")).unwrap();
        assert_eq!(
            (containerd.runtime(), containerd.hex()),
            (Runtime::Containerd, hex)
        );
        let crio = ContainerId::parse(&format!("cri-o://{hex}")).unwrap();
        assert_eq!((crio.runtime(), crio.hex()), (Runtime::CriO, hex));
        assert_eq!(crio.to_string(), format!("cri-o://{hex}"));
        for bad in [
            hex.to_owned(),
            format!("docker://{hex}"),
            "containerd://".to_owned(),
            "containerd://../../x".to_owned(),
            "cri-o://abc/def".to_owned(),
            "cri-o://ABCDEF".to_owned(),
            "containerd://abc\0".to_owned(),
            format!("containerd://{hex}.scope"),
            format!("containerd://{}", "a".repeat(129)),
        ] {
            assert!(ContainerId::parse(&bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn namespaces_are_dns_labels() {
        for good in ["default", "kube-system", "a", "x1", &"a".repeat(63)] {
            assert_eq!(dns_label(good), Ok(()), "{good:?}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a.b",
            "a/b",
            "..",
            "a_b",
            "a\0",
            "é",
            &"a".repeat(64),
        ] {
            assert!(dns_label(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn service_accounts_are_dns_subdomains() {
        for good in ["default", "cart", "my.sa-1", "a.b.c"] {
            assert_eq!(dns_subdomain(good), Ok(()), "{good:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a..b",
            ".a",
            "a.",
            "a/b",
            "A",
            "a_b",
            &"a".repeat(254),
        ] {
            assert!(dns_subdomain(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn quoted_text_is_escaped_and_bounded() {
        assert_eq!(quoted("a\nb\0"), "\"a\\nb\\0\"");
        let long = quoted(&"x".repeat(500));
        assert!(long.len() < 100 && long.ends_with("...\""), "{long}");
    }
}
