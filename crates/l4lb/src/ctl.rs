//! `l4lb ctl ...`: the admin API's client, for operators and scripts. It finds the admin
//! endpoint (and token) in the same config file l4lb runs with, or takes them as flags.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::Subcommand;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

/// What to ask the running l4lb.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Listeners, pools and backends as a table (`--json` for the raw status).
    Status {
        /// Print the JSON the admin endpoint returns.
        #[arg(long)]
        json: bool,
    },
    /// Reload the config file; prints what changed, or every error (exit 1).
    Reload,
    /// No new connections to the backend; live ones continue.
    Drain { pool: String, backend: SocketAddr },
    /// Back in rotation (probes and passive detection judge it from here).
    Enable { pool: String, backend: SocketAddr },
    /// Out of rotation until enabled.
    Disable { pool: String, backend: SocketAddr },
    /// Set the backend's weight (1..=256) until the next reload.
    Weight {
        pool: String,
        backend: SocketAddr,
        weight: u32,
    },
}

/// Where the admin endpoint is.
pub struct Target {
    pub addr: SocketAddr,
    pub token: Option<String>,
}

impl Target {
    /// From the flags, else from the config file's `admin` and `admin_token`.
    pub fn find(config: &Path, addr: Option<SocketAddr>, token: Option<String>) -> Result<Target> {
        if let Some(addr) = addr {
            return Ok(Target { addr, token });
        }
        let text = std::fs::read_to_string(config)
            .with_context(|| format!("cannot read {}", config.display()))?;
        let parsed =
            crate::config::parse(&text).map_err(|e| anyhow!("{}: {e}", config.display()))?;
        let addr = parsed.admin.ok_or_else(|| {
            anyhow!(
                "{} has no `admin:` address (or pass --admin)",
                config.display()
            )
        })?;
        Ok(Target {
            addr,
            token: token.or(parsed.admin_token),
        })
    }
}

/// Runs one command; the exit code is 0 when the endpoint said yes.
pub fn run(target: &Target, command: &Command) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let pool_path = |pool: &str, backend: &SocketAddr, action: &str| {
            format!("/pools/{pool}/backends/{backend}/{action}")
        };
        let (method, path, body) = match command {
            Command::Status { .. } => (Method::GET, "/status".to_string(), String::new()),
            Command::Reload => (Method::POST, "/reload".to_string(), String::new()),
            Command::Drain { pool, backend } => (
                Method::POST,
                pool_path(pool, backend, "drain"),
                String::new(),
            ),
            Command::Enable { pool, backend } => (
                Method::POST,
                pool_path(pool, backend, "enable"),
                String::new(),
            ),
            Command::Disable { pool, backend } => (
                Method::POST,
                pool_path(pool, backend, "disable"),
                String::new(),
            ),
            Command::Weight {
                pool,
                backend,
                weight,
            } => (
                Method::PUT,
                pool_path(pool, backend, "weight"),
                weight.to_string(),
            ),
        };
        let (status, text) = request(target, method, &path, body).await?;
        let value: serde_json::Value =
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text.clone()));
        match command {
            Command::Status { json: false } if status.is_success() => print!("{}", table(&value)),
            _ => println!("{}", serde_json::to_string_pretty(&value)?),
        }
        if !status.is_success() {
            bail!("the admin endpoint answered {status}");
        }
        Ok(())
    })
}

async fn request(
    target: &Target,
    method: Method,
    path: &str,
    body: String,
) -> Result<(hyper::StatusCode, String)> {
    let stream = tokio::net::TcpStream::connect(target.addr)
        .await
        .with_context(|| format!("cannot reach the admin endpoint at {}", target.addr))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, target.addr.to_string());
    if let Some(token) = &target.token {
        builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = sender
        .send_request(builder.body(Full::new(Bytes::from(body)))?)
        .await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// `/status` as a table an operator reads at a glance.
fn table(status: &serde_json::Value) -> String {
    let mut out = String::new();
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    out.push_str(&format!(
        "{:<16} {:<5} {:<24} {:<16} {:>8}\n",
        "LISTENER", "PROTO", "ADDRESS", "POOL", "ACTIVE"
    ));
    for l in status["listeners"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<16} {:<5} {:<24} {:<16} {:>8}\n",
            text(&l["name"]),
            text(&l["protocol"]),
            text(&l["addr"]),
            text(&l["pool"]),
            text(&l["active"])
        ));
    }
    out.push('\n');
    out.push_str(&format!(
        "{:<16} {:<24} {:<9} {:>6} {:>8} {:>10} {:>6}\n",
        "POOL", "BACKEND", "STATE", "WEIGHT", "ACTIVE", "TOTAL", "FAILS"
    ));
    for p in status["pools"].as_array().into_iter().flatten() {
        for b in p["backends"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "{:<16} {:<24} {:<9} {:>6} {:>8} {:>10} {:>6}\n",
                text(&p["name"]),
                text(&b["address"]),
                text(&b["state"]),
                text(&b["weight"]),
                text(&b["active"]),
                text(&b["total"]),
                text(&b["consecutive_failures"])
            ));
            if let Some(why) = b["why"].as_str() {
                out.push_str(&format!("{:<16} {:<24} why: {why}\n", "", ""));
            }
        }
    }
    out
}
