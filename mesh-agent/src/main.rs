//! `mesh-agent`: the per-node daemon.

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use mesh_agent::{
    admin, agent,
    bpf::{MapSizes, PinLayout},
    config,
    kernel_log::KernelDebugLog,
    metrics,
    source::{KubeOptions, SourceOptions},
};

#[derive(Parser, Debug)]
#[command(
    name = "mesh-agent",
    version,
    about = "mesh's node agent: in-kernel service load balancing"
)]
struct Cli {
    /// Log format: text for people, json for log pipelines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `--source`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum SourceKind {
    File,
    Kubernetes,
}

/// An on/off flag value.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Switch {
    On,
    Off,
}

// Parsed once at start; boxing `Run` would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Attach the programs and keep the kernel's maps in step with the config.
    Run {
        /// The YAML configuration (see examples/mesh.yaml): a file, or a
        /// directory whose `*.yaml` files together make the configuration
        /// (service and workload names unique across them).
        #[arg(long, env = "MESH_CONFIG")]
        config: Option<PathBuf>,
        /// Where services, endpoints and workloads come from: the `--config`
        /// file, or the Kubernetes API (Services, EndpointSlices, this
        /// node's Pods and Node).
        #[arg(long, env = "MESH_SOURCE", value_enum, default_value_t = SourceKind::File)]
        source: SourceKind,
        /// Kubernetes: a kubeconfig file [default: the pod's service account].
        #[arg(long, env = "MESH_KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// Kubernetes: the trust domain of workloads' SPIFFE IDs
        /// (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>).
        #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = mesh_agent::state::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Kubernetes: /readyz fails while a watch has been failing this long.
        #[arg(long, default_value_t = 60)]
        watch_stale_seconds: u64,
        /// Kubernetes: the kubelet's --cgroup-root, under which it makes pod
        /// cgroups (`/kubelet` on kind), for either cgroup driver.
        #[arg(long, default_value = "/")]
        kubelet_cgroup_root: String,
        /// Kubernetes: how often Nodes (this one's zone, the addresses of
        /// nodes hosting endpoints) are read again.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
        node_refresh_seconds: u64,
        /// Cgroup whose sockets are balanced [default: the root of the cgroup v2 tree].
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// bpffs directory for pinned maps and links.
        #[arg(long, default_value = "/sys/fs/bpf/mesh")]
        bpffs: PathBuf,
        /// Unix socket of the admin API (owner-only).
        #[arg(long, env = "MESH_ADMIN_SOCKET", default_value = admin::DEFAULT_SOCKET)]
        admin_socket: PathBuf,
        /// How often the config file is checked for changes, in milliseconds
        /// (with inotify on, a directory is only rescanned on SIGHUP or
        /// when inotify lost events).
        #[arg(long, default_value_t = 1000)]
        watch_interval_ms: u64,
        /// Apply config changes as inotify reports them; `off`: only on
        /// SIGHUP and the poll.
        #[arg(long, value_enum, default_value_t = Switch::On)]
        inotify: Switch,
        /// SO_MARK of the agent's own sockets, which the programs never touch.
        #[arg(long, default_value_t = agent::DEFAULT_SOCKET_MARK, value_parser = parse_u32)]
        socket_mark: u32,
        /// Capacity of the service map.
        #[arg(long, default_value_t = MapSizes::default().services)]
        max_services: u32,
        /// Capacity of the backend map.
        #[arg(long, default_value_t = MapSizes::default().backends)]
        max_backends: u32,
        /// Capacity of the slot map (all services' selection tables).
        #[arg(long, default_value_t = MapSizes::default().slots)]
        max_slots: u32,
        /// Map layout version to pin under; only for testing upgrades.
        #[arg(long, hide = true, default_value_t = mesh_common::SCHEMA_VERSION)]
        schema_version: u32,
        /// Report every balancing decision on the kernel's event ring buffer.
        #[arg(long, value_enum, default_value_t = Switch::On)]
        events: Switch,
        /// Same-node redirect: local-to-local TCP skips the TCP/IP stack
        /// (switch at runtime with `meshctl redirect on|off`).
        #[arg(long, value_enum, default_value_t = Switch::On)]
        same_node_redirect: Switch,
        /// An address on this node besides its interfaces' (a local pod);
        /// repeatable. Loopback is always local.
        #[arg(long = "local-address", value_name = "IP")]
        local_addresses: Vec<std::net::IpAddr>,
        /// Do not count this node's interface addresses, nor those of the
        /// network namespaces its workloads live in, as local (only loopback
        /// and --local-address).
        #[arg(long)]
        no_discover_local_addresses: bool,
        /// A TCP port whose connections (either end) are never redirected,
        /// e.g. a receiver that reads with splice(); repeatable.
        #[arg(long = "redirect-exclude-port", value_name = "PORT", value_parser = parse_port)]
        redirect_exclude_ports: Vec<u16>,
        /// Where to serve Prometheus metrics (/metrics), liveness (/healthz)
        /// and readiness (/readyz): IP:PORT (port 0 picks one; `meshctl
        /// status` shows it), or `off`.
        #[arg(long, env = "MESH_METRICS_ADDR", default_value = metrics::DEFAULT_ADDR)]
        metrics_addr: metrics::MetricsAddr,
        /// Kernel-side debug logs (aya-log) at the balancing decisions,
        /// forwarded into this log with target `mesh_kernel` (switch at
        /// runtime with `meshctl debug-log on|off`). Off costs the hot path
        /// one branch per decision; `never` loads the programs without their
        /// log sites (the verifier removes them) and cannot be switched on.
        #[arg(long, value_enum, default_value_t = KernelDebugLog::Off)]
        kernel_debug_log: KernelDebugLog,
        /// This node's name in the mesh (a name in the config's `nodes:`);
        /// backends of other nodes are reached through the tunnel
        /// [default: the hostname].
        #[arg(long, env = "MESH_NODE_NAME")]
        node_name: Option<String>,
        /// Directory holding this node's certificate, key and trust bundle
        /// (cert.pem, key.pem, bundle.pem, as `meshctl ca issue` writes
        /// them): turns the cross-node mTLS tunnel on.
        #[arg(long, env = "MESH_IDENTITY_DIR")]
        identity_dir: Option<PathBuf>,
        /// Where the tunnel's outbound listener takes the connections the
        /// kernel captures (IPv4 clients).
        #[arg(long, default_value = "127.0.0.1:15001")]
        tunnel_outbound: std::net::SocketAddrV4,
        /// The outbound listener for IPv6 clients (same port as the IPv4 one).
        #[arg(long, default_value = "[::1]:15001")]
        tunnel_outbound6: std::net::SocketAddrV6,
        /// Where other nodes' agents reach this one (HBONE, mTLS).
        #[arg(long, default_value = "0.0.0.0:15008")]
        tunnel_inbound: std::net::SocketAddr,
        /// On SIGTERM, how long tunnelled connections may take to finish
        /// while a new agent takes the new ones.
        #[arg(long, default_value_t = 30)]
        tunnel_drain_seconds: u64,
        /// Data-plane threads of the tunnel, each with its own listeners
        /// and connections (default: one per CPU, at most 8).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
        tunnel_threads: Option<u16>,
    },
    /// Validate a configuration file and exit.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Detach the programs and remove every pinned map and link.
    Cleanup {
        #[arg(long, default_value = "/sys/fs/bpf/mesh")]
        bpffs: PathBuf,
    },
}

/// A TCP port, 1..=65535.
fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) => Err("port 0 names no service; give a port in 1..=65535".into()),
        Ok(p) => Ok(p),
        Err(e) => Err(format!("{s:?} is not a port in 1..=65535: {e}")),
    }
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("{s}: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// Whether `dir` holds a node identity. A DaemonSet mounts each node's
/// identity directory whether or not it was issued yet: a node without one
/// runs without the tunnel (and says so) instead of failing to start.
fn has_identity(dir: &std::path::Path) -> bool {
    let cert = dir.join("cert.pem");
    let present = cert.exists();
    if !present {
        tracing::warn!(
            "no node identity at {} yet: the cross-node tunnel stays off until one is issued there (`meshctl ca issue`) and the agent restarts",
            cert.display()
        );
    }
    present
}

/// One tunnel thread per CPU the agent may use, at most 8.
fn default_tunnel_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// Lifts the soft limit on open files to the hard one, as Go's runtime and
/// Envoy's docs do: HTTP health checks hold one connection per backend, so a
/// node with a thousand backends would hit the common soft limit of 1024.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0
        || limit.rlim_cur >= limit.rlim_max
    {
        return;
    }
    let soft = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
        tracing::debug!(from = soft, to = limit.rlim_max, "open-file limit raised");
    } else {
        tracing::warn!(
            soft,
            "cannot raise the open-file limit: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The error and its causes on one line, skipping causes whose text the
/// message before already includes (typed errors quote their source).
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run {
            config,
            source,
            kubeconfig,
            trust_domain,
            watch_stale_seconds,
            node_refresh_seconds,
            kubelet_cgroup_root,
            cgroup,
            bpffs,
            admin_socket,
            watch_interval_ms,
            inotify,
            socket_mark,
            max_services,
            max_backends,
            max_slots,
            events,
            schema_version,
            same_node_redirect,
            local_addresses,
            no_discover_local_addresses,
            redirect_exclude_ports,
            metrics_addr,
            kernel_debug_log,
            node_name,
            identity_dir,
            tunnel_outbound,
            tunnel_outbound6,
            tunnel_inbound,
            tunnel_drain_seconds,
            tunnel_threads,
        } => {
            if tunnel_outbound.port() != tunnel_outbound6.port() {
                anyhow::bail!(
                    "--tunnel-outbound ({tunnel_outbound}) and --tunnel-outbound6 ({tunnel_outbound6}) must use one port: the kernel keeps one for both"
                );
            }
            let node_name = match node_name {
                Some(name) => name,
                None => hostname().context("cannot read the hostname; give --node-name")?,
            };
            let watch_interval = Duration::from_millis(watch_interval_ms.max(10));
            let identity_dir = identity_dir.filter(|dir| has_identity(dir));
            let source = match (source, config) {
                (SourceKind::File, Some(path)) => SourceOptions::File {
                    path,
                    inotify: inotify == Switch::On,
                    interval: watch_interval,
                },
                (SourceKind::File, None) => anyhow::bail!("--source=file needs --config"),
                (SourceKind::Kubernetes, _) => SourceOptions::Kubernetes(KubeOptions {
                    kubeconfig,
                    node_name: node_name.clone(),
                    trust_domain,
                    cgroups: mesh_agent::source::kubernetes::cgroups::Layout::with_kubelet_root(
                        mesh_agent::bpf::cgroup2_mount().context(
                            "Kubernetes mode finds pods' cgroups under the cgroup v2 mount",
                        )?,
                        &kubelet_cgroup_root,
                    )
                    .context("--kubelet-cgroup-root")?,
                    stale_after: Duration::from_secs(watch_stale_seconds),
                    node_refresh: Duration::from_secs(node_refresh_seconds),
                    peer_identities: identity_dir.is_some(),
                }),
            };
            let opts = agent::AgentOptions {
                source,
                cgroup,
                bpffs,
                admin_socket,
                watch_interval,
                socket_mark,
                map_sizes: MapSizes {
                    services: max_services,
                    backends: max_backends,
                    slots: max_slots,
                },
                events: events == Switch::On,
                schema_version,
                redirect: mesh_agent::redirect::RedirectOptions {
                    enabled: same_node_redirect == Switch::On,
                    local_addresses,
                    discover: !no_discover_local_addresses,
                    workload_cgroup: None,
                    exclude_ports: redirect_exclude_ports,
                },
                metrics_addr: metrics_addr.0,
                kernel_debug_log,
                node_name,
                tunnel: identity_dir.map(|identity_dir| mesh_agent::tunnel::TunnelSettings {
                    identity_dir,
                    outbound_v4: tunnel_outbound,
                    outbound_v6: tunnel_outbound6,
                    inbound: tunnel_inbound,
                    drain_timeout: Duration::from_secs(tunnel_drain_seconds),
                    threads: tunnel_threads.map_or_else(default_tunnel_threads, usize::from),
                }),
            };
            raise_open_files_limit();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            Ok(runtime.block_on(agent::run(opts))?)
        }
        Command::Check { config } => {
            let mut source = config::ConfigSource::new(&config);
            let update = source.load(&config::Scope::All)?;
            source.commit(update);
            let desired = source.current();
            println!(
                "{}: ok ({} services)",
                config.display(),
                desired.services.len()
            );
            Ok(())
        }
        Command::Cleanup { bpffs } => {
            let layout = PinLayout::new(&bpffs);
            let removed = layout
                .remove_all()
                .with_context(|| format!("cannot remove {}", bpffs.display()))?;
            if removed {
                println!(
                    "removed {} (programs detached, maps released)",
                    bpffs.display()
                );
            } else {
                println!("nothing pinned at {}", bpffs.display());
            }
            Ok(())
        }
    }
}

/// The kernel's hostname (what Kubernetes names the node by default).
fn hostname() -> std::io::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    Ok(name.trim().to_owned())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    /// The soft limit this test process starts with is lowered first, so the
    /// raise has something to do whatever the machine's defaults are.
    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain rlimit calls on this test's own process (nextest
        // runs each test in a process of its own).
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
            let hard = limit.rlim_max;
            assert!(hard > 64, "hard limit {hard} too low to test");
            limit.rlim_cur = 64;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
            super::raise_open_files_limit();
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
            assert_eq!(limit.rlim_cur, hard);
        }
    }
}
