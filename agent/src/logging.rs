//! Logging set-up for every binary of the project: `tracing` to stderr, filtered by
//! `UNIDESK_LOG` (an `EnvFilter` directive, `default` when unset), in the format
//! `UNIDESK_LOG_FORMAT` names (`human` or `json`). Without it, a process whose stderr systemd
//! connected to the journal (`JOURNAL_STREAM`) writes for journald — no timestamps (the journal
//! stamps each line) and no colours — and any other writes human lines, coloured only on a
//! terminal.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Timestamped lines; colours only on a terminal.
    Human,
    /// One JSON object a line (for log shippers).
    Json,
    /// Lines for journald: no timestamp, no colours.
    Journal,
}

/// The format `UNIDESK_LOG_FORMAT` (`requested`) asks for, or the journal's when stderr is the
/// journal's stream. An unknown value is an error naming it.
pub fn format_from(requested: Option<&str>, journal_stream: bool) -> Result<Format, String> {
    match requested.map(str::trim) {
        None | Some("") => Ok(if journal_stream {
            Format::Journal
        } else {
            Format::Human
        }),
        Some("human") => Ok(Format::Human),
        Some("json") => Ok(Format::Json),
        Some(other) => Err(format!(
            "UNIDESK_LOG_FORMAT={other:?} is not `human` or `json`"
        )),
    }
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(default: &str) {
    let filter =
        || EnvFilter::try_from_env("UNIDESK_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let requested = std::env::var("UNIDESK_LOG_FORMAT").ok();
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let format = format_from(requested.as_deref(), journal).unwrap_or_else(|why| {
        eprintln!("warning: {why}; writing human log lines");
        Format::Human
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr);
    match format {
        Format::Human => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        Format::Json => builder.json().with_ansi(false).init(),
        Format::Journal => builder.without_time().with_ansi(false).init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_wins_the_journal_is_the_default_under_systemd() {
        assert_eq!(format_from(None, false), Ok(Format::Human));
        assert_eq!(format_from(None, true), Ok(Format::Journal));
        assert_eq!(format_from(Some(""), true), Ok(Format::Journal));
        assert_eq!(format_from(Some("json"), true), Ok(Format::Json));
        assert_eq!(format_from(Some("human"), true), Ok(Format::Human));
        let err = format_from(Some("xml"), false).unwrap_err();
        assert!(err.contains("UNIDESK_LOG_FORMAT=\"xml\""), "{err}");
    }
}
