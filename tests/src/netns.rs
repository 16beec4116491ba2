//! A network namespace made for one test (`ip netns add`), with `lo` up.
//! Used for multi-node tests: one namespace per node, joined by veth pairs.

use std::ffi::OsStr;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use crate::run_ok;

const IP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct TestNetns {
    name: String,
}

impl TestNetns {
    /// Creates `mesh-test-<hint>-<pid>-<n>` and brings its loopback up.
    pub fn new(hint: &str) -> Result<Self> {
        let name = format!(
            "mesh-test-{}-{}-{}",
            crate::sanitize(hint),
            std::process::id(),
            crate::next_id()
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]), IP_TIMEOUT)?;
        // From here on Drop deletes it.
        let ns = TestNetns { name };
        run_ok(
            Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]),
            IP_TIMEOUT,
        )?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec <name> <program>`: add args and spawn as usual. Combine
    /// with a cgroup by wrapping: `cg.command("ip").args(["netns", "exec", ns.name(), ...])`.
    pub fn exec(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        if let Err(e) = run_ok(
            Command::new("ip").args(["netns", "del", &self.name]),
            IP_TIMEOUT,
        ) {
            eprintln!("mesh-tests: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(name: &str) -> bool {
        let out = run_ok(Command::new("ip").args(["netns", "list"]), IP_TIMEOUT).unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name))
    }

    #[test]
    fn create_exec_delete() {
        let ns = TestNetns::new("unit").unwrap();
        let name = ns.name().to_string();
        assert!(listed(&name));
        // Inside: only lo, and it is up.
        let out = run_ok(ns.exec("ip").args(["-o", "link"]), IP_TIMEOUT).unwrap();
        let links = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(links.lines().count(), 1, "{links}");
        assert!(links.contains("lo:") && links.contains("UP"), "{links}");
        drop(ns);
        assert!(!listed(&name));
    }
}
