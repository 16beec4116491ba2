//! Small python3 programs the tests run inside a node (its network
//! namespace and cgroup): servers and clients that are exactly what an
//! application there would be. One process type for all of them: its
//! stdout lines as they come, its end as JSON, killed by PID when dropped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::cluster::Node;
use crate::run_with_timeout;

/// An echo server on argv[1]:argv[2]: every connection, in a thread of its
/// own, gets back what it sends, then a FIN after its own. Prints
/// `listening` once it listens; bounded by an alarm.
pub const ECHO_SERVER: &str = r#"
import signal, socket, sys, threading
signal.alarm(300)
l = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET, socket.SOCK_STREAM)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2])))
l.listen(512)
print("listening", flush=True)
def echo(c):
    c.settimeout(60)
    try:
        while True:
            b = c.recv(262144)
            if not b:
                break
            c.sendall(b)
        c.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, _ = l.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"#;

/// [`ECHO_SERVER`] on `host:port` inside `node`, once it listens (≤ 10 s).
pub fn echo_server(node: &Node, host: &str, port: u16) -> Result<PyProcess> {
    let cmd = command(node, ECHO_SERVER, &[host, &port.to_string()]);
    PyProcess::ready(cmd, "the echo server", "listening")
}

/// `python3 -c program args...` inside `node` (its namespace and cgroup).
pub fn command(node: &Node, program: &str, args: &[&str]) -> Command {
    let mut cmd = node.command("python3");
    cmd.arg("-c").arg(program).args(args);
    cmd
}

/// Runs `program` inside `node` to completion (≤ `limit`); its trimmed
/// stdout, or its stderr as the error.
pub fn run(node: &Node, program: &str, args: &[&str], limit: Duration) -> Result<String> {
    let out = run_with_timeout(&mut command(node, program, args), limit)?;
    if !out.status.success() {
        bail!(
            "python in {} failed: {}",
            node.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A python3 process of ours (killed by PID on drop, if still running).
pub struct PyProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    what: String,
}

impl PyProcess {
    /// Starts `cmd` (a `python3 ...` command): stdin closed, stdout read
    /// line by line, stderr inherited.
    pub fn spawn(mut cmd: Command, what: &str) -> Result<PyProcess> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning {what}"))?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(PyProcess {
            child,
            lines,
            what: what.to_owned(),
        })
    }

    /// Starts `cmd` and waits (≤ 10 s) for it to print `ready` on a line
    /// of its own (a server that listens, say).
    pub fn ready(cmd: Command, what: &str, ready: &str) -> Result<PyProcess> {
        let py = Self::spawn(cmd, what)?;
        match py.line(Duration::from_secs(10)) {
            Ok(line) if line.trim() == ready => Ok(py),
            other => bail!("{what} did not print {ready:?}: {other:?}"),
        }
    }

    /// The next line, within `timeout`.
    pub fn line(&self, timeout: Duration) -> Result<String> {
        self.lines
            .recv_timeout(timeout)
            .with_context(|| format!("no line from {} within {timeout:?}", self.what))
    }

    /// Lines until one that `pred` accepts (returned), within `timeout`.
    pub fn until(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let line = self.line(deadline.saturating_duration_since(Instant::now()))?;
            if pred(&line) {
                return Ok(line);
            }
        }
    }

    /// The lines printed so far and not yet read.
    pub fn pending(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// Waits (≤ `limit`) for the program to exit successfully and parses
    /// what it printed and nobody read as one JSON value.
    pub fn finish(mut self, limit: Duration) -> Result<Value> {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                bail!("{} did not finish within {limit:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // The reader thread ends with stdout; collect all it sent.
        let out: Vec<String> = self.lines.iter().collect();
        let out = out.join("\n");
        if !status.success() {
            bail!("{} failed ({status}): {out}", self.what);
        }
        serde_json::from_str(out.trim()).with_context(|| format!("{} printed {out:?}", self.what))
    }
}

impl Drop for PyProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
