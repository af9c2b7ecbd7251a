//! Logging setup: `tracing` to stderr, quiet by default, `-v` / `RUST_LOG` for more.

use tracing_subscriber::EnvFilter;

pub fn init(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info,bot_bottle=debug",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // A closed terminal answers writes with EIO: the subscriber would report that with
        // `eprintln!`, which panics (and, in a destructor during teardown, aborts it).
        .log_internal_errors(false)
        .try_init();
}

/// A `bot-bottle: ...` line on stderr that never panics: `eprintln!` does when the write fails,
/// and after a hangup the terminal answers every write with EIO. Teardown paths use this (a
/// panic in a destructor during unwinding aborts the process, and the teardown with it).
pub fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "bot-bottle: {line}");
}
