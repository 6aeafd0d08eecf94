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

use std::future::{poll_fn, Future};
use std::io;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::task::coop;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::pipe_pool::{self, PooledPipe};

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

    /// The peer across the relay.
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
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

/// Counters and times of a relayed connection. Both pumps run inside one poll of the
/// relay, one after the other, so they share it by `&mut`: no atomics, no `Arc`.
#[derive(Debug)]
struct Progress {
    start: Instant,
    /// When the last byte moved either way.
    last_activity: Instant,
    client_to_backend: u64,
    backend_to_client: u64,
    spliced: u64,
    /// Directions that reached end of stream (0, 1 or 2).
    directions_done: u8,
    /// Bytes read from one side and not yet written to the other (in a pipe or a leftover
    /// buffer). A connection cut while this is not zero is reset, never closed with a FIN
    /// that would make the truncated stream look complete.
    in_flight: u64,
}

impl Progress {
    fn new() -> Self {
        let now = Instant::now();
        Progress {
            start: now,
            last_activity: now,
            client_to_backend: 0,
            backend_to_client: 0,
            spliced: 0,
            directions_done: 0,
            in_flight: 0,
        }
    }

    /// Any byte moving either way, read or written, keeps the connection from idling out:
    /// a slow reader that drains a backlog is not idle.
    fn touch(&mut self) {
        self.last_activity = Instant::now();
    }

    /// The byte count of the direction that reads from `from`.
    fn moved(&mut self, from: Side) -> &mut u64 {
        match from {
            Side::Client => &mut self.client_to_backend,
            Side::Backend => &mut self.backend_to_client,
        }
    }

    fn read(&mut self, n: usize) {
        self.in_flight += n as u64;
        self.touch();
    }

    fn wrote(&mut self, from: Side, n: usize) {
        *self.moved(from) += n as u64;
        self.in_flight = self.in_flight.saturating_sub(n as u64);
        self.touch();
    }

    /// Bytes read and written at once (the copy path's common case): never in flight.
    fn passed(&mut self, from: Side, n: usize) {
        *self.moved(from) += n as u64;
        self.touch();
    }

    fn has_pending_bytes(&self) -> bool {
        self.in_flight > 0
    }

    fn idle_deadline(&self, idle: Duration) -> Instant {
        self.last_activity + idle
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

/// Bytes read at once on the copy path; a direction whose reads keep filling it is bulk.
const COPY_BUFFER: usize = 64 * 1024;
/// Consecutive full reads after which `Auto` switches a direction to splice.
const BULK_READS: u32 = 2;

thread_local! {
    /// The copy path's buffer, one per worker thread: a message read is written out at
    /// once, so it only needs to live within one poll. Bytes the peer cannot take yet go
    /// to a per-connection leftover buffer, allocated only then.
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
    /// Read the last bytes before the end of stream and wrote them all: the end is to be
    /// passed on now.
    MovedLast,
}

/// Why the copy loop stopped without an error.
enum CopyEnd {
    /// The stream ended and was passed on.
    Eof,
    /// The direction carries bulk data: switch to splice.
    Bulk,
}

/// One direction's state between polls. The relay is a hand-written state machine rather
/// than one `async fn` per direction: an idle connection is what l4lb holds most of, and
/// each `.await` on readiness would keep a future (with its waiter node) per direction in
/// the connection's task. Waiting through `poll_read_ready`/`poll_write_ready` stores the
/// task's waker in the socket's own reader and writer slots instead, so an idle direction
/// is a few words.
struct Pump {
    way: Way,
    stage: Stage,
}

/// Which way a direction runs, and what it reports once.
struct Way {
    /// The side this direction reads from.
    from_side: Side,
    /// No byte read yet (the first one is reported to the time-to-first-byte hook).
    first: bool,
}

impl Way {
    fn fail_from(&self, error: io::Error) -> PumpError {
        PumpError {
            side: self.from_side,
            error,
        }
    }

    fn fail_to(&self, error: io::Error) -> PumpError {
        PumpError {
            side: self.from_side.other(),
            error,
        }
    }

    /// The first time, reports the time to first byte.
    fn first_byte(&mut self, ends: &Ends<'_>) {
        if self.first {
            self.first = false;
            if let Some(hook) = ends.on_first_byte {
                hook(ends.progress.start.elapsed());
            }
        }
    }
}

enum Stage {
    /// Copying through the worker's scratch buffer.
    Copy(CopyState),
    /// Splicing; a pipe is held only while it has bytes to move.
    Splice(Option<HeldPipe>),
}

struct CopyState {
    /// Switch to splice once reads keep filling the buffer (`Auto`).
    promote: bool,
    full_reads: u32,
    /// Bytes the peer could not take yet; `written` of them have been written since.
    leftover: Vec<u8>,
    written: usize,
    /// The end of stream was read behind the leftover: it is passed on once the leftover
    /// is written, and the leftover goes with `MSG_MORE` so that the FIN joins its last
    /// segment.
    ended: bool,
}

impl CopyState {
    fn new(promote: bool) -> Self {
        CopyState {
            promote,
            full_reads: 0,
            leftover: Vec::new(),
            written: 0,
            ended: false,
        }
    }
}

struct HeldPipe {
    pipe: PooledPipe,
    /// Bytes of the last fill still in the pipe.
    left: usize,
    /// Bytes of the last fill, counted as spliced once all are written.
    filled: usize,
}

/// What a pump works on during one poll: the two sockets and the shared counters.
struct Ends<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    progress: &'a mut Progress,
    on_first_byte: FirstByteHook<'a>,
    max_pipes: usize,
}

impl Pump {
    fn new(from_side: Side, mode: RelayMode) -> Self {
        let stage = match mode {
            RelayMode::Auto => Stage::Copy(CopyState::new(true)),
            RelayMode::Splice => Stage::Splice(None),
            RelayMode::Copy => Stage::Copy(CopyState::new(false)),
        };
        Pump {
            way: Way {
                from_side,
                first: true,
            },
            stage,
        }
    }

    /// Moves bytes until the stream ends (`Ok`), a side fails, or nothing can move now.
    fn poll_run(
        &mut self,
        cx: &mut Context<'_>,
        ends: &mut Ends<'_>,
    ) -> Poll<Result<(), PumpError>> {
        loop {
            match &mut self.stage {
                Stage::Copy(state) => match ready!(state.poll(cx, &mut self.way, ends)) {
                    Ok(CopyEnd::Eof) => return Poll::Ready(Ok(())),
                    Ok(CopyEnd::Bulk) => self.stage = Stage::Splice(None),
                    Err(e) => return Poll::Ready(Err(e)),
                },
                Stage::Splice(held) => match ready!(poll_splice(held, cx, &mut self.way, ends)) {
                    Ok(result) => return Poll::Ready(result),
                    // Splice has left nothing in a pipe: copying takes over where it stopped.
                    Err(SpliceUnavailable) => self.stage = Stage::Copy(CopyState::new(false)),
                },
            }
        }
    }
}

impl CopyState {
    /// Reads into the worker's scratch buffer and writes straight out. Returns `Bulk` once
    /// `BULK_READS` reads in a row filled the buffer (when promoting).
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        way: &mut Way,
        ends: &mut Ends<'_>,
    ) -> Poll<Result<CopyEnd, PumpError>> {
        loop {
            // What the peer could not take is written before anything more is read.
            while self.written < self.leftover.len() {
                let rest = &self.leftover[self.written..];
                let sent = if self.ended {
                    send_before_end(ends.to, rest)
                } else {
                    ends.to.try_write(rest)
                };
                match sent {
                    Ok(0) => {
                        let e = io::Error::from(io::ErrorKind::WriteZero);
                        return Poll::Ready(Err(way.fail_to(e)));
                    }
                    Ok(m) => {
                        self.written += m;
                        ends.progress.wrote(way.from_side, m);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if let Err(e) = ready!(ends.to.poll_write_ready(cx)) {
                            return Poll::Ready(Err(way.fail_to(e)));
                        }
                    }
                    Err(e) => return Poll::Ready(Err(way.fail_to(e))),
                }
            }
            if !self.leftover.is_empty() {
                // Released, not kept: an idle connection holds no buffer.
                self.leftover = Vec::new();
                self.written = 0;
            }
            if self.ended {
                finish(ends);
                return Poll::Ready(Ok(CopyEnd::Eof));
            }
            if self.promote && self.full_reads >= BULK_READS {
                return Poll::Ready(Ok(CopyEnd::Bulk));
            }
            if let Err(e) = ready!(ends.from.poll_read_ready(cx)) {
                return Poll::Ready(Err(way.fail_from(e)));
            }
            match self.copy_once(way, ends)? {
                CopyStep::Eof | CopyStep::MovedLast => {
                    finish(ends);
                    return Poll::Ready(Ok(CopyEnd::Eof));
                }
                CopyStep::Again => {}
                CopyStep::Moved(n) if n == COPY_BUFFER => self.full_reads += 1,
                CopyStep::Moved(_) => self.full_reads = 0,
            }
        }
    }

    /// One read into the scratch buffer and as much of it written as the peer takes; the
    /// rest becomes the leftover.
    ///
    /// When the reactor has already seen the sender's FIN, the end of stream is read before
    /// the bytes are written, and they go out with `MSG_MORE`: the shutdown (or close) that
    /// follows at once then carries the FIN in the same segment as the last bytes, as
    /// HAProxy's does. The receiver gets data and end in one segment and one wake-up, and
    /// an ACK and a segment are saved on each side of l4lb. Only a confirmed end of stream
    /// is corked this way: what `MSG_MORE` holds back is pushed by the shutdown or the
    /// close that always follows, never left waiting.
    fn copy_once(&mut self, way: &mut Way, ends: &mut Ends<'_>) -> Result<CopyStep, PumpError> {
        SCRATCH.with(|scratch| {
            let mut buf = scratch.borrow_mut();
            let mut n = match ends.from.try_read(&mut buf) {
                Ok(0) => return Ok(CopyStep::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(CopyStep::Again),
                Err(e) => return Err(way.fail_from(e)),
            };
            let mut ended = false;
            let mut read_failed = None;
            if n < buf.len() {
                // A short read drained the socket: forget the readiness now instead of
                // paying a read that returns EAGAIN to learn it.
                mark_drained(ends.from, Interest::READABLE);
                // What readable readiness is left is the reactor's record of a FIN or a
                // hang-up (how a reset shows): final states, never cleared. Then the read
                // that would follow the write is made now; without them, `try_read`
                // answers WouldBlock with no syscall.
                match ends.from.try_read(&mut buf[n..]) {
                    Ok(0) => ended = true,
                    Ok(more) => n += more,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // Returned after the bytes read before it are written, where the next
                    // read would have returned it.
                    Err(e) => read_failed = Some(e),
                }
            }
            way.first_byte(ends);
            let mut written = 0;
            let mut failed = None;
            while written < n {
                let rest = &buf[written..n];
                let sent = if ended {
                    send_before_end(ends.to, rest)
                } else {
                    ends.to.try_write(rest)
                };
                match sent {
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
            // One count and one clock read for what went straight through; only what the
            // peer could not take yet is in flight.
            ends.progress.passed(way.from_side, written);
            ends.progress.in_flight += (n - written) as u64;
            if let Some(e) = failed {
                return Err(way.fail_to(e));
            }
            if let Some(e) = read_failed {
                return Err(way.fail_from(e));
            }
            if ended && written == n {
                return Ok(CopyStep::MovedLast);
            }
            self.leftover.extend_from_slice(&buf[written..n]);
            self.ended = ended;
            Ok(CopyStep::Moved(n))
        })
    }
}

/// Writes the last bytes before a FIN, held back (`MSG_MORE`) so that the shutdown or close
/// which follows sends them and the FIN together.
fn send_before_end(to: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    to.try_io(Interest::WRITABLE, || {
        socket2::SockRef::from(to).send_with_flags(bytes, libc::MSG_MORE | libc::MSG_NOSIGNAL)
    })
}

/// Socket -> pipe -> socket, holding a pipe (`held`) only while it has bytes to move.
/// `Err(SpliceUnavailable)` when this direction cannot splice; no byte is left in a pipe
/// then.
fn poll_splice(
    held: &mut Option<HeldPipe>,
    cx: &mut Context<'_>,
    way: &mut Way,
    ends: &mut Ends<'_>,
) -> Poll<Result<Result<(), PumpError>, SpliceUnavailable>> {
    loop {
        let Some(h) = held else {
            // Idle: wait for data without holding a pipe.
            if let Err(e) = ready!(ends.from.poll_read_ready(cx)) {
                return Poll::Ready(Ok(Err(way.fail_from(e))));
            }
            // No pipe to be had (the cap, a shrunk pipe, out of descriptors): copy instead;
            // nothing is in flight.
            match pipe_pool::take(ends.max_pipes) {
                Ok(pipe) => {
                    *held = Some(HeldPipe {
                        pipe,
                        left: 0,
                        filled: 0,
                    })
                }
                Err(e) => {
                    tracing::debug!(reason = %e, "no pipe: copying");
                    return Poll::Ready(Err(SpliceUnavailable));
                }
            }
            continue;
        };
        while h.left > 0 {
            let drained = ends.to.try_io(Interest::WRITABLE, || {
                h.pipe.drain_to(ends.to.as_fd(), h.left)
            });
            let failed = match drained {
                Ok(0) => {
                    // The pipe holds bytes, so 0 can only mean the peer is gone.
                    io::Error::from(io::ErrorKind::WriteZero)
                }
                Ok(m) => {
                    h.left -= m;
                    ends.progress.wrote(way.from_side, m);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match ready!(ends.to.poll_write_ready(cx)) {
                        Ok(()) => continue,
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            // The pipe still holds bytes: it is closed, not pooled.
            *held = None;
            return Poll::Ready(Ok(Err(way.fail_to(failed))));
        }
        ends.progress.spliced += h.filled as u64;
        h.filled = 0;
        // Fills that keep succeeding never wait on readiness, so they pay the task's
        // cooperative budget here: a bulk direction yields now and then instead of
        // splicing until the sender pauses while the other direction and the worker's
        // other connections wait.
        let budget = ready!(coop::poll_proceed(cx));
        let filled = ends.from.try_io(Interest::READABLE, || {
            h.pipe.fill_from(ends.from.as_fd(), h.pipe.capacity())
        });
        // No mark_drained on a short fill: a splice can come back short because the pipe
        // ran out of page slots while the socket still holds data.
        if let Ok(n @ 1..) = filled {
            budget.made_progress();
            h.left = n;
            h.filled = n;
            ends.progress.read(n);
            way.first_byte(ends);
            continue;
        }
        // The pipe is empty in every case below: back to the pool.
        if let Some(h) = held.take() {
            pipe_pool::give_back(h.pipe);
        }
        match filled {
            Ok(_) => {
                finish(ends);
                return Poll::Ready(Ok(Ok(())));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // Nothing is lost by copying from here on.
            Err(e) if splice_unsupported(&e) => return Poll::Ready(Err(SpliceUnavailable)),
            Err(e) => return Poll::Ready(Ok(Err(way.fail_from(e)))),
        }
    }
}

/// Passes the end of stream on: the peer sees a FIN while the other direction may still be
/// flowing. A peer that has already gone (ENOTCONN) needs nothing more. When the other
/// direction has already ended, both sockets are closed right after this, and close sends
/// the FIN: the shutdown call is saved.
fn finish(ends: &mut Ends<'_>) {
    if ends.progress.directions_done == 0 {
        let _ = socket2::SockRef::from(ends.to).shutdown(Shutdown::Write);
    }
    ends.progress.directions_done += 1;
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

/// A connection being relayed: both sockets, both directions and what they share.
struct Relay {
    client: TcpStream,
    backend: TcpStream,
    options: RelayOptions,
    progress: Progress,
    /// Client -> backend.
    up: Pump,
    /// Backend -> client.
    down: Pump,
    up_done: bool,
    down_done: bool,
    /// Polled the backend's direction first last time.
    backend_first: bool,
    /// Which direction ended first with a FIN: a backend that closes before anything moved
    /// is an accept-then-die backend (passive detection).
    first_fin: Option<Side>,
    first_end: Option<Duration>,
    /// The backend's cut signal (`on_down: close`), boxed: only such pools pay for it.
    cut: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// Set once the end was handled; until then, dropping the relay (the drain timeout
    /// ends every live connection by dropping it) with bytes in flight resets both sides:
    /// the client must see the cut, not a FIN after a truncated stream.
    finished: bool,
}

impl Drop for Relay {
    fn drop(&mut self) {
        if !self.finished && self.progress.has_pending_bytes() {
            abort(&self.client);
            abort(&self.backend);
        }
    }
}

impl Relay {
    /// Polls both directions, the cut signal and the idle timer; ready with how the
    /// connection ended.
    fn poll_end(
        &mut self,
        cx: &mut Context<'_>,
        mut idle: Pin<&mut Sleep>,
        on_first_byte: FirstByteHook<'_>,
    ) -> Poll<(RelayEnd, Option<io::Error>)> {
        if let Some(cut) = &mut self.cut {
            if cut.as_mut().poll(cx).is_ready() {
                return Poll::Ready((RelayEnd::BackendDown, None));
            }
        }
        // Which direction goes first alternates. Each moves bytes until it must wait or the
        // task's cooperative budget runs out, so one always polled first could take the
        // whole budget on every poll and starve the other (select! randomises its branches
        // for the same reason).
        // The first poll takes the client first: when both sides had already closed a
        // silent connection, the client is taken to have left first, and the backend is not
        // blamed for an empty close it may not have caused.
        let order = if self.backend_first {
            [Side::Backend, Side::Client]
        } else {
            [Side::Client, Side::Backend]
        };
        self.backend_first = !self.backend_first;
        for from in order {
            if let Some(end) = self.poll_direction(cx, from, on_first_byte) {
                return Poll::Ready(end);
            }
        }
        if self.up_done && self.down_done {
            return Poll::Ready((RelayEnd::Closed, None));
        }
        // The timer is set for the idle deadline as it was when it was last armed; when it
        // fires, traffic since then moves it on. One timer operation per idle period,
        // however many bytes move.
        loop {
            ready!(idle.as_mut().poll(cx));
            let deadline = self.progress.idle_deadline(self.options.idle_timeout);
            if Instant::now() >= deadline {
                return Poll::Ready((RelayEnd::IdleTimeout, None));
            }
            idle.as_mut().reset(deadline);
        }
    }

    /// Polls the direction that reads from `from`, unless it has ended; `Some` when the
    /// connection ends with it (a failure).
    fn poll_direction(
        &mut self,
        cx: &mut Context<'_>,
        from: Side,
        on_first_byte: FirstByteHook<'_>,
    ) -> Option<(RelayEnd, Option<io::Error>)> {
        let (pump, done, from_socket, to_socket, on_first_byte) = match from {
            Side::Client => (
                &mut self.up,
                &mut self.up_done,
                &self.client,
                &self.backend,
                None,
            ),
            Side::Backend => (
                &mut self.down,
                &mut self.down_done,
                &self.backend,
                &self.client,
                on_first_byte,
            ),
        };
        if *done {
            return None;
        }
        let mut ends = Ends {
            from: from_socket,
            to: to_socket,
            progress: &mut self.progress,
            on_first_byte,
            max_pipes: self.options.max_pipes,
        };
        match pump.poll_run(cx, &mut ends) {
            Poll::Ready(Ok(())) => {
                *done = true;
                self.first_fin = self.first_fin.or(Some(from));
                self.first_end = self.first_end.or(Some(self.progress.start.elapsed()));
                None
            }
            Poll::Ready(Err(e)) => Some((RelayEnd::Reset(e.side), Some(e.error))),
            Poll::Pending => None,
        }
    }

    /// Passes the end on to the peers and reports.
    fn conclude(&mut self, end: RelayEnd, error: Option<io::Error>) -> RelayReport {
        match end {
            // Pass the failure on: the surviving peer gets a RST, not a clean FIN that could
            // make a truncated response look complete.
            RelayEnd::Reset(Side::Client) => abort(&self.backend),
            RelayEnd::Reset(Side::Backend) => abort(&self.client),
            // Idle with bytes stuck behind a peer that stopped reading: reset both.
            RelayEnd::IdleTimeout if self.progress.has_pending_bytes() => {
                abort(&self.client);
                abort(&self.backend);
            }
            // The client must reconnect (to a healthy backend): a reset, never a FIN that
            // could end a response that looks complete.
            RelayEnd::BackendDown => {
                abort(&self.client);
                abort(&self.backend);
            }
            RelayEnd::IdleTimeout | RelayEnd::Closed => {}
        }
        self.finished = true;
        RelayReport {
            client_to_backend: self.progress.client_to_backend,
            backend_to_client: self.progress.backend_to_client,
            end,
            error: error.map(|e| e.kind()),
            spliced_bytes: self.progress.spliced,
            first_fin: self.first_fin,
            first_end: self
                .first_end
                .or_else(|| Some(self.progress.start.elapsed())),
        }
    }
}

/// Relays between `client` and `backend` until the connection ends, then closes both.
/// `on_first_byte` is told how long the backend took to send its first byte.
///
/// Not an `async fn`: the sockets move straight into the relay's state here, so the future
/// does not also keep the moved-from arguments (an idle connection's memory is mostly this
/// future).
pub fn relay<'a>(
    client: TcpStream,
    backend: TcpStream,
    options: RelayOptions,
    on_first_byte: FirstByteHook<'a>,
    cut: Option<CancellationToken>,
) -> impl Future<Output = RelayReport> + 'a {
    let mut relay = Relay {
        client,
        backend,
        options,
        progress: Progress::new(),
        up: Pump::new(Side::Client, options.mode),
        down: Pump::new(Side::Backend, options.mode),
        up_done: false,
        down_done: false,
        backend_first: false,
        first_fin: None,
        first_end: None,
        cut: cut.map(|token| Box::pin(token.cancelled_owned())),
        finished: false,
    };
    // An `async move` block, not an `async fn` taking the relay: the block uses what it
    // captured in place, where an `async fn` would keep a moved copy of its argument too.
    async move {
        let idle =
            tokio::time::sleep_until(relay.progress.idle_deadline(relay.options.idle_timeout));
        tokio::pin!(idle);
        let (end, error) = poll_fn(|cx| relay.poll_end(cx, idle.as_mut(), on_first_byte)).await;
        relay.conclude(end, error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_sockets::connected_pair;

    /// An idle connection's memory is mostly its task, and the task is mostly this future
    /// (1,344 bytes when each direction was an `async fn` raced with the timer by
    /// `select!`). The bench's idle-memory row measures the whole; this keeps the part
    /// that code controls from growing back unnoticed.
    #[tokio::test]
    async fn the_relay_future_of_an_idle_connection_stays_small() {
        let (backend, client) = connected_pair(None).await;
        let options = RelayOptions {
            mode: RelayMode::Auto,
            idle_timeout: Duration::from_secs(60),
            max_pipes: 8,
        };
        let future = relay(client, backend, options, None, None);
        let size = std::mem::size_of_val(&future);
        assert!(size <= 512, "the relay future grew to {size} bytes");
    }

    /// The backend sends a full read's worth, then its last bytes with its FIN, and the
    /// client takes bytes slowly: the last bytes wait as a leftover with the end already
    /// read, and the client must still get every byte, then the end.
    #[tokio::test]
    async fn the_end_read_behind_a_leftover_is_passed_on_after_it() {
        const SIZE: usize = COPY_BUFFER + 16 * 1024;
        // A small window and send buffer toward the client: the first 64 KiB fill them,
        // and the last bytes, read with the end, cannot be written at once.
        let (client, mut client_peer) = connected_pair(Some(4096)).await;
        let (backend, backend_peer) = connected_pair(None).await;
        socket2::SockRef::from(&client)
            .set_send_buffer_size(4096)
            .unwrap();
        let body: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
        let peer = socket2::SockRef::from(&backend_peer);
        assert_eq!(peer.send_with_flags(&body, libc::MSG_MORE).unwrap(), SIZE);
        peer.shutdown(Shutdown::Write).unwrap();
        // Let the reactor record the FIN before the relay's first read (a freshly accepted
        // socket is taken as readable before any event).
        mark_drained(&backend, Interest::READABLE);
        let seen = backend.ready(Interest::READABLE).await.unwrap();
        assert!(seen.is_read_closed());
        let options = RelayOptions {
            mode: RelayMode::Copy,
            idle_timeout: Duration::from_secs(10),
            max_pipes: 0,
        };
        let relaying = tokio::spawn(relay(client, backend, options, None, None));
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut client_peer, &mut got)
            .await
            .unwrap();
        assert!(got == body, "{} bytes of {SIZE}, or other bytes", got.len());
        drop(client_peer);
        drop(backend_peer);
        let report = relaying.await.unwrap();
        assert_eq!(report.backend_to_client, SIZE as u64);
        assert_eq!(report.end, RelayEnd::Closed);
    }
}
