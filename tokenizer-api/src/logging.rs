//! Logging of every process of the binary (`serve`, the operator commands,
//! `tokenizer edge`): to stderr, as text or as JSON (one object per line),
//! at a level or filter expression; and whether this process logs JSON, so
//! that error lines and the panic hook write JSON too.

use crate::config::LogFormat;

/// Set once the JSON log format is installed.
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process writes its logs as JSON (see [`init_logging`]): the
/// panic hook and error lines then write JSON too.
pub fn json_logs() -> bool {
    JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Logs to stderr at `level` (a level or a filter expression) in `format`
/// (see [`json_subscriber`] for JSON).
pub fn init_logging(level: &str, format: LogFormat) {
    match format {
        LogFormat::Text => {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(log_filter(level))
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(true)
                .try_init();
        }
        LogFormat::Json => {
            if tracing::subscriber::set_global_default(json_subscriber(level, std::io::stderr))
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
