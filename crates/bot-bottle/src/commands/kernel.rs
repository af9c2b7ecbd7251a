//! `bot-bottle kernel build [--source DIR]`: build the guest kernel from a Linux source tree.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context as _;
use bot_bottle::image::kernel::{self, KernelBuildOptions};

use super::Context;

#[derive(Debug, clap::Args)]
pub struct KernelArgs {
    #[command(subcommand)]
    command: KernelCommand,
}

#[derive(Debug, clap::Subcommand)]
enum KernelCommand {
    /// Build (or reuse from the cache) the guest kernel.
    Build(BuildArgs),
    /// Print the path of the cached kernel for this bot-bottle, if built.
    Path,
}

#[derive(Debug, clap::Args)]
struct BuildArgs {
    /// Linux source tree or tarball (default: $BOT_BOTTLE_KERNEL_SOURCE, else Debian's
    /// /usr/src/linux-source-6.1.tar.xz).
    #[arg(long)]
    source: Option<PathBuf>,
    /// Parallel make jobs (default: one per CPU).
    #[arg(long, short)]
    jobs: Option<usize>,
    /// Rebuild even when a cached kernel matches.
    #[arg(long)]
    force: bool,
}

pub async fn run(ctx: &Context, args: KernelArgs) -> anyhow::Result<i32> {
    match args.command {
        KernelCommand::Path => {
            match kernel::cached_kernel_in(&kernel::kernel_cache_dir(&ctx.dirs), kernel::FRAGMENT) {
                Some(p) => {
                    println!("{}", p.display());
                    Ok(0)
                }
                None => {
                    eprintln!(
                        "bot-bottle: no guest kernel built yet: run `bot-bottle kernel build`"
                    );
                    Ok(1)
                }
            }
        }
        KernelCommand::Build(b) => {
            let mut opts = KernelBuildOptions::new(&ctx.dirs);
            opts.source = b.source.or(opts.source);
            opts.force = b.force;
            if let Some(j) = b.jobs {
                opts.jobs = j.max(1);
            }
            let tty = std::io::stderr().is_terminal();
            let vmlinux = tokio::task::spawn_blocking(move || {
                kernel::build_kernel(&opts, &mut |p| kernel::show_on_stderr(p, tty))
            })
            .await
            .context("the kernel build thread panicked")??;
            println!("{}", vmlinux.display());
            Ok(0)
        }
    }
}
