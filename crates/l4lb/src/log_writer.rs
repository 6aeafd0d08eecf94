//! The log's writer thread, batched: workers push formatted lines into a bounded lock-free
//! queue and, while lines keep coming, never wake the writer for one; the writer drains
//! the queue every [`FLUSH_EVERY`] and writes each batch with one `write`.
//!
//! Why not `tracing-appender`'s non-blocking writer: its thread waits for every line on a
//! channel, so at one access-log line per connection it was woken (futex) and spun
//! (`sched_yield`, ~3 per connection) for each one, plus its `write`: about 4.4 of the 24
//! syscalls l4lb made per proxied connection, on the cores the workers need. Here an idle writer sleeps until
//! the first line after a quiet spell (one wake-up), and a busy one wakes on its own
//! clock: a line waits [`FLUSH_EVERY`] at most, as nginx's `access_log ... flush=` does.

use std::io::Write;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use crossbeam::queue::ArrayQueue;
use tracing_subscriber::fmt::MakeWriter;

/// How long a busy writer sleeps between batches: the most a line waits in the queue.
const FLUSH_EVERY: Duration = Duration::from_millis(10);

/// A batch is written once it reaches this size, even before the queue is empty.
const BATCH_BYTES: usize = 64 * 1024;

/// Written lines' buffers kept for reuse, at most: a worker then takes a buffer the writer
/// has emptied instead of allocating one that the writer's thread would free (a malloc
/// and a cross-thread free per connection otherwise).
const SPARE_BUFFERS: usize = 1024;

/// Buffers larger than this (a long panic message) are freed, not kept.
const SPARE_MAX_BYTES: usize = 4096;

/// The queue and the writer's state, shared by the emitting threads and the writer.
struct Shared {
    lines: ArrayQueue<Vec<u8>>,
    /// Emptied buffers, for the next lines.
    spare: ArrayQueue<Vec<u8>>,
    /// Lines refused because the queue was full.
    dropped: AtomicUsize,
    /// The writer is parked (or about to): the next line must wake it.
    sleeping: AtomicBool,
    stop: AtomicBool,
    writer: Thread,
}

impl Shared {
    fn push(&self, line: &[u8]) {
        let mut buffer = self.spare.pop().unwrap_or_default();
        buffer.clear();
        buffer.extend_from_slice(line);
        if let Err(buffer) = self.lines.push(buffer) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            let _ = self.spare.push(buffer);
            return;
        }
        // Pairs with the fence in `Writer::sleep`: either the writer sees this line before
        // it parks, or this thread sees it asleep and wakes it.
        fence(Ordering::SeqCst);
        // A queue filling up faster than the clock drains it wakes the writer early.
        let filling = self.lines.len() > self.lines.capacity() / 2;
        if (self.sleeping.load(Ordering::Relaxed) && self.sleeping.swap(false, Ordering::AcqRel))
            || filling
        {
            self.writer.unpark();
        }
    }
}

/// The [`MakeWriter`] the fmt layers write to: each event arrives as one `write` of a
/// whole line, which is queued.
#[derive(Clone)]
pub struct QueueWriter {
    shared: Arc<Shared>,
}

/// One event's writer.
pub struct Line<'a>(&'a Shared);

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for QueueWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line(&self.shared)
    }
}

/// Counts the lines a writer dropped because its queue was full.
#[derive(Clone)]
pub struct DroppedLines(Arc<Shared>);

impl DroppedLines {
    /// Lines dropped so far.
    pub fn get(&self) -> usize {
        self.0.dropped.load(Ordering::Relaxed)
    }
}

/// How long dropping a [`WriterGuard`] waits for its thread to write what is queued.
const EXIT_WAIT: Duration = Duration::from_secs(1);

/// Owns the writer thread: dropping it writes what is queued and ends the thread, waiting
/// [`EXIT_WAIT`] at most (a writer stuck behind a full pipe must not keep the process
/// from exiting; it is then left behind).
pub struct WriterGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// Closed by the writer thread when it ends.
    ended: std::sync::mpsc::Receiver<()>,
}

impl WriterGuard {
    /// Tells the writer to write what is queued and end, without waiting for it.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.writer.unpark();
    }

    /// Stops the writer and waits for it until `deadline` at most.
    pub fn finish(mut self, deadline: Instant) {
        self.wait(deadline);
    }

    fn wait(&mut self, deadline: Instant) {
        self.stop();
        let Some(thread) = self.thread.take() else {
            return;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        // Disconnected when the thread has ended; a timeout leaves it behind.
        if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) = self.ended.recv_timeout(left)
        {
            let _ = thread.join();
        }
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.wait(Instant::now() + EXIT_WAIT);
    }
}

/// Starts a writer thread named `name` writing to `out`, with room for `capacity` lines.
pub fn spawn<W: Write + Send + 'static>(
    out: W,
    capacity: usize,
    name: &str,
) -> std::io::Result<(QueueWriter, DroppedLines, WriterGuard)> {
    // The thread needs the shared state and the shared state names the thread: the
    // thread waits for its state on a channel before it starts.
    let (hand, handed) = std::sync::mpsc::sync_channel::<Arc<Shared>>(1);
    let (end, ended) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let _end = end;
            if let Ok(shared) = handed.recv() {
                Writer {
                    shared,
                    out,
                    batch: Vec::with_capacity(BATCH_BYTES),
                }
                .run();
            }
        })?;
    let shared = Arc::new(Shared {
        lines: ArrayQueue::new(capacity.max(1)),
        spare: ArrayQueue::new(SPARE_BUFFERS),
        dropped: AtomicUsize::new(0),
        sleeping: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        writer: thread.thread().clone(),
    });
    let _ = hand.send(Arc::clone(&shared));
    Ok((
        QueueWriter {
            shared: Arc::clone(&shared),
        },
        DroppedLines(Arc::clone(&shared)),
        WriterGuard {
            shared,
            thread: Some(thread),
            ended,
        },
    ))
}

struct Writer<W> {
    shared: Arc<Shared>,
    out: W,
    batch: Vec<u8>,
}

impl<W: Write> Writer<W> {
    fn run(mut self) {
        loop {
            // Read before draining: a stop seen here still gets everything queued before it.
            let stopping = self.shared.stop.load(Ordering::SeqCst);
            let wrote = self.drain();
            if stopping {
                return;
            }
            if wrote {
                std::thread::park_timeout(FLUSH_EVERY);
            } else {
                self.sleep();
            }
        }
    }

    /// Writes everything queued; whether there was anything.
    fn drain(&mut self) -> bool {
        let mut wrote = false;
        while let Some(line) = self.shared.lines.pop() {
            self.batch.extend_from_slice(&line);
            if line.capacity() <= SPARE_MAX_BYTES {
                let _ = self.shared.spare.push(line);
            }
            if self.batch.len() >= BATCH_BYTES {
                self.write_batch();
            }
            wrote = true;
        }
        self.write_batch();
        wrote
    }

    fn write_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        // A failed write (a closed stderr, a full disk) loses this batch only; the next
        // one is tried afresh. There is nowhere left to report it.
        let _ = self.out.write_all(&self.batch);
        let _ = self.out.flush();
        self.batch.clear();
    }

    /// Parks until a line or a stop arrives.
    fn sleep(&self) {
        self.shared.sleeping.store(true, Ordering::SeqCst);
        // Pairs with the fence in `Shared::push`.
        fence(Ordering::SeqCst);
        if self.shared.lines.is_empty() && !self.shared.stop.load(Ordering::SeqCst) {
            std::thread::park();
        }
        self.shared.sleeping.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// One event, as the fmt layer writes it: the whole line in one `write_all`.
    fn line(writer: &QueueWriter, text: &str) {
        writer
            .make_writer()
            .write_all(format!("{text}\n").as_bytes())
            .unwrap();
    }

    /// A sink the test can read back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_from_every_thread_is_written_in_order_per_thread() {
        let sink = Sink::default();
        let (writer, dropped, guard) = spawn(sink.clone(), 1 << 16, "test-log").unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        line(&writer, &format!("{t} {i}"));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        drop(guard);
        assert_eq!(dropped.get(), 0);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let mut next = [0usize; 4];
        for line in text.lines() {
            let (t, i) = line.split_once(' ').unwrap();
            let (t, i): (usize, usize) = (t.parse().unwrap(), i.parse().unwrap());
            assert_eq!(i, next[t], "thread {t} out of order");
            next[t] += 1;
        }
        assert_eq!(next, [5000; 4]);
    }

    #[test]
    fn a_line_after_a_quiet_spell_wakes_the_sleeping_writer() {
        let sink = Sink::default();
        let (writer, _dropped, _guard) = spawn(sink.clone(), 16, "test-log").unwrap();
        for round in 0..3 {
            // Let the writer fall asleep with nothing queued, then one line must appear.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !writer.shared.sleeping.load(Ordering::SeqCst) {
                assert!(std::time::Instant::now() < deadline, "writer never slept");
                std::thread::yield_now();
            }
            line(&writer, &format!("line {round}"));
            let expected = format!("line {round}\n");
            while !String::from_utf8_lossy(&sink.0.lock().unwrap()).ends_with(&expected) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "line {round} never written"
                );
                std::thread::yield_now();
            }
        }
    }

    /// A writer stuck on its output (a full pipe) costs lines, counted, never a wait.
    #[test]
    fn a_full_queue_drops_and_counts() {
        struct Stuck {
            entered: std::sync::mpsc::Sender<()>,
            release: std::sync::mpsc::Receiver<()>,
        }
        impl Write for Stuck {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let _ = self.entered.send(());
                let _ = self.release.recv();
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (entered, writing) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel();
        let stuck = Stuck {
            entered,
            release: released,
        };
        let (writer, dropped, guard) = spawn(stuck, 4, "test-log").unwrap();
        line(&writer, "first");
        writing.recv().unwrap();
        // The writer is inside `write`: four lines fit in the queue, the rest do not.
        for i in 0..100 {
            line(&writer, &i.to_string());
        }
        let lost = dropped.get();
        // A writer stuck in `write` is left behind after the wait, not waited for forever.
        let started = Instant::now();
        guard.finish(Instant::now() + Duration::from_millis(200));
        let waited = started.elapsed();
        drop(release);
        assert_eq!(lost, 96);
        assert!(waited < Duration::from_secs(5), "waited {waited:?}");
    }
}
