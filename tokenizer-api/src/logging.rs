//! Logging of every process of the binary (`serve`, the operator commands,
//! `tokenizer edge`): to stderr, as text or as JSON (one object per line),
//! at a level or filter expression; and whether this process logs JSON, so
//! that error lines and the panic hook write JSON too.
//!
//! Lines are written by a thread of their own (`log-writer`,
//! tracing-appender's non-blocking writer, never lossy: a full queue makes
//! the logging thread wait rather than drop a line), through a buffer that
//! is flushed whenever the queue is empty: under load many lines leave in
//! one write instead of one write(2) per request on the request's thread
//! (about 5% of the service's CPU on detokenize, issue 19). An idle
//! process writes each line at once. [`flush`] writes what is queued
//! before the process exits.

use crate::config::LogFormat;

/// Set once the JSON log format is installed.
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process writes its logs as JSON (see [`init_logging`]): the
/// panic hook and error lines then write JSON too.
pub fn json_logs() -> bool {
    JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The log writer thread's guard: dropped by [`flush`].
static WRITER: std::sync::Mutex<Option<tracing_appender::non_blocking::WorkerGuard>> =
    std::sync::Mutex::new(None);

/// Lines queued for the log writer thread, at most (then the logging
/// thread waits).
const QUEUED_LINES: usize = 128 * 1024;

/// stderr, written by the log writer thread (see the module doc).
fn stderr_writer() -> tracing_appender::non_blocking::NonBlocking {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("log-writer")
        .finish(std::io::BufWriter::with_capacity(
            64 << 10,
            std::io::stderr(),
        ));
    *WRITER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(guard);
    writer
}

/// Write every queued line and stop the log writer thread: the last thing
/// a process does (later lines are not written).
pub fn flush() {
    let guard = WRITER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    drop(guard);
}

/// Logs to stderr at `level` (a level or a filter expression) in `format`
/// (see [`json_subscriber`] for JSON).
pub fn init_logging(level: &str, format: LogFormat) {
    // Once per process: a second writer would replace the first one's guard
    // and stop the thread the installed subscriber writes through.
    if WRITER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .is_some()
    {
        return;
    }
    match format {
        LogFormat::Text => {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(log_filter(level))
                .with_writer(stderr_writer())
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(true)
                .try_init();
        }
        LogFormat::Json => {
            if tracing::subscriber::set_global_default(json_subscriber(level, stderr_writer()))
                .is_ok()
            {
                JSON_LOGS.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// A bare level applies to everything; a filter expression is taken as is.
fn log_filter(level: &str) -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::EnvFilter;
    EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// `--log-format json`: one object per line, the event's fields
/// (`message`, `request_id`, ...) at the top level next to `timestamp`,
/// `level` and `target`, and, for an event inside a span, the current span
/// (`span`) and every enclosing span (`spans`) with their fields.
pub fn json_subscriber<W>(level: &str, writer: W) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(level))
        .with_writer(writer)
        .with_target(true)
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(true)
        .with_ansi(false)
        .finish()
}
