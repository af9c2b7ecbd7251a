//! `bot-bottle plan`: the resolved plan of a bottle, touching nothing.

use bot_bottle::config::manifest::Backend;
use bot_bottle::plan::{self, derive_cid, HostFacts};

use super::Context;

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// Bottle name (bundled, or a file in ~/.config/bot-bottle/bottles/).
    bottle: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Backend to plan for (default: $BOT_BOTTLE_BACKEND, else the manifest's, else microvm).
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// Host directory to mount, HOST[:GUEST] (repeatable).
    #[arg(long = "mount", value_name = "HOST[:GUEST]")]
    mounts: Vec<String>,
}

pub async fn run(ctx: &Context, args: PlanArgs) -> anyhow::Result<i32> {
    let resolved = super::resolve(ctx, &args.bottle, args.backend, &args.mounts)?;
    // The address `start` would take now, read without locking or writing anything. Docker
    // is consulted when reachable; a plan is still printed when it is not.
    let pool = bot_bottle::state::alias::pool_from_env()?;
    let (published, runsc) = match bot_bottle::host::docker::connect().await {
        Ok(d) => (
            bot_bottle::host::docker::published_aliases(&d)
                .await
                .unwrap_or_default(),
            bot_bottle::host::docker::runsc_registered(&d)
                .await
                .unwrap_or(false),
        ),
        Err(_) => (Vec::new(), false),
    };
    let alias = bot_bottle::state::alias::peek(&ctx.dirs.db_path(), &pool, &published)?;
    let id = format!("{}-xxxxxx", resolved.manifest.name);
    let facts = HostFacts {
        guest_cid: derive_cid(&id, 0),
        bottle_id: id,
        alias,
        backend: resolved.backend,
        mounts: resolved.mounts,
        runsc,
        state_tag: ctx.dirs.state_tag(),
    };
    let p = plan::plan(&resolved.manifest, &facts)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        print_human(&p);
    }
    Ok(0)
}

fn print_human(p: &plan::BottlePlan) {
    println!(
        "bottle      {} (id {}, backend {})",
        p.bottle, p.id, p.backend
    );
    println!("alias       {}   guest CID {}", p.alias, p.guest_cid);
    println!("network     {}", p.network.egress);
    if let Some(n) = &p.network.internal {
        println!(
            "internal    {} {} (bundle {}, agent {})",
            n.name, n.subnet, n.bundle_ip, n.agent_ip
        );
    }
    println!("bundle      {}", p.bundle.container);
    for port in &p.bundle.ports {
        println!(
            "  port      {}:{} -> {} ({})",
            port.host_ip, port.host_port, port.container_port, port.service
        );
    }
    println!("agent       {} ({})", p.agent.name, p.agent.dockerfile);
    println!("  command   {}", p.agent.command.join(" "));
    println!("  user      {}   workdir {}", p.agent.user, p.agent.workdir);
    println!(
        "  resources {} vCPU, {} MiB",
        p.agent.vcpus, p.agent.memory_mib
    );
    for (k, v) in &p.agent.env {
        println!("  env       {k}={v}");
    }
    println!("egress      allow {}", p.egress.allow.join(", "));
    for rule in &p.egress.request_rules {
        let list = |v: &Option<Vec<String>>| v.as_ref().map_or("*".to_owned(), |v| v.join(","));
        println!(
            "            rule  {}  methods {}  paths {}",
            rule.host,
            list(&rule.methods),
            list(&rule.paths)
        );
    }
    if !p.egress.deny.is_empty() {
        println!("            deny  {}", p.egress.deny.join(", "));
    }
    match p.egress.approval_hold_secs {
        Some(secs) => println!(
            "            other hosts: held {secs} s for approval (`bot-bottle approvals`), then 403"
        ),
        None => println!("            other hosts: 403 (`[egress] unknown = \"deny\"`)"),
    }
    use bot_bottle::bundle::egress::SecretMode;
    let secrets = match (p.egress.secrets, p.egress.secret_hold_secs) {
        (SecretMode::Block, _) => "refused (403)".to_owned(),
        (SecretMode::Ask, Some(secs)) => {
            format!("held {secs} s for approval (`bot-bottle approvals`), then 403")
        }
        (SecretMode::Ask, None) => "refused (403)".to_owned(),
        (SecretMode::Redact, _) => "sent with each secret overwritten by *".to_owned(),
        (SecretMode::Log, _) => "sent, and logged".to_owned(),
        (SecretMode::Off, _) => "not scanned".to_owned(),
    };
    println!(
        "            secrets: {} — a request the proxy sees carrying one is {secrets}",
        p.egress.secrets.as_str()
    );
    for a in &p.allowlist {
        println!("allowlist   {}:{}", a.cidr, a.port);
    }
    for m in &p.mounts {
        println!("mount       {} -> {}", m.host.display(), m.guest.display());
    }
}
