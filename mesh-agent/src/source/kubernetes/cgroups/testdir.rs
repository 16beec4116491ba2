//! Real cgroup directories for the tests: a tree of one test's own under
//! the cgroup v2 mount, removed deepest first when the test ends (also when
//! it panics). No process ever joins them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Deeper than any layout the tests build: the removal stops there.
const MAX_DEPTH: usize = 16;

pub struct CgroupTree {
    root: PathBuf,
}

impl CgroupTree {
    /// `<cgroup v2 mount>/mesh-test-cgroups-<pid>-<n>`, one per call, so
    /// tests running in parallel threads never share a directory.
    pub fn new() -> CgroupTree {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mount = crate::bpf::cgroup2_mount().expect("these tests need a cgroup v2 mount");
        let name = format!(
            "mesh-test-cgroups-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let root = mount.join(name);
        std::fs::create_dir(&root)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e} (run as root)", root.display()));
        CgroupTree { root }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Creates `relative` and the levels above it; returns its full path.
    pub fn mkdir(&self, relative: &str) -> PathBuf {
        let path = self.root.join(relative);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        path
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        remove_tree(&self.root, 0);
    }
}

/// rmdir of a cgroup takes its interface files with it, but not its
/// children: remove those first.
fn remove_tree(dir: &Path, depth: usize) {
    if depth < MAX_DEPTH
        && let Ok(entries) = std::fs::read_dir(dir)
    {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path(), depth + 1);
            }
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        eprintln!("leaving cgroup {} behind: {e}", dir.display());
    }
}
