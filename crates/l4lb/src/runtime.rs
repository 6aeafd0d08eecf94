//! Process wiring: pools, listening sockets, worker threads, signals and drain.
//!
//! Each worker is a single-threaded tokio runtime on its own thread with its own
//! `SO_REUSEPORT` socket per listener: the kernel spreads connections over workers and a
//! connection lives on one thread from accept to close. Signals are handled on the main
//! thread.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use l4_balance::{Pool, PoolSnapshot};
use l4_core::admission::ConnectionLimit;
use l4_core::listener::{bind_tcp, bind_udp};
use l4_core::relay::RelayOptions;
use l4_core::tcp::{serve, TcpService};
use l4_core::udp::{serve_udp, UdpService, UdpStats};
use l4_health::spawn_checks;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};
use tracing_appender::non_blocking::ErrorCounter;

use crate::config::{Config, ListenerProtocol};

/// Runs until SIGTERM or SIGINT, then drains and returns. `dropped_logs` counts log lines
/// the writer had to drop; they are reported from the control thread.
pub fn run(config: Config, dropped_logs: ErrorCounter) -> Result<()> {
    match l4_core::sys::raise_nofile_limit() {
        Ok(limit) => info!(nofile = limit, "open file limit"),
        Err(e) => warn!(error = %e, "could not raise the open file limit"),
    }

    let mut pools = HashMap::new();
    for p in &config.pools {
        let snapshot = PoolSnapshot::build(p.algorithm, &p.backends, |_| None)
            .with_context(|| format!("pool {}", p.name))?
            .with_outlier(p.passive);
        let pool = Arc::new(Pool::new(p.name.clone(), snapshot));
        pools.insert(p.name.clone(), (pool, p.health, p.clone()));
    }

    // Bind everything before starting any worker, so a bad address fails the start.
    let mut bound = Vec::new();
    let mut udp_services = Vec::new();
    for l in &config.listeners {
        let (pool, _, pool_config) = pools
            .get(&l.pool)
            .ok_or_else(|| anyhow!("listener {}: no pool {}", l.name, l.pool))?;
        let mut sockets: Vec<WorkerSocket> = match l.protocol {
            ListenerProtocol::Tcp => {
                let sockets = bind_tcp(l.bind, config.workers)
                    .with_context(|| format!("listener {}: cannot listen on {}", l.name, l.bind))?;
                let addr = sockets[0].local_addr()?;
                info!(listener = %l.name, protocol = "tcp", addr = %addr, pool = %l.pool, "listening");
                let service = Arc::new(TcpService {
                    name: Arc::from(l.name.as_str()),
                    bind: l.bind,
                    pool: Arc::clone(pool),
                    connect_timeout: l.connect_timeout,
                    retries: l.retries,
                    relay: RelayOptions {
                        mode: l.relay,
                        idle_timeout: l.idle_timeout,
                        max_pipes: config.max_pipes.div_ceil(config.workers),
                    },
                    access: l.access.clone(),
                    limit: ConnectionLimit::new(l.max_connections),
                    proxy_protocol: l.proxy_protocol,
                    sources: pool_config.source.clone(),
                    next_source: Default::default(),
                });
                sockets
                    .into_iter()
                    .map(|s| WorkerSocket::Tcp(Arc::clone(&service), s))
                    .collect()
            }
            ListenerProtocol::Udp => {
                let sockets = bind_udp(l.bind, config.workers)
                    .with_context(|| format!("listener {}: cannot bind {}", l.name, l.bind))?;
                let addr = sockets[0].local_addr()?;
                info!(listener = %l.name, protocol = "udp", addr = %addr, pool = %l.pool, max_flows = l.max_flows, idle_timeout = ?l.idle_timeout, "listening");
                let service = Arc::new(UdpService {
                    name: Arc::from(l.name.as_str()),
                    bind: l.bind,
                    pool: Arc::clone(pool),
                    sources: pool_config.source.clone(),
                    idle_timeout: l.idle_timeout,
                    max_flows_per_worker: l.max_flows.div_ceil(config.workers.max(1)),
                    access: l.access.clone(),
                    stats: Arc::new(UdpStats::default()),
                });
                udp_services.push(Arc::clone(&service));
                sockets
                    .into_iter()
                    .map(|s| WorkerSocket::Udp(Arc::clone(&service), s))
                    .collect()
            }
        };
        sockets.reverse(); // popped from the end: worker 0 gets the first socket
        bound.push(sockets);
    }

    let stop = CancellationToken::new();
    // Cancelled by a worker whose accept loop, UDP loop or thread panicked: l4lb then
    // stops like on SIGTERM and exits non-zero, so its supervisor restarts it.
    let fatal = CancellationToken::new();
    let mut workers = Vec::new();
    for index in 0..config.workers {
        let mine: Vec<_> = bound
            .iter_mut()
            .filter_map(|sockets| sockets.pop())
            .collect();
        workers.push(spawn_worker(
            index,
            mine,
            stop.clone(),
            fatal.clone(),
            config.drain_timeout,
        )?);
    }
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("control runtime")?;
    let outcome = control.block_on(async {
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        tokio::spawn(crate::logging::report_dropped(dropped_logs));
        // Health checks run here, on the control thread, off the workers.
        let checks = CancellationToken::new();
        for (pool, settings, _) in pools.values() {
            spawn_checks(Arc::clone(pool), *settings, checks.clone());
        }
        // Ready only once signals are handled: a SIGTERM from here on drains.
        info!(
            workers = config.workers,
            listeners = config.listeners.len(),
            pools = config.pools.len(),
            "ready"
        );

        let cause = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            () = fatal.cancelled() => "a worker panicked",
        };
        info!(cause, drain_timeout = ?config.drain_timeout, "stopping: no new connections, draining live ones");
        stop.cancel();
        checks.cancel();
        let joined = tokio::task::spawn_blocking(move || {
            for worker in workers {
                let _ = worker.join();
            }
        });
        tokio::select! {
            _ = joined => {}
            _ = term.recv() => warn!("second signal: exiting without waiting"),
            _ = int.recv() => warn!("second signal: exiting without waiting"),
        }
        for service in &udp_services {
            info!(listener = %service.name, "udp totals: {}", service.stats);
        }
        if fatal.is_cancelled() {
            return Err(anyhow!("stopped because a worker panicked (see the panic above)"));
        }
        info!("stopped");
        Ok::<(), anyhow::Error>(())
    });
    // Do not wait for the thread joining the workers: after a second signal it may be
    // stuck behind connections that are still draining.
    control.shutdown_background();
    outcome
}

/// One worker's socket of one listener.
enum WorkerSocket {
    Tcp(Arc<TcpService>, std::net::TcpListener),
    Udp(Arc<UdpService>, std::net::UdpSocket),
}

fn spawn_worker(
    index: usize,
    listeners: Vec<WorkerSocket>,
    stop: CancellationToken,
    fatal: CancellationToken,
    drain_timeout: Duration,
) -> Result<JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("worker runtime")?;
    let handle = std::thread::Builder::new()
        .name(format!("l4lb-worker-{index}"))
        .spawn(move || {
            // A panic that unwinds the worker thread itself stops the process too.
            let _watch = PanicWatch(fatal.clone());
            runtime.block_on(async move {
                let connections = TaskTracker::new();
                // A loop ends on stop, or by panicking: then its listener no longer serves
                // on this worker, and the process must not go on as if it did.
                let mut loops = tokio::task::JoinSet::new();
                for socket in listeners {
                    match socket {
                        WorkerSocket::Tcp(service, socket) => {
                            match tokio::net::TcpListener::from_std(socket) {
                                Ok(listener) => {
                                    loops.spawn(serve(
                                        listener,
                                        service,
                                        stop.clone(),
                                        connections.clone(),
                                    ));
                                }
                                Err(e) => {
                                    warn!(worker = index, error = %e, "cannot register listener")
                                }
                            }
                        }
                        // UDP flows have no end to wait for: on stop the loop ends them.
                        WorkerSocket::Udp(service, socket) => {
                            loops.spawn(serve_udp(socket, service, stop.clone()));
                        }
                    }
                }
                while let Some(result) = loops.join_next().await {
                    if matches!(&result, Err(e) if e.is_panic()) {
                        error!(worker = index, "a listener loop panicked: stopping l4lb");
                        fatal.cancel();
                    }
                }
                connections.close();
                let live = connections.len();
                if live > 0
                    && tokio::time::timeout(drain_timeout, connections.wait())
                        .await
                        .is_err()
                {
                    warn!(
                        worker = index,
                        left = connections.len(),
                        "drain timeout: closing live connections"
                    );
                }
            });
        })
        .context("spawn worker thread")?;
    Ok(handle)
}

/// Cancels its token if the thread unwinds past it.
struct PanicWatch(CancellationToken);

impl Drop for PanicWatch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.cancel();
        }
    }
}
