//! `bot-bottle doctor`: every preflight check, each with its fix.

use bot_bottle::host::preflight::{self, Check, Status};

use super::Context;

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Print the checks as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(ctx: &Context, args: DoctorArgs) -> anyhow::Result<i32> {
    let mut checks: Vec<Check> = vec![
        preflight::check_state_dir(&ctx.dirs),
        preflight::check_bottles_dir(&ctx.dirs),
        preflight::check_alias_pool(),
    ];
    let (docker, runsc) = preflight::check_docker().await;
    checks.push(docker);
    checks.extend(runsc);
    checks.push(preflight::check_kvm());
    checks.extend(preflight::check_linux_guest());
    checks.push(preflight::check_kernel(&ctx.dirs));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            let mark = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            println!("[{mark}] {:<11} {}", c.name, c.detail);
            if !c.fix.is_empty() {
                println!("       {:<11} fix: {}", "", c.fix);
            }
        }
    }
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    Ok(i32::from(failed))
}
