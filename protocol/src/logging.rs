//! The log setup of the binaries (feature `logging`): one `tracing`
//! subscriber writing to stderr, as text or as JSON lines. It lives here
//! because `cohort-protocol` is the one library crate that `cohort-sim`,
//! `cohort-aggregator` and `cohort-node` all depend on; the library code
//! only emits `tracing` events and never installs a subscriber.
//!
//! Colours (ANSI escape codes) only when stderr is a terminal and
//! `NO_COLOR` (<https://no-color.org>) is unset or empty: a log file
//! stays plain text.

use std::ffi::OsStr;
use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

/// The default filter of the network binaries (`cohort-aggregator`,
/// `cohort-node`): their own `info` lines, libp2p's warnings only.
pub const NETWORK_FILTER: &str = "info,libp2p=warn,libp2p_request_response=error";

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields`
    /// (`message` and the event's own fields) and the enclosing `spans`.
    Json,
}

impl LogFormat {
    pub const ALL: [LogFormat; 2] = [LogFormat::Text, LogFormat::Json];

    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LogFormat::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| format!("unknown log format `{s}` (known: text, json)"))
    }
}

/// Whether text logs are coloured: only on a terminal, and not when
/// `NO_COLOR` is set to anything non-empty.
pub fn use_colour(is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    is_terminal && no_color.is_none_or(OsStr::is_empty)
}

/// Installs the process's subscriber on stderr: `RUST_LOG` if it is set
/// and valid, else `default_filter`. A program that installed its own
/// subscriber before keeps it (this call then does nothing).
pub fn init(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let colour = use_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // try_init fails only when a global subscriber exists already.
    let _ = match format {
        LogFormat::Text => builder.with_ansi(colour).try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(OsStr::new(""))));
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None));
        assert!(!use_colour(false, Some(OsStr::new(""))));
    }

    #[test]
    fn formats_parse_by_name() {
        for f in LogFormat::ALL {
            assert_eq!(f.name().parse::<LogFormat>(), Ok(f));
        }
        assert!("xml".parse::<LogFormat>().is_err());
    }
}
