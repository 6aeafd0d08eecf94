//! The control thread's state and the one path that changes it: [`Control::apply`]. The
//! start is an apply from nothing; a reload (SIGHUP, `POST /reload`, `l4lb ctl reload`) is
//! an apply from what runs; an operator's weight change rebuilds one pool through the
//! same snapshot builder. Nothing here touches a relaying connection: pools publish new
//! snapshots carrying every remaining backend's state by address, listeners get a new
//! service (the socket stays) or are replaced when their address changes, and workers
//! are added or retired (a retired worker stops accepting and finishes its connections).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, Context, Result};
use arc_swap::ArcSwap;
use l4_balance::{BackendState, OnDown, Pool, PoolSnapshot};
use l4_core::admission::AccessList;
use l4_core::admission::ConnectionLimit;
use l4_core::listener::{bind_tcp, bind_udp};
use l4_core::proxy_protocol::ProxyProtocol;
use l4_core::relay::RelayOptions;
use l4_core::sni_routes::SniRoutes;
use l4_core::source_limit::{ConcurrentPerSource, RatePerSource};
use l4_core::tcp::{AcceptProxy, SharedTcpService, SniRouting, Target, TcpService, TcpStats};
use l4_core::udp::{SharedUdpService, UdpService, UdpStats};
use l4_health::spawn_checks;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::discovery::Discovered;

use super::worker::{ListenerSocket, Worker};
use crate::config::{self, Config, ConfigErrors, Listener, ListenerProtocol, PoolConfig};

/// A running pool.
pub(crate) struct PoolEntry {
    pub(crate) pool: Arc<Pool>,
    /// As applied: for a discovery pool, with the backends last discovered.
    pub(crate) config: PoolConfig,
    checks: CancellationToken,
    /// The pool's discovery task, if it has one.
    discovery: Option<CancellationToken>,
}

/// A listener's published service.
#[derive(Clone)]
pub(crate) enum Service {
    Tcp(SharedTcpService),
    Udp(SharedUdpService),
}

/// A running listener.
pub(crate) struct ListenerEntry {
    pub(crate) config: Listener,
    /// The address it is bound to (the port chosen when the config says 0).
    pub(crate) addr: SocketAddr,
    pub(crate) service: Service,
    /// Its accept loop on each worker, by worker index.
    tokens: BTreeMap<usize, CancellationToken>,
}

/// Why a reload did not happen. The old config keeps serving in every case.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReloadError {
    /// The file could not be read.
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    /// The file is not a valid config.
    #[error("invalid config: {}", .0.0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(ConfigErrors),
    /// l4lb is stopping: nothing changes any more.
    #[error("l4lb is stopping")]
    Stopping,
    /// Valid, but could not be applied (an address that cannot be bound).
    #[error("{0:#}")]
    Apply(anyhow::Error),
}

/// What a reload changed, for its one log event.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct Changes {
    pub(crate) listeners_added: Vec<String>,
    pub(crate) listeners_removed: Vec<String>,
    pub(crate) listeners_rebound: Vec<String>,
    pub(crate) listeners_changed: Vec<String>,
    pub(crate) pools_added: Vec<String>,
    pub(crate) pools_removed: Vec<String>,
    pub(crate) pools_changed: Vec<String>,
    pub(crate) workers: (usize, usize),
}

/// Reload outcomes, for metrics.
#[derive(Debug, Default)]
pub(crate) struct ReloadStats {
    pub(crate) ok: AtomicU64,
    pub(crate) failed: AtomicU64,
    /// Seconds since the Unix epoch of the last successful reload (or the start).
    pub(crate) last_ok_unix: AtomicU64,
}

pub(crate) struct Control {
    pub(crate) path: PathBuf,
    pub(crate) config: Config,
    pub(crate) pools: BTreeMap<String, PoolEntry>,
    pub(crate) listeners: BTreeMap<String, ListenerEntry>,
    workers: Vec<Worker>,
    retired: Vec<JoinHandle<()>>,
    next_worker: usize,
    fatal: CancellationToken,
    /// Where discovery tasks send what they find (read by the control loop).
    discovered: UnboundedSender<Discovered>,
    drain_timeout_ms: Arc<AtomicU64>,
    pub(crate) reloads: Arc<ReloadStats>,
    /// Set by `stop`: from then on nothing may start serving again.
    stopping: bool,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Control {
    /// Starts everything `config` describes. Must run inside the control runtime (health
    /// checks are spawned on it).
    pub(crate) fn start(
        path: PathBuf,
        config: Config,
        fatal: CancellationToken,
        discovered: UnboundedSender<Discovered>,
    ) -> Result<Self> {
        let empty = Config {
            workers: 0,
            listeners: Vec::new(),
            pools: Vec::new(),
            ..config.clone()
        };
        let mut control = Control {
            path,
            config: empty,
            pools: BTreeMap::new(),
            listeners: BTreeMap::new(),
            workers: Vec::new(),
            retired: Vec::new(),
            next_worker: 0,
            fatal,
            discovered,
            drain_timeout_ms: Arc::new(AtomicU64::new(0)),
            reloads: Arc::new(ReloadStats::default()),
            stopping: false,
        };
        control.apply(config)?;
        control
            .reloads
            .last_ok_unix
            .store(unix_now(), Ordering::Relaxed);
        Ok(control)
    }

    /// Reads the config file again and applies it; on any error the running config
    /// stays as it was.
    pub(crate) fn reload(&mut self) -> Result<Changes, ReloadError> {
        let outcome = self.try_reload();
        let counter = match &outcome {
            Ok(_) => &self.reloads.ok,
            Err(_) => &self.reloads.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match &outcome {
            Ok(changes) => {
                self.reloads
                    .last_ok_unix
                    .store(unix_now(), Ordering::Relaxed);
                info!(changes = %serde_json::to_string(changes).unwrap_or_default(), "config reloaded");
            }
            Err(e) => tracing::error!(error = %e, "reload refused: the running config stays"),
        }
        outcome
    }

    fn try_reload(&mut self) -> Result<Changes, ReloadError> {
        if self.stopping {
            return Err(ReloadError::Stopping);
        }
        let text = std::fs::read_to_string(&self.path).map_err(|error| ReloadError::Read {
            path: self.path.display().to_string(),
            error,
        })?;
        let mut config = config::parse(&text).map_err(ReloadError::Invalid)?;
        if config.admin != self.config.admin
            || config.admin_token != self.config.admin_token
            || config.access_log != self.config.access_log
        {
            tracing::warn!("admin, admin_token and log take effect at start: the running ones stay until a restart");
            // Keep what runs, so the next reload compares against it too.
            config.admin = self.config.admin;
            config.admin_token = self.config.admin_token.clone();
            config.access_log = self.config.access_log.clone();
        }
        self.apply(config).map_err(ReloadError::Apply)
    }

    /// Moves from the running config to `new`. Every socket the new config needs is bound
    /// before anything changes, so a bind failure leaves everything as it was.
    pub(crate) fn apply(&mut self, mut new: Config) -> Result<Changes> {
        // A discovery pool keeps the backends it last discovered while its discovery
        // settings stay; with new settings it starts empty until the first answer.
        for p in &mut new.pools {
            if let Some(old) = self.pools.get(&p.name) {
                // Same question (name, type, port): the answer stands while the task
                // restarts with a new interval or resolver.
                let same_question = match (&p.discovery, &old.config.discovery) {
                    (Some(new), Some(old)) => {
                        (&new.name, new.kind, new.port) == (&old.name, old.kind, old.port)
                    }
                    _ => false,
                };
                if same_question {
                    p.backends = old.config.backends.clone();
                }
            }
        }
        let mut changes = Changes {
            workers: (self.workers.len(), new.workers),
            ..Changes::default()
        };
        // 1. Bind: new listeners (and moved ones) on every worker of the new count; old
        //    listeners that stay, on the workers to be added.
        let adding = new.workers.saturating_sub(self.workers.len());
        let mut fresh: BTreeMap<String, (SocketAddr, Vec<BoundSocket>)> = BTreeMap::new();
        let mut extra: BTreeMap<String, Vec<BoundSocket>> = BTreeMap::new();
        for l in &new.listeners {
            match self.listeners.get(&l.name) {
                // The same address: as configured, or the port a configured port 0 got
                // (rebinding would open a window where the old sockets' queues are lost).
                Some(old)
                    if (old.config.bind == l.bind || old.addr == l.bind)
                        && old.config.protocol == l.protocol
                        && old.config.freebind == l.freebind =>
                {
                    if adding > 0 {
                        extra.insert(l.name.clone(), bind(old.addr, l, adding)?);
                    }
                }
                _ => {
                    let sockets = bind(l.bind, l, new.workers)?;
                    let addr = sockets
                        .first()
                        .map(BoundSocket::local_addr)
                        .transpose()?
                        .ok_or_else(|| anyhow!("listener {}: nothing bound", l.name))?;
                    fresh.insert(l.name.clone(), (addr, sockets));
                }
            }
        }

        // 2. Everything else that can fail, before anything changes: every pool's new
        //    snapshot, and the workers to add.
        let mut snapshots = Vec::new();
        for p in &new.pools {
            let old = self.pools.get(&p.name).map(|e| &e.pool);
            snapshots.push((p, build_snapshot(p, old)?));
        }
        let mut spawned = Vec::new();
        for index in self.next_worker..self.next_worker + adding {
            match Worker::spawn(
                index,
                self.fatal.clone(),
                Arc::clone(&self.drain_timeout_ms),
            ) {
                Ok(worker) => spawned.push(worker),
                Err(e) => {
                    spawned.iter().for_each(|w: &Worker| w.stop.cancel());
                    return Err(e);
                }
            }
        }
        self.next_worker += adding;

        // 3. Pools: same name -> the new snapshot, states carried; new -> a new pool.
        //    Health checks restart only where the pool changed.
        let mut pools = BTreeMap::new();
        for (p, snapshot) in snapshots {
            let entry = match self.pools.remove(&p.name) {
                Some(old) => {
                    republish(&old.pool, p, snapshot);
                    let discovery = if old.config.discovery == p.discovery {
                        old.discovery
                    } else {
                        if let Some(token) = old.discovery {
                            token.cancel();
                        }
                        self.start_discovery(p)
                    };
                    let checks = if old.config == *p {
                        old.checks
                    } else {
                        changes.pools_changed.push(p.name.clone());
                        old.checks.cancel();
                        start_checks(&old.pool, p)
                    };
                    PoolEntry {
                        pool: old.pool,
                        config: p.clone(),
                        checks,
                        discovery,
                    }
                }
                None => {
                    changes.pools_added.push(p.name.clone());
                    let pool = Arc::new(Pool::new(p.name.clone(), snapshot));
                    PoolEntry {
                        checks: start_checks(&pool, p),
                        discovery: self.start_discovery(p),
                        pool,
                        config: p.clone(),
                    }
                }
            };
            pools.insert(p.name.clone(), entry);
        }
        for (name, old) in std::mem::take(&mut self.pools) {
            if let Some(token) = &old.discovery {
                token.cancel();
            }
            if old.config.on_down == OnDown::Close {
                let states = old
                    .pool
                    .snapshot()
                    .backends()
                    .map(|b| Arc::clone(&b.state))
                    .collect();
                close_after(&name, states, old.config.close_after);
            }
            changes.pools_removed.push(name);
            old.checks.cancel();
        }
        self.pools = pools;
        self.drain_timeout_ms.store(
            u64::try_from(new.drain_timeout.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );

        // Workers: add the spawned ones, or retire from the end.
        self.workers.extend(spawned);
        while self.workers.len() > new.workers {
            let Some(mut worker) = self.workers.pop() else {
                break;
            };
            worker.stop.cancel();
            for entry in self.listeners.values_mut() {
                entry.tokens.remove(&worker.index);
            }
            if let Some(thread) = worker.take_thread() {
                self.retired.push(thread);
            }
        }
        // Join the retired workers that have finished draining.
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retired)
            .into_iter()
            .partition(|t| t.is_finished());
        done.into_iter().for_each(|t| drop(t.join()));
        self.retired = running;

        // 4. Listeners: same address -> new service; new or moved -> serve the fresh
        //    sockets; gone -> stop (their live connections finish).
        let mut listeners = BTreeMap::new();
        for l in &new.listeners {
            let old = self.listeners.remove(&l.name);
            let rebound = fresh.contains_key(&l.name);
            let service = publish_service(
                &new,
                l,
                &self.pools,
                old.as_ref().map(|o| &o.service),
                !rebound,
            )?;
            let mut entry = match (old, fresh.remove(&l.name)) {
                (Some(old), None) => {
                    if old.config != *l {
                        changes.listeners_changed.push(l.name.clone());
                    }
                    ListenerEntry {
                        config: l.clone(),
                        addr: old.addr,
                        service,
                        tokens: old.tokens,
                    }
                }
                (old, Some((addr, sockets))) => {
                    match old {
                        Some(old) => {
                            changes.listeners_rebound.push(l.name.clone());
                            old.tokens.values().for_each(CancellationToken::cancel);
                        }
                        None => changes.listeners_added.push(l.name.clone()),
                    }
                    info!(listener = %l.name, protocol = l.protocol.as_str(), addr = %addr, pool = %l.pool, "listening");
                    let mut entry = ListenerEntry {
                        config: l.clone(),
                        addr,
                        service,
                        tokens: BTreeMap::new(),
                    };
                    for (worker, socket) in self.workers.iter().zip(sockets) {
                        let token = worker.serve(socket.into_listener(&entry.service)?);
                        entry.tokens.insert(worker.index, token);
                    }
                    entry
                }
                (None, None) => return Err(anyhow!("listener {}: not bound", l.name)),
            };
            // Workers added by this apply serve every listener that stays.
            if let Some(sockets) = extra.remove(&l.name) {
                let missing: Vec<&Worker> = self
                    .workers
                    .iter()
                    .filter(|w| !entry.tokens.contains_key(&w.index))
                    .collect();
                for (worker, socket) in missing.into_iter().zip(sockets) {
                    let token = worker.serve(socket.into_listener(&entry.service)?);
                    entry.tokens.insert(worker.index, token);
                }
            }
            listeners.insert(l.name.clone(), entry);
        }
        for (name, old) in std::mem::take(&mut self.listeners) {
            info!(listener = %name, "listener removed: no new connections, live ones finish");
            old.tokens.values().for_each(CancellationToken::cancel);
            changes.listeners_removed.push(name);
        }
        self.listeners = listeners;
        self.config = new;
        Ok(changes)
    }

    /// Starts the discovery task of a pool that has `discovery:`.
    fn start_discovery(&self, config: &PoolConfig) -> Option<CancellationToken> {
        let settings = config.discovery.clone()?;
        let token = CancellationToken::new();
        crate::discovery::spawn(
            config.name.clone(),
            settings,
            self.discovered.clone(),
            token.clone(),
        );
        Some(token)
    }

    /// Applies what a pool's discovery found: the pool is rebuilt through the same
    /// snapshot builder as a reload (states carried by address), and its checks restart
    /// over the new set.
    pub(crate) fn set_discovered(&mut self, found: Discovered) {
        if self.stopping {
            return;
        }
        let Some(entry) = self.pools.get_mut(&found.pool) else {
            return;
        };
        if entry.config.discovery.as_ref() != Some(&found.settings) {
            // Found by a task a reload has replaced since.
            return;
        }
        let before: Vec<SocketAddr> = entry.config.backends.iter().map(|b| b.addr).collect();
        let mut config = entry.config.clone();
        config.backends = found.backends;
        let snapshot = match build_snapshot(&config, Some(&entry.pool)) {
            Ok(snapshot) => snapshot,
            Err(e) => {
                warn!(pool = %found.pool, error = %format!("{e:#}"), "discovered backends refused");
                return;
            }
        };
        let added: Vec<String> = config
            .backends
            .iter()
            .filter(|b| !before.contains(&b.addr))
            .map(|b| b.addr.to_string())
            .collect();
        let removed: Vec<String> = before
            .iter()
            .filter(|a| !config.backends.iter().any(|b| b.addr == **a))
            .map(ToString::to_string)
            .collect();
        republish(&entry.pool, &config, snapshot);
        entry.checks.cancel();
        entry.checks = start_checks(&entry.pool, &config);
        info!(pool = %found.pool, backends = config.backends.len(), added = ?added, removed = ?removed, "discovery: backends changed");
        entry.config = config;
    }

    /// Every worker stops accepting and drains; returns the threads to join.
    pub(crate) fn stop(&mut self) -> Vec<JoinHandle<()>> {
        self.stopping = true;
        for entry in self.pools.values() {
            entry.checks.cancel();
            if let Some(discovery) = &entry.discovery {
                discovery.cancel();
            }
        }
        let mut threads = std::mem::take(&mut self.retired);
        for worker in &mut self.workers {
            worker.stop.cancel();
            threads.extend(worker.take_thread());
        }
        threads
    }

    /// The pool called `name`.
    pub(crate) fn pool(&self, name: &str) -> Option<&PoolEntry> {
        self.pools.get(name)
    }

    /// Sets one backend's weight: the pool's snapshot is rebuilt (the same builder a
    /// reload uses), every state carried. Until the next reload, which restores the
    /// file's weights.
    pub(crate) fn set_weight(
        &mut self,
        pool: &str,
        backend: SocketAddr,
        weight: u32,
    ) -> Result<()> {
        if self.stopping {
            return Err(anyhow!("l4lb is stopping"));
        }
        let entry = self
            .pools
            .get_mut(pool)
            .ok_or_else(|| anyhow!("no pool named {pool:?}"))?;
        let spec = entry
            .config
            .backends
            .iter_mut()
            .find(|b| b.addr == backend)
            .ok_or_else(|| anyhow!("pool {pool} has no backend {backend}"))?;
        if !(1..=l4_balance::MAX_WEIGHT).contains(&weight) {
            return Err(anyhow!(
                "weight {weight} is outside 1..={}",
                l4_balance::MAX_WEIGHT
            ));
        }
        spec.weight = weight;
        let snapshot = build_snapshot(&entry.config, Some(&entry.pool))?;
        entry.pool.publish(snapshot);
        info!(pool, backend = %backend, weight, "backend weight set");
        Ok(())
    }
}

/// A socket bound for a listener, not yet handed to a worker.
enum BoundSocket {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

impl BoundSocket {
    fn local_addr(&self) -> Result<SocketAddr> {
        Ok(match self {
            BoundSocket::Tcp(s) => s.local_addr()?,
            BoundSocket::Udp(s) => s.local_addr()?,
        })
    }

    fn into_listener(self, service: &Service) -> Result<ListenerSocket> {
        match (self, service) {
            (BoundSocket::Tcp(s), Service::Tcp(svc)) => Ok(ListenerSocket::Tcp(Arc::clone(svc), s)),
            (BoundSocket::Udp(s), Service::Udp(svc)) => Ok(ListenerSocket::Udp(Arc::clone(svc), s)),
            // A listener's sockets and service are made from the same protocol.
            _ => Err(anyhow!("a socket and a service of different protocols")),
        }
    }
}

/// `count` reuseport sockets on `addr`.
fn bind(addr: SocketAddr, l: &Listener, count: usize) -> Result<Vec<BoundSocket>> {
    let name = &l.name;
    Ok(match l.protocol {
        ListenerProtocol::Tcp => bind_tcp(addr, count, l.freebind)
            .with_context(|| format!("listener {name}: cannot listen on {addr}"))?
            .into_iter()
            .map(BoundSocket::Tcp)
            .collect(),
        ListenerProtocol::Udp => bind_udp(addr, count, l.freebind)
            .with_context(|| format!("listener {name}: cannot bind {addr}"))?
            .into_iter()
            .map(BoundSocket::Udp)
            .collect(),
    })
}

/// A snapshot for `config`, carrying the state (health, operator state, counters, live
/// connections) of every backend `old` already has at the same address.
fn build_snapshot(config: &PoolConfig, old: Option<&Arc<Pool>>) -> Result<PoolSnapshot> {
    // Only a discovery pool can be empty (before its first answer): the config check
    // refuses a static pool without backends.
    let snapshot = if config.backends.is_empty() && config.discovery.is_some() {
        PoolSnapshot::empty(config.algorithm)
    } else {
        PoolSnapshot::build(config.algorithm, &config.backends, |addr| {
            old.and_then(|pool| pool.backend_state(addr))
        })
        .with_context(|| format!("pool {}", config.name))?
    };
    Ok(snapshot
        .with_outlier(config.passive)
        .with_on_down(config.on_down)
        .with_slow_start(config.slow_start))
}

/// Publishes `snapshot` (built for `config`) into a running pool: backends it adds ramp
/// up (slow start), backends it removes leave like a reload removal (their live
/// connections finish, or are reset after `close_after` with `on_down: close`).
fn republish(pool: &Arc<Pool>, config: &PoolConfig, snapshot: PoolSnapshot) {
    let now = std::time::Instant::now();
    for b in snapshot.backends() {
        if pool.backend_state(b.spec.addr).is_none() {
            b.state.mark_added(now);
        }
    }
    if config.on_down == OnDown::Close {
        let kept: Vec<SocketAddr> = snapshot.backends().map(|b| b.spec.addr).collect();
        let removed: Vec<Arc<BackendState>> = pool
            .snapshot()
            .backends()
            .filter(|b| !kept.contains(&b.spec.addr))
            .map(|b| Arc::clone(&b.state))
            .collect();
        close_after(&config.name, removed, config.close_after);
    }
    pool.publish(snapshot);
}

/// `on_down: close` for backends a reload removed: their live connections are reset once
/// `grace` has passed (at once for zero).
fn close_after(pool: &str, backends: Vec<Arc<BackendState>>, grace: std::time::Duration) {
    if backends.is_empty() {
        return;
    }
    let pool = pool.to_string();
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        for state in backends {
            let live = state.active();
            state.retire();
            info!(pool = %pool, backend = %state.addr(), connections = live, "removed backend: on_down: close resets its live connections");
        }
    });
}

fn start_checks(pool: &Arc<Pool>, config: &PoolConfig) -> CancellationToken {
    let token = CancellationToken::new();
    spawn_checks(Arc::clone(pool), config.health.clone(), token.clone());
    token
}

/// Builds the listener's service from the new config and publishes it: into the old
/// `ArcSwap` when the sockets stay (`reuse`), so the accept loops take it for their next
/// connection, or into a new one. Counters and the live-connection count carry over.
fn publish_service(
    config: &Config,
    l: &Listener,
    pools: &BTreeMap<String, PoolEntry>,
    old: Option<&Service>,
    reuse: bool,
) -> Result<Service> {
    let pool = pools
        .get(&l.pool)
        .ok_or_else(|| anyhow!("listener {}: no pool {}", l.name, l.pool))?;
    let target = |name: &str| -> Result<Target> {
        let entry = pools
            .get(name)
            .ok_or_else(|| anyhow!("listener {}: no pool {name}", l.name))?;
        Ok(Target::new(
            name,
            Arc::clone(&entry.pool),
            entry.config.source.clone(),
        ))
    };
    Ok(match l.protocol {
        ListenerProtocol::Tcp => {
            let previous = match old {
                Some(Service::Tcp(shared)) => Some(shared.load_full()),
                _ => None,
            };
            let (stats, limit) = match &previous {
                Some(p) => {
                    p.limit.set_max(l.max_connections);
                    (Arc::clone(&p.stats), Arc::clone(&p.limit))
                }
                None => (
                    Arc::new(TcpStats::default()),
                    ConnectionLimit::new(l.max_connections),
                ),
            };
            // Per-source tables carry over too: live connections hold counts in them.
            let per_source = l.max_connections_per_source.map(|max| {
                match previous.as_ref().and_then(|p| p.per_source.clone()) {
                    Some(table) => {
                        table.set_max(max);
                        table
                    }
                    None => ConcurrentPerSource::new(max),
                }
            });
            let rate_per_source = l.max_new_connections_per_second_per_source.map(|rate| {
                match previous.as_ref().and_then(|p| p.rate_per_source.clone()) {
                    Some(table) => {
                        table.set_rate(rate);
                        table
                    }
                    None => RatePerSource::new(rate),
                }
            });
            let sni = if l.sni.is_empty() {
                None
            } else {
                let mut routes = SniRoutes::default();
                let mut targets = Vec::new();
                for route in &l.sni {
                    // Validation refused bad and duplicate patterns already.
                    routes
                        .add(&route.pattern, targets.len())
                        .map_err(|e| anyhow!("listener {}: {e}", l.name))?;
                    targets.push(target(&route.pool)?);
                }
                Some(SniRouting {
                    routes,
                    targets,
                    timeout: l.sni_timeout,
                    postgres: l.sni_postgres,
                })
            };
            let service = TcpService {
                name: Arc::from(l.name.as_str()),
                bind: l.bind,
                target: target(&l.pool)?,
                sni,
                accept_proxy: l.accept_proxy.as_ref().map(|a| AcceptProxy {
                    from: AccessList {
                        allow: a.from.clone(),
                        deny: Vec::new(),
                    },
                    timeout: a.timeout,
                }),
                connect_timeout: l.connect_timeout,
                retries: l.retries,
                relay: RelayOptions {
                    mode: l.relay,
                    idle_timeout: l.idle_timeout,
                    max_pipes: config.max_pipes.div_ceil(config.workers.max(1)),
                },
                access: l.access.clone(),
                limit,
                proxy_protocol: l.proxy_protocol,
                stats,
                per_source,
                rate_per_source,
            };
            match (old, reuse) {
                (Some(Service::Tcp(shared)), true) => {
                    shared.store(Arc::new(service));
                    Service::Tcp(Arc::clone(shared))
                }
                _ => Service::Tcp(Arc::new(ArcSwap::from_pointee(service))),
            }
        }
        ListenerProtocol::Udp => {
            let stats = match old {
                Some(Service::Udp(shared)) => Arc::clone(&shared.load().stats),
                _ => Arc::new(UdpStats::default()),
            };
            let service = UdpService {
                name: Arc::from(l.name.as_str()),
                bind: l.bind,
                pool: Arc::clone(&pool.pool),
                sources: pool.config.source.clone(),
                flow_rate_per_source: l
                    .max_new_flows_per_second_per_source
                    .map(RatePerSource::new),
                idle_timeout: l.idle_timeout,
                max_flows_per_worker: l.max_flows.div_ceil(config.workers.max(1)),
                access: l.access.clone(),
                accept_proxy: l.accept_proxy.as_ref().map(|a| AccessList {
                    allow: a.from.clone(),
                    deny: Vec::new(),
                }),
                proxy_protocol: (l.proxy_protocol == ProxyProtocol::V2)
                    .then_some(l.proxy_protocol_udp),
                stats,
            };
            match (old, reuse) {
                (Some(Service::Udp(shared)), true) => {
                    shared.store(Arc::new(service));
                    Service::Udp(Arc::clone(shared))
                }
                _ => Service::Udp(Arc::new(ArcSwap::from_pointee(service))),
            }
        }
    })
}
