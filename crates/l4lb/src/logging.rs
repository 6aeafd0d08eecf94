//! Logging that never stalls a worker: every event is formatted on the thread that emits
//! it and handed to a writer thread through a bounded queue ([`crate::log_writer`], which
//! batches and does not wake per line). A slow terminal or a full stderr pipe then costs
//! log lines, never relaying; the lines dropped are counted and reported.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing_subscriber::filter::{filter_fn, FilterExt};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::config::{AccessLog, AccessSink};
use crate::log_format::{TextFields, TextLine};
use crate::log_writer::{DroppedLines, WriterGuard};

/// Lines queued for the writer at most; beyond, new lines are dropped and counted.
const QUEUED_LINES: usize = 16 * 1024;

/// How often the dropped-line count is looked at (and reported if it grew).
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Keeps the writer threads alive; dropping it flushes what is queued (waiting about a
/// second at most for each writer; [`Logging::finish`] waits a second for all).
pub struct Logging {
    guards: Vec<WriterGuard>,
    dropped: Vec<DroppedLines>,
    reopen: Arc<AtomicBool>,
}

/// Installs the subscriber and a panic hook that logs every panic with its thread and
/// place. Two streams: the log (level from `L4LB_LOG`, default `info`) on stderr, and the
/// access log (one event per connection or UDP flow, target [`l4_core::ACCESS_LOG`]) where
/// `access` says, whatever the log level.
pub fn init(access: &AccessLog) -> std::io::Result<Logging> {
    let (stderr, stderr_dropped, stderr_guard) = non_blocking(std::io::stderr())?;
    let mut dropped = vec![stderr_dropped];
    let mut guards = vec![stderr_guard];
    let reopen = Arc::new(AtomicBool::new(false));
    let ansi = std::io::stderr().is_terminal();

    let filter = tracing_subscriber::EnvFilter::try_from_env("L4LB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The hint (any level) lets the combined filter keep EnvFilter's: without one, `and`
    // would drop the level hint and, with the access log off, every debug! call site would
    // be asked instead of skipped by level.
    let not_access = filter_fn(|meta| meta.target() != l4_core::ACCESS_LOG)
        .with_max_level_hint(tracing::level_filters::LevelFilter::TRACE);
    let main = tracing_subscriber::fmt::layer()
        .event_format(TextLine::default())
        .fmt_fields(TextFields)
        .with_writer(stderr.clone())
        .with_ansi(ansi)
        // One filter of both, not one wrapped in the other: every span a worker enters
        // or leaves is looked up once per filtering layer.
        .with_filter(not_access.and(filter));

    // Spans pass too: the access event's span carries the listener and the client.
    let only_access = || filter_fn(|meta| meta.is_span() || meta.target() == l4_core::ACCESS_LOG);
    let access_writer = match &access.sink {
        AccessSink::Off => None,
        AccessSink::Stderr => Some(stderr),
        AccessSink::File(path) => {
            let file = ReopenableFile::open(path.clone(), Arc::clone(&reopen))?;
            let (writer, lines_dropped, guard) = non_blocking(file)?;
            guards.push(guard);
            dropped.push(lines_dropped);
            Some(writer)
        }
    };
    let access_ansi = ansi && access.sink == AccessSink::Stderr;
    let (text, json) = match (access_writer, access.json) {
        (None, _) => (None, None),
        (Some(w), false) => (
            Some(
                tracing_subscriber::fmt::layer()
                    .event_format(TextLine::default())
                    .fmt_fields(TextFields)
                    .with_writer(w)
                    .with_ansi(access_ansi)
                    .with_filter(only_access()),
            ),
            None,
        ),
        (Some(w), true) => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_span_list(true)
                    .with_writer(w)
                    .with_filter(only_access()),
            ),
        ),
    };
    tracing_subscriber::registry()
        .with(main)
        .with(text)
        .with(json)
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
    Ok(Logging {
        guards,
        dropped,
        reopen,
    })
}

fn non_blocking<W: Write + Send + 'static>(
    writer: W,
) -> std::io::Result<(crate::log_writer::QueueWriter, DroppedLines, WriterGuard)> {
    crate::log_writer::spawn(writer, QUEUED_LINES, "l4lb-log")
}

impl Logging {
    /// Counters of log lines dropped because a writer could not keep up (the log's and,
    /// with a file, the access log's).
    pub fn dropped(&self) -> Vec<DroppedLines> {
        self.dropped.clone()
    }

    /// Flushes what is queued, waiting a second at most: a writer stuck behind a full
    /// pipe must not keep the process from exiting (after a second signal above all).
    /// All writers are told first, so one stuck writer does not keep the others' lines
    /// from being written.
    pub fn finish(self) {
        for guard in &self.guards {
            guard.stop();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        for guard in self.guards {
            guard.finish(deadline);
        }
    }

    /// Set to make the access log file be reopened before its next line (SIGUSR1).
    pub fn reopen(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.reopen)
    }
}

/// An append-only file that reopens its path when asked (after logrotate moved it), on
/// the log writer's thread, before the next line.
struct ReopenableFile {
    path: std::path::PathBuf,
    file: std::fs::File,
    reopen: Arc<AtomicBool>,
}

impl ReopenableFile {
    fn open(path: std::path::PathBuf, reopen: Arc<AtomicBool>) -> std::io::Result<Self> {
        let file = append(&path)?;
        Ok(ReopenableFile { path, file, reopen })
    }
}

fn append(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

impl Write for ReopenableFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.reopen.swap(false, Ordering::Relaxed) {
            // A file that cannot be reopened keeps the old one: no line is lost for it.
            if let Ok(file) = append(&self.path) {
                self.file = file;
            }
        }
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Reports, every [`REPORT_EVERY`], how many lines were dropped since the last report.
pub async fn report_dropped(dropped: Vec<DroppedLines>) {
    let mut reported = 0;
    let mut every = tokio::time::interval(REPORT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let now: usize = dropped.iter().map(DroppedLines::get).sum();
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
