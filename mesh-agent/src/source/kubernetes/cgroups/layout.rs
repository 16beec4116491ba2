//! Where the kubelet puts a pod's cgroup, and the runtime a container's.
//!
//! The kubelet names a pod's cgroup from its QoS class and UID under its
//! `--cgroup-root` (default `/`) and a `kubepods` level:
//!
//! | driver | Guaranteed | Burstable (BestEffort alike) |
//! |---|---|---|
//! | cgroupfs | `kubepods/pod<uid>` | `kubepods/burstable/pod<uid>` |
//! | systemd | `kubepods.slice/kubepods-pod<uid_>.slice` | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice` |
//!
//! where `<uid_>` is the UID with its dashes written as `_` (systemd uses
//! `-` for slice nesting). The systemd form is the cgroupfs name's parts
//! joined by `-`, each prefix a slice of its own; a `--cgroup-root` takes
//! part in it the same way: kind's `--cgroup-root=/kubelet` gives
//! `kubelet/kubepods/…` (cgroupfs) and
//! `kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod<uid_>.slice`
//! (systemd). Kubelets with `--cgroups-per-qos=false` (no `kubepods`
//! level) are not supported.
//!
//! Containers sit below their pod: `<id>` (containerd) or `crio-<id>`
//! (CRI-O) with cgroupfs, `cri-containerd-<id>.scope` or `crio-<id>.scope`
//! with systemd. CRI-O's `crio-conmon-<id>` beside it is the container's
//! monitor, not the workload.

use std::fmt;
use std::path::{Path, PathBuf};

use super::CgroupError;
use super::names::{ContainerId, PodUid, Runtime, quoted};

/// The kubelet's cgroup driver (`--cgroup-driver`), which decides how
/// cgroups are spelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Driver {
    Cgroupfs,
    Systemd,
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Driver::Cgroupfs => "cgroupfs",
            Driver::Systemd => "systemd",
        })
    }
}

/// A pod's QoS class (`status.qosClass`): which level of `kubepods` holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub const ALL: [QosClass; 3] = [
        QosClass::Guaranteed,
        QosClass::Burstable,
        QosClass::BestEffort,
    ];

    /// The class the API spells `value`, if it is one.
    pub fn from_api(value: &str) -> Option<QosClass> {
        match value {
            "Guaranteed" => Some(QosClass::Guaranteed),
            "Burstable" => Some(QosClass::Burstable),
            "BestEffort" => Some(QosClass::BestEffort),
            _ => None,
        }
    }

    /// The level below `kubepods`: Guaranteed pods sit directly in it.
    fn level(self) -> Option<&'static str> {
        match self {
            QosClass::Guaranteed => None,
            QosClass::Burstable => Some("burstable"),
            QosClass::BestEffort => Some("besteffort"),
        }
    }
}

/// Where this node's pod cgroups live: the cgroup v2 mount as the agent
/// sees it, and the kubelet's `--cgroup-root` below it.
///
/// The paths this gives are absolute filesystem paths under the mount, as
/// `state::Workload::cgroup` wants them: the reconciler takes a workload's
/// cgroup id from the inode of exactly that path (`fs::metadata(path).ino()`),
/// and the file source requires it to be absolute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The cgroup v2 mount (`bpf::cgroup2_mount()`), or in tests a
    /// directory below it.
    mount: PathBuf,
    /// The kubelet's `--cgroup-root` as a cgroup name, one part per level:
    /// empty for `/`, `["kubelet"]` for kind's `/kubelet`.
    kubelet_root: Vec<String>,
}

impl Layout {
    /// Pods of a kubelet with the default `--cgroup-root=/`.
    pub fn new(mount: impl Into<PathBuf>) -> Layout {
        Layout {
            mount: mount.into(),
            kubelet_root: Vec::new(),
        }
    }

    /// Pods of a kubelet run with `--cgroup-root=<cgroup_root>`, given as the
    /// kubelet takes it (a cgroupfs-style path: `/`, `/kubelet`), whatever
    /// its driver.
    pub fn with_kubelet_root(
        mount: impl Into<PathBuf>,
        cgroup_root: &str,
    ) -> Result<Layout, CgroupError> {
        let fail = |why| CgroupError::KubeletRoot {
            value: quoted(cgroup_root),
            why,
        };
        let Some(rest) = cgroup_root.strip_prefix('/') else {
            return Err(fail("it must be absolute (start with '/')"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let mut kubelet_root = Vec::new();
        if !rest.is_empty() {
            for part in rest.split('/') {
                match part {
                    "" => return Err(fail("it has an empty level ('//')")),
                    "." | ".." => return Err(fail("'.' and '..' levels are not allowed")),
                    _ => {}
                }
                // No '_': the systemd spelling turns '-' into '_', so a name
                // with both could not be told apart (the kubelet refuses
                // '_' in its own names for the same reason).
                if !part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                {
                    return Err(fail("a level may hold only letters, digits, '-' and '.'"));
                }
                kubelet_root.push(part.to_owned());
            }
        }
        Ok(Layout {
            mount: mount.into(),
            kubelet_root,
        })
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// The kubelet's `--cgroup-root` this layout was made for.
    pub fn kubelet_root(&self) -> String {
        format!("/{}", self.kubelet_root.join("/"))
    }

    /// The cgroup the kubelet gives a pod under `driver`.
    pub fn pod_path(&self, driver: Driver, uid: &PodUid, qos: QosClass) -> PathBuf {
        let pod = format!("pod{uid}");
        let name = self
            .kubelet_root
            .iter()
            .map(String::as_str)
            .chain(["kubepods"])
            .chain(qos.level())
            .chain([pod.as_str()]);
        let mut path = self.mount.clone();
        match driver {
            Driver::Cgroupfs => path.extend(name),
            Driver::Systemd => {
                // Each level is a slice named by every level down to it.
                let mut joined = String::new();
                for part in name {
                    if !joined.is_empty() {
                        joined.push('-');
                    }
                    joined.push_str(&part.replace('-', "_"));
                    path.push(format!("{joined}.slice"));
                }
            }
        }
        path
    }
}

/// A pod's cgroup that exists, and the driver whose spelling it has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    pub path: PathBuf,
    pub driver: Driver,
}

/// Every place a pod's cgroup may be (one per driver), in the order
/// [`pod_cgroup`] tries them: for messages that say where the agent looked.
pub fn pod_cgroup_candidates(layout: &Layout, uid: &PodUid, qos: QosClass) -> Vec<PathBuf> {
    [Driver::Cgroupfs, Driver::Systemd]
        .into_iter()
        .map(|driver| layout.pod_path(driver, uid, qos))
        .collect()
}

/// The pod's cgroup: the first of the drivers' spellings that is a
/// directory. `None` while the kubelet has not made it (or after it
/// removed it).
pub fn pod_cgroup(layout: &Layout, uid: &PodUid, qos: QosClass) -> Option<PodCgroup> {
    [Driver::Cgroupfs, Driver::Systemd]
        .into_iter()
        .map(|driver| PodCgroup {
            path: layout.pod_path(driver, uid, qos),
            driver,
        })
        .find(|pod| is_dir(&pod.path))
}

/// The cgroup the runtime made for container `id` under its pod's, if it
/// exists. Informational: the pod's cgroup is what a workload registers,
/// and the kernel matches a container's sockets to it as their nearest
/// registered ancestor.
pub fn container_cgroup(pod: &PodCgroup, id: &ContainerId) -> Option<PathBuf> {
    let name = match (pod.driver, id.runtime()) {
        (Driver::Cgroupfs, Runtime::Containerd) => id.hex().to_owned(),
        (Driver::Cgroupfs, Runtime::CriO) => format!("crio-{}", id.hex()),
        (Driver::Systemd, Runtime::Containerd) => format!("cri-containerd-{}.scope", id.hex()),
        (Driver::Systemd, Runtime::CriO) => format!("crio-{}.scope", id.hex()),
    };
    let path = pod.path.join(name);
    is_dir(&path).then_some(path)
}

/// A directory, not followed through a symlink (cgroupfs has none; a
/// symlink here would be someone else's).
fn is_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

#[cfg(test)]
mod tests {
    use super::super::testdir::CgroupTree;
    use super::*;

    const UID: &str = "9ac48755-3968-48e4-b9dc-6d4b69f3bb42";
    const OTHER_UID: &str = "1858680e-b044-4fd5-9dd4-f137e30e2180";
    const HEX: &str = "3baf66ee56a52a8765c3deb2444315411a888fa3e2f8f7ddd75e9ded3c34425e";

    fn uid(text: &str) -> PodUid {
        PodUid::parse(text).unwrap()
    }

    /// The kubelet's paths, written out by hand, for the default root.
    fn expected(driver: Driver, qos: QosClass) -> &'static str {
        use {Driver::*, QosClass::*};
        match (driver, qos) {
            (Cgroupfs, Guaranteed) => "kubepods/pod9ac48755-3968-48e4-b9dc-6d4b69f3bb42",
            (Cgroupfs, Burstable) => "kubepods/burstable/pod9ac48755-3968-48e4-b9dc-6d4b69f3bb42",
            (Cgroupfs, BestEffort) => "kubepods/besteffort/pod9ac48755-3968-48e4-b9dc-6d4b69f3bb42",
            (Systemd, Guaranteed) => {
                "kubepods.slice/kubepods-pod9ac48755_3968_48e4_b9dc_6d4b69f3bb42.slice"
            }
            (Systemd, Burstable) => {
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod9ac48755_3968_48e4_b9dc_6d4b69f3bb42.slice"
            }
            (Systemd, BestEffort) => {
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod9ac48755_3968_48e4_b9dc_6d4b69f3bb42.slice"
            }
        }
    }

    fn finds_each_qos_class(driver: Driver) {
        for qos in QosClass::ALL {
            let tree = CgroupTree::new();
            let layout = Layout::new(tree.path());
            assert_eq!(
                pod_cgroup(&layout, &uid(UID), qos),
                None,
                "{qos:?} before mkdir"
            );
            let dir = tree.mkdir(expected(driver, qos));
            assert_eq!(
                pod_cgroup(&layout, &uid(UID), qos),
                Some(PodCgroup { path: dir, driver }),
                "{driver} {qos:?}"
            );
            for wrong in QosClass::ALL.into_iter().filter(|&q| q != qos) {
                assert_eq!(
                    pod_cgroup(&layout, &uid(UID), wrong),
                    None,
                    "a {qos:?} pod's cgroup matched {wrong:?}"
                );
            }
            assert_eq!(
                pod_cgroup(&layout, &uid(OTHER_UID), qos),
                None,
                "another pod matched"
            );
        }
    }

    #[test]
    fn finds_each_qos_class_in_the_cgroupfs_layout() {
        finds_each_qos_class(Driver::Cgroupfs);
    }

    #[test]
    fn finds_each_qos_class_in_the_systemd_layout() {
        finds_each_qos_class(Driver::Systemd);
    }

    #[test]
    fn candidates_are_both_drivers_spellings() {
        let layout = Layout::new("/sys/fs/cgroup");
        for qos in QosClass::ALL {
            assert_eq!(
                pod_cgroup_candidates(&layout, &uid(UID), qos),
                [Driver::Cgroupfs, Driver::Systemd]
                    .map(|d| Path::new("/sys/fs/cgroup").join(expected(d, qos)))
            );
        }
    }

    #[test]
    fn a_kubelet_root_nests_both_layouts_as_the_kubelet_does() {
        // kind runs its kubelets with --cgroup-root=/kubelet.
        let cases = [
            (
                "/kubelet",
                Driver::Cgroupfs,
                "kubelet/kubepods/besteffort/pod9ac48755-3968-48e4-b9dc-6d4b69f3bb42",
            ),
            (
                "/kubelet",
                Driver::Systemd,
                "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod9ac48755_3968_48e4_b9dc_6d4b69f3bb42.slice",
            ),
            (
                "/node-a/k8s/",
                Driver::Cgroupfs,
                "node-a/k8s/kubepods/besteffort/pod9ac48755-3968-48e4-b9dc-6d4b69f3bb42",
            ),
            (
                "/node-a/k8s/",
                Driver::Systemd,
                "node_a.slice/node_a-k8s.slice/node_a-k8s-kubepods.slice/node_a-k8s-kubepods-besteffort.slice/node_a-k8s-kubepods-besteffort-pod9ac48755_3968_48e4_b9dc_6d4b69f3bb42.slice",
            ),
        ];
        for (root, driver, path) in cases {
            let tree = CgroupTree::new();
            let layout = Layout::with_kubelet_root(tree.path(), root).unwrap();
            let dir = tree.mkdir(path);
            assert_eq!(
                pod_cgroup(&layout, &uid(UID), QosClass::BestEffort),
                Some(PodCgroup { path: dir, driver }),
                "{root} {driver}"
            );
            // Without the root the same pod is not found.
            let plain = Layout::new(tree.path());
            assert_eq!(pod_cgroup(&plain, &uid(UID), QosClass::BestEffort), None);
        }
    }

    #[test]
    fn kubelet_roots_are_absolute_names_without_traversal() {
        for (root, said) in [("/", "/"), ("/kubelet", "/kubelet"), ("/a/b/", "/a/b")] {
            let layout = Layout::with_kubelet_root("/m", root).unwrap();
            assert_eq!(layout.kubelet_root(), said);
        }
        for bad in [
            "", "kubelet", "/a//b", "/..", "/a/../b", "/./a", "/a_b", "/a\0", "/a b",
        ] {
            let err = Layout::with_kubelet_root("/m", bad).unwrap_err();
            assert!(
                matches!(err, CgroupError::KubeletRoot { .. }),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn finds_each_runtimes_container_below_its_pod() {
        let cases = [
            (Driver::Cgroupfs, "containerd", HEX.to_owned()),
            (Driver::Cgroupfs, "cri-o", format!("crio-{HEX}")),
            (
                Driver::Systemd,
                "containerd",
                format!("cri-containerd-{HEX}.scope"),
            ),
            (Driver::Systemd, "cri-o", format!("crio-{HEX}.scope")),
        ];
        for (driver, runtime, dir_name) in cases {
            let tree = CgroupTree::new();
            let pod_dir = tree.mkdir(expected(driver, QosClass::Burstable));
            let pod = PodCgroup {
                path: pod_dir.clone(),
                driver,
            };
            let id = ContainerId::parse(&format!("{runtime}://{HEX}")).unwrap();
            assert_eq!(
                container_cgroup(&pod, &id),
                None,
                "{driver} {runtime} before mkdir"
            );
            // CRI-O's monitor sits beside the container: never taken for it.
            if runtime == "cri-o" {
                let conmon = match driver {
                    Driver::Cgroupfs => format!("crio-conmon-{HEX}"),
                    Driver::Systemd => format!("crio-conmon-{HEX}.scope"),
                };
                tree.mkdir(&format!(
                    "{}/{conmon}",
                    expected(driver, QosClass::Burstable)
                ));
                assert_eq!(
                    container_cgroup(&pod, &id),
                    None,
                    "conmon taken for the container"
                );
            }
            let dir = tree.mkdir(&format!(
                "{}/{dir_name}",
                expected(driver, QosClass::Burstable)
            ));
            assert_eq!(container_cgroup(&pod, &id), Some(dir), "{driver} {runtime}");
            // The other runtime's id of the same hex is not this container.
            let other = if runtime == "cri-o" {
                "containerd"
            } else {
                "cri-o"
            };
            let other = ContainerId::parse(&format!("{other}://{HEX}")).unwrap();
            assert_eq!(container_cgroup(&pod, &other), None, "{driver} {runtime}");
        }
    }
}
