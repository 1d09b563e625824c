//! The tracing subscriber: `RUST_LOG` filters (default `info`), text or JSON lines on stderr.

use std::io::{IsTerminal, Write};

use tracing_subscriber::fmt::MakeWriter;

use crate::args::LogFormat;

/// Installs the subscriber. With a `prefix`, every text line starts with it (`launch` marks
/// the coordinator's lines so, beside its workers' `[worker-i]`); JSON lines carry no prefix.
pub fn init(format: LogFormat, prefix: Option<&'static str>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(prefix.is_none() && std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.with_writer(Prefixed(prefix.unwrap_or(""))).init(),
        LogFormat::Json => builder.json().with_writer(std::io::stderr).init(),
    }
}

/// Makes a stderr writer per event that starts the event's text with the prefix.
struct Prefixed(&'static str);

impl<'a> MakeWriter<'a> for Prefixed {
    type Writer = PrefixedWriter;

    fn make_writer(&'a self) -> PrefixedWriter {
        PrefixedWriter {
            prefix: self.0,
            started: false,
        }
    }
}

struct PrefixedWriter {
    prefix: &'static str,
    started: bool,
}

impl Write for PrefixedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        if !self.started {
            err.write_all(self.prefix.as_bytes())?;
            self.started = true;
        }
        err.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
