//! The admin endpoint (`admin:` in the config): hyper on the control thread, never on a
//! worker. Routes:
//! - `GET /live` (200 while the process runs), `GET /ready` (200 while accepting, 503
//!   from the first SIGTERM on), `GET /metrics` (Prometheus), `GET /status` (JSON);
//! - `POST /reload`: 200 with what changed, or 400 with every error (the old config
//!   keeps serving);
//! - `POST /pools/{pool}/backends/{address}/drain|enable|disable`,
//!   `PUT /pools/{pool}/backends/{address}/weight` (body: the weight).
//!
//! With `admin_token` set, every request must carry `Authorization: Bearer <token>`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use l4_balance::Health;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::runtime::control::{Control, ReloadError, Service};

/// What the admin endpoint serves from.
pub(crate) struct Admin {
    pub(crate) control: Arc<Mutex<Control>>,
    pub(crate) ready: Arc<AtomicBool>,
    pub(crate) token: Option<String>,
    pub(crate) registry: Registry,
}

/// Admin connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves admin requests on `listener` until the task is dropped. Bounded: at most
/// [`MAX_CONNECTIONS`] at once, each with [`HEADER_TIMEOUT`] to send its headers, so an
/// unauthenticated peer cannot hold the control thread's descriptors.
pub(crate) async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, most likely: accepting again at once would spin.
                debug!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let admin = Arc::clone(&admin);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let admin = Arc::clone(&admin);
                async move { Ok::<_, Infallible>(handle(&admin, req, peer).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "admin connection ended");
            }
            drop(slot);
        });
    }
}

/// Compares without stopping at the first differing byte, so response times do not
/// tell how much of a guessed token was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}

fn json_reply(status: StatusCode, value: serde_json::Value) -> Reply {
    let mut body = value.to_string();
    body.push('\n');
    reply(status, "application/json", body)
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Reply {
    json_reply(status, json!({ "error": message.to_string() }))
}

fn lock(admin: &Admin) -> std::sync::MutexGuard<'_, Control> {
    admin.control.lock().unwrap_or_else(|e| e.into_inner())
}

async fn handle(admin: &Admin, req: Request<Incoming>, peer: SocketAddr) -> Reply {
    // Liveness and readiness answer anyone: orchestrator probes and routing daemons poll
    // them without credentials, and they reveal nothing but up or not.
    let probe = req.method() == Method::GET && matches!(req.uri().path(), "/live" | "/ready");
    if let (Some(token), false) = (&admin.token, probe) {
        let expected = format!("Bearer {token}");
        let given = req.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
        if !given.is_some_and(|g| same_secret(g, expected.as_bytes())) {
            return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        }
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["live"]) => reply(StatusCode::OK, "text/plain", "live\n"),
        (&Method::GET, ["ready"]) => {
            if admin.ready.load(Ordering::Relaxed) {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        (&Method::GET, ["metrics"]) => {
            let openmetrics = req
                .headers()
                .get(hyper::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/openmetrics-text"));
            let content_type = if openmetrics {
                crate::metrics::OPENMETRICS
            } else {
                crate::metrics::PROMETHEUS_TEXT
            };
            reply(
                StatusCode::OK,
                content_type,
                crate::metrics::render(&admin.registry, openmetrics),
            )
        }
        (&Method::GET, ["status"]) => json_reply(StatusCode::OK, status(&lock(admin))),
        (&Method::POST, ["reload"]) => {
            info!(from = %peer, "reload requested through the admin endpoint");
            match lock(admin).reload() {
                Ok(changes) => json_reply(
                    StatusCode::OK,
                    json!({ "reloaded": true, "changes": changes }),
                ),
                Err(ReloadError::Invalid(errors)) => json_reply(
                    StatusCode::BAD_REQUEST,
                    json!({ "reloaded": false, "errors": errors.0.iter().map(ToString::to_string).collect::<Vec<_>>() }),
                ),
                Err(e) => json_reply(
                    StatusCode::BAD_REQUEST,
                    json!({ "reloaded": false, "errors": [e.to_string()] }),
                ),
            }
        }
        (&Method::POST, ["pools", pool, "backends", backend, action]) => {
            operator(admin, pool, backend, action, peer)
        }
        (&Method::PUT, ["pools", pool, "backends", backend, "weight"]) => {
            let body = match Limited::new(req.into_body(), 64).collect().await {
                Ok(body) => body.to_bytes(),
                Err(_) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "the body must be a weight, 1..=256",
                    )
                }
            };
            let Some(weight) = std::str::from_utf8(&body)
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok())
            else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "the body must be a weight, 1..=256",
                );
            };
            let Ok(addr) = backend.parse::<SocketAddr>() else {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("invalid backend address {backend:?}"),
                );
            };
            match lock(admin).set_weight(pool, addr, weight) {
                Ok(()) => json_reply(
                    StatusCode::OK,
                    json!({ "pool": pool, "backend": backend, "weight": weight }),
                ),
                Err(e) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
            }
        }
        _ => error(StatusCode::NOT_FOUND, format!("no route {method} {path}")),
    }
}

/// drain | enable | disable one backend.
fn operator(admin: &Admin, pool: &str, backend: &str, action: &str, peer: SocketAddr) -> Reply {
    let Ok(addr) = backend.parse::<SocketAddr>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("invalid backend address {backend:?}"),
        );
    };
    let control = lock(admin);
    let Some(entry) = control.pool(pool) else {
        return error(StatusCode::NOT_FOUND, format!("no pool named {pool:?}"));
    };
    let Some(state) = entry.pool.backend_state(addr) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("pool {pool} has no backend {addr}"),
        );
    };
    let to = match action {
        "drain" => Health::Draining,
        "disable" => Health::Disabled,
        // Back in rotation: probes and passive detection judge it from here.
        "enable" => Health::Up,
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                format!("no action {action:?} (drain, enable, disable)"),
            )
        }
    };
    let from = state.set_health(to);
    if from != to {
        let reason = format!("operator ({action} from {peer})");
        entry.pool.announce(addr, from, to, &reason);
    }
    json_reply(
        StatusCode::OK,
        json!({ "pool": pool, "backend": backend, "from": from.as_str(), "state": to.as_str() }),
    )
}

/// Listeners, pools and backends as JSON.
fn status(control: &Control) -> serde_json::Value {
    let listeners: Vec<serde_json::Value> = control
        .listeners
        .iter()
        .map(|(name, l)| {
            let (protocol, active) = match &l.service {
                Service::Tcp(s) => ("tcp", s.load().limit.active() as u64),
                Service::Udp(s) => ("udp", s.load().stats.flows_active.load(Ordering::Relaxed)),
            };
            let sni: Vec<serde_json::Value> = l
                .config
                .sni
                .iter()
                .map(|r| json!({ "match": r.pattern, "pool": r.pool }))
                .collect();
            json!({
                "name": name,
                "protocol": protocol,
                "addr": l.addr.to_string(),
                "pool": l.config.pool,
                "sni": sni,
                "accept_proxy": l.config.accept_proxy.is_some(),
                "active": active,
            })
        })
        .collect();
    let pools: Vec<serde_json::Value> = control
        .pools
        .iter()
        .map(|(name, entry)| {
            let snapshot = entry.pool.snapshot();
            let backends: Vec<serde_json::Value> = snapshot
                .backends()
                .map(|b| {
                    let last_check = b.state.stats.last_check().map(|(ok, at)| json!({ "ok": ok, "unix_ms": at }));
                    json!({
                        "address": b.spec.addr.to_string(),
                        "state": b.state.health().as_str(),
                        "why": b.state.why().map(|w| w.to_string()),
                        "weight": b.spec.weight,
                        "backup": b.spec.backup,
                        "active": b.state.active(),
                        "total": b.state.total(),
                        "consecutive_failures": b.state.consecutive_failures(),
                        "last_check": last_check,
                    })
                })
                .collect();
            json!({ "name": name, "algorithm": snapshot.algorithm().as_str(), "backends": backends })
        })
        .collect();
    json!({ "workers": control.config.workers, "listeners": listeners, "pools": pools })
}
