//! Structured logging with a filter that can be changed while the process runs (the admin
//! `/logging?level=` endpoint), written to stderr line by line or, for a data path that logs a
//! line per connection, in batches ([`LogOutput::Buffered`]).

use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use thiserror::Error;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

/// Errors from setting up or changing logging.
#[derive(Debug, Error)]
pub enum LoggingError {
    /// A filter directive did not parse.
    #[error(
        "invalid log filter {directive:?}: {reason} (expected e.g. info, debug or ztunnel=debug,h2=info)"
    )]
    BadDirective {
        /// The directive as given.
        directive: String,
        /// Why it was refused.
        reason: String,
    },
    /// A global subscriber was already installed.
    #[error("logging was already initialised in this process")]
    AlreadyInitialised,
    /// The thread that writes a buffered log on its interval could not start.
    #[error("cannot start the log flush thread: {0}")]
    FlushThread(String),
    /// The reload handle outlived the subscriber.
    #[error("the log filter can no longer be changed: {0}")]
    Reload(String),
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" | "plain" | "" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format {other:?}: expected text or json"
            )),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// How log lines reach stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogOutput {
    /// One `write` per line, as it is logged.
    Direct,
    /// Lines are gathered in memory and written together: when [`BUFFER_BYTES`] are pending,
    /// `flush_interval` after the first pending line, at [`LogHandle::flush`] (call it before the
    /// process exits) and before a panic message is printed. A line is never split between two
    /// writes. A process killed outright (SIGKILL) loses at most the last interval's lines.
    Buffered {
        /// The longest a line waits in memory.
        flush_interval: Duration,
    },
}

/// Pending bytes that make a [`LogOutput::Buffered`] log write at once.
pub const BUFFER_BYTES: usize = 64 * 1024;

/// Log lines gathered in memory and written to `W` in batches (see [`LogOutput::Buffered`]).
/// Cheap to clone (shared); when the last clone is dropped the pending lines are written and the
/// buffer's thread ends. Each `write` through [`LineBuffer::writer`] appends whole: the
/// formatter hands over one line per call.
pub struct LineBuffer<W: Write + Send + 'static> {
    handle: Arc<Handle<W>>,
}

impl<W: Write + Send + 'static> Clone for LineBuffer<W> {
    fn clone(&self) -> Self {
        LineBuffer {
            handle: self.handle.clone(),
        }
    }
}

impl<W: Write + Send + 'static> fmt::Debug for LineBuffer<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LineBuffer")
            .field("flush_interval", &self.handle.shared.interval)
            .finish_non_exhaustive()
    }
}

/// What the clones of one [`LineBuffer`] share; dropping it stops the thread.
struct Handle<W: Write> {
    shared: Arc<Shared<W>>,
}

impl<W: Write> Drop for Handle<W> {
    fn drop(&mut self) {
        let mut pending = self.shared.lock();
        pending.closed = true;
        pending.write_out();
        self.shared.wake.notify_one();
    }
}

struct Shared<W> {
    state: Mutex<Pending<W>>,
    /// Wakes the flusher thread when the first line of a batch arrives or the buffer closes.
    wake: Condvar,
    interval: Duration,
    capacity: usize,
}

impl<W> Shared<W> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending<W>> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

struct Pending<W> {
    bytes: Vec<u8>,
    sink: W,
    /// True from a batch's first line until the flusher thread writes it at the interval's end.
    flush_due: bool,
    /// Every handle is gone: the thread ends.
    closed: bool,
}

impl<W> Pending<W>
where
    W: Write,
{
    /// Writes out what is pending. A failing sink (stderr closed) drops the batch: logging
    /// never stops the process.
    fn write_out(&mut self) {
        if !self.bytes.is_empty() {
            let _ = self.sink.write_all(&self.bytes);
            let _ = self.sink.flush();
            self.bytes.clear();
        }
    }
}

impl<W: Write + Send + 'static> LineBuffer<W> {
    /// A buffer writing to `sink` when `capacity` bytes are pending or `interval` after the first
    /// pending line, with a thread of its own for the interval.
    pub fn new(sink: W, interval: Duration, capacity: usize) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(Pending {
                bytes: Vec::with_capacity(capacity),
                sink,
                flush_due: false,
                closed: false,
            }),
            wake: Condvar::new(),
            interval,
            capacity,
        });
        let thread = shared.clone();
        std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || flusher(&thread))?;
        Ok(LineBuffer {
            handle: Arc::new(Handle { shared }),
        })
    }

    /// Appends one formatted line (or several).
    pub fn write_line(&self, line: &[u8]) {
        let shared = &self.handle.shared;
        let mut pending = shared.lock();
        pending.bytes.extend_from_slice(line);
        if pending.bytes.len() >= shared.capacity {
            pending.write_out();
        } else if !pending.flush_due {
            pending.flush_due = true;
            shared.wake.notify_one();
        }
    }

    /// Writes out every pending line now.
    pub fn flush(&self) {
        self.handle.shared.lock().write_out();
    }

    /// A writer appending to this buffer, for a formatter.
    pub fn writer(&self) -> BufferedWriter<'_, W> {
        BufferedWriter { buffer: self }
    }
}

/// Sleeps until a batch starts, waits out the interval, writes the batch; until the buffer
/// closes.
fn flusher<W: Write>(shared: &Shared<W>) {
    loop {
        {
            let pending = shared
                .wake
                .wait_while(shared.lock(), |p| !p.flush_due && !p.closed)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if pending.closed {
                return;
            }
        }
        std::thread::sleep(shared.interval);
        let mut pending = shared.lock();
        pending.write_out();
        pending.flush_due = false;
        if pending.closed {
            return;
        }
    }
}

/// [`io::Write`] into a [`LineBuffer`]: each `write` appends all it is given.
#[derive(Debug)]
pub struct BufferedWriter<'a, W: Write + Send + 'static> {
    buffer: &'a LineBuffer<W>,
}

impl<W: Write + Send + 'static> Write for BufferedWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buffer.write_line(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Lines are written out by the buffer's own rules; a formatter's flush per line would
        // defeat it.
        Ok(())
    }
}

impl<'a, W: Write + Send + 'static> tracing_subscriber::fmt::MakeWriter<'a> for LineBuffer<W> {
    type Writer = BufferedWriter<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        self.writer()
    }
}

/// The process's buffered stderr log, for the panic hook and [`LogHandle::flush`].
static STDERR_BUFFER: OnceLock<LineBuffer<io::Stderr>> = OnceLock::new();

/// Flushes the buffered log (if any) before the panic message, which goes straight to stderr.
fn install_panic_flush() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Some(buffer) = STDERR_BUFFER.get() {
            buffer.flush();
        }
        previous(info);
    }));
}

/// Parses a filter such as `info` or `ztunnel=debug,h2=warn`.
pub fn parse_filter(directive: &str) -> Result<EnvFilter, LoggingError> {
    EnvFilter::builder()
        .parse(directive)
        .map_err(|e| LoggingError::BadDirective {
            directive: directive.to_string(),
            reason: e.to_string(),
        })
}

/// Changes the running filter.
#[derive(Clone)]
pub struct LogHandle {
    reload: reload::Handle<EnvFilter, Registry>,
    current: Arc<Mutex<String>>,
    initial: String,
    buffer: Option<LineBuffer<io::Stderr>>,
}

impl fmt::Debug for LogHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogHandle")
            .field("current", &self.current())
            .finish()
    }
}

impl LogHandle {
    /// Replaces the filter; a bad directive leaves the current one in place.
    pub fn set_level(&self, directive: &str) -> Result<(), LoggingError> {
        let filter = parse_filter(directive)?;
        self.reload
            .reload(filter)
            .map_err(|e| LoggingError::Reload(e.to_string()))?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = directive.to_string();
        Ok(())
    }

    /// Restores the filter the process started with.
    pub fn reset(&self) -> Result<(), LoggingError> {
        let initial = self.initial.clone();
        self.set_level(&initial)
    }

    /// Writes out the lines a [`LogOutput::Buffered`] log holds (nothing to do for a direct
    /// one). Call it before the process exits and before writing to stderr directly.
    pub fn flush(&self) {
        if let Some(buffer) = &self.buffer {
            buffer.flush();
        }
    }

    /// The filter in force.
    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Installs the global subscriber: `RUST_LOG` if set, else `default_directive`; logs go to stderr
/// line by line (text in colour only when stderr is a terminal).
pub fn init(format: LogFormat, default_directive: &str) -> Result<LogHandle, LoggingError> {
    init_with(format, default_directive, LogOutput::Direct)
}

/// [`init`] with the choice of how lines reach stderr. With [`LogOutput::Buffered`] the process
/// must call [`LogHandle::flush`] before it exits; a panic flushes by itself.
pub fn init_with(
    format: LogFormat,
    default_directive: &str,
    output: LogOutput,
) -> Result<LogHandle, LoggingError> {
    let directive = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| default_directive.to_string());
    let filter = parse_filter(&directive)?;
    let (filter_layer, reload) = reload::Layer::new(filter);
    let buffer = match output {
        LogOutput::Direct => None,
        LogOutput::Buffered { flush_interval } => {
            if STDERR_BUFFER.get().is_some() {
                return Err(LoggingError::AlreadyInitialised);
            }
            let buffer = LineBuffer::new(io::stderr(), flush_interval, BUFFER_BYTES)
                .map_err(|e| LoggingError::FlushThread(e.to_string()))?;
            Some(buffer)
        }
    };
    let ansi = io::IsTerminal::is_terminal(&io::stderr());
    let output: Box<dyn Layer<_> + Send + Sync> = match (format, buffer.clone()) {
        // Colour codes only for a person at a terminal: a log file or collector gets plain text
        // (and formatting them cost 6-8% of ztunnel's CPU under connection churn).
        (LogFormat::Text, None) => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(io::stderr)
            .boxed(),
        (LogFormat::Text, Some(buffer)) => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(buffer)
            .boxed(),
        (LogFormat::Json, None) => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(io::stderr)
            .boxed(),
        (LogFormat::Json, Some(buffer)) => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(buffer)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(output)
        .try_init()
        .map_err(|_| LoggingError::AlreadyInitialised)?;
    if let Some(buffer) = &buffer
        && STDERR_BUFFER.set(buffer.clone()).is_ok()
    {
        install_panic_flush();
    }
    Ok(LogHandle {
        reload,
        current: Arc::new(Mutex::new(directive.clone())),
        initial: directive,
        buffer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_directives_name_the_directive() {
        let err = parse_filter("ztunnel=loud").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid log filter \"ztunnel=loud\""),
            "{err}"
        );
        parse_filter("info,ztunnel::proxy=debug").unwrap();
    }

    /// A sink that keeps what it is given and counts the writes.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut c = self.0.lock().unwrap();
            c.0.extend_from_slice(buf);
            c.1 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().0.clone()).unwrap()
        }
        fn writes(&self) -> usize {
            self.0.lock().unwrap().1
        }
    }

    /// Waits (bounded) until `done` holds.
    fn eventually(what: &str, done: impl Fn() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("timed out waiting until {what}");
    }

    #[test]
    fn a_burst_of_lines_from_many_threads_arrives_whole_in_few_writes() {
        let sink = Capture::default();
        let buffer = LineBuffer::new(sink.clone(), Duration::from_millis(50), 4096).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let buffer = buffer.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        let line = format!("access connection complete thread={t} line={i}\n");
                        buffer.writer().write_all(line.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // No flush asked for: the buffer writes when full and at the end of its interval.
        eventually("every line is written", || {
            sink.text().lines().count() == 8000
        });
        let text = sink.text();
        let mut seen = std::collections::HashSet::new();
        for line in text.lines() {
            let (t, i) = line
                .strip_prefix("access connection complete thread=")
                .and_then(|rest| rest.split_once(" line="))
                .unwrap_or_else(|| panic!("a line came out cut or mixed: {line:?}"));
            assert!(seen.insert((t.to_string(), i.to_string())), "{line} twice");
        }
        assert_eq!(seen.len(), 8000);
        assert!(
            sink.writes() < 8000 / 10,
            "{} writes for 8000 lines: not batched",
            sink.writes()
        );
    }

    #[test]
    fn a_lone_line_is_written_after_the_interval_and_pending_lines_at_drop() {
        let sink = Capture::default();
        let buffer = LineBuffer::new(sink.clone(), Duration::from_millis(20), 4096).unwrap();
        buffer.write_line(b"first\n");
        eventually("the line is written without a flush", || {
            sink.text() == "first\n"
        });
        // A long interval: only dropping the last handle writes the line.
        let sink = Capture::default();
        let buffer = LineBuffer::new(sink.clone(), Duration::from_secs(3600), 4096).unwrap();
        let clone = buffer.clone();
        clone.write_line(b"second\n");
        drop(clone);
        buffer.write_line(b"third\n");
        drop(buffer);
        assert_eq!(sink.text(), "second\nthird\n");
    }

    /// Run as a child process by the test below: logs through a buffered subscriber whose
    /// interval never passes, then exits the way `mode` says.
    fn buffered_child(mode: &str) {
        let log = init_with(
            LogFormat::Text,
            "info",
            LogOutput::Buffered {
                flush_interval: Duration::from_secs(3600),
            },
        )
        .unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..500 {
                        tracing::info!(target: "access", thread = t, line = i, "connection complete");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        match mode {
            "flush" => log.flush(),
            _ => panic!("child panics with lines pending"),
        }
    }

    #[test]
    fn buffered_lines_are_written_before_a_clean_exit_and_before_a_panic_message() {
        const CHILD: &str = "AMBIT_LOGGING_TEST_CHILD";
        if let Ok(mode) = std::env::var(CHILD) {
            buffered_child(&mode);
            return;
        }
        let name = "logging::tests::buffered_lines_are_written_before_a_clean_exit_and_before_a_panic_message";
        for mode in ["flush", "panic"] {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([name, "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD, mode)
                .env_remove("RUST_LOG")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.success(), mode == "flush", "{mode}: {stderr}");
            let lines: Vec<&str> = stderr
                .lines()
                .filter(|l| l.contains("connection complete"))
                .collect();
            assert_eq!(
                lines.len(),
                2000,
                "{mode}: every line is on stderr:\n{stderr}"
            );
            for t in 0..4 {
                for i in 0..500 {
                    let fields = format!("thread={t} line={i}");
                    assert!(
                        lines.iter().any(|l| l.ends_with(&fields)),
                        "{mode}: {fields} missing"
                    );
                }
            }
            if mode == "panic" {
                let last_line = stderr.rfind("connection complete").unwrap();
                let panic = stderr
                    .find("child panics with lines pending")
                    .unwrap_or_else(|| panic!("no panic message: {stderr}"));
                assert!(last_line < panic, "the lines come before the panic message");
            }
        }
    }

    #[test]
    fn formats_parse() {
        assert_eq!("JSON".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert!(
            "xml"
                .parse::<LogFormat>()
                .unwrap_err()
                .contains("expected text or json")
        );
    }
}
