//! A TCP listener's service: accept, admit, pick a backend, connect (with retries), send
//! the PROXY header, relay, and log one event when the connection ends.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::{bump, ACCESS_LOG};
use arc_swap::ArcSwap;
use l4_balance::{BackendHandle, FlowKey, Pool, Protocol, TimeMetric};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::admission::{AccessList, ConnectionLimit};
use crate::connect::connect;
use crate::proxy_protocol::{self, ProxyProtocol, Transport};
use crate::relay::{relay, RelayOptions};
use crate::source_limit::{now_second, ConcurrentPerSource, RatePerSource};

/// Everything a TCP listener needs to serve a connection. Shared by all its workers.
#[derive(Debug)]
pub struct TcpService {
    /// The listener's name, for logs.
    pub name: Arc<str>,
    /// The address as configured (the VIP): the local half of the flow key that hashing
    /// algorithms use. Using the configured rather than the accepted address keeps
    /// placement identical on every l4lb instance sharing a config (port 0 included);
    /// an unspecified IP (a wildcard bind) is replaced by the address the client reached.
    pub bind: SocketAddr,
    /// Where connections go.
    pub pool: Arc<Pool>,
    /// Limit for each connect attempt.
    pub connect_timeout: Duration,
    /// Further backends to try after a failed connect.
    pub retries: u32,
    /// Relay settings.
    pub relay: RelayOptions,
    /// Who may connect.
    pub access: AccessList,
    /// How many may be connected at once, across workers.
    pub limit: Arc<ConnectionLimit>,
    /// Header sent to backends.
    pub proxy_protocol: ProxyProtocol,
    /// Local addresses backend connections leave from, in turn (empty: by route).
    pub sources: Vec<IpAddr>,
    /// The next source to use.
    pub next_source: AtomicUsize,
    /// Counters, carried across reloads.
    pub stats: Arc<TcpStats>,
    /// `max_connections_per_source`, if set.
    pub per_source: Option<Arc<ConcurrentPerSource>>,
    /// `max_new_connections_per_second_per_source`, if set.
    pub rate_per_source: Option<Arc<RatePerSource>>,
}

impl TcpService {
    /// The source address for a connection to `backend`: the next configured one of its
    /// family, or none (the route decides).
    fn source_for(&self, backend: SocketAddr) -> Option<IpAddr> {
        if self.sources.is_empty() {
            return None;
        }
        let start = self.next_source.fetch_add(1, Ordering::Relaxed);
        (0..self.sources.len())
            .map(|i| self.sources[(start + i) % self.sources.len()])
            .find(|ip| ip.is_ipv4() == backend.is_ipv4())
    }
}

/// Counters of one TCP listener, kept across reloads (the service is replaced, these are
/// carried), summed by the admin endpoint at scrape time.
#[derive(Debug, Default)]
pub struct TcpStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Refused by the access list.
    pub rejected_denied: AtomicU64,
    /// Refused by `max_connections`.
    pub rejected_limit: AtomicU64,
    /// Closed because no backend could be reached.
    pub rejected_no_backend: AtomicU64,
    /// Refused by `max_connections_per_source`.
    pub rejected_per_source: AtomicU64,
    /// Refused by `max_new_connections_per_second_per_source`.
    pub rejected_per_source_rate: AtomicU64,
    /// Bytes client -> backend.
    pub bytes_in: AtomicU64,
    /// Bytes backend -> client.
    pub bytes_out: AtomicU64,
    /// Bytes (both ways) moved by splice.
    pub spliced_bytes: AtomicU64,
}

/// The service of a listener as published: a reload swaps in a new one without touching
/// the listening socket; each connection keeps the service it was accepted with.
pub type SharedTcpService = Arc<ArcSwap<TcpService>>;

/// Accepts on `listener` until `stop` is cancelled; every connection runs as a task on
/// `tracker`, so the caller can wait for them to drain. On stop, the connections already
/// queued in the socket's backlog are still taken (they would be reset when it closes),
/// then the listening socket is closed, so the kernel stops queueing new ones here.
pub async fn serve(
    listener: TcpListener,
    service: SharedTcpService,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let local = listener.local_addr().ok();
    let inject_panic = crate::fault::panic_requested("tcp_accept");
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                if inject_panic {
                    panic!("injected panic in the accept loop (L4LB_INJECT_PANIC)");
                }
                start(&service.load_full(), client, peer, local, &tracker);
            }
            Err(e) if is_resource_exhaustion(&e) => {
                // Out of fds or memory: accepting again at once would spin. Back off
                // briefly; queued clients wait in the backlog meanwhile.
                let name = Arc::clone(&service.load().name);
                warn!(listener = %name, error = %e, "accept failed, pausing accepts");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => debug!(listener = %service.load().name, error = %e, "accept failed"),
        }
    }
    // The backlog: a zero timeout polls accept once and stops at the first "nothing".
    while let Ok(Ok((client, peer))) = tokio::time::timeout(Duration::ZERO, listener.accept()).await
    {
        start(&service.load_full(), client, peer, local, &tracker);
    }
}

fn start(
    service: &Arc<TcpService>,
    client: TcpStream,
    peer: SocketAddr,
    listening: Option<SocketAddr>,
    tracker: &TaskTracker,
) {
    // Only a wildcard listener needs getsockname to learn which address the client
    // reached; otherwise it is the listener's, and the syscall is saved.
    let local = match listening {
        Some(addr) if !addr.ip().is_unspecified() => Some(addr),
        _ => client.local_addr().ok(),
    };
    let Some(local) = local else { return };
    bump(&service.stats.accepted, 1);
    let span = info_span!("conn", listener = %service.name, client = %peer);
    tracker.spawn(handle(Arc::clone(service), client, peer, local).instrument(span));
}

/// The local half of the flow key; see [`TcpService::bind`].
fn flow_local(configured: SocketAddr, accepted: SocketAddr) -> SocketAddr {
    if configured.ip().is_unspecified() {
        SocketAddr::new(accepted.ip(), configured.port())
    } else {
        configured
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

async fn handle(service: Arc<TcpService>, client: TcpStream, peer: SocketAddr, local: SocketAddr) {
    if !service.access.admits(peer.ip()) {
        bump(&service.stats.rejected_denied, 1);
        debug!("rejected by access list");
        return;
    }
    if let Some(rate) = &service.rate_per_source {
        if !rate.admit(peer.ip(), now_second()) {
            bump(&service.stats.rejected_per_source_rate, 1);
            debug!("rejected: max_new_connections_per_second_per_source reached");
            return;
        }
    }
    let _source_slot = match &service.per_source {
        Some(table) => match table.try_acquire(peer.ip()) {
            Some(slot) => Some(slot),
            None => {
                bump(&service.stats.rejected_per_source, 1);
                debug!("rejected: max_connections_per_source reached");
                return;
            }
        },
        None => None,
    };
    let Some(_slot) = service.limit.try_acquire() else {
        bump(&service.stats.rejected_limit, 1);
        debug!("rejected: max_connections reached");
        return;
    };
    // TCP_NODELAY is inherited from the listening socket (see listener::bind_tcp).
    let started = Instant::now();
    let key = FlowKey {
        client: peer,
        local: flow_local(service.bind, local),
        protocol: Protocol::Tcp,
    };
    let (mut backend, handle) = match connect_backend(&service, &key).await {
        Ok(connected) => connected,
        Err(0) => {
            // The pool has no usable backend; health logged that once for the pool.
            bump(&service.stats.rejected_no_backend, 1);
            debug!("no usable backend, closing client");
            return;
        }
        Err(attempts) => {
            bump(&service.stats.rejected_no_backend, 1);
            info!(attempts, "no backend reachable, closing client");
            return;
        }
    };
    let backend_addr = handle.addr();
    if service.proxy_protocol != ProxyProtocol::Off {
        let header = proxy_protocol::encode(service.proxy_protocol, Transport::Stream, peer, local);
        if let Err(e) = backend.write_all(&header).await {
            info!(backend = %backend_addr, error = %e, "could not send PROXY header");
            return;
        }
    }
    let metric = service.pool.snapshot().algorithm().time_metric();
    let report = if metric == Some(TimeMetric::FirstByte) {
        let state = handle.state();
        let hook = |elapsed: Duration| state.record_response_time(elapsed);
        relay(client, backend, service.relay, Some(&hook)).await
    } else {
        relay(client, backend, service.relay, None).await
    };
    bump(&service.stats.bytes_in, report.client_to_backend);
    bump(&service.stats.bytes_out, report.backend_to_client);
    bump(&service.stats.spliced_bytes, report.spliced_bytes);
    info!(
        target: ACCESS_LOG,
        backend = %backend_addr,
        bytes_in = report.client_to_backend,
        bytes_out = report.backend_to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        end = report.end.as_str(),
        error = ?report.error,
        spliced_bytes = report.spliced_bytes,
        "connection closed"
    );
    drop(handle);
}

/// Connects to a backend chosen by the pool, trying up to `retries` other backends when
/// one refuses or times out. Returns the number of attempts made when all failed.
async fn connect_backend(
    service: &TcpService,
    key: &FlowKey,
) -> Result<(TcpStream, BackendHandle), u32> {
    let mut tried: Vec<SocketAddr> = Vec::new();
    for _ in 0..=service.retries {
        let snapshot = service.pool.snapshot();
        let Some(handle) = snapshot.select(key, &tried) else {
            break;
        };
        let measure_connect = snapshot.algorithm().time_metric() == Some(TimeMetric::Connect);
        drop(snapshot);
        let addr = handle.addr();
        let started = Instant::now();
        match connect(addr, service.connect_timeout, service.source_for(addr)).await {
            Ok(stream) => {
                let took = started.elapsed();
                handle.state().stats.record_connect_time(took);
                if measure_connect {
                    handle.state().record_response_time(took);
                }
                service
                    .pool
                    .connect_succeeded(handle.state(), Instant::now().into_std());
                return Ok((stream, handle));
            }
            Err(e) => {
                info!(backend = %addr, error = %e, "backend connect failed");
                if measure_connect {
                    // A failed attempt is a slow one: it must not look fast.
                    handle.state().record_response_time(service.connect_timeout);
                }
                if e.blames_backend() {
                    service.pool.connect_failed(
                        handle.state(),
                        e.reason(),
                        &e,
                        Instant::now().into_std(),
                    );
                }
                tried.push(addr);
            }
        }
    }
    Err(tried.len() as u32)
}
