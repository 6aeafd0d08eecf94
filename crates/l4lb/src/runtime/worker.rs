//! Worker threads: each a single-threaded tokio runtime that serves the listener sockets
//! it is handed, at start or by a reload, until they or the worker are stopped.
//!
//! A worker owns its connections from accept to close. Stopping one listener on it ends
//! that accept loop (the socket closes, live connections continue); stopping the worker
//! ends every loop and then drains its connections for up to the drain timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use l4_core::tcp::{serve, SharedTcpService};
use l4_core::udp::{serve_udp, SharedUdpService};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

/// One listener's socket for one worker.
pub(crate) enum ListenerSocket {
    Tcp(SharedTcpService, std::net::TcpListener),
    Udp(SharedUdpService, std::net::UdpSocket),
}

/// Serve this socket until `stop`.
pub(crate) struct Serve {
    pub(crate) socket: ListenerSocket,
    pub(crate) stop: CancellationToken,
}

/// The control thread's handle on a worker.
pub(crate) struct Worker {
    pub(crate) index: usize,
    commands: mpsc::UnboundedSender<Serve>,
    /// Cancels the worker: its listener tokens are children of it.
    pub(crate) stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts worker `index`. `fatal` is cancelled if one of its loops panics;
    /// `drain_timeout_ms` is read when it stops, so a reload can change it.
    pub(crate) fn spawn(
        index: usize,
        fatal: CancellationToken,
        drain_timeout_ms: Arc<AtomicU64>,
    ) -> Result<Worker> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("worker runtime")?;
        let (commands, mut received) = mpsc::unbounded_channel::<Serve>();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("l4lb-worker-{index}"))
            .spawn(move || {
                // A panic that unwinds the worker thread itself stops the process too.
                let _watch = PanicWatch(fatal.clone());
                runtime.block_on(async move {
                    let connections = TaskTracker::new();
                    // A loop ends when its listener or this worker stops, or by panicking:
                    // then its listener no longer serves here, and the process must not go
                    // on as if it did.
                    let mut loops = tokio::task::JoinSet::new();
                    let check = |result: Result<(), tokio::task::JoinError>| {
                        if matches!(&result, Err(e) if e.is_panic()) {
                            error!(worker = index, "a listener loop panicked: stopping l4lb");
                            fatal.cancel();
                        }
                    };
                    loop {
                        tokio::select! {
                            () = stopped.cancelled() => break,
                            command = received.recv() => match command {
                                Some(Serve { socket, stop }) => {
                                    spawn_loop(&mut loops, socket, stop, &connections, index);
                                }
                                None => break,
                            },
                            Some(result) = loops.join_next() => check(result),
                        }
                    }
                    while let Some(result) = loops.join_next().await {
                        check(result);
                    }
                    connections.close();
                    let drain = Duration::from_millis(drain_timeout_ms.load(Ordering::Relaxed));
                    if !connections.is_empty()
                        && tokio::time::timeout(drain, connections.wait())
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
        Ok(Worker {
            index,
            commands,
            stop,
            thread: Some(thread),
        })
    }

    /// Hands the worker a listener socket to serve until `stop` (a child of the worker's
    /// own token, so stopping the worker stops it too).
    pub(crate) fn serve(&self, socket: ListenerSocket) -> CancellationToken {
        let stop = self.stop.child_token();
        let _ = self.commands.send(Serve {
            socket,
            stop: stop.clone(),
        });
        stop
    }

    /// Takes the thread handle, to join it.
    pub(crate) fn take_thread(&mut self) -> Option<JoinHandle<()>> {
        self.thread.take()
    }
}

fn spawn_loop(
    loops: &mut tokio::task::JoinSet<()>,
    socket: ListenerSocket,
    stop: CancellationToken,
    connections: &TaskTracker,
    index: usize,
) {
    match socket {
        ListenerSocket::Tcp(service, socket) => match tokio::net::TcpListener::from_std(socket) {
            Ok(listener) => {
                loops.spawn(serve(listener, service, stop, connections.clone()));
            }
            Err(e) => warn!(worker = index, error = %e, "cannot register listener"),
        },
        // UDP flows have no end to wait for: on stop the loop ends them.
        ListenerSocket::Udp(service, socket) => {
            loops.spawn(serve_udp(socket, service, stop));
        }
    }
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
