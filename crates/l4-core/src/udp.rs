//! A UDP listener's service: datagrams from a client form a flow, pinned to one backend
//! through a connected UDP socket; the backend's datagrams go back to the client from the
//! listener's own address.
//!
//! Each worker owns a [`FlowTable`] for its `SO_REUSEPORT` socket (the kernel keeps a
//! client on one socket), so the table needs no lock. Each flow has a small reply task that
//! waits on its backend socket and forwards through the worker's shared batch buffers: a
//! flow costs a socket and about a kilobyte, never a buffer of its own. Datagrams move in
//! batches (`recvmmsg`, then one `sendmmsg` per run of one client's datagrams; sends never
//! wait on tokio's writability: UDP drops when a buffer is full), one for one: never
//! split, merged or reordered within a flow.

use std::cell::RefCell;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use l4_balance::{BackendHandle, BackendState, FailureReason, FlowKey, Health, Pool, Protocol};
use std::os::fd::{AsFd, OwnedFd};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use crate::log_addr::LogAddr;
use crate::udp_ports::{FlowSocket, PortBook};
use crate::{bump, ACCESS_LOG};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::admission::AccessList;
use crate::flow::{FlowEnd, FlowTable};
use crate::proxy_protocol::{decode_datagram, encode, ProxyProtocol, Transport};
use crate::relay::mark_drained;
use crate::sys::{send_batch, RecvBatch, BATCH};

/// The largest UDP payload over IPv4; every datagram up to this passes unchanged.
pub const MAX_DATAGRAM: usize = 65_507;
/// `recvmmsg` calls per wake-up before the loop gives the expiry sweep a turn.
const ROUNDS: usize = 8;

/// Counters of one UDP listener, shared by its workers.
#[derive(Debug, Default)]
pub struct UdpStats {
    /// Flows in the tables now.
    pub flows_active: AtomicU64,
    /// Flows ever created.
    pub flows_created: AtomicU64,
    /// Flows evicted by the `max_flows` cap.
    pub flows_evicted: AtomicU64,
    /// Flows ended by `idle_timeout`.
    pub flows_expired: AtomicU64,
    /// Datagrams client -> backend.
    pub datagrams_in: AtomicU64,
    /// Bytes client -> backend.
    pub bytes_in: AtomicU64,
    /// Datagrams backend -> client.
    pub datagrams_out: AtomicU64,
    /// Bytes backend -> client.
    pub bytes_out: AtomicU64,
    /// Dropped: the pool had no usable backend.
    pub dropped_no_backend: AtomicU64,
    /// Dropped: the source is not allowed.
    pub dropped_denied: AtomicU64,
    /// Dropped: no socket could be opened to the backend.
    pub dropped_no_socket: AtomicU64,
    /// Dropped: the backend's port is closed (ICMP port unreachable).
    pub dropped_unreachable: AtomicU64,
    /// Dropped: a socket buffer was full.
    pub dropped_busy: AtomicU64,
    /// Dropped: the source opened more new flows per second than allowed.
    pub dropped_per_source_rate: AtomicU64,
    /// Dropped: `accept_proxy` is set and the sender is not in its `from`.
    pub dropped_untrusted: AtomicU64,
    /// Dropped: a trusted sender's datagram had no valid PROXY v2 header.
    pub dropped_proxy_header: AtomicU64,
    /// Dropped: with the PROXY header prefixed, the datagram exceeds the UDP maximum.
    pub dropped_oversize: AtomicU64,
}

impl fmt::Display for UdpStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "flows_active={} flows_created={} flows_evicted={} flows_expired={} datagrams_in={} bytes_in={} datagrams_out={} bytes_out={} dropped_no_backend={} dropped_denied={} dropped_no_socket={} dropped_unreachable={} dropped_busy={} dropped_per_source_rate={} dropped_untrusted={} dropped_proxy_header={} dropped_oversize={}",
            g(&self.flows_active),
            g(&self.flows_created),
            g(&self.flows_evicted),
            g(&self.flows_expired),
            g(&self.datagrams_in),
            g(&self.bytes_in),
            g(&self.datagrams_out),
            g(&self.bytes_out),
            g(&self.dropped_no_backend),
            g(&self.dropped_denied),
            g(&self.dropped_no_socket),
            g(&self.dropped_unreachable),
            g(&self.dropped_busy),
            g(&self.dropped_per_source_rate),
            g(&self.dropped_untrusted),
            g(&self.dropped_proxy_header),
            g(&self.dropped_oversize),
        )
    }
}

/// The service of a UDP listener as published; see [`crate::tcp::SharedTcpService`].
pub type SharedUdpService = Arc<arc_swap::ArcSwap<UdpService>>;

/// Everything a UDP listener needs. Shared by all its workers.
#[derive(Debug)]
pub struct UdpService {
    /// The listener's name, for logs.
    pub name: Arc<str>,
    /// The configured address: the local half of the flow key (see `TcpService::bind`).
    pub bind: SocketAddr,
    /// Where flows go.
    pub pool: Arc<Pool>,
    /// Local addresses flow sockets bind to (empty: the wildcard); each adds a full range
    /// of local ports, which flows to different backends share.
    pub sources: Vec<IpAddr>,
    /// `max_new_flows_per_second_per_source`, if set.
    pub flow_rate_per_source: Option<Arc<crate::source_limit::RatePerSource>>,
    /// A flow ends after this long without a datagram either way.
    pub idle_timeout: Duration,
    /// Flows per worker at most (the listener's `max_flows` split over its workers).
    pub max_flows_per_worker: usize,
    /// Who may send (the original client, when a PROXY header names it).
    pub access: AccessList,
    /// Upstreams whose every datagram starts with a PROXY v2 header naming the client
    /// (`accept_proxy.from`); datagrams from anyone else are dropped. `None`: no header.
    pub accept_proxy: Option<AccessList>,
    /// A PROXY v2 header prefixed to datagrams sent to backends, and to which.
    pub proxy_protocol: Option<ProxyUdp>,
    /// Counters.
    pub stats: Arc<UdpStats>,
}

/// Which datagrams of a flow carry the PROXY v2 header to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyUdp {
    /// The first datagram of each flow (the backend keeps the address per source port;
    /// if that datagram is lost, the backend never learns it).
    First,
    /// Every datagram (stateless backends; costs the header's bytes on each).
    Every,
}

/// A flow's identity: who sent the datagrams (replies go back there) and the client they
/// are for (the same address, unless a trusted upstream's PROXY header names another).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowId {
    peer: SocketAddr,
    client: SocketAddr,
}

impl FlowId {
    fn direct(client: SocketAddr) -> Self {
        FlowId {
            peer: client,
            client,
        }
    }
}

/// State shared between a flow's entry in the table and its reply task.
#[derive(Debug)]
struct FlowShared {
    /// Milliseconds after the worker's epoch of the last backend datagram (0: none).
    last_reply_ms: AtomicU64,
    datagrams_out: AtomicU64,
    bytes_out: AtomicU64,
}

/// One flow: its backend socket, the backend it counts against, and its reply task.
struct Flow {
    socket: Arc<FlowSocket>,
    backend: BackendHandle,
    shared: Arc<FlowShared>,
    reply: JoinHandle<()>,
    started: Instant,
    datagrams_in: u64,
    bytes_in: u64,
    /// The address the client reached, for the PROXY header sent onward.
    reached: SocketAddr,
    /// Whether a datagram with the PROXY header has gone to the backend.
    header_sent: bool,
}

impl Drop for Flow {
    fn drop(&mut self) {
        // Ends the reply task and, with the last Arc, closes the backend socket.
        self.reply.abort();
    }
}

thread_local! {
    /// One reply batch per worker thread, borrowed only between two awaits.
    static REPLY_BATCH: RefCell<RecvBatch> = RefCell::new(RecvBatch::default());
}

fn is_unreachable(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::ConnectionRefused
}

/// A worker's half of a UDP listener.
struct Worker {
    /// The listener's service as published (a reload swaps it).
    shared: SharedUdpService,
    /// The service this worker applies now; refreshed from `shared` at each batch.
    service: Arc<UdpService>,
    listener: Arc<UdpSocket>,
    table: FlowTable<FlowId, Flow>,
    /// Datagrams with the PROXY header prefixed, built for one send.
    prefixed: Vec<u8>,
    /// The listener socket's address.
    local: SocketAddr,
    epoch: Instant,
    ports: PortBook,
    /// A descriptor held back for the moment the process runs out: closing it lets the
    /// new flow open its socket at once, while the evicted flow's socket closes only when
    /// its reply task is dropped, a moment later. Refilled on the next sweep.
    reserve: Option<OwnedFd>,
}

/// Serves datagrams on `socket` until `stop`; ends every flow on return.
pub async fn serve_udp(
    socket: std::net::UdpSocket,
    shared: SharedUdpService,
    stop: CancellationToken,
) {
    let service = shared.load_full();
    let listener = match UdpSocket::from_std(socket) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            warn!(listener = %service.name, error = %e, "cannot register udp socket");
            return;
        }
    };
    let mut worker = Worker {
        table: FlowTable::new(service.max_flows_per_worker, service.idle_timeout),
        ports: PortBook::new(service.sources.clone()),
        reserve: None,
        prefixed: Vec::new(),
        local: listener.local_addr().unwrap_or(service.bind),
        shared,
        service,
        listener,
        epoch: Instant::now(),
    };
    worker.refill_reserve();
    let sweep_every =
        (worker.service.idle_timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut sweep = tokio::time::interval(sweep_every);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = RecvBatch::default();
    let inject_panic = crate::fault::panic_requested("udp_receive");
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = sweep.tick() => {
                worker.refresh();
                worker.expire();
                worker.refill_reserve();
            }
            ready = worker.listener.readable() => {
                if ready.is_err() {
                    continue;
                }
                for _ in 0..ROUNDS {
                    let listener = Arc::clone(&worker.listener);
                    let received = listener
                        .try_io(Interest::READABLE, || batch.recv(listener.as_fd()));
                    match received {
                        Ok(n) => {
                            if inject_panic {
                                panic!("injected panic in the udp loop (L4LB_INJECT_PANIC)");
                            }
                            worker.forward_batch(&batch, n);
                            // A short batch means the queue is drained for now: forget the
                            // readiness instead of paying a recvmmsg that says EAGAIN.
                            if n < BATCH {
                                mark_drained(listener.as_ref(), Interest::READABLE);
                                break;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        // An unconnected socket may report a past ICMP error; nothing to do.
                        Err(e) => {
                            debug!(listener = %worker.service.name, error = %e, "udp receive error");
                            break;
                        }
                    }
                }
            }
        }
    }
    for (id, flow) in worker.table.drain() {
        worker.end(id, flow, FlowEnd::Shutdown);
    }
}

impl Worker {
    fn expire(&mut self) {
        let epoch = self.epoch;
        let expired = self.table.expire(Instant::now(), |flow| {
            let ms = flow.shared.last_reply_ms.load(Ordering::Relaxed);
            (ms > 0).then(|| epoch + Duration::from_millis(ms))
        });
        for (id, flow) in expired {
            bump(&self.service.stats.flows_expired, 1);
            self.end(id, flow, FlowEnd::Idle);
        }
    }

    /// Forwards a received batch: each flow's datagrams, in their order, go to its
    /// backend in one send (GSO or `sendmmsg`), however the flows interleave in the batch.
    /// Order only matters within a flow, so grouping keeps every guarantee.
    fn forward_batch(&mut self, batch: &RecvBatch, n: usize) {
        self.refresh();
        // The reserve comes back as soon as an evicted flow's socket has closed.
        self.refill_reserve();
        // The address clients reached (port included), for the PROXY header sent onward.
        let local = self.local;
        // Each datagram's flow and payload (after a received PROXY header); None: dropped.
        let mut items: [Option<(FlowId, SocketAddr, &[u8])>; BATCH] = [None; BATCH];
        for (i, item) in items.iter_mut().enumerate().take(n) {
            let (from, payload) = batch.get(i);
            let Some(from) = from else { continue };
            *item = match &self.service.accept_proxy {
                None => Some((FlowId::direct(from), local, payload)),
                Some(trusted) => self.strip_proxy_header(trusted, from, local, payload),
            };
        }
        let mut taken = [false; BATCH];
        for i in 0..n {
            let Some((id, reached, _)) = items[i] else {
                continue;
            };
            if taken[i] {
                continue;
            }
            let mut payloads: [&[u8]; BATCH] = [&[]; BATCH];
            let mut count = 0;
            for (j, taken) in taken.iter_mut().enumerate().take(n).skip(i) {
                if let Some((other, _, payload)) = items[j] {
                    if !*taken && other == id {
                        *taken = true;
                        payloads[count] = payload;
                        count += 1;
                    }
                }
            }
            self.forward(id, reached, &payloads[..count]);
        }
    }

    /// The flow and payload of a datagram from a trusted upstream: the client its PROXY v2
    /// header names (or the sender, for a LOCAL header). None (dropped, counted) for an
    /// untrusted sender or a datagram without a valid header.
    fn strip_proxy_header<'a>(
        &self,
        trusted: &AccessList,
        from: SocketAddr,
        local: SocketAddr,
        datagram: &'a [u8],
    ) -> Option<(FlowId, SocketAddr, &'a [u8])> {
        if trusted.allow.is_empty() || !trusted.admits(from.ip()) {
            bump(&self.service.stats.dropped_untrusted, 1);
            return None;
        }
        match decode_datagram(datagram) {
            Ok(header) => {
                let (client, reached) = header.addresses.unwrap_or((from, local));
                let payload = datagram.get(header.len..).unwrap_or_default();
                Some((FlowId { peer: from, client }, reached, payload))
            }
            Err(e) => {
                bump(&self.service.stats.dropped_proxy_header, 1);
                debug!(listener = %self.service.name, peer = %from, error = %e, "datagram dropped: no valid PROXY header");
                None
            }
        }
    }

    fn forward(&mut self, id: FlowId, reached: SocketAddr, payloads: &[&[u8]]) {
        let stats = Arc::clone(&self.service.stats);
        let count = payloads.len() as u64;
        if !self.service.access.admits(id.client.ip()) {
            bump(&stats.dropped_denied, count);
            return;
        }
        let now = Instant::now();
        let usable = self
            .table
            .get_mut(&id, now)
            // Draining keeps live flows (only new ones avoid the backend); down or disabled
            // moves them, and so does ejected, unless nothing else is usable (fail open:
            // moving would pick an ejected backend again, on every datagram).
            .map(|flow| match flow.backend.state().health() {
                Health::Up | Health::Draining => true,
                Health::Down | Health::Disabled => false,
                Health::Ejected => !self.service.pool.snapshot().has_usable(),
            });
        match usable {
            Some(true) => {}
            Some(false) => {
                // The flow's backend is down: this datagram re-selects.
                if let Some(flow) = self.table.remove(&id) {
                    self.end(id, flow, FlowEnd::BackendDown);
                }
                if !self.open(id, reached, now, count) {
                    return;
                }
            }
            None => {
                if !self.open(id, reached, now, count) {
                    return;
                }
            }
        }
        let Some(flow) = self.table.get_mut(&id, now) else {
            return;
        };
        let mut framed: [&[u8]; BATCH] = [&[]; BATCH];
        // Where, among what is sent, the first datagram with a PROXY header is.
        let mut header_at = None;
        let payloads = match self.service.proxy_protocol {
            None => payloads,
            Some(mode) => {
                let kept;
                let header = encode(
                    ProxyProtocol::V2,
                    Transport::Datagram,
                    id.client,
                    flow.reached,
                );
                (kept, header_at) = prefix_proxy_header(
                    mode,
                    &header,
                    flow.header_sent,
                    payloads,
                    &mut self.prefixed,
                    &mut framed,
                );
                bump(&stats.dropped_oversize, count - kept as u64);
                &framed[..kept]
            }
        };
        let count = payloads.len() as u64;
        match send_batch(flow.socket.as_fd(), payloads, None) {
            Ok(sent) => {
                if header_at.is_some_and(|at| at < sent) {
                    flow.header_sent = true;
                }
                let bytes: u64 = payloads[..sent].iter().map(|p| p.len() as u64).sum();
                flow.datagrams_in += sent as u64;
                flow.bytes_in += bytes;
                bump(&stats.datagrams_in, sent as u64);
                bump(&stats.bytes_in, bytes);
                bump(&stats.dropped_busy, count - sent as u64);
            }
            Err(e) if is_unreachable(&e) => {
                bump(&stats.dropped_unreachable, count);
                let state = Arc::clone(flow.backend.state());
                self.service.pool.connect_failed(
                    &state,
                    FailureReason::Refused,
                    &"udp port unreachable",
                    now,
                );
            }
            Err(_) => bump(&stats.dropped_busy, count),
        }
    }

    /// Opens a flow for `client`: selects a backend, connects a socket to it, starts the
    /// reply task. Returns false (datagram dropped) when no backend or socket can be had.
    fn open(&mut self, id: FlowId, reached: SocketAddr, now: Instant, datagrams: u64) -> bool {
        let stats = Arc::clone(&self.service.stats);
        let client = id.client;
        let key = FlowKey {
            client,
            local: self.flow_local(),
            protocol: Protocol::Udp,
        };
        if let Some(rate) = &self.service.flow_rate_per_source {
            if !rate.admit(client.ip(), crate::source_limit::now_second()) {
                bump(&stats.dropped_per_source_rate, datagrams);
                return false;
            }
        }
        // At the cap, the oldest flow goes before the new one opens its socket.
        if self.table.is_full() {
            self.evict_oldest();
        }
        let mut tried = Vec::new();
        let (backend, socket) = loop {
            let Some(backend) = self.service.pool.select(&key, &tried) else {
                bump(&stats.dropped_no_backend, datagrams);
                return false;
            };
            match self.ports.open(backend.addr()) {
                Ok(socket) => break (backend, socket),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                    // Out of descriptors: give up the least recently used flow for this
                    // one, and use the reserve while its socket is being closed.
                    self.evict_oldest();
                    self.reserve = None;
                    if let Ok(socket) = self.ports.open(backend.addr()) {
                        break (backend, socket);
                    }
                    bump(&stats.dropped_no_socket, datagrams);
                    return false;
                }
                Err(e) => {
                    debug!(backend = %backend.addr(), error = %e, "udp connect failed");
                    tried.push(backend.addr());
                    if tried.len() > 8 {
                        bump(&stats.dropped_no_socket, datagrams);
                        return false;
                    }
                }
            }
        };
        let socket = Arc::new(socket);
        let shared = Arc::new(FlowShared {
            last_reply_ms: AtomicU64::new(0),
            datagrams_out: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        });
        let reply = tokio::spawn(reply_loop(ReplyPath {
            backend_socket: Arc::clone(&socket),
            listener: Arc::clone(&self.listener),
            client: id.peer,
            shared: Arc::clone(&shared),
            backend: Arc::clone(backend.state()),
            pool: Arc::clone(&self.service.pool),
            stats: Arc::clone(&stats),
            epoch: self.epoch,
        }));
        let flow = Flow {
            socket,
            backend,
            shared,
            reply,
            started: now,
            datagrams_in: 0,
            bytes_in: 0,
            reached,
            header_sent: false,
        };
        debug!(
            listener = %self.service.name,
            client = %client,
            backend = %flow.backend.addr(),
            local = ?flow.socket.local_addr().ok(),
            "flow opened"
        );
        bump(&stats.flows_created, 1);
        bump(&stats.flows_active, 1);
        if let Some((old, evicted)) = self.table.insert(id, flow, now) {
            let reason = if old == id {
                FlowEnd::BackendDown
            } else {
                FlowEnd::Evicted
            };
            if reason == FlowEnd::Evicted {
                bump(&stats.flows_evicted, 1);
            }
            self.end(old, evicted, reason);
        }
        true
    }

    fn flow_local(&self) -> SocketAddr {
        let bind = self.service.bind;
        if bind.ip().is_unspecified() {
            self.listener
                .local_addr()
                .map_or(bind, |a| SocketAddr::new(a.ip(), bind.port()))
        } else {
            bind
        }
    }

    /// Takes up a service a reload published: new flows follow it (the pool, limits,
    /// sources); live flows keep their backend.
    fn refresh(&mut self) {
        let current = self.shared.load();
        if !Arc::ptr_eq(&current, &self.service) {
            self.service = Arc::clone(&current);
            self.table
                .set_limits(self.service.max_flows_per_worker, self.service.idle_timeout);
            self.ports.set_sources(self.service.sources.clone());
            // Flows whose backend the reload removed move on their next datagram: UDP
            // has no end to wait for, and nothing probes a removed backend any more.
            let snapshot = self.service.pool.snapshot();
            let kept: std::collections::HashSet<*const BackendState> =
                snapshot.backends().map(|b| Arc::as_ptr(&b.state)).collect();
            let gone = self
                .table
                .remove_where(|flow| !kept.contains(&Arc::as_ptr(flow.backend.state())));
            for (id, flow) in gone {
                self.end(id, flow, FlowEnd::BackendDown);
            }
        }
    }

    fn evict_oldest(&mut self) {
        if let Some((old, flow)) = self.table.pop_oldest() {
            bump(&self.service.stats.flows_evicted, 1);
            self.end(old, flow, FlowEnd::Evicted);
        }
    }

    fn refill_reserve(&mut self) {
        if self.reserve.is_none() {
            self.reserve = self.listener.as_fd().try_clone_to_owned().ok();
        }
    }

    fn end(&self, id: FlowId, flow: Flow, reason: FlowEnd) {
        self.service
            .stats
            .flows_active
            .fetch_sub(1, Ordering::Relaxed);
        info!(
        target: ACCESS_LOG,
            listener = %self.service.name,
            client = %LogAddr(id.client),
            peer = (id.peer != id.client).then_some(tracing::field::display(LogAddr(id.peer))),
            backend = %LogAddr(flow.backend.addr()),
            datagrams_in = flow.datagrams_in,
            bytes_in = flow.bytes_in,
            datagrams_out = flow.shared.datagrams_out.load(Ordering::Relaxed),
            bytes_out = flow.shared.bytes_out.load(Ordering::Relaxed),
            duration_ms = flow.started.elapsed().as_millis() as u64,
            end = reason.as_str(),
            "flow closed"
        );
    }
}

/// What a flow's reply task needs.
struct ReplyPath {
    backend_socket: Arc<FlowSocket>,
    listener: Arc<UdpSocket>,
    client: SocketAddr,
    shared: Arc<FlowShared>,
    backend: Arc<BackendState>,
    pool: Arc<Pool>,
    stats: Arc<UdpStats>,
    epoch: Instant,
}

/// Forwards the backend's datagrams to the client until the flow ends (the task is
/// aborted when its flow leaves the table).
async fn reply_loop(path: ReplyPath) {
    loop {
        if path.backend_socket.readable().await.is_err() {
            return;
        }
        for _ in 0..ROUNDS {
            let forwarded = REPLY_BATCH.with(|batch| {
                let mut batch = batch.borrow_mut();
                let socket = &path.backend_socket;
                let n = socket.try_io(Interest::READABLE, || batch.recv(socket.as_fd()))?;
                if n < BATCH {
                    mark_drained(&***socket, Interest::READABLE);
                }
                let mut payloads: [&[u8]; BATCH] = [&[]; BATCH];
                for (i, slot) in payloads.iter_mut().enumerate().take(n) {
                    *slot = batch.get(i).1;
                }
                let payloads = &payloads[..n];
                // A full client buffer drops datagrams (UDP may), never stalls the flow.
                let sent = match send_batch(path.listener.as_fd(), payloads, Some(path.client)) {
                    Ok(sent) => sent,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) => return Err(e),
                };
                let bytes: u64 = payloads[..sent].iter().map(|p| p.len() as u64).sum();
                Ok((n, sent, bytes))
            });
            match forwarded {
                Ok((n, sent, bytes)) => {
                    bump(&path.shared.datagrams_out, sent as u64);
                    bump(&path.shared.bytes_out, bytes);
                    bump(&path.stats.datagrams_out, sent as u64);
                    bump(&path.stats.bytes_out, bytes);
                    bump(&path.stats.dropped_busy, (n - sent) as u64);
                    let ms = u64::try_from(path.epoch.elapsed().as_millis())
                        .unwrap_or(u64::MAX)
                        .max(1);
                    path.shared.last_reply_ms.store(ms, Ordering::Relaxed);
                    // The backend answers: its failure streak (ICMP unreachables) is over.
                    path.pool.connect_succeeded(&path.backend, Instant::now());
                    if n < BATCH {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if is_unreachable(&e) => {
                    // ICMP port unreachable from the backend: a passive health failure.
                    bump(&path.stats.dropped_unreachable, 1);
                    path.pool.connect_failed(
                        &path.backend,
                        FailureReason::Refused,
                        &"udp port unreachable",
                        Instant::now(),
                    );
                    break;
                }
                Err(e) => {
                    debug!(client = %path.client, error = %e, "udp reply error");
                    break;
                }
            }
        }
    }
}

/// Frames the datagrams of one send for a backend that reads PROXY v2: the header goes
/// before every datagram (`every`), or before the flow's first datagram that fits with it
/// until one has been sent (`first`), built in `scratch`; the others are passed as they
/// are. Fills `out`; returns how many it holds (a datagram that needs the header but would
/// exceed the UDP maximum with it is left out) and the index of the first with a header.
fn prefix_proxy_header<'a>(
    mode: ProxyUdp,
    header: &[u8],
    header_sent: bool,
    payloads: &[&'a [u8]],
    scratch: &'a mut Vec<u8>,
    out: &mut [&'a [u8]; BATCH],
) -> (usize, Option<usize>) {
    // First pass: lay the framed datagrams end to end, so the scratch buffer is not
    // reallocated while slices into it are held.
    scratch.clear();
    let mut wants = [false; BATCH];
    let mut framed: [Option<(usize, usize)>; BATCH] = [None; BATCH];
    let mut pending = mode == ProxyUdp::Every || !header_sent;
    for (i, payload) in payloads.iter().enumerate().take(BATCH) {
        if !pending {
            break;
        }
        wants[i] = true;
        if header.len() + payload.len() <= MAX_DATAGRAM {
            let start = scratch.len();
            scratch.extend_from_slice(header);
            scratch.extend_from_slice(payload);
            framed[i] = Some((start, scratch.len()));
            pending = mode == ProxyUdp::Every;
        }
    }
    let scratch: &'a [u8] = scratch;
    let mut kept = 0;
    let mut header_at = None;
    for (i, payload) in payloads.iter().enumerate().take(BATCH) {
        match (wants[i], framed[i]) {
            (false, _) => {
                out[kept] = payload;
                kept += 1;
            }
            (true, Some((start, end))) => {
                header_at = header_at.or(Some(kept));
                out[kept] = &scratch[start..end];
                kept += 1;
            }
            // Too large with its header: dropped (and counted by the caller).
            (true, None) => {}
        }
    }
    (kept, header_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(mode: ProxyUdp, sent: bool, payloads: &[&[u8]]) -> (Vec<Vec<u8>>, Option<usize>) {
        let mut scratch = Vec::new();
        let mut out: [&[u8]; BATCH] = [&[]; BATCH];
        let (kept, at) = prefix_proxy_header(mode, b"HDR", sent, payloads, &mut scratch, &mut out);
        (out[..kept].iter().map(|p| p.to_vec()).collect(), at)
    }

    #[test]
    fn the_header_goes_on_the_first_or_every_datagram() {
        let payloads: [&[u8]; 3] = [b"a", b"b", b"c"];
        assert_eq!(
            frame(ProxyUdp::First, false, &payloads),
            (
                vec![b"HDRa".to_vec(), b"b".to_vec(), b"c".to_vec()],
                Some(0)
            )
        );
        assert_eq!(
            frame(ProxyUdp::First, true, &payloads),
            (vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()], None)
        );
        assert_eq!(
            frame(ProxyUdp::Every, true, &payloads),
            (
                vec![b"HDRa".to_vec(), b"HDRb".to_vec(), b"HDRc".to_vec()],
                Some(0)
            )
        );
    }

    #[test]
    fn a_datagram_too_large_for_the_header_passes_the_header_on() {
        let big = vec![7u8; MAX_DATAGRAM - 2];
        let payloads: [&[u8]; 3] = [&big, b"b", &big];
        let (out, at) = frame(ProxyUdp::First, false, &payloads);
        assert_eq!(at, Some(0));
        assert_eq!(
            out.len(),
            2,
            "the first is dropped, the header rides on the next"
        );
        assert_eq!(out[0], b"HDRb");
        assert_eq!(
            out[1], big,
            "after the header went, a large one passes as it is"
        );
        let (out, _) = frame(ProxyUdp::Every, false, &payloads);
        assert_eq!(out, vec![b"HDRb".to_vec()]);
    }
}
