//! Progress of the long operator commands (`keys status --watch`, `backup`,
//! `restore`, `purge`, `audit archive`) on stderr; stdout stays the
//! command's one JSON answer. On a terminal: an `indicatif` bar (known
//! length) or spinner (a phase of unknown length, with its elapsed time).
//! Elsewhere (a pipe, a log file, CI): one plain line per step, or one JSON
//! event with `--log-format json`. Only counts and phases are shown, never
//! card data.

use std::io::IsTerminal as _;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// One operation's progress (see the module documentation).
#[derive(Debug)]
pub(crate) struct Progress {
    operation: &'static str,
    /// `Some` on a terminal.
    bar: Option<ProgressBar>,
    /// The last line written without a terminal, so that a step is written
    /// once however often it is reported.
    last: Mutex<String>,
}

impl Progress {
    /// A phase of unknown length: a spinner on a terminal.
    pub(crate) fn spinner(operation: &'static str) -> Progress {
        Progress::new(operation, None)
    }

    /// `total` steps: a bar on a terminal.
    pub(crate) fn bar(operation: &'static str, total: u64) -> Progress {
        Progress::new(operation, Some(total))
    }

    fn new(operation: &'static str, total: Option<u64>) -> Progress {
        // A terminal shows a bar; JSON logs keep every stderr line JSON.
        let drawn = std::io::stderr().is_terminal() && !super::json_logs();
        let bar = drawn.then(|| {
            let (bar, template) = match total {
                Some(total) => (
                    ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()),
                    "{prefix}: [{bar:40}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
                ),
                None => (
                    ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
                    "{spinner} {prefix}: {msg} ({elapsed})",
                ),
            };
            let style = ProgressStyle::with_template(template)
                .map(|s| s.progress_chars("#>-").tick_chars("-\\|/*"))
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_prefix(operation);
            if total.is_none() {
                bar.enable_steady_tick(Duration::from_millis(120));
            }
            bar
        });
        Progress {
            operation,
            bar,
            last: Mutex::new(String::new()),
        }
    }

    /// The current phase (what is being done now).
    pub(crate) fn phase(&self, message: impl std::fmt::Display) {
        match &self.bar {
            Some(bar) => bar.set_message(message.to_string()),
            None => self.line(&message.to_string()),
        }
    }

    /// `done` of `total` steps (`total` may grow), with a message.
    pub(crate) fn update(&self, done: u64, total: u64, message: impl std::fmt::Display) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(total);
                bar.set_position(done);
                bar.set_message(message.to_string());
            }
            None => self.line(&format!("{done} of {total}, {message}")),
        }
    }

    /// Done: the bar stays on screen with `message`.
    pub(crate) fn finish(&self, message: impl std::fmt::Display) {
        match &self.bar {
            Some(bar) => bar.finish_with_message(message.to_string()),
            None => self.line(&message.to_string()),
        }
    }

    /// Failed: the bar is cleared (the error follows on its own line).
    pub(crate) fn fail(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    fn line(&self, message: &str) {
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        if *last == message {
            return;
        }
        message.clone_into(&mut last);
        if super::json_logs() {
            tracing::info!(operation = self.operation, "{}: {message}", self.operation);
        } else {
            eprintln!("{}: {message}", self.operation);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            if !bar.is_finished() {
                bar.finish_and_clear();
            }
        }
    }
}
