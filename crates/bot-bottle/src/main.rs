//! The `bot-bottle` command line. `anyhow` lives here and in `commands/` only.
#![forbid(unsafe_code)]

mod commands;

use std::process::ExitCode;

use clap::Parser;

/// Exit code for bad input (manifest, CLI arguments, mounts).
const EXIT_BAD_INPUT: u8 = 2;
/// Exit code for every other failure.
const EXIT_FAILURE: u8 = 1;

fn is_bad_input(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause.is::<bot_bottle::config::manifest::ManifestError>()
            || cause.is::<bot_bottle::config::mounts::MountError>()
            || cause.is::<bot_bottle::plan::PlanError>()
            || matches!(
                cause.downcast_ref::<bot_bottle::state::alias::AliasError>(),
                Some(bot_bottle::state::alias::AliasError::BadPool { .. })
            )
    })
}

/// Print the chain of causes once, one numbered line each. Never panics: after a hangup the
/// terminal answers with EIO, and the exit code must still say what happened.
fn report(err: &anyhow::Error) {
    use std::io::Write as _;
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "bot-bottle: error: {err}");
    for (i, cause) in err.chain().skip(1).enumerate() {
        let _ = writeln!(stderr, "  {}: {cause}", i + 1);
    }
}

fn main() -> ExitCode {
    let cli = commands::Cli::parse();
    bot_bottle::host::logging::init(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("bot-bottle: error: cannot start the async runtime: {err}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = runtime.block_on(commands::run(cli));
    // Do not wait for background tasks (attached streams) past the command's end.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(EXIT_FAILURE)),
        Err(err) => {
            report(&err);
            ExitCode::from(if is_bad_input(&err) {
                EXIT_BAD_INPUT
            } else {
                EXIT_FAILURE
            })
        }
    }
}
