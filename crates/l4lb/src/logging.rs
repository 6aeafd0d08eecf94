//! Logging that never stalls a worker: every event is formatted on the thread that emits
//! it and handed to one writer thread through a bounded queue (`tracing-appender`'s
//! non-blocking writer, lossy). A slow terminal or a full stderr pipe then costs log lines,
//! never relaying; the lines dropped are counted and reported.

use std::io::IsTerminal;
use std::time::Duration;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

/// Lines queued for the writer at most; beyond, new lines are dropped and counted.
const QUEUED_LINES: usize = 16 * 1024;

/// How often the dropped-line count is looked at (and reported if it grew).
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Keeps the writer thread alive; dropping it flushes what is queued (waiting about a
/// second at most).
pub struct Logging {
    _guard: WorkerGuard,
    dropped: ErrorCounter,
}

/// Installs the subscriber (level from `L4LB_LOG`, default `info`) and a panic hook that
/// logs every panic with its thread and place.
pub fn init() -> Logging {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("l4lb-log")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let filter = tracing_subscriber::EnvFilter::try_from_env("L4LB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        // Debug formatting keeps a multi-line message on one log line.
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            message = ?message,
            location,
            "panic"
        );
    }));
    Logging {
        _guard: guard,
        dropped,
    }
}

impl Logging {
    /// Log lines dropped so far because the writer could not keep up.
    pub fn dropped(&self) -> ErrorCounter {
        self.dropped.clone()
    }
}

/// Reports, every [`REPORT_EVERY`], how many lines were dropped since the last report.
pub async fn report_dropped(dropped: ErrorCounter) {
    let mut reported = 0;
    let mut every = tokio::time::interval(REPORT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let now = dropped.dropped_lines();
        if now > reported {
            tracing::warn!(
                dropped = now - reported,
                total = now,
                "log lines dropped: the log writer could not keep up"
            );
            reported = now;
        }
    }
}
