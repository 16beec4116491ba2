//! meshctl: shows and changes what this node's agent does. It talks only to
//! the agent's admin API, or, when no agent answers, reads the pinned maps
//! for a read-only view.
//!
//! Exit codes: 0 success, 1 the command failed, 2 bad usage, 3 no agent
//! answered on the admin socket (a read-only view may still be printed).

mod authz;
mod ca;
mod certs;
mod debug_log;
mod offline;
mod redirect;
mod table;
mod tunnels;

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode, time::Duration};

use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};

use crate::admin::{self, AdminClientError, EventsResponse, ServicesResponse, StatusResponse};
use crate::explain::ExplainResponse;
use crate::overrides::{Action, OverrideRequest, OverrideResponse};
use table::Table;

#[derive(Parser, Debug)]
#[command(
    name = "meshctl",
    version,
    about = "Show and change what mesh does on this node"
)]
struct Cli {
    /// The agent's admin socket.
    #[arg(long, global = true, env = "MESH_ADMIN_SOCKET", default_value = admin::DEFAULT_SOCKET)]
    admin_socket: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Where the agent pins its maps; read when no agent answers.
    #[arg(long, global = true, default_value = "/sys/fs/bpf/mesh")]
    bpffs: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The agent: readiness, configuration, reloads, attached programs.
    Status,
    /// Services with their backends, weights and the kernel's connection counts.
    Services,
    /// Every backend: weight, state, health, live and total connections.
    Backends {
        /// Only this service's backends.
        service: Option<String>,
    },
    /// Follow the kernel's balancing decisions as they happen.
    Watch {
        #[arg(long)]
        service: Option<String>,
        /// Only this client: a cgroup id or network-namespace cookie.
        #[arg(long)]
        client: Option<u64>,
        /// Stop after this many decisions.
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this many seconds.
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Which backend the kernel would choose for a client, and why.
    Explain {
        service: String,
        /// The client's cgroup directory.
        #[arg(long)]
        client: Option<PathBuf>,
    },
    /// Stop new connections to a backend (runtime override; existing ones continue).
    Drain {
        /// ADDRESS:PORT of the backend.
        backend: std::net::SocketAddr,
        /// Only in this service (default: every service that has it).
        #[arg(long)]
        service: Option<String>,
    },
    /// Undo `drain`.
    Undrain {
        backend: std::net::SocketAddr,
        #[arg(long)]
        service: Option<String>,
    },
    /// Override a backend's weight at runtime (`--clear` returns to the config).
    Weight {
        backend: std::net::SocketAddr,
        /// The new weight, 0 to 65535.
        #[arg(required_unless_present = "clear")]
        weight: Option<u32>,
        #[arg(long, conflicts_with = "weight")]
        clear: bool,
        #[arg(long)]
        service: Option<String>,
    },
    /// Node totals: connections, refusals, map fill, redirect.
    Stats,
    /// Print a shell completion script.
    Completion { shell: clap_complete::Shell },
    /// Recent balancing decisions the kernel reported, oldest first.
    Events {
        /// Only this service's decisions.
        #[arg(long)]
        service: Option<String>,
        /// At most this many (the newest).
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Same-node redirect: counters and node-local addresses; `on`/`off`
    /// switches it at runtime (connections already redirected go back to TCP
    /// when switched off and stay there).
    Redirect {
        #[arg(value_enum)]
        switch: Option<redirect::Switch>,
    },
    /// The cross-node mTLS tunnel: this node's certificate, and per peer
    /// node its connections, streams, bytes each way, age and expiry.
    Tunnels,
    /// The identities this node holds: SPIFFE ID, serial, issuer, validity
    /// and time left, the trust bundle's roots, and the last reload (its
    /// time, error and next retry).
    Certs,
    /// Whether the source's own view (Kubernetes: the API's objects), the
    /// agent's state and the kernel's maps agree, service by service; each
    /// disagreement with how long it has stood.
    Diff,
    /// Kernel-side debug logs at the balancing decisions, forwarded into the
    /// agent's log (target `mesh_kernel`); `on`/`off` switches them. Off,
    /// they cost one branch per decision.
    DebugLog {
        #[arg(value_enum)]
        switch: Option<redirect::Switch>,
    },
    /// The mesh CA and node certificates (on the operator's machine).
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Authorization of tunnel streams at their destination.
    #[command(subcommand)]
    Authz(authz::AuthzCommand),
}

const EXIT_FAILED: u8 = 1;
const EXIT_UNREACHABLE: u8 = 3;

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Admin(#[from] AdminClientError),
    #[error("cannot encode the answer: {0}")]
    Encode(String),
    /// No agent, but a read-only view from the pins was printed.
    #[error("{0}")]
    Offline(String),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Admin(e) if e.is_unreachable() => EXIT_UNREACHABLE,
            CliError::Offline(_) => EXIT_UNREACHABLE,
            _ => EXIT_FAILED,
        }
    }
}

/// Entry point of the `meshctl` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    table::use_colour(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none());
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match runtime.block_on(execute(&cli)) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn execute(cli: &Cli) -> Result<String, CliError> {
    let socket = &cli.admin_socket;
    let out = cli.output;
    match &cli.command {
        Command::Status => match admin::get::<StatusResponse>(socket, admin::PATH_STATUS).await {
            Ok(status) => render(out, &status, render_status),
            Err(e) if e.is_unreachable() => offline::status(&cli.bpffs, e),
            Err(e) => Err(e.into()),
        },
        Command::Services => {
            match admin::get::<ServicesResponse>(socket, admin::PATH_SERVICES).await {
                Ok(services) => render(out, &services, render_services),
                Err(e) if e.is_unreachable() => offline::services(&cli.bpffs, out, e),
                Err(e) => Err(e.into()),
            }
        }
        Command::Backends { service } => {
            let mut services: ServicesResponse = admin::get(socket, admin::PATH_SERVICES).await?;
            if let Some(name) = service {
                services.services.retain(|s| &s.name == name);
                if services.services.is_empty() {
                    return Err(CliError::Admin(AdminClientError::Status {
                        status: 404,
                        body: format!("no service named '{name}'; `meshctl services` lists them"),
                    }));
                }
            }
            render(out, &services, render_backends)
        }
        Command::Watch {
            service,
            client,
            count,
            seconds,
        } => watch(socket, out, service.as_deref(), *client, *count, *seconds).await,
        Command::Explain { service, client } => {
            let mut path = format!("{}?service={service}", admin::PATH_EXPLAIN);
            if let Some(cgroup) = client {
                path += &format!("&cgroup={}", encode(&cgroup.display().to_string()));
            }
            let view: ExplainResponse = admin::get(socket, &path).await?;
            render(out, &view, render_explain)
        }
        Command::Drain { backend, service } => {
            set_override(socket, out, *backend, service, Action::Drain).await
        }
        Command::Undrain { backend, service } => {
            set_override(socket, out, *backend, service, Action::Undrain).await
        }
        Command::Weight {
            backend,
            weight,
            clear,
            service,
        } => {
            let action = match (weight, clear) {
                (Some(w), false) => Action::Weight(*w),
                _ => Action::ClearWeight,
            };
            set_override(socket, out, *backend, service, action).await
        }
        Command::Stats => {
            let status: StatusResponse = admin::get(socket, admin::PATH_STATUS).await?;
            let services: ServicesResponse = admin::get(socket, admin::PATH_SERVICES).await?;
            let stats = Stats::from(&status, &services);
            render(out, &stats, render_stats)
        }
        Command::Completion { shell } => {
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "meshctl", &mut buf);
            Ok(String::from_utf8_lossy(&buf).into_owned())
        }
        Command::Events { service, limit } => {
            let mut path = format!("{}?limit={limit}", admin::PATH_EVENTS);
            if let Some(service) = service {
                path += &format!("&service={service}");
            }
            let events: EventsResponse = admin::get(socket, &path).await?;
            render(out, &events, render_events)
        }
        Command::Redirect { switch } => {
            let view = redirect::execute(socket, *switch).await?;
            render(out, &view, redirect::render)
        }
        Command::Tunnels => {
            let view: admin::TunnelsResponse = admin::get(socket, admin::PATH_TUNNELS).await?;
            render(out, &view, tunnels::render)
        }
        Command::Diff => {
            let view: crate::diff::DiffResponse = admin::get(socket, admin::PATH_DIFF).await?;
            render(out, &view, render_diff)
        }
        Command::Certs => {
            let view: admin::CertsResponse = admin::get(socket, admin::PATH_CERTS).await?;
            render(out, &view, certs::render)
        }
        Command::DebugLog { switch } => {
            let view = debug_log::execute(socket, *switch).await?;
            render(out, &view, debug_log::render)
        }
        Command::Ca(command) => ca::execute(command, out),
        Command::Authz(command) => {
            let view: crate::identity::AuthzCheck = admin::get(socket, &command.path()).await?;
            render(out, &view, authz::render)
        }
    }
}

async fn set_override(
    socket: &std::path::Path,
    out: Output,
    backend: std::net::SocketAddr,
    service: &Option<String>,
    action: Action,
) -> Result<String, CliError> {
    let request = OverrideRequest {
        backend,
        service: service.clone(),
        action,
    };
    let answer: OverrideResponse = admin::post(socket, admin::PATH_OVERRIDES, &request).await?;
    render(out, &answer, |a| {
        format!(
            "{backend}: {:?} in {} (runtime override; `meshctl backends` shows it)\n",
            request.action,
            a.services.join(", ")
        )
    })
}

/// Prints decisions as they arrive: a table row each, or a JSON/YAML
/// document each (JSON lines) for scripts.
async fn watch(
    socket: &std::path::Path,
    out: Output,
    service: Option<&str>,
    client: Option<u64>,
    count: Option<usize>,
    seconds: Option<u64>,
) -> Result<String, CliError> {
    use std::io::Write as _;
    let deadline = seconds.map(|s| std::time::Instant::now() + Duration::from_secs(s));
    let first: EventsResponse =
        admin::get(socket, &format!("{}?limit=0", admin::PATH_EVENTS)).await?;
    let mut after = first.next.checked_sub(1);
    let mut seen = 0;
    let mut header = true;
    loop {
        let mut path = format!("{}?limit=1000", admin::PATH_EVENTS);
        if let Some(a) = after {
            path += &format!("&after={a}");
        }
        if let Some(s) = service {
            path += &format!("&service={s}");
        }
        if let Some(c) = client {
            path += &format!("&client={c}");
        }
        let mut batch: EventsResponse = admin::get(socket, &path).await?;
        if let Some(limit) = count {
            batch.events.truncate(limit - seen);
        }
        if let Some(last) = batch.events.last() {
            after = Some(last.seq);
        }
        seen += batch.events.len();
        let text = match out {
            Output::Table => {
                let rendered = render_events(&batch);
                let skip = if header { 0 } else { 1 };
                header = false;
                rendered
                    .lines()
                    .skip(skip)
                    .map(|l| format!("{l}\n"))
                    .collect()
            }
            _ => batch
                .events
                .iter()
                .map(|e| serde_json::to_string(e).map(|j| j + "\n"))
                .collect::<Result<String, _>>()
                .map_err(|e| CliError::Encode(e.to_string()))?,
        };
        if !batch.events.is_empty() || header {
            print!("{text}");
            let _ = std::io::stdout().flush();
        }
        if count.is_some_and(|c| seen >= c)
            || deadline.is_some_and(|d| std::time::Instant::now() >= d)
        {
            return Ok(String::new());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn render<T: serde::Serialize>(
    output: Output,
    value: &T,
    table: impl Fn(&T) -> String,
) -> Result<String, CliError> {
    Ok(match output {
        Output::Json => {
            serde_json::to_string_pretty(value).map_err(|e| CliError::Encode(e.to_string()))? + "\n"
        }
        Output::Yaml => {
            serde_saphyr::to_string(value).map_err(|e| CliError::Encode(e.to_string()))?
        }
        Output::Table => table(value),
    })
}

/// Node totals for `meshctl stats`.
#[derive(serde::Serialize)]
struct Stats {
    services: usize,
    backends: usize,
    connections: u64,
    udp_flows: u64,
    refused_no_backend: u64,
    refused_policy: u64,
    live_connections: u64,
    unhealthy_backends: usize,
    sockets_destroyed: u64,
    maps: Vec<admin::MapFill>,
}

impl Stats {
    fn from(status: &StatusResponse, services: &ServicesResponse) -> Self {
        let backends = services.services.iter().flat_map(|s| &s.backends);
        Self {
            services: services.services.len(),
            backends: backends.clone().count(),
            connections: services.services.iter().map(|s| s.connections).sum(),
            udp_flows: services.services.iter().map(|s| s.udp_flows).sum(),
            refused_no_backend: services.services.iter().map(|s| s.no_backend).sum(),
            refused_policy: services.services.iter().map(|s| s.denied).sum(),
            live_connections: backends.clone().map(|b| b.active).sum(),
            unhealthy_backends: backends.filter(|b| b.health != "healthy").count(),
            sockets_destroyed: status.sockets_destroyed,
            maps: status.maps.clone(),
        }
    }
}

fn render_stats(s: &Stats) -> String {
    let mut t = Table::new(["FIELD", "VALUE"]);
    for (name, value) in [
        ("services", s.services.to_string()),
        ("backends", s.backends.to_string()),
        ("connections balanced", s.connections.to_string()),
        ("UDP flows balanced", s.udp_flows.to_string()),
        ("refused: no backend", s.refused_no_backend.to_string()),
        ("refused: policy", s.refused_policy.to_string()),
        ("live TCP connections", s.live_connections.to_string()),
        ("backends not healthy", s.unhealthy_backends.to_string()),
        ("sockets destroyed", s.sockets_destroyed.to_string()),
    ] {
        t.row([name, &value]);
    }
    for m in &s.maps {
        t.row([
            &format!("map {}", m.name),
            &format!("{} / {}", m.entries, m.capacity),
        ]);
    }
    t.render()
}

fn render_backends(r: &ServicesResponse) -> String {
    let mut t = Table::new([
        "SERVICE",
        "BACKEND",
        "WEIGHT",
        "STATE",
        "HEALTH",
        "LIVE",
        "CONNECTIONS",
        "UDP FLOWS",
        "OVERRIDE",
    ]);
    for svc in &r.services {
        for b in &svc.backends {
            t.row([
                &svc.name,
                &std::net::SocketAddr::new(b.address, b.port).to_string(),
                &b.weight.to_string(),
                &b.state,
                &b.health,
                &b.active.to_string(),
                &b.connections.to_string(),
                &b.udp_flows.to_string(),
                b.overridden.as_deref().unwrap_or("-"),
            ]);
        }
    }
    t.render()
}

fn render_explain(e: &ExplainResponse) -> String {
    let mut out = String::new();
    let mut t = Table::new(["FIELD", "VALUE"]);
    t.row([
        "service",
        &format!("{} ({}, {})", e.service, e.protocol, e.algorithm),
    ]);
    if let Some(c) = &e.client {
        t.row([
            "client",
            &format!(
                "{} (cgroup id {}, client id {})",
                c.cgroup, c.cgroup_id, c.client_id
            ),
        ]);
        t.row(["identity", c.identity.as_deref().unwrap_or("-")]);
    }
    t.row(["policy", &e.policy]);
    t.row(["decision", &e.decision]);
    t.row(["chosen", e.chosen.as_deref().unwrap_or("-")]);
    t.row(["verdict", &e.verdict]);
    out += &t.render();
    out.push('\n');
    let mut c = Table::new(["BACKEND", "SLOTS", "SHARE", "LIVE"]);
    for cand in &e.candidates {
        c.row([
            &cand.backend,
            &cand.slots.to_string(),
            &format!("{:.1}%", cand.share * 100.0),
            &cand.live_connections.to_string(),
        ]);
    }
    out += &c.render();
    if !e.remote.is_empty() {
        out.push('\n');
        let mut r = Table::new(["REMOTE BACKEND", "NODE", "CARRIES", "AT THE DESTINATION"]);
        for v in &e.remote {
            r.row([
                &v.backend,
                &v.node,
                v.identity.as_deref().unwrap_or("(no workload identity)"),
                &v.destination,
            ]);
        }
        out += &r.render();
    }
    out
}

fn render_status(s: &StatusResponse) -> String {
    let maps: Vec<String> = s
        .maps
        .iter()
        .map(|m| format!("{} {}/{}", m.name, m.entries, m.capacity))
        .collect();
    let mut t = Table::new(["FIELD", "VALUE"]);
    t.row(["ready", &s.ready.to_string()]);
    t.row(["version", &s.version]);
    t.row(["config", &s.config_path]);
    t.row(["config generation", &s.config_generation.to_string()]);
    t.row([
        "reloads ok / failed",
        &format!("{} / {}", s.reloads_ok, s.reloads_failed),
    ]);
    t.row([
        "last reload error",
        s.last_reload_error.as_deref().unwrap_or("-"),
    ]);
    t.row(["sockets destroyed", &s.sockets_destroyed.to_string()]);
    let panic = if s.panic_services.is_empty() {
        "-".to_owned()
    } else {
        format!(
            "PANIC (all backends unhealthy): {}",
            s.panic_services.join(", ")
        )
    };
    t.row(["panic mode", &panic]);
    t.row(["cgroup", &s.cgroup]);
    t.row(["bpffs", &s.bpffs]);
    t.row(["programs", &s.programs.join(", ")]);
    t.row(["maps (entries/capacity)", &maps.join(", ")]);
    t.row(["services", &s.services.to_string()]);
    t.row(["metrics", s.metrics_addr.as_deref().unwrap_or("off")]);
    t.row([
        "kernel debug log",
        match (s.kernel_debug_log, s.kernel_log_sites_removed) {
            (true, _) => "on",
            (false, false) => "off",
            (false, true) => "off (log sites removed at load: --kernel-debug-log never)",
        },
    ]);
    t.render()
}

fn render_services(r: &ServicesResponse) -> String {
    let mut t = Table::new([
        "SERVICE",
        "FRONTEND",
        "ALGORITHM",
        "BACKEND",
        "STATE",
        "HEALTH",
        "WEIGHT",
        "SHARE",
        "CONNECTIONS",
        "UDP FLOWS",
        "LIVE",
    ]);
    for svc in &r.services {
        let frontend = match svc.vip {
            std::net::IpAddr::V4(ip) => format!("{ip}:{}/{}", svc.port, svc.protocol),
            std::net::IpAddr::V6(ip) => format!("[{ip}]:{}/{}", svc.port, svc.protocol),
        };
        let mut algorithm = match svc.affinity_timeout_s {
            Some(timeout) => format!("{}+affinity({timeout}s)", svc.algorithm),
            None => svc.algorithm.clone(),
        };
        if !svc.same_node_redirect {
            algorithm += ", no redirect";
        }
        if svc.mtls == "strict" {
            algorithm += ", mtls strict";
        }
        let name = svc.name.as_str();
        if svc.backends.is_empty() {
            t.row([
                name,
                &frontend,
                &algorithm,
                "(none: connects refused)",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
            ]);
        }
        let total_weight: u64 = svc
            .backends
            .iter()
            .filter(|b| b.state == "active")
            .map(|b| u64::from(b.weight))
            .sum();
        for (i, b) in svc.backends.iter().enumerate() {
            let share = if total_weight == 0 || b.state != "active" {
                "-".to_owned()
            } else {
                format!("{:.1}%", 100.0 * f64::from(b.weight) / total_weight as f64)
            };
            let first = i == 0;
            let mut backend = std::net::SocketAddr::new(b.address, b.port).to_string();
            match (&b.node, b.tunnel) {
                (Some(node), true) => backend += &format!(" @{node} (mTLS)"),
                (Some(node), false) => backend += &format!(" @{node}"),
                (None, _) => {}
            }
            t.row([
                if first { name } else { "" },
                if first { frontend.as_str() } else { "" },
                if first { algorithm.as_str() } else { "" },
                &backend,
                &b.state,
                &b.health,
                &b.weight.to_string(),
                &share,
                &b.connections.to_string(),
                &b.udp_flows.to_string(),
                &b.active.to_string(),
            ]);
        }
        for (what, count) in [
            ("(refused: no backend)", svc.no_backend),
            ("(refused: policy)", svc.denied),
            ("(through the tunnel)", svc.tunnelled),
            ("(udp direct to another node)", svc.udp_direct_remote),
        ] {
            if count > 0 {
                t.row([
                    "",
                    "",
                    "",
                    what,
                    "-",
                    "-",
                    "-",
                    "-",
                    &count.to_string(),
                    "-",
                    "-",
                ]);
            }
        }
    }
    t.render()
}

fn render_events(r: &EventsResponse) -> String {
    let mut t = Table::new([
        "TIME(ms)",
        "SERVICE",
        "PROTO",
        "VERDICT",
        "BACKEND",
        "ALGORITHM",
        "SLOT",
        "AFFINITY",
        "CLIENT",
        "IDENTITY",
    ]);
    for e in &r.events {
        t.row([
            &e.unix_ms.to_string(),
            &e.service,
            &e.protocol,
            &e.verdict,
            e.backend.as_deref().unwrap_or("-"),
            &e.algorithm,
            &e.slot.map_or("-".to_owned(), |s| s.to_string()),
            if e.affinity_hit { "hit" } else { "-" },
            &e.client.to_string(),
            e.identity.as_deref().unwrap_or("-"),
        ]);
    }
    t.render()
}

fn render_diff(r: &crate::diff::DiffResponse) -> String {
    let mut out = format!(
        "{} services checked against the kernel{}\n",
        r.services_checked,
        if r.source_compared {
            ", and against the source's own view"
        } else {
            " (the file source has no view of its own to compare)"
        }
    );
    if r.disagreements.is_empty() {
        out.push_str("no disagreements\n");
        return out;
    }
    let mut t = Table::new(["LAYER", "SERVICE", "STANDING", "DETAIL"]);
    for d in &r.disagreements {
        let layer = format!("{:?}", d.layer).to_lowercase();
        let age = format!("{:.1}s", d.age_ms as f64 / 1e3);
        t.row([layer.as_str(), &d.service, &age, &d.detail]);
    }
    out.push('\n');
    out.push_str(&t.render());
    out
}
