//! Process life: the control thread (signals, reloads, health checks, the admin
//! endpoint) and the worker threads it starts (see [`worker`]); every change of what runs
//! goes through [`control::Control::apply`].
//!
//! Each worker is a single-threaded tokio runtime on its own thread with its own
//! `SO_REUSEPORT` socket per listener: the kernel spreads connections over workers and a
//! connection lives on one thread from accept to close.

pub(crate) mod control;
mod worker;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use control::{Control, Service};

/// Runs until SIGTERM or SIGINT (or a panicking worker), then drains and returns.
/// `path` is read again on every reload. `dropped_logs` counts log lines the writer had
/// to drop; they are reported from the control thread.
pub fn run(
    path: PathBuf,
    config: Config,
    dropped_logs: Vec<crate::log_writer::DroppedLines>,
    reopen_access_log: Arc<AtomicBool>,
) -> Result<()> {
    match l4_core::sys::raise_nofile_limit() {
        Ok(limit) => info!(nofile = limit, "open file limit"),
        Err(e) => warn!(error = %e, "could not raise the open file limit"),
    }
    // With SO_REUSEPORT, closing one worker's listening socket (a worker retired by a
    // reload) resets the connections queued on it at that instant, unless the kernel moves
    // them to another socket of the group, which it does when told to (Linux 5.14+).
    if std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").is_ok_and(|v| v.trim() == "0")
    {
        info!("net.ipv4.tcp_migrate_req is 0: set it to 1 so that reducing `workers` by reload never resets a connection queued on a retired worker's socket");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("control runtime")?;
    // Cancelled by a worker whose accept loop, UDP loop or thread panicked: l4lb then
    // stops like on SIGTERM and exits non-zero, so its supervisor restarts it.
    let fatal = CancellationToken::new();
    let outcome = runtime.block_on(control_loop(
        path,
        config,
        dropped_logs,
        reopen_access_log,
        fatal,
    ));
    // Do not wait for the thread joining the workers: after a second signal it may be
    // stuck behind connections that are still draining.
    runtime.shutdown_background();
    outcome
}

async fn control_loop(
    path: PathBuf,
    config: Config,
    dropped_logs: Vec<crate::log_writer::DroppedLines>,
    reopen_access_log: Arc<AtomicBool>,
    fatal: CancellationToken,
) -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?;
    tokio::spawn(crate::logging::report_dropped(dropped_logs));

    let (admin_addr, admin_token) = (config.admin, config.admin_token.clone());
    let (workers, listeners, pools) = (config.workers, config.listeners.len(), config.pools.len());
    let (discovered_tx, mut discovered) = tokio::sync::mpsc::unbounded_channel();
    let control = Arc::new(Mutex::new(Control::start(
        path,
        config,
        fatal.clone(),
        discovered_tx,
    )?));
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(addr) = admin_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("admin: cannot listen on {addr}"))?;
        info!(addr = %listener.local_addr()?, "admin listening");
        let admin = Arc::new(crate::admin::Admin {
            control: Arc::clone(&control),
            ready: Arc::clone(&ready),
            token: admin_token,
            registry: crate::metrics::registry(Arc::clone(&control)),
        });
        tokio::spawn(crate::admin::serve(listener, admin));
    }
    // Ready only once signals are handled: a SIGTERM from here on drains.
    ready.store(true, Ordering::Relaxed);
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    info!(workers, listeners, pools, "ready");

    let lock = || control.lock().unwrap_or_else(|e| e.into_inner());
    let cause = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            () = fatal.cancelled() => break "a worker panicked",
            _ = hup.recv() => {
                info!("SIGHUP: reloading the config");
                let _ = lock().reload();
            }
            Some(found) = discovered.recv() => lock().set_discovered(found),
            _ = usr1.recv() => {
                info!("SIGUSR1: reopening the access log file");
                reopen_access_log.store(true, Ordering::Relaxed);
            }
        }
    };
    // Not ready from the first signal on, before the listeners close: load balancers and
    // BGP daemons that poll /ready stop sending first.
    ready.store(false, Ordering::Relaxed);
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    let shutdown_delay = lock().config.shutdown_delay;
    if !shutdown_delay.is_zero() && !fatal.is_cancelled() {
        // Keep accepting while the VIP's route is withdrawn and routers converge: a
        // connection that still arrives here is served, not refused.
        info!(cause, shutdown_delay = ?shutdown_delay, "not ready: still accepting while routes are withdrawn");
        tokio::select! {
            () = tokio::time::sleep(shutdown_delay) => {}
            _ = term.recv() => warn!("second signal: draining now"),
            _ = int.recv() => warn!("second signal: draining now"),
            () = fatal.cancelled() => {}
        }
    }
    let drain_timeout = lock().config.drain_timeout;
    info!(cause, drain_timeout = ?drain_timeout, "stopping: no new connections, draining live ones");
    let threads = lock().stop();
    let joined = tokio::task::spawn_blocking(move || {
        for thread in threads {
            let _ = thread.join();
        }
    });
    tokio::select! {
        _ = joined => {}
        _ = term.recv() => warn!("second signal: exiting without waiting"),
        _ = int.recv() => warn!("second signal: exiting without waiting"),
    }
    for (name, l) in &lock().listeners {
        if let Service::Udp(service) = &l.service {
            info!(listener = %name, "udp totals: {}", service.load().stats);
        }
    }
    if fatal.is_cancelled() {
        return Err(anyhow!(
            "stopped because a worker panicked (see the panic above)"
        ));
    }
    info!("stopped");
    Ok(())
}

/// Tells systemd (`Type=notify`) about readiness and stopping; nothing when not run by
/// systemd (no `NOTIFY_SOCKET`).
fn notify_systemd(state: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(false, state) {
            warn!(error = %e, "could not notify systemd");
        }
    }
}
