//! The CLI as a user meets it: plans, manifest errors, doctor's checks. Real processes.

mod common;

use common::{stderr, stdout, Sandbox};

#[test]
fn plan_claude_json_is_complete() {
    let sb = Sandbox::new("40-41");
    let out = sb.run(&["plan", "claude", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["bottle"], "claude");
    assert_eq!(plan["backend"], "microvm");
    assert_eq!(plan["alias"], "127.0.0.40");
    assert_eq!(
        plan["agent"]["env"]["HTTPS_PROXY"],
        "http://127.0.0.40:3128"
    );
    assert_eq!(plan["allowlist"][0]["cidr"], "127.0.0.40/32");
    // The bundled interactive agent asks about unlisted hosts.
    assert_eq!(plan["egress"]["approval_hold_secs"], 30);
    assert!(plan["guest_cid"].as_u64().unwrap() > 2);
    for key in [
        "network", "bundle", "agent", "egress", "labels", "mounts", "id",
    ] {
        assert!(!plan[key].is_null(), "plan lacks {key}");
    }
    // Nothing was touched: no state database, no Docker objects.
    assert!(!sb.state().join("state.db").exists());
}

#[test]
fn plan_with_mount_resolves_the_default_guest_path() {
    let sb = Sandbox::new("40-41");
    let host = sb.dir.path().join("app");
    std::fs::create_dir(&host).unwrap();
    let out = sb.run(&["plan", "test", "--json", "--mount", host.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["mounts"][0]["guest"], "/workspace");
}

#[test]
fn missing_mount_path_exits_2_naming_it() {
    let sb = Sandbox::new("40-41");
    let out = sb.run(&["plan", "test", "--mount", "/definitely/not/here:/w"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("/definitely/not/here"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn unknown_manifest_key_exits_2_naming_key_and_line() {
    let sb = Sandbox::new("40-41");
    sb.add_bottle(
        "typo",
        "[agent]\ndockerfile = \"Dockerfile.test\"\n\n[egres]\nallow = []\n",
    );
    let out = sb.run(&["plan", "typo"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("egres"), "{err}");
    assert!(err.contains("line 4"), "{err}");
}

#[test]
fn missing_bottle_exits_2_listing_available_bottles() {
    let sb = Sandbox::new("40-41");
    sb.add_bottle("mine", "[agent]\ndockerfile = \"Dockerfile.test\"\n");
    let out = sb.run(&["start", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("claude, codex, mine, test"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn extends_cycle_exits_2_printing_the_cycle() {
    let sb = Sandbox::new("40-41");
    sb.add_bottle("a", "extends = \"b\"\n");
    sb.add_bottle("b", "extends = \"a\"\n");
    let out = sb.run(&["plan", "a"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("a -> b -> a"), "{}", stderr(&out));
}

#[test]
fn doctor_with_missing_kvm_says_which_module_to_load() {
    let sb = Sandbox::new("40-41");
    let out = sb
        .cmd()
        .env("BOT_BOTTLE_KVM_PATH", "/nonexistent/kvm")
        .arg("doctor")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("[FAIL] kvm"), "{text}");
    assert!(text.contains("modprobe kvm_intel"), "{text}");
    assert!(text.contains("firmware"), "{text}");
}

#[test]
fn doctor_reports_every_check_with_its_state_dir() {
    let sb = Sandbox::new("40-41");
    let out = sb.run(&["doctor", "--json"]);
    let checks: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    for n in ["state", "bottles", "alias-pool", "docker", "kvm"] {
        assert!(names.contains(&n), "doctor lacks {n}: {names:?}");
    }
    let state = checks.iter().find(|c| c["name"] == "state").unwrap();
    assert!(state["detail"]
        .as_str()
        .unwrap()
        .contains(sb.state().to_str().unwrap()));
}

#[test]
fn start_microvm_without_kvm_access_refuses_with_the_fix() {
    let sb = Sandbox::new("42-42");
    let out = sb
        .cmd()
        .env("BOT_BOTTLE_KVM_PATH", "/nonexistent/kvm")
        .args(["start", "test", "--backend", "microvm", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("modprobe"), "{}", stderr(&out));
    assert!(sb.rows().is_empty());
}

#[test]
fn plan_shows_the_method_and_path_rules() {
    let sb = Sandbox::new("40-41");
    sb.add_bottle(
        "ruled",
        "extends = \"test\"\n\
[egress]\n\
allow = [{ host = \"api.test:*\", methods = [\"GET\"], paths = [\"/me/app/read/**\"] }]\n\
[credentials.\"api.test\"]\n\
env = \"BB_TEST_TOKEN\"\n",
    );
    let out = sb.run(&["plan", "ruled"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(
        text.contains("rule  api.test:*  methods GET  paths /me/app/read/**\n"),
        "{text}"
    );
}

#[test]
fn plan_says_what_an_unlisted_host_gets_and_bad_ask_settings_are_named() {
    let sb = Sandbox::new("40-41");
    sb.add_bottle(
        "asks",
        "extends = \"test\"\n[egress]\nunknown = \"ask\"\nask_hold_secs = 45\n",
    );
    sb.add_bottle(
        "maybe",
        "extends = \"test\"\n[egress]\nunknown = \"maybe\"\n",
    );
    sb.add_bottle(
        "never",
        "extends = \"test\"\n[egress]\nunknown = \"ask\"\nask_hold_secs = 0\n",
    );

    let asks = sb.run(&["plan", "asks"]);
    let denies = sb.run(&["plan", "test"]);
    let maybe = sb.run(&["plan", "maybe"]);
    let never = sb.run(&["plan", "never"]);

    assert!(
        stdout(&asks).contains("other hosts: held 45 s for approval (`bot-bottle approvals`)"),
        "{}",
        stdout(&asks)
    );
    assert!(
        stdout(&denies).contains("other hosts: 403"),
        "{}",
        stdout(&denies)
    );
    assert_eq!(maybe.status.code(), Some(2));
    assert!(stderr(&maybe).contains("unknown"), "{}", stderr(&maybe));
    assert!(stderr(&maybe).contains("maybe"), "{}", stderr(&maybe));
    assert!(
        stderr(&never).contains("ask_hold_secs = 0"),
        "{}",
        stderr(&never)
    );
}

#[test]
fn bad_alias_pool_setting_exits_2() {
    let sb = Sandbox::new("31-16");
    let out = sb.run(&["plan", "test"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("BOT_BOTTLE_ALIAS_POOL"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn kernel_build_from_a_missing_source_names_it() {
    let sb = Sandbox::new("40-41");
    let out = sb.run(&["kernel", "build", "--source", "/nonexistent/linux-src"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("/nonexistent/linux-src"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn doctor_reports_the_missing_guest_kernel_with_the_build_command() {
    let sb = Sandbox::new("40-41");
    let out = sb.run(&["doctor", "--json"]);
    let checks: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let kernel = checks.iter().find(|c| c["name"] == "kernel").unwrap();
    assert_eq!(kernel["status"], "warn");
    assert!(kernel["fix"]
        .as_str()
        .unwrap()
        .contains("bot-bottle kernel build"));
}

#[test]
fn bot_bottle_backend_chooses_the_backend_unless_the_flag_does_and_a_bad_value_is_named() {
    let sb = Sandbox::new("40-41");
    let plan_backend = |env: &str, extra: &[&str]| {
        let out = sb
            .cmd()
            .env("BOT_BOTTLE_BACKEND", env)
            .args(["plan", "claude", "--json"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        plan["backend"].as_str().unwrap().to_owned()
    };
    // The claude manifest names no backend: microvm by default.
    assert_eq!(plan_backend("", &[]), "microvm");
    // The variable wins over a manifest's `backend` (test's is docker).
    let out = sb
        .cmd()
        .env("BOT_BOTTLE_BACKEND", "microvm")
        .args(["plan", "test", "--json"])
        .output()
        .unwrap();
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["backend"], "microvm", "{}", stderr(&out));
    assert_eq!(plan_backend("docker", &[]), "docker");
    assert_eq!(plan_backend("docker", &["--backend", "microvm"]), "microvm");

    let out = sb
        .cmd()
        .env("BOT_BOTTLE_BACKEND", "vm")
        .args(["start", "claude"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("BOT_BOTTLE_BACKEND=\"vm\" is not a backend"),
        "{}",
        stderr(&out)
    );
    assert!(sb.rows().is_empty());
}

#[test]
fn kernel_build_takes_its_source_from_the_environment_unless_given_one() {
    let sb = Sandbox::new("40-41");
    let build = |extra: &[&str]| {
        sb.cmd()
            .env("BOT_BOTTLE_KERNEL_SOURCE", "/nonexistent/from-env")
            .args(["kernel", "build"])
            .args(extra)
            .output()
            .unwrap()
    };
    let from_env = build(&[]);
    let from_flag = build(&["--source", "/nonexistent/from-flag"]);
    assert_eq!(from_env.status.code(), Some(1));
    assert!(
        stderr(&from_env).contains("/nonexistent/from-env"),
        "{}",
        stderr(&from_env)
    );
    assert!(
        stderr(&from_flag).contains("/nonexistent/from-flag"),
        "{}",
        stderr(&from_flag)
    );
}

#[test]
fn logs_show_a_rotated_logs_older_part_first() {
    let sb = Sandbox::new("40-41");
    let dir = sb.state().join("bottles").join("test-a1b2c3");
    std::fs::create_dir_all(&dir).unwrap();
    let event = |host: &str, second: u32| {
        format!(
            "{{\"time\":\"2026-11-23T14:00:{second:02}.000Z\",\"time_unix_ms\":0,\"bottle_id\":\"test-a1b2c3\",\"client\":\"c\",\"method\":\"CONNECT\",\"host\":\"{host}\",\"port\":443,\"verdict\":\"deny\",\"rule\":null,\"reason\":\"not_allowed\",\"detail\":null}}\n"
        )
    };
    std::fs::write(dir.join("egress.jsonl.1"), event("older.test", 1)).unwrap();
    std::fs::write(dir.join("egress.jsonl"), event("newer.test", 2)).unwrap();

    let out = sb.run(&["logs", "test"]);

    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "14:00:01.000  deny   CONNECT  older.test:443  not_allowed\n\
         14:00:02.000  deny   CONNECT  newer.test:443  not_allowed\n"
    );
}

#[test]
fn plan_says_what_a_request_carrying_a_secret_gets_and_a_bad_mode_is_named() {
    let sb = Sandbox::new("40-41");
    sb.add_bottle(
        "redacts",
        "extends = \"test\"\n[egress]\nsecrets = \"redact\"\n",
    );
    sb.add_bottle(
        "asks",
        "extends = \"test\"\n[egress]\nsecrets = \"ask\"\nask_hold_secs = 20\n",
    );
    sb.add_bottle(
        "hides",
        "extends = \"test\"\n[egress]\nsecrets = \"hide\"\n",
    );

    let default = sb.run(&["plan", "test"]);
    let redacts = sb.run(&["plan", "redacts"]);
    let asks = sb.run(&["plan", "asks", "--json"]);
    let hides = sb.run(&["plan", "hides"]);

    assert!(
        stdout(&default)
            .contains("secrets: block — a request the proxy sees carrying one is refused (403)"),
        "{}",
        stdout(&default)
    );
    assert!(
        stdout(&redacts).contains("sent with each secret overwritten by *"),
        "{}",
        stdout(&redacts)
    );
    let plan: serde_json::Value = serde_json::from_slice(&asks.stdout).unwrap();
    assert_eq!(plan["egress"]["secrets"], "ask");
    assert_eq!(plan["egress"]["secret_hold_secs"], 20);
    // Unlisted hosts are still refused at once: only flagged requests ask.
    assert!(plan["egress"].get("approval_hold_secs").is_none(), "{plan}");
    assert_eq!(hides.status.code(), Some(2));
    for word in ["secrets", "hide", "block", "redact"] {
        assert!(stderr(&hides).contains(word), "{word}: {}", stderr(&hides));
    }
}
