//! The TCP relay: moves bytes both ways between a client and a backend until both
//! directions have ended, one side fails, or the connection sits idle too long.
//!
//! Each direction is pumped independently, so a FIN from one side is passed on as a FIN
//! (`shutdown(SHUT_WR)`) while the other direction keeps flowing: half-closed connections
//! behave as if l4lb were not there. A reset or error on one side resets the other.
//!
//! On Linux the bytes go socket -> pipe -> socket with `splice(2)` and never enter user
//! space. The rules that keep this simple and correct:
//! - read from a socket into a pipe only when the pipe is empty, so `EAGAIN` on a fill
//!   always means "the socket has nothing", never "the pipe is full";
//! - an idle direction holds no pipe: it takes one from the worker's pool when its socket
//!   turns readable and returns it once drained;
//! - if splice is refused (`EINVAL`, `ENOSYS`, ...) or no pipe can be had, the direction
//!   falls back to a userspace copy; no byte is ever left behind in a pipe when it does.
//!
//! Splice pays off for bulk transfers and costs more than a plain read and write for small
//! messages (pipe bookkeeping, page references). The default mode, `Auto`, does what
//! HAProxy's `splice-auto` does: it copies through a per-worker scratch buffer (no
//! allocation per connection) and switches a direction to splice once reads keep filling
//! the buffer, i.e. once the direction carries bulk data.

use std::io;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::pipe_pool;

/// How bytes are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RelayMode {
    /// Copy small exchanges, splice bulk transfers (see the module doc).
    #[default]
    Auto,
    /// `splice(2)` through a pipe from the first byte; falls back to copying where splice
    /// is unavailable.
    Splice,
    /// Userspace copy only.
    Copy,
}

/// Per-connection relay settings.
#[derive(Debug, Clone, Copy)]
pub struct RelayOptions {
    /// Splice or copy.
    pub mode: RelayMode,
    /// Close the connection after this long with no byte in either direction.
    pub idle_timeout: Duration,
    /// Pipes this worker may hold (pooled or in use); past it directions copy.
    pub max_pipes: usize,
}

/// One of the two peers of a relayed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The downstream peer that connected to l4lb.
    Client,
    /// The upstream server l4lb connected to.
    Backend,
}

impl Side {
    /// Lower-case name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Backend => "backend",
        }
    }
}

/// How a relayed connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both directions finished with a FIN.
    Closed,
    /// This side reset the connection or failed; the other side was reset in turn.
    Reset(Side),
    /// No traffic in either direction for `idle_timeout`.
    IdleTimeout,
    /// Cut because the backend went down (`on_down: close`); both sides were reset.
    BackendDown,
}

impl RelayEnd {
    /// Short name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RelayEnd::Closed => "closed",
            RelayEnd::Reset(Side::Client) => "client_reset",
            RelayEnd::Reset(Side::Backend) => "backend_reset",
            RelayEnd::IdleTimeout => "idle_timeout",
            RelayEnd::BackendDown => "backend_down",
        }
    }
}

/// What happened on a relayed connection.
#[derive(Debug, Clone, Copy)]
pub struct RelayReport {
    /// Bytes moved from the client to the backend.
    pub client_to_backend: u64,
    /// Bytes moved from the backend to the client.
    pub backend_to_client: u64,
    /// How it ended.
    pub end: RelayEnd,
    /// The I/O error behind a reset, if any.
    pub error: Option<io::ErrorKind>,
    /// Bytes (both ways) that moved with splice rather than through user space.
    pub spliced_bytes: u64,
    /// The side whose FIN ended its direction first, if either did.
    pub first_fin: Option<Side>,
    /// How long after the relay started the first FIN or the reset came.
    pub first_end: Option<Duration>,
}

/// Counters the two directions share with the relay and its idle watch.
#[derive(Debug)]
struct Progress {
    start: Instant,
    client_to_backend: AtomicU64,
    backend_to_client: AtomicU64,
    /// Milliseconds after `start` of the last byte moved either way.
    last_activity_ms: AtomicU64,
    spliced: AtomicU64,
    /// Directions that reached end of stream (0, 1 or 2).
    directions_done: AtomicU64,
    /// Bytes read from one side and not yet written to the other (in a pipe or a leftover
    /// buffer). A connection cut while this is not zero is reset, never closed with a FIN
    /// that would make the truncated stream look complete.
    in_flight: AtomicU64,
}

impl Progress {
    fn new() -> Self {
        Progress {
            start: Instant::now(),
            client_to_backend: AtomicU64::new(0),
            backend_to_client: AtomicU64::new(0),
            last_activity_ms: AtomicU64::new(0),
            spliced: AtomicU64::new(0),
            directions_done: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        }
    }

    /// Any byte moving either way, read or written, keeps the connection from idling out:
    /// a slow reader that drains a backlog is not idle.
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    fn read(&self, n: usize) {
        self.in_flight.fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }

    fn wrote(&self, counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
        self.in_flight.fetch_sub(n as u64, Ordering::Relaxed);
        self.touch();
    }

    /// Bytes read and written at once (the copy path's common case): never in flight.
    fn passed(&self, counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }

    fn has_pending_bytes(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }

    fn idle_deadline(&self, idle: Duration) -> Instant {
        self.start + Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed)) + idle
    }
}

/// A direction stopped because of an I/O error on one side.
#[derive(Debug)]
struct PumpError {
    side: Side,
    error: io::Error,
}

/// Splice cannot be used for this direction; nothing has moved yet.
#[derive(Debug)]
struct SpliceUnavailable;

/// Called once with the time from the start of the relay to the backend's first byte
/// (for `least_time first_byte`).
pub type FirstByteHook<'a> = Option<&'a (dyn Fn(Duration) + Sync)>;

/// One direction: `from` -> `to`.
struct Direction<'a> {
    from: &'a TcpStream,
    from_side: Side,
    to: &'a TcpStream,
    to_side: Side,
    counter: &'a AtomicU64,
    progress: &'a Progress,
    on_first_byte: FirstByteHook<'a>,
    max_pipes: usize,
}

/// Bytes read at once on the copy path; a direction whose reads keep filling it is bulk.
const COPY_BUFFER: usize = 64 * 1024;
/// Consecutive full reads after which `Auto` switches a direction to splice.
const BULK_READS: u32 = 2;

thread_local! {
    /// The copy path's buffer, one per worker thread: a message read is written out at
    /// once, so it only needs to live between two awaits. Bytes the peer cannot take yet
    /// go to a per-connection leftover buffer, allocated only then.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; COPY_BUFFER]);
}

/// What one copy step did.
enum CopyStep {
    /// End of stream from `from`.
    Eof,
    /// Readiness was stale: nothing to read.
    Again,
    /// Read this many bytes (all written, or the rest kept as leftover).
    Moved(usize),
}

/// Why the copy loop stopped without an error.
enum CopyEnd {
    /// The stream ended and was passed on.
    Eof,
    /// The direction carries bulk data: switch to splice.
    Bulk,
}

impl Direction<'_> {
    /// The first time, reports the time to first byte.
    fn first_byte(&self, first: &mut bool) {
        if *first {
            *first = false;
            if let Some(hook) = self.on_first_byte {
                hook(self.progress.start.elapsed());
            }
        }
    }

    /// Accounts `n` bytes read from `from` into a pipe, in flight until written.
    fn read(&self, n: usize, first: &mut bool) {
        self.first_byte(first);
        self.progress.read(n);
    }

    /// Accounts `n` bytes written to `to`.
    fn wrote(&self, n: usize) {
        self.progress.wrote(self.counter, n);
    }

    fn fail_from(&self, error: io::Error) -> PumpError {
        PumpError {
            side: self.from_side,
            error,
        }
    }

    fn fail_to(&self, error: io::Error) -> PumpError {
        PumpError {
            side: self.to_side,
            error,
        }
    }

    /// Passes the end of stream on: the peer sees a FIN while the other direction may
    /// still be flowing. A peer that has already gone (ENOTCONN) needs nothing more. When
    /// the other direction has already ended, both sockets are closed right after this,
    /// and close sends the FIN: the shutdown call is saved.
    fn finish(&self) {
        if self.progress.directions_done.fetch_add(1, Ordering::AcqRel) == 0 {
            let _ = socket2::SockRef::from(self.to).shutdown(Shutdown::Write);
        }
    }

    async fn run(&self, mode: RelayMode) -> Result<(), PumpError> {
        let mut first = true;
        if mode == RelayMode::Auto {
            match self.copy(true, &mut first).await? {
                CopyEnd::Eof => return Ok(()),
                CopyEnd::Bulk => {}
            }
        }
        if mode != RelayMode::Copy {
            // Splice either finishes the stream or, when unavailable, has left nothing in
            // a pipe, so copying can take over where it stopped.
            if let Ok(result) = self.splice(&mut first).await {
                return result;
            }
        }
        self.copy(false, &mut first).await.map(|_| ())
    }

    async fn splice(&self, first: &mut bool) -> Result<Result<(), PumpError>, SpliceUnavailable> {
        loop {
            // Idle: wait for data without holding a pipe.
            if let Err(e) = self.from.readable().await {
                return Ok(Err(self.fail_from(e)));
            }
            // No pipe to be had (the cap, a shrunk pipe, out of descriptors): copy instead;
            // nothing is in flight.
            let pipe = match pipe_pool::take(self.max_pipes) {
                Ok(pipe) => pipe,
                Err(e) => {
                    tracing::debug!(reason = %e, "no pipe: copying");
                    return Err(SpliceUnavailable);
                }
            };
            loop {
                let filled = self.from.try_io(Interest::READABLE, || {
                    pipe.fill_from(self.from.as_fd(), pipe.capacity())
                });
                let n = match filled {
                    Ok(0) => {
                        pipe_pool::give_back(pipe);
                        self.finish();
                        return Ok(Ok(()));
                    }
                    // No mark_drained here: a splice can come back short because the pipe
                    // ran out of page slots while the socket still holds data.
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        pipe_pool::give_back(pipe);
                        break;
                    }
                    // The pipe is empty: nothing is lost by copying from here on.
                    Err(e) if splice_unsupported(&e) => {
                        pipe_pool::give_back(pipe);
                        return Err(SpliceUnavailable);
                    }
                    Err(e) => {
                        pipe_pool::give_back(pipe);
                        return Ok(Err(self.fail_from(e)));
                    }
                };
                self.read(n, first);
                let mut left = n;
                while left > 0 {
                    let drained = self
                        .to
                        .try_io(Interest::WRITABLE, || pipe.drain_to(self.to.as_fd(), left));
                    match drained {
                        Ok(0) => {
                            // The pipe holds bytes, so 0 can only mean the peer is gone.
                            let e = io::Error::from(io::ErrorKind::WriteZero);
                            return Ok(Err(self.fail_to(e)));
                        }
                        Ok(m) => {
                            left -= m;
                            self.wrote(m);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if let Err(e) = self.to.writable().await {
                                return Ok(Err(self.fail_to(e)));
                            }
                        }
                        // The pipe still holds bytes: it is dropped (closed), not pooled.
                        Err(e) => return Ok(Err(self.fail_to(e))),
                    }
                }
                self.progress.spliced.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }

    /// Reads into the worker's scratch buffer and writes straight out. With `promote`,
    /// returns `Bulk` once `BULK_READS` reads in a row filled the buffer.
    async fn copy(&self, promote: bool, first: &mut bool) -> Result<CopyEnd, PumpError> {
        let mut leftover: Vec<u8> = Vec::new();
        let mut full_reads = 0;
        loop {
            self.from.readable().await.map_err(|e| self.fail_from(e))?;
            let step = SCRATCH.with(|scratch| {
                let mut buf = scratch.borrow_mut();
                let n = match self.from.try_read(&mut buf) {
                    Ok(0) => return Ok(CopyStep::Eof),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(CopyStep::Again),
                    Err(e) => return Err(self.fail_from(e)),
                };
                if n < buf.len() {
                    // A short read drained the socket: forget the readiness now instead of
                    // paying a read that returns EAGAIN to learn it.
                    mark_drained(self.from, Interest::READABLE);
                }
                self.first_byte(first);
                let mut written = 0;
                let mut failed = None;
                while written < n {
                    match self.to.try_write(&buf[written..n]) {
                        Ok(0) => {
                            failed = Some(io::Error::from(io::ErrorKind::WriteZero));
                            break;
                        }
                        Ok(m) => written += m,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                // One count and one clock read for what went straight through; only
                // what the peer could not take yet is in flight.
                self.progress.passed(self.counter, written);
                self.progress
                    .in_flight
                    .fetch_add((n - written) as u64, Ordering::Relaxed);
                if let Some(e) = failed {
                    return Err(self.fail_to(e));
                }
                leftover.extend_from_slice(&buf[written..n]);
                Ok(CopyStep::Moved(n))
            })?;
            let n = match step {
                CopyStep::Eof => {
                    self.finish();
                    return Ok(CopyEnd::Eof);
                }
                CopyStep::Again => continue,
                CopyStep::Moved(n) => n,
            };
            let mut written = 0;
            while written < leftover.len() {
                match self.to.try_write(&leftover[written..]) {
                    Ok(0) => return Err(self.fail_to(io::Error::from(io::ErrorKind::WriteZero))),
                    Ok(m) => {
                        written += m;
                        self.wrote(m);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.to.writable().await.map_err(|e| self.fail_to(e))?;
                    }
                    Err(e) => return Err(self.fail_to(e)),
                }
            }
            if !leftover.is_empty() {
                // Released, not kept: an idle connection holds no buffer.
                leftover = Vec::new();
            }
            if n == COPY_BUFFER {
                full_reads += 1;
                if promote && full_reads >= BULK_READS {
                    return Ok(CopyEnd::Bulk);
                }
            } else {
                full_reads = 0;
            }
        }
    }
}

/// Clears tokio's readiness for `interest` without a syscall, after a short read showed the
/// socket drained. Safe against lost wake-ups only on a current-thread runtime (every l4lb
/// worker is one): no reactor turn can record a new event between the read and the clear,
/// and data arriving later raises a fresh edge-triggered event that the next turn sees.
/// On a multi-threaded runtime another thread could record an event in that gap and this
/// would erase it.
pub(crate) fn mark_drained<S: MarkDrained>(socket: &S, interest: Interest) {
    socket.mark_drained(interest);
}

/// Sockets whose tokio readiness can be cleared.
pub(crate) trait MarkDrained {
    fn mark_drained(&self, interest: Interest);
}

impl MarkDrained for TcpStream {
    fn mark_drained(&self, interest: Interest) {
        let _ = self.try_io(interest, || {
            Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
        });
    }
}

impl MarkDrained for tokio::net::UdpSocket {
    fn mark_drained(&self, interest: Interest) {
        let _ = self.try_io(interest, || {
            Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
        });
    }
}

/// Errors that mean "this pair of file descriptors cannot be spliced" rather than
/// "the connection failed".
fn splice_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    )
}

/// Resets a socket: closing it with a zero linger sends RST instead of FIN.
fn abort(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Resets both sides if the relay is dropped before it finished (the drain timeout ends
/// every live connection by dropping it) while bytes are still in flight: the client must
/// see the cut, not a FIN after a truncated stream.
struct CutGuard<'a> {
    client: &'a TcpStream,
    backend: &'a TcpStream,
    progress: &'a Progress,
    finished: bool,
}

impl Drop for CutGuard<'_> {
    fn drop(&mut self) {
        if !self.finished && self.progress.has_pending_bytes() {
            abort(self.client);
            abort(self.backend);
        }
    }
}

/// Relays between `client` and `backend` until the connection ends, then closes both.
/// `on_first_byte` is told how long the backend took to send its first byte.
pub async fn relay(
    client: TcpStream,
    backend: TcpStream,
    options: RelayOptions,
    on_first_byte: FirstByteHook<'_>,
    cut: Option<CancellationToken>,
) -> RelayReport {
    let progress = Progress::new();
    let mut guard = CutGuard {
        client: &client,
        backend: &backend,
        progress: &progress,
        finished: false,
    };
    let upstream = Direction {
        from: &client,
        from_side: Side::Client,
        to: &backend,
        to_side: Side::Backend,
        counter: &progress.client_to_backend,
        progress: &progress,
        on_first_byte: None,
        max_pipes: options.max_pipes,
    };
    let downstream = Direction {
        from: &backend,
        from_side: Side::Backend,
        to: &client,
        to_side: Side::Client,
        counter: &progress.backend_to_client,
        progress: &progress,
        on_first_byte,
        max_pipes: options.max_pipes,
    };
    let up = upstream.run(options.mode);
    let down = downstream.run(options.mode);
    let idle = async {
        loop {
            let deadline = progress.idle_deadline(options.idle_timeout);
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    let cut_signal = async {
        match &cut {
            Some(token) => token.cancelled().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(up, down, idle, cut_signal);

    let (mut up_done, mut down_done) = (false, false);
    // Which direction ended first with a FIN: a backend that closes before anything
    // moved is an accept-then-die backend (passive detection).
    let mut first_fin = None;
    let started = Instant::now();
    let mut first_end = None;
    let (end, error) = loop {
        tokio::select! {
            result = &mut up, if !up_done => match result {
                Ok(()) => {
                    up_done = true;
                    first_fin = first_fin.or(Some(Side::Client));
                    first_end = first_end.or(Some(started.elapsed()));
                }
                Err(e) => break (RelayEnd::Reset(e.side), Some(e.error)),
            },
            result = &mut down, if !down_done => match result {
                Ok(()) => {
                    down_done = true;
                    first_fin = first_fin.or(Some(Side::Backend));
                    first_end = first_end.or(Some(started.elapsed()));
                }
                Err(e) => break (RelayEnd::Reset(e.side), Some(e.error)),
            },
            () = &mut idle => break (RelayEnd::IdleTimeout, None),
            () = &mut cut_signal => break (RelayEnd::BackendDown, None),
        }
        if up_done && down_done {
            break (RelayEnd::Closed, None);
        }
    };
    match end {
        // Pass the failure on: the surviving peer gets a RST, not a clean FIN that could
        // make a truncated response look complete.
        RelayEnd::Reset(Side::Client) => abort(&backend),
        RelayEnd::Reset(Side::Backend) => abort(&client),
        // Idle with bytes stuck behind a peer that stopped reading: reset both.
        RelayEnd::IdleTimeout if progress.has_pending_bytes() => {
            abort(&client);
            abort(&backend);
        }
        // The client must reconnect (to a healthy backend): a reset, never a FIN that
        // could end a response that looks complete.
        RelayEnd::BackendDown => {
            abort(&client);
            abort(&backend);
        }
        RelayEnd::IdleTimeout | RelayEnd::Closed => {}
    }
    guard.finished = true;
    RelayReport {
        client_to_backend: progress.client_to_backend.load(Ordering::Relaxed),
        backend_to_client: progress.backend_to_client.load(Ordering::Relaxed),
        end,
        error: error.map(|e| e.kind()),
        spliced_bytes: progress.spliced.load(Ordering::Relaxed),
        first_fin,
        first_end: first_end.or(Some(started.elapsed())),
    }
}
