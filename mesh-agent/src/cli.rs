//! meshctl: shows and changes what this node's agent does. It talks only to
//! the agent's admin API.
//!
//! Exit codes: 0 success, 1 the command failed, 2 bad usage, 3 no agent
//! answered on the admin socket.

mod redirect;
mod table;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};

use crate::admin::{self, AdminClientError, EventsResponse, ServicesResponse, StatusResponse};
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The agent: readiness, configuration, reloads, attached programs.
    Status,
    /// Services with their backends, weights and the kernel's connection counts.
    Services,
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
}

const EXIT_FAILED: u8 = 1;
const EXIT_UNREACHABLE: u8 = 3;

/// Entry point of the `meshctl` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
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
            ExitCode::from(if e.is_unreachable() {
                EXIT_UNREACHABLE
            } else {
                EXIT_FAILED
            })
        }
    }
}

async fn execute(cli: &Cli) -> Result<String, AdminClientError> {
    let socket = &cli.admin_socket;
    match cli.command {
        Command::Status => {
            let status: StatusResponse = admin::get(socket, admin::PATH_STATUS).await?;
            render(cli.output, &status, render_status)
        }
        Command::Services => {
            let services: ServicesResponse = admin::get(socket, admin::PATH_SERVICES).await?;
            render(cli.output, &services, render_services)
        }
        Command::Events { ref service, limit } => {
            let mut path = format!("{}?limit={limit}", admin::PATH_EVENTS);
            if let Some(service) = service {
                path += &format!("&service={service}");
            }
            let events: EventsResponse = admin::get(socket, &path).await?;
            render(cli.output, &events, render_events)
        }
        Command::Redirect { switch } => {
            let view = redirect::execute(socket, switch).await?;
            render(cli.output, &view, redirect::render)
        }
    }
}

fn render<T: serde::Serialize>(
    output: Output,
    value: &T,
    table: fn(&T) -> String,
) -> Result<String, AdminClientError> {
    Ok(match output {
        Output::Json => serde_json::to_string_pretty(value)? + "\n",
        Output::Table => table(value),
    })
}

fn render_status(s: &StatusResponse) -> String {
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
    t.row(["cgroup", &s.cgroup]);
    t.row(["bpffs", &s.bpffs]);
    t.row(["programs", &s.programs.join(", ")]);
    t.row(["services", &s.services.to_string()]);
    t.row(["metrics", s.metrics_addr.as_deref().unwrap_or("off")]);
    t.render()
}

fn render_services(r: &ServicesResponse) -> String {
    let mut t = Table::new([
        "SERVICE",
        "FRONTEND",
        "ALGORITHM",
        "BACKEND",
        "STATE",
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
        let algorithm = match svc.affinity_timeout_s {
            Some(timeout) => format!("{}+affinity({timeout}s)", svc.algorithm),
            None => svc.algorithm.clone(),
        };
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
            t.row([
                if first { name } else { "" },
                if first { frontend.as_str() } else { "" },
                if first { algorithm.as_str() } else { "" },
                &std::net::SocketAddr::new(b.address, b.port).to_string(),
                &b.state,
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
