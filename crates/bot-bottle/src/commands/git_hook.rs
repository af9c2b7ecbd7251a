//! `bot-bottle __git-hook pre-receive|post-receive` (hidden): the git gate's hooks, run by
//! git's `receive-pack` on the host for a push to a bottle's gate ([`bot_bottle::bundle::gate`]).

use std::io::Read as _;

use anyhow::Context as _;
use bot_bottle::bundle::gate::policy::{self, GatePolicy, PolicyError, POLICY_ENV};

#[derive(Debug, clap::Args)]
pub struct GitHookArgs {
    /// Which hook git runs.
    #[arg(value_parser = ["pre-receive", "post-receive"])]
    hook: String,
}

pub async fn run(args: GitHookArgs) -> anyhow::Result<i32> {
    let path = std::env::var_os(POLICY_ENV).ok_or(PolicyError::NoPolicy)?;
    let policy = GatePolicy::read(std::path::Path::new(&path))?;
    let mut stdin = String::new();
    std::io::stdin()
        .read_to_string(&mut stdin)
        .context("reading the ref updates from git")?;
    let code = tokio::task::spawn_blocking(move || match args.hook.as_str() {
        "pre-receive" => policy::pre_receive(&policy, &stdin, &mut std::io::stderr()),
        _ => policy::post_receive(&policy, &stdin),
    })
    .await??;
    Ok(code)
}
