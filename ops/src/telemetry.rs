//! Tracing set-up for a binary: filter from `RUST_LOG` (default `info`), format from `LOG_FORMAT`
//! (`plain`, the default, or `json`). Logs go to standard error.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The format named by `LOG_FORMAT`, plain when unset or unknown.
    pub fn from_env() -> Self {
        match std::env::var("LOG_FORMAT").as_deref() {
            Ok("json") => Self::Json,
            _ => Self::Plain,
        }
    }
}

/// Installs the global subscriber. Calling it twice (as tests that start several daemons in one
/// process do) keeps the first and is not an error.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match LogFormat::from_env() {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Plain => builder.try_init(),
    };
}
