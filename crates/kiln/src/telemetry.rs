//! Structured logs on stderr: readable text for people, JSON for collectors. `RUST_LOG` filters.
//!
//! The long-running commands (`serve`, `worker`) hand their lines to a writer thread
//! ([`Output::Background`]): an access-log line per request written straight to stderr was one
//! `write` system call, a contended stderr lock and a wake-up of the reader per request, which
//! measured as a third of `GET /healthz`'s cost under load (BENCHMARKS.md). The thread writes
//! whatever has queued up in one go, then lets the next lines gather for a millisecond; a line
//! logged while it waits idle is written at once, so an idle server's lines appear as soon as
//! they are logged. Short commands write directly, so their log lines keep their order with
//! what they print themselves.

use crate::config::LogFormat;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// Where log lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Written to stderr by the calling thread, a line at a time.
    Direct,
    /// Queued for a writer thread that writes them in batches.
    Background,
}

/// Keeps the background writer running; dropping it writes out what is still queued. Hold it
/// until the command returns.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    writer: Option<(Arc<Queue>, JoinHandle<()>)>,
}

impl LogGuard {
    /// For a command that installs no logger.
    pub fn none() -> Self {
        Self { writer: None }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some((queue, thread)) = self.writer.take() {
            queue.close();
            let _ = thread.join();
        }
    }
}

pub fn init(format: LogFormat, default_filter: &str, output: Output) -> LogGuard {
    match output {
        Output::Direct => {
            install(format, default_filter, std::io::stderr);
            LogGuard::none()
        }
        Output::Background => {
            let queue = Arc::new(Queue::default());
            let writer = queue.clone();
            let thread = std::thread::Builder::new()
                .name("kiln-log".into())
                .spawn(move || writer.write_out(&mut std::io::stderr()));
            match thread {
                Ok(thread) => {
                    install(format, default_filter, QueueWriter(queue.clone()));
                    LogGuard {
                        writer: Some((queue, thread)),
                    }
                }
                // No thread to spare: log directly rather than not at all.
                Err(_) => init(format, default_filter, Output::Direct),
            }
        }
    }
}

fn install<W>(format: LogFormat, default_filter: &str, writer: W)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(colour);
    // A second init (tests building several apps) is harmless: the first subscriber stays.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Bytes of lines that may wait for the writer thread; a logger that falls this far behind
/// makes the threads that log wait rather than dropping lines (access logs are records).
const QUEUED_BYTES: usize = 8 << 20;

/// How long the writer thread lets lines gather after a write, so that a busy server's lines
/// go out many to a `write` call; an idle server's line is written as soon as it is logged.
const GATHER: Duration = Duration::from_millis(1);

/// Lines waiting for the writer thread.
struct Queue {
    /// At most this many bytes wait (one line more when the queue is empty).
    capacity: usize,
    state: Mutex<Queued>,
    /// Lines arrived (the writer waits on it) or room was made (full loggers wait on it).
    changed: Condvar,
}

#[derive(Default)]
struct Queued {
    bytes: Vec<u8>,
    closed: bool,
}

impl Default for Queue {
    fn default() -> Self {
        Self::with_capacity(QUEUED_BYTES)
    }
}

impl Queue {
    fn with_capacity(capacity: usize) -> Self {
        Self {
            capacity,
            state: Mutex::default(),
            changed: Condvar::new(),
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, Queued> {
        // A thread that panicked while holding the lock left whole lines: carry on.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, line: &[u8]) {
        let mut queued = self.lock();
        while queued.bytes.len() + line.len() > self.capacity
            && !queued.bytes.is_empty()
            && !queued.closed
        {
            queued = self.changed.wait(queued).unwrap_or_else(|p| p.into_inner());
        }
        if queued.closed {
            // The writer has stopped (the guard is gone): a late line is written directly
            // rather than queued where nothing would write it.
            drop(queued);
            let _ = std::io::stderr().write_all(line);
            return;
        }
        let was_empty = queued.bytes.is_empty();
        queued.bytes.extend_from_slice(line);
        drop(queued);
        if was_empty {
            self.changed.notify_all();
        }
    }

    /// The writer thread: takes everything queued, writes it in one go, until closed and empty.
    fn write_out(&self, out: &mut impl Write) {
        let mut batch = Vec::new();
        loop {
            let mut queued = self.lock();
            while queued.bytes.is_empty() && !queued.closed {
                queued = self.changed.wait(queued).unwrap_or_else(|p| p.into_inner());
            }
            if queued.bytes.is_empty() {
                return;
            }
            std::mem::swap(&mut batch, &mut queued.bytes);
            drop(queued);
            self.changed.notify_all();
            // Nowhere to report a failed log write; the next batch tries again.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            std::thread::sleep(GATHER);
        }
    }
}

/// The formatter's [`MakeWriter`]: it hands out a [`LineWriter`] per event, a borrow of the
/// queue (no reference count to change per line).
struct QueueWriter(Arc<Queue>);

impl<'w> MakeWriter<'w> for QueueWriter {
    type Writer = LineWriter<'w>;

    fn make_writer(&'w self) -> Self::Writer {
        LineWriter(&self.0)
    }
}

/// What the formatter writes an event through. It writes a formatted event with one
/// `write_all`, which this takes whole, so lines from different threads never interleave.
struct LineWriter<'q>(&'q Queue);

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines from several threads, through a queue far smaller than what they write (so the
    /// loggers wait for the writer): every line arrives whole, each thread's in its order,
    /// and closing writes out the rest before the writer thread ends.
    #[test]
    fn the_background_writer_loses_no_line_and_keeps_each_threads_order() {
        let queue = Arc::new(Queue::with_capacity(256));
        let writer = queue.clone();
        let out = std::thread::spawn(move || {
            let mut out = Vec::new();
            writer.write_out(&mut out);
            out
        });
        let loggers: Vec<_> = (0..4)
            .map(|thread| {
                let queue = queue.clone();
                std::thread::spawn(move || {
                    let mut logger = LineWriter(&queue);
                    for line in 0..2_000 {
                        // As the formatter writes: a whole line per `write`.
                        let line = format!("thread {thread} line {line}\n");
                        logger.write_all(line.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for logger in loggers {
            logger.join().unwrap();
        }
        queue.close();
        let out = String::from_utf8(out.join().unwrap()).unwrap();
        let mut next = [0; 4];
        for line in out.lines() {
            let words: Vec<&str> = line.split(' ').collect();
            let thread: usize = words[1].parse().unwrap();
            assert_eq!(words[3].parse::<usize>().unwrap(), next[thread], "{line}");
            next[thread] += 1;
        }
        assert_eq!(next, [2_000; 4]);
    }

    /// A line logged after the writer stopped is not left in the queue (nor waits for room).
    #[test]
    fn a_line_after_closing_is_not_queued() {
        let queue = Queue::with_capacity(4);
        queue.push(b"queued\n");
        queue.close();
        queue.push(b"late line, over the capacity\n");
        assert_eq!(queue.lock().bytes, b"queued\n");
    }

    /// An idle server's line does not wait for a batch to fill.
    #[test]
    fn a_lone_line_is_written_at_once() {
        let queue = Arc::new(Queue::default());
        let (sent, written) = std::sync::mpsc::channel();
        let writer = queue.clone();
        let thread = std::thread::spawn(move || writer.write_out(&mut Forward(sent)));
        LineWriter(&queue).write_all(b"one line\n").unwrap();
        let line = written.recv_timeout(Duration::from_secs(10));
        queue.close();
        thread.join().unwrap();
        assert_eq!(line.unwrap(), b"one line\n");
    }

    /// Hands each write to a channel, as it happens.
    struct Forward(std::sync::mpsc::Sender<Vec<u8>>);

    impl Write for Forward {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.send(buf.to_vec());
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
