//! A TCP listener's service: accept, admit, pick a backend, connect (with retries), send
//! the PROXY header, relay, and log one event when the connection ends.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::{bump, ACCESS_LOG};
use arc_swap::ArcSwap;
use l4_balance::{
    BackendHandle, FailureReason, FlowKey, Health, OnDown, Pool, Protocol, TimeMetric,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn};

use crate::admission::{AccessList, ConnectionLimit, ConnectionSlot};
use crate::connect::connect;
use crate::log_addr::LogAddr;
use crate::preread::{
    peek_server_name, postgres_backend_tls, postgres_start, read_proxy_header, PeekEnd, ServerName,
};
use crate::proxy_protocol::{self, ProxyProtocol, Transport};
use crate::relay::{relay, RelayEnd, RelayOptions, RelayReport, Side};
use crate::sni_routes::SniRoutes;
use crate::source_limit::{now_second, ConcurrentPerSource, RatePerSource, SourceSlot};

/// Where a connection can go: a pool, and the local addresses to leave from.
#[derive(Debug)]
pub struct Target {
    /// The pool's name, for logs.
    pub name: Arc<str>,
    /// The pool.
    pub pool: Arc<Pool>,
    /// Local addresses backend connections leave from, in turn (empty: by route).
    pub sources: Vec<IpAddr>,
    next_source: AtomicUsize,
}

impl Target {
    /// A target for `pool`, leaving from `sources`.
    pub fn new(name: &str, pool: Arc<Pool>, sources: Vec<IpAddr>) -> Self {
        Target {
            name: Arc::from(name),
            pool,
            sources,
            next_source: AtomicUsize::new(0),
        }
    }

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

/// Routing by the server name of the client's TLS ClientHello (`sni:`).
#[derive(Debug)]
pub struct SniRouting {
    /// Names to indexes into `targets`.
    pub routes: SniRoutes<usize>,
    /// The routes' pools.
    pub targets: Vec<Target>,
    /// How long to wait for a complete ClientHello before using the default pool.
    pub timeout: Duration,
    /// Answer a PostgreSQL SSLRequest and route by the ClientHello that follows.
    pub postgres: bool,
}

/// Reading a PROXY header from trusted upstreams (`accept_proxy:`).
#[derive(Debug)]
pub struct AcceptProxy {
    /// The upstreams trusted to send one; any other peer is refused.
    pub from: AccessList,
    /// How long the header may take to arrive.
    pub timeout: Duration,
}

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
    /// Where connections go (unless an SNI route says otherwise).
    pub target: Target,
    /// SNI routes, if any.
    pub sni: Option<SniRouting>,
    /// PROXY header expected from trusted upstreams, if any.
    pub accept_proxy: Option<AcceptProxy>,
    /// Limit for each connect attempt.
    pub connect_timeout: Duration,
    /// Further backends to try after a failed connect.
    pub retries: u32,
    /// Relay settings.
    pub relay: RelayOptions,
    /// Who may connect (the original client, when a PROXY header names it).
    pub access: AccessList,
    /// How many may be connected at once, across workers.
    pub limit: Arc<ConnectionLimit>,
    /// Header sent to backends.
    pub proxy_protocol: ProxyProtocol,
    /// Counters, carried across reloads.
    pub stats: Arc<TcpStats>,
    /// `max_connections_per_source`, if set.
    pub per_source: Option<Arc<ConcurrentPerSource>>,
    /// `max_new_connections_per_second_per_source`, if set.
    pub rate_per_source: Option<Arc<RatePerSource>>,
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
    /// Refused: `accept_proxy` is set and the peer is not in its `from`.
    pub rejected_untrusted: AtomicU64,
    /// Closed: a trusted peer sent no valid PROXY header in time.
    pub rejected_proxy_header: AtomicU64,
    /// Closed: the client left (or sent nothing) before a route could be chosen, or a
    /// PostgreSQL backend refused TLS.
    pub rejected_preread: AtomicU64,
    /// Routed by an SNI route.
    pub sni_matched: AtomicU64,
    /// Sent to the listener's pool by an SNI listener (no name, no match, not TLS,
    /// unreadable or late ClientHello).
    pub sni_default: AtomicU64,
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
    let span = info_span!("conn", listener = %service.name, client = %LogAddr(peer));
    tracker.spawn(handle(Arc::clone(service), client, peer, local, span));
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

/// One connection, in its span. The span is entered while the connection is set up and
/// when it ends, not while it relays: entering one costs a registry lookup and the log
/// filter's lock on every poll, and a keep-alive connection is polled once per request.
///
/// Not an `async fn`: an `async move` block uses what it captured in place, where an
/// `async fn` would keep a moved copy of each argument beside it for the connection's life.
fn handle(
    service: Arc<TcpService>,
    client: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    span: tracing::Span,
) -> impl Future<Output = ()> {
    let started = Instant::now();
    async move {
        // Boxed: set-up needs more state than relaying, and a connection spends its life
        // relaying; inline, the set-up's size would be every idle connection's size.
        // Each poll runs in the span. (Not `Instrumented`: it holds a second handle to the
        // span and enters it once more to drop the finished set-up, an enter, an exit and
        // a close that every connection would pay for nothing.)
        let mut setup = Box::pin(prepare(&service, client, peer, local, started));
        let ready = std::future::poll_fn(|cx| span.in_scope(|| setup.as_mut().poll(cx))).await;
        drop(setup);
        let Some(Ready {
            client,
            backend,
            metric,
            cut,
            ends,
        }) = ready
        else {
            return;
        };
        // (The relay's one event, a debug line when no pipe is left for splice, is logged
        // without the connection's span.)
        let report = if metric == Some(TimeMetric::FirstByte) {
            let state = ends.handle.state();
            let hook = |elapsed: Duration| state.record_response_time(elapsed);
            relay(client, backend, service.relay, Some(&hook), cut).await
        } else {
            relay(client, backend, service.relay, None, cut).await
        };
        span.in_scope(|| finish(&service, ends, &report, started));
    }
}

/// A connection ready to relay: both sockets and what its end needs.
struct Ready<'a> {
    client: TcpStream,
    backend: TcpStream,
    metric: Option<TimeMetric>,
    cut: Option<CancellationToken>,
    ends: Ending<'a>,
}

/// What the end of a connection reports and judges, held (with the admission slots)
/// until then.
struct Ending<'a> {
    route: Route<'a>,
    source: SocketAddr,
    handle: BackendHandle,
    empty_close_fails: bool,
    _slots: (Option<SourceSlot>, ConnectionSlot),
}

/// Admits the connection, reads what routing needs, connects to a backend and sends what
/// precedes the relay. `None` when the connection ended there (each way logged).
async fn prepare(
    service: &TcpService,
    mut client: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    started: Instant,
) -> Option<Ready<'_>> {
    // The client as far as policy is concerned: the socket's peer, or the address a
    // trusted upstream's PROXY header names.
    let (source, reached) = match &service.accept_proxy {
        None => (peer, local),
        Some(accept) => {
            // An empty list trusts nobody (the config refuses one; an access list would
            // read it as "everyone").
            if accept.from.allow.is_empty() || !accept.from.admits(peer.ip()) {
                bump(&service.stats.rejected_untrusted, 1);
                debug!("refused: peer is not in accept_proxy.from");
                return None;
            }
            let deadline = started + accept.timeout;
            match read_proxy_header(&mut client, deadline).await {
                Ok(header) => header.addresses.unwrap_or((peer, local)),
                Err(e) => {
                    bump(&service.stats.rejected_proxy_header, 1);
                    info!(error = %e, "closed: no valid PROXY header from a trusted peer");
                    return None;
                }
            }
        }
    };
    if !service.access.admits(source.ip()) {
        bump(&service.stats.rejected_denied, 1);
        debug!("rejected by access list");
        return None;
    }
    if let Some(rate) = &service.rate_per_source {
        if !rate.admit(source.ip(), now_second()) {
            bump(&service.stats.rejected_per_source_rate, 1);
            debug!("rejected: max_new_connections_per_second_per_source reached");
            return None;
        }
    }
    let source_slot = match &service.per_source {
        Some(table) => match table.try_acquire(source.ip()) {
            Some(slot) => Some(slot),
            None => {
                bump(&service.stats.rejected_per_source, 1);
                debug!("rejected: max_connections_per_source reached");
                return None;
            }
        },
        None => None,
    };
    let Some(slot) = service.limit.try_acquire() else {
        bump(&service.stats.rejected_limit, 1);
        debug!("rejected: max_connections reached");
        return None;
    };
    let Some(route) = choose_route(service, &mut client).await else {
        bump(&service.stats.rejected_preread, 1);
        return None;
    };
    // TCP_NODELAY is inherited from the listening socket (see listener::bind_tcp).
    let key = FlowKey {
        client: source,
        local: flow_local(service.bind, local),
        protocol: Protocol::Tcp,
    };
    let target = route.target;
    let (mut backend, handle) = match connect_backend(service, target, &key).await {
        Ok(connected) => connected,
        Err(0) => {
            // The pool has no usable backend; health logged that once for the pool.
            bump(&service.stats.rejected_no_backend, 1);
            debug!(pool = %target.name, "no usable backend, closing client");
            return None;
        }
        Err(attempts) => {
            bump(&service.stats.rejected_no_backend, 1);
            info!(pool = %target.name, attempts, "no backend reachable, closing client");
            return None;
        }
    };
    let backend_addr = handle.addr();
    let (metric, on_down, empty_close_fails) = {
        let snapshot = target.pool.snapshot();
        let outlier = snapshot.outlier();
        (
            snapshot.algorithm().time_metric(),
            snapshot.on_down(),
            outlier.empty_close_fails,
        )
    };
    // on_down: close: the connection takes the backend's cut signal before anything else
    // can wait, then looks at the backend once more; the checker changes the health
    // before it cuts, so a cut can never fall between the two unseen.
    let cut = if on_down == OnDown::Close {
        let cut = handle.state().sessions().child_token();
        if handle.state().health() == Health::Down || handle.state().is_retired() {
            debug!(backend = %backend_addr, "backend went down while connecting; closing client");
            return None;
        }
        Some(cut)
    } else {
        None
    };
    if service.proxy_protocol != ProxyProtocol::Off {
        let header =
            proxy_protocol::encode(service.proxy_protocol, Transport::Stream, source, reached);
        if let Err(e) = backend.write_all(&header).await {
            info!(backend = %backend_addr, error = %e, "could not send PROXY header");
            return None;
        }
    }
    if route.postgres_tls {
        let deadline = Instant::now() + service.connect_timeout;
        if let Err(e) = postgres_backend_tls(&mut backend, deadline).await {
            bump(&service.stats.rejected_preread, 1);
            info!(backend = %backend_addr, error = %e, "PostgreSQL backend refused TLS, closing client");
            return None;
        }
    }
    Some(Ready {
        client,
        backend,
        metric,
        cut,
        ends: Ending {
            route,
            source,
            handle,
            empty_close_fails,
            _slots: (source_slot, slot),
        },
    })
}

/// Judges the end for passive health, counts the bytes and writes the access log line.
fn finish(service: &TcpService, ends: Ending<'_>, report: &RelayReport, started: Instant) {
    let Ending {
        route,
        source,
        handle,
        empty_close_fails,
        _slots,
    } = ends;
    let target = route.target;
    let backend_addr = handle.addr();
    if empty_close_fails {
        let now = Instant::now().into_std();
        // Only a quick close counts: a backend that times out a client that never spoke
        // (a slow or idle client) is doing its job, and clients must not be able to
        // eject backends that way.
        let quick = report
            .first_end
            .is_some_and(|after| after < service.connect_timeout);
        if closed_before_any_byte(report) && quick {
            target.pool.connect_failed(
                handle.state(),
                FailureReason::EmptyClose,
                &"accepted, then closed before any byte",
                now,
            );
        } else if handle.state().in_empty_close_streak()
            && report.client_to_backend + report.backend_to_client > 0
        {
            target.pool.connect_succeeded(handle.state(), now);
        }
    }
    bump(&service.stats.bytes_in, report.client_to_backend);
    bump(&service.stats.bytes_out, report.backend_to_client);
    bump(&service.stats.spliced_bytes, report.spliced_bytes);
    info!(
        target: ACCESS_LOG,
        // The client a trusted upstream's PROXY header named (the span has the peer).
        source = service
            .accept_proxy
            .is_some()
            .then_some(tracing::field::display(LogAddr(source))),
        pool = %target.name,
        sni = route.name.as_deref(),
        backend = %LogAddr(backend_addr),
        bytes_in = report.client_to_backend,
        bytes_out = report.backend_to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        end = report.end.as_str(),
        error = ?report.error,
        spliced_bytes = report.spliced_bytes,
        "connection closed"
    );
    drop((handle, _slots));
}

/// Whether the backend ended a connection on which no byte moved either way: it reset it,
/// or its FIN came first. (A client that leaves first without a word is not the
/// backend's fault.)
fn closed_before_any_byte(report: &RelayReport) -> bool {
    report.client_to_backend == 0
        && report.backend_to_client == 0
        && match report.end {
            // A reset that answers a client's FIN (a backend with linger 0) is not a
            // failure either.
            RelayEnd::Reset(Side::Backend) => report.first_fin != Some(Side::Client),
            RelayEnd::Closed => report.first_fin == Some(Side::Backend),
            _ => false,
        }
}

/// Where a connection goes, as the preread decided.
struct Route<'a> {
    target: &'a Target,
    /// The server name the client sent, for the access log.
    name: Option<String>,
    /// l4lb answered the client's SSLRequest: the backend must be asked too.
    postgres_tls: bool,
}

/// Chooses the target: the listener's pool, or the SNI route the ClientHello names.
/// `None` when the client left before a route could be chosen.
async fn choose_route<'a>(service: &'a TcpService, client: &mut TcpStream) -> Option<Route<'a>> {
    let Some(sni) = &service.sni else {
        return Some(Route {
            target: &service.target,
            name: None,
            postgres_tls: false,
        });
    };
    let deadline = Instant::now() + sni.timeout;
    let (name, postgres_tls) = if sni.postgres {
        match postgres_start(client, deadline).await {
            Ok(start) => (start.name, start.ssl_requested),
            Err(e) => {
                debug!(error = %e, "PostgreSQL preamble not read");
                return None;
            }
        }
    } else {
        (peek_server_name(client, deadline).await, false)
    };
    let name = match name {
        ServerName::Name(name) => Some(name),
        ServerName::NoName | ServerName::NotTls => None,
        ServerName::Invalid(e) => {
            debug!(error = %e, "unreadable ClientHello, using the listener's pool");
            None
        }
        ServerName::Undecided(PeekEnd::Closed) => {
            debug!("client closed before its ClientHello");
            return None;
        }
        ServerName::Undecided(PeekEnd::Io(e)) => {
            debug!(error = %e, "error reading the ClientHello");
            return None;
        }
        ServerName::Undecided(e) => {
            info!(error = %e, "no ClientHello read, using the listener's pool");
            None
        }
    };
    let routed = name
        .as_deref()
        .and_then(|n| sni.routes.route(n))
        .and_then(|&i| sni.targets.get(i));
    match routed {
        Some(_) => bump(&service.stats.sni_matched, 1),
        None => bump(&service.stats.sni_default, 1),
    }
    Some(Route {
        target: routed.unwrap_or(&service.target),
        name,
        postgres_tls,
    })
}

/// Connects to a backend chosen by the pool, trying up to `retries` other backends when
/// one refuses or times out. Returns the number of attempts made when all failed.
async fn connect_backend(
    service: &TcpService,
    target: &Target,
    key: &FlowKey,
) -> Result<(TcpStream, BackendHandle), u32> {
    let mut tried: Vec<SocketAddr> = Vec::new();
    for _ in 0..=service.retries {
        let snapshot = target.pool.snapshot();
        let Some(handle) = snapshot.select(key, &tried) else {
            break;
        };
        let measure_connect = snapshot.algorithm().time_metric() == Some(TimeMetric::Connect);
        drop(snapshot);
        let addr = handle.addr();
        let started = Instant::now();
        match connect(addr, service.connect_timeout, target.source_for(addr)).await {
            Ok(stream) => {
                let took = started.elapsed();
                handle.state().stats.record_connect_time(took);
                if measure_connect {
                    handle.state().record_response_time(took);
                }
                let now = Instant::now().into_std();
                if handle.state().in_empty_close_streak() {
                    // An accept-then-die backend must not end its own failure streak
                    // by accepting: only a byte moving does.
                    target.pool.connect_accepted(handle.state(), now);
                } else {
                    target.pool.connect_succeeded(handle.state(), now);
                }
                return Ok((stream, handle));
            }
            Err(e) => {
                info!(backend = %addr, error = %e, "backend connect failed");
                if measure_connect {
                    // A failed attempt is a slow one: it must not look fast.
                    handle.state().record_response_time(service.connect_timeout);
                }
                if e.blames_backend() {
                    target.pool.connect_failed(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn report(end: RelayEnd, first_fin: Option<Side>, bytes: u64) -> RelayReport {
        RelayReport {
            client_to_backend: bytes,
            backend_to_client: 0,
            end,
            error: None,
            spliced_bytes: 0,
            first_fin,
            first_end: Some(Duration::from_millis(1)),
        }
    }

    #[test]
    fn only_the_backend_ending_a_silent_connection_is_an_empty_close() {
        use Side::{Backend, Client};
        for (end, first_fin, bytes, empty) in [
            // The backend closed or reset first, nothing moved: accept-then-die.
            (RelayEnd::Closed, Some(Backend), 0, true),
            (RelayEnd::Reset(Backend), None, 0, true),
            // The client left first (a port check, a scanner), or answered by a reset.
            (RelayEnd::Closed, Some(Client), 0, false),
            (RelayEnd::Reset(Backend), Some(Client), 0, false),
            (RelayEnd::Reset(Client), None, 0, false),
            // Bytes moved: a served connection.
            (RelayEnd::Closed, Some(Backend), 5, false),
            (RelayEnd::IdleTimeout, None, 0, false),
        ] {
            let report = report(end, first_fin, bytes);
            assert_eq!(
                closed_before_any_byte(&report),
                empty,
                "{end:?} {first_fin:?} {bytes}"
            );
        }
    }
}
