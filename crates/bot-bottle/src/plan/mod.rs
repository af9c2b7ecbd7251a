//! Planning: a pure function from a manifest and facts about the host to every name, address,
//! port and environment variable a bottle will use. No I/O happens here; `bot-bottle plan`
//! prints the result without touching anything.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::manifest::{Backend, Manifest};

/// Egress proxy port inside the bundle, published on the bottle's alias.
pub const PROXY_PORT: u16 = 3128;
/// Git gate port: git's smart HTTP protocol, relayed by the bundle to the host (`bundle::gate`).
pub const GIT_GATE_PORT: u16 = 9418;
/// Supervisor port (placeholder service until the supervisor lands).
pub const SUPERVISOR_PORT: u16 = 7070;

/// Label every Docker object we create carries.
pub const LABEL_MANAGED: &str = "bot-bottle.managed";
/// Label carrying the bottle id.
pub const LABEL_ID: &str = "bot-bottle.id";
/// Label carrying the bottle (manifest) name.
pub const LABEL_BOTTLE: &str = "bot-bottle.bottle";
/// Label carrying the published alias address on the bundle container.
pub const LABEL_ALIAS: &str = "bot-bottle.alias";
/// Label naming the state directory that owns the object, so `cleanup` of one user (or one
/// test) never removes another's bottles on a shared Docker engine.
pub const LABEL_STATE: &str = "bot-bottle.state";

/// vsock CIDs the guest can never have: hypervisor (0), local (1), host (2), any (u32::MAX).
pub const RESERVED_CIDS: [u32; 4] = [0, 1, 2, u32::MAX];

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("mount {host}: the guest path `{guest}` is not absolute: write it as /path")]
    GuestPathNotAbsolute { host: PathBuf, guest: PathBuf },
    #[error(
        "two mounts use the guest path {guest}: give each mount its own guest path (HOST:GUEST)"
    )]
    DuplicateGuestPath { guest: PathBuf },
    #[error(
        "{count} mounts without a guest path: only a single mount defaults to /workspace, \
         give the others a guest path (HOST:GUEST)"
    )]
    AmbiguousDefaultGuest { count: usize },
    #[error("mount guest path {guest} would hide a system directory: choose a path such as /workspace/NAME")]
    GuestPathReserved { guest: PathBuf },
    #[error("the loopback alias {alias} is not in 127.0.0.0/8")]
    AliasNotLoopback { alias: Ipv4Addr },
}

/// Facts about the host and this run that the plan depends on. Gathered by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// Unique id of this bottle run (`<name>-<hex>`).
    pub bottle_id: String,
    /// The loopback alias allocated (or proposed) for this bottle.
    pub alias: Ipv4Addr,
    /// The guest vsock CID allocated (or proposed).
    pub guest_cid: u32,
    /// The backend chosen (CLI flag, else manifest, else host default).
    pub backend: Backend,
    /// Host mounts, already checked to exist (see [`crate::config::mounts`]).
    pub mounts: Vec<HostMount>,
    /// Whether Docker has gVisor's `runsc` runtime registered (docker backend only).
    pub runsc: bool,
    /// Identity of the state directory (see [`LABEL_STATE`]).
    pub state_tag: String,
}

/// A mount whose host side has been checked: absolute, existing directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostMount {
    pub host: PathBuf,
    pub guest: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BottlePlan {
    pub id: String,
    pub bottle: String,
    pub backend: Backend,
    pub alias: Ipv4Addr,
    pub guest_cid: u32,
    pub labels: BTreeMap<String, String>,
    pub network: NetworkPlan,
    pub bundle: BundlePlan,
    pub agent: AgentPlan,
    pub egress: EgressPlan,
    /// The machine's allowlist: what the guest may reach. One /32 (the alias), these ports.
    pub allowlist: Vec<AllowEntry>,
    pub mounts: Vec<MountPlan>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPlan {
    /// Bridge network the bundle uses to reach the outside and publish its ports.
    pub egress: String,
    /// Docker backend only: internal network (no route out) shared by agent and bundle.
    pub internal: Option<InternalNetwork>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InternalNetwork {
    pub name: String,
    pub subnet: String,
    pub bundle_ip: Ipv4Addr,
    pub agent_ip: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundlePlan {
    pub container: String,
    pub image_repo: String,
    pub ports: Vec<PortPlan>,
    /// Extra /etc/hosts entries for the bundle (`host` -> address or `host-gateway`).
    pub hosts: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortPlan {
    pub service: String,
    pub container_port: u16,
    pub host_ip: Ipv4Addr,
    pub host_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentPlan {
    /// Docker backend: the container name. microVM backend: the machine name.
    pub name: String,
    pub image_repo: String,
    pub dockerfile: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub user: String,
    pub workdir: String,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// Docker backend: the agent container's pids limit.
    pub pids: u32,
    /// Docker backend: the OCI runtime (`runsc` when registered).
    pub runtime: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressPlan {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    pub deny_message: String,
    /// Hosts that get credentials injected (names only: values never enter the plan).
    pub credential_hosts: Vec<String>,
    /// Exceptions to the proxy's address floor (`[egress] allow_private`).
    #[serde(default)]
    pub allow_private: Vec<String>,
    /// `[egress] allow` tables with `methods` or `paths` (their hosts are in `allow` too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_rules: Vec<crate::bundle::egress::RequestRuleSpec>,
    /// `[egress] unknown = "ask"`: seconds a request to an unlisted host waits for approval;
    /// none: refused at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_hold_secs: Option<u64>,
    /// `[egress] secrets`: what a request the proxy sees carrying a secret gets.
    #[serde(default)]
    pub secrets: crate::bundle::egress::SecretMode,
    /// `secrets = "ask"`: seconds such a request waits for approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_hold_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AllowEntry {
    /// Always a /32 today: `127.0.0.N/32`.
    pub cidr: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountPlan {
    pub host: PathBuf,
    pub guest: PathBuf,
}

/// Guest paths a workspace mount may not cover.
const RESERVED_GUEST_PATHS: &[&str] = &[
    "/", "/bin", "/sbin", "/lib", "/lib64", "/usr", "/etc", "/proc", "/sys", "/dev", "/run",
    "/tmp", "/var", "/boot",
];
const DEFAULT_GUEST_MOUNT: &str = "/workspace";

/// The microVM's machine name (its state row, and the plan's agent name): known before the
/// plan, since the machine row (with the guest's CID) is made first.
pub fn machine_name(bottle_id: &str) -> String {
    format!("bot-bottle-{bottle_id}-vm")
}

/// Derive the guest CID for a bottle id; `attempt` re-derives after a collision.
/// Never returns a reserved CID.
pub fn derive_cid(bottle_id: &str, attempt: u32) -> u32 {
    // FNV-1a: stable across releases and platforms (unlike std's hasher).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bottle_id.bytes().chain(attempt.to_le_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Fold to 32 bits, then keep clear of the reserved low values and u32::MAX.
    let folded = (hash as u32) ^ ((hash >> 32) as u32);
    3 + folded % (u32::MAX - 4)
}

/// The Docker backend's internal subnet for an alias: 198.18.N.0/24 (RFC 2544 benchmarking
/// space, which real networks do not use), N being the alias's last octet.
fn internal_network(id: &str, alias: Ipv4Addr) -> InternalNetwork {
    let n = alias.octets()[3];
    InternalNetwork {
        name: format!("bot-bottle-{id}-internal"),
        subnet: format!("198.18.{n}.0/24"),
        bundle_ip: Ipv4Addr::new(198, 18, n, 2),
        agent_ip: Ipv4Addr::new(198, 18, n, 3),
    }
}

fn resolve_mount_guests(mounts: &[HostMount]) -> Result<Vec<MountPlan>, PlanError> {
    let defaulted = mounts.iter().filter(|m| m.guest.is_none()).count();
    if defaulted > 1 {
        return Err(PlanError::AmbiguousDefaultGuest { count: defaulted });
    }
    let mut out: Vec<MountPlan> = Vec::with_capacity(mounts.len());
    for m in mounts {
        let guest = m
            .guest
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_GUEST_MOUNT));
        if !guest.is_absolute() {
            return Err(PlanError::GuestPathNotAbsolute {
                host: m.host.clone(),
                guest,
            });
        }
        let normal: PathBuf = guest.components().collect();
        if RESERVED_GUEST_PATHS.iter().any(|r| Path::new(r) == normal) {
            return Err(PlanError::GuestPathReserved { guest: normal });
        }
        if out.iter().any(|p| p.guest == normal) {
            return Err(PlanError::DuplicateGuestPath { guest: normal });
        }
        out.push(MountPlan {
            host: m.host.clone(),
            guest: normal,
        });
    }
    Ok(out)
}

/// Build the plan. Pure: same inputs, same plan.
pub fn plan(manifest: &Manifest, host: &HostFacts) -> Result<BottlePlan, PlanError> {
    if host.alias.octets()[0] != 127 {
        return Err(PlanError::AliasNotLoopback { alias: host.alias });
    }
    let id = host.bottle_id.clone();
    let alias = host.alias;
    let labels: BTreeMap<String, String> = [
        (LABEL_MANAGED, "true".to_owned()),
        (LABEL_ID, id.clone()),
        (LABEL_BOTTLE, manifest.name.clone()),
        (LABEL_ALIAS, alias.to_string()),
        (LABEL_STATE, host.state_tag.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();

    let ports: Vec<PortPlan> = [
        ("egress-proxy", PROXY_PORT),
        ("git-gate", GIT_GATE_PORT),
        ("supervisor", SUPERVISOR_PORT),
    ]
    .into_iter()
    .map(|(service, port)| PortPlan {
        service: service.to_owned(),
        container_port: port,
        host_ip: alias,
        host_port: port,
    })
    .collect();

    let internal = match host.backend {
        Backend::Docker => Some(internal_network(&id, alias)),
        Backend::Microvm => None,
    };
    // Where the agent reaches the bundle: the alias in the microVM (loopback inside the guest
    // too, forwarded over vsock); the bundle's fixed address on the internal network in Docker.
    let bundle_addr = internal.as_ref().map_or(alias, |n| n.bundle_ip);
    let proxy_url = format!("http://{bundle_addr}:{PROXY_PORT}");
    let mut env = manifest.agent.env.clone();
    for key in ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"] {
        env.insert(key.to_owned(), proxy_url.clone());
    }
    let no_proxy = format!("localhost,127.0.0.1,{bundle_addr}");
    env.insert("NO_PROXY".to_owned(), no_proxy.clone());
    env.insert("no_proxy".to_owned(), no_proxy);
    env.insert(
        "BOT_BOTTLE_SUPERVISOR_URL".to_owned(),
        format!("http://{bundle_addr}:{SUPERVISOR_PORT}"),
    );
    env.insert("BOT_BOTTLE_ID".to_owned(), id.clone());
    if manifest.git.enabled {
        // The gate as the agent's `bottle` remote, and every directory trusted by git whatever
        // its owner (a workspace snapshot keeps the host's owners): command-line scope, which
        // the agent's own configuration cannot lower.
        let gate = format!(
            "http://{bundle_addr}:{GIT_GATE_PORT}/{}",
            crate::bundle::gate::REPO_NAME
        );
        // GIT_CONFIG_PARAMETERS is what `git -c` sets: one variable (the guest's command line
        // has little room), command-line scope.
        env.insert(
            "GIT_CONFIG_PARAMETERS".to_owned(),
            format!("'remote.bottle.url'='{gate}' 'safe.directory'='*'"),
        );
    }
    // Credential hosts are intercepted by the proxy: Node-based agents trust the bottle's CA,
    // installed at this path before the agent starts.
    if !manifest.credentials.is_empty() {
        env.insert(
            "NODE_EXTRA_CA_CERTS".to_owned(),
            bottle_proto::config::CA_CERT_PATH.to_owned(),
        );
    }

    let allowlist = ports
        .iter()
        .map(|p| AllowEntry {
            cidr: format!("{alias}/32"),
            port: p.host_port,
        })
        .collect();

    let mounts = resolve_mount_guests(&host.mounts)?;
    let agent_name = match host.backend {
        Backend::Docker => format!("bot-bottle-{id}-agent"),
        Backend::Microvm => machine_name(&id),
    };
    Ok(BottlePlan {
        id: id.clone(),
        bottle: manifest.name.clone(),
        backend: host.backend,
        alias,
        guest_cid: host.guest_cid,
        labels,
        network: NetworkPlan {
            egress: format!("bot-bottle-{id}-egress"),
            internal,
        },
        bundle: BundlePlan {
            container: format!("bot-bottle-{id}-bundle"),
            image_repo: "bot-bottle-sidecar".to_owned(),
            ports,
            hosts: manifest.egress.hosts.clone(),
        },
        agent: AgentPlan {
            name: agent_name,
            image_repo: format!("bot-bottle-agent-{}", manifest.name),
            dockerfile: manifest.agent.dockerfile.clone(),
            command: manifest.agent.command.clone(),
            env,
            user: manifest.agent.user.clone(),
            workdir: manifest.agent.workdir.clone(),
            vcpus: manifest.resources.vcpus,
            memory_mib: manifest.resources.memory_mib,
            pids: manifest.resources.pids,
            runtime: (host.backend == Backend::Docker && host.runsc).then(|| "runsc".to_owned()),
        },
        egress: EgressPlan {
            allow: manifest.egress.allow.clone(),
            deny: manifest.egress.deny.clone(),
            deny_message: manifest.egress.deny_message.clone(),
            credential_hosts: manifest.credentials.keys().cloned().collect(),
            allow_private: manifest.egress.allow_private.clone(),
            request_rules: manifest.egress.request_rules.clone(),
            approval_hold_secs: (manifest.egress.unknown == crate::config::manifest::Unknown::Ask)
                .then_some(manifest.egress.ask_hold_secs),
            secrets: manifest.egress.secrets,
            secret_hold_secs: (manifest.egress.secrets == crate::bundle::egress::SecretMode::Ask)
                .then_some(manifest.egress.ask_hold_secs),
        },
        allowlist,
        mounts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::manifest::ManifestSource;

    fn manifest(name: &str) -> Manifest {
        ManifestSource::new(PathBuf::from("/nonexistent"))
            .load(name)
            .unwrap()
    }

    fn facts(backend: Backend) -> HostFacts {
        HostFacts {
            bottle_id: "claude-0a1b2c".to_owned(),
            alias: Ipv4Addr::new(127, 0, 0, 17),
            guest_cid: derive_cid("claude-0a1b2c", 0),
            backend,
            mounts: vec![],
            runsc: false,
            state_tag: "0123abcd".to_owned(),
        }
    }

    #[test]
    fn plan_names_every_docker_object_after_the_bottle_id() {
        let p = plan(&manifest("claude"), &facts(Backend::Docker)).unwrap();
        assert_eq!(p.network.egress, "bot-bottle-claude-0a1b2c-egress");
        assert_eq!(
            p.network.internal.as_ref().unwrap().name,
            "bot-bottle-claude-0a1b2c-internal"
        );
        assert_eq!(p.bundle.container, "bot-bottle-claude-0a1b2c-bundle");
        assert_eq!(p.agent.name, "bot-bottle-claude-0a1b2c-agent");
        assert_eq!(p.agent.image_repo, "bot-bottle-agent-claude");
    }

    #[test]
    fn plan_gives_the_agent_the_gate_as_its_bottle_remote_where_it_reaches_the_bundle() {
        let docker = plan(&manifest("claude"), &facts(Backend::Docker)).unwrap();
        let key = |p: &BottlePlan, k: &str| {
            let params = &p.agent.env["GIT_CONFIG_PARAMETERS"];
            let prefix = format!("'{k}'='");
            params.split(" '").find_map(|kv| {
                let kv = if kv.starts_with('\'') {
                    kv.to_owned()
                } else {
                    format!("'{kv}")
                };
                kv.strip_prefix(&prefix)
                    .map(|v| v.trim_end_matches('\'').to_owned())
            })
        };
        assert_eq!(
            key(&docker, "remote.bottle.url").as_deref(),
            Some("http://198.18.17.2:9418/workspace.git")
        );
        let vm = plan(&manifest("claude"), &facts(Backend::Microvm)).unwrap();
        assert_eq!(
            key(&vm, "remote.bottle.url").as_deref(),
            Some("http://127.0.0.17:9418/workspace.git")
        );
        assert_eq!(key(&vm, "safe.directory").as_deref(), Some("*"));
        // The gate is reached directly, never through the egress proxy.
        assert!(docker.agent.env["NO_PROXY"].contains("198.18.17.2"));
        let mut off = manifest("claude");
        off.git.enabled = false;
        let p = plan(&off, &facts(Backend::Docker)).unwrap();
        assert!(!p.agent.env.contains_key("GIT_CONFIG_PARAMETERS"));
    }

    #[test]
    fn plan_labels_carry_managed_id_bottle_and_alias() {
        let p = plan(&manifest("claude"), &facts(Backend::Microvm)).unwrap();
        assert_eq!(p.labels[LABEL_MANAGED], "true");
        assert_eq!(p.labels[LABEL_ID], "claude-0a1b2c");
        assert_eq!(p.labels[LABEL_BOTTLE], "claude");
        assert_eq!(p.labels[LABEL_ALIAS], "127.0.0.17");
        assert_eq!(p.labels[LABEL_STATE], "0123abcd");
    }

    #[test]
    fn microvm_agent_env_points_the_proxy_at_the_alias() {
        let p = plan(&manifest("claude"), &facts(Backend::Microvm)).unwrap();
        assert_eq!(p.agent.env["HTTPS_PROXY"], "http://127.0.0.17:3128");
        assert_eq!(p.agent.env["http_proxy"], "http://127.0.0.17:3128");
        assert!(p.agent.env["NO_PROXY"]
            .split(',')
            .any(|h| h == "127.0.0.17"));
        assert_eq!(p.agent.name, "bot-bottle-claude-0a1b2c-vm");
        assert!(p.network.internal.is_none());
    }

    #[test]
    fn docker_agent_env_points_the_proxy_at_the_bundle_on_the_internal_network() {
        let p = plan(&manifest("claude"), &facts(Backend::Docker)).unwrap();
        let net = p.network.internal.as_ref().unwrap();
        assert_eq!(net.subnet, "198.18.17.0/24");
        assert_eq!(net.bundle_ip, Ipv4Addr::new(198, 18, 17, 2));
        assert_eq!(p.agent.env["HTTPS_PROXY"], "http://198.18.17.2:3128");
        assert!(p.agent.env["NO_PROXY"].contains("198.18.17.2"));
    }

    #[test]
    fn ports_are_published_only_on_the_alias() {
        let p = plan(&manifest("claude"), &facts(Backend::Microvm)).unwrap();
        assert_eq!(p.bundle.ports.len(), 3);
        assert!(p
            .bundle
            .ports
            .iter()
            .all(|port| port.host_ip == Ipv4Addr::new(127, 0, 0, 17)));
        assert_eq!(p.bundle.ports[0].host_port, PROXY_PORT);
    }

    #[test]
    fn allowlist_is_the_alias_slash_32_with_the_published_ports() {
        let p = plan(&manifest("claude"), &facts(Backend::Microvm)).unwrap();
        let cidrs: Vec<&str> = p.allowlist.iter().map(|a| a.cidr.as_str()).collect();
        assert_eq!(cidrs, vec!["127.0.0.17/32"; 3]);
        let ports: Vec<u16> = p.allowlist.iter().map(|a| a.port).collect();
        assert_eq!(ports, vec![PROXY_PORT, GIT_GATE_PORT, SUPERVISOR_PORT]);
    }

    #[test]
    fn manifest_env_is_kept_and_proxy_env_overrides_it() {
        let mut m = manifest("test");
        m.agent.env.insert("FOO".into(), "bar".into());
        m.agent
            .env
            .insert("HTTPS_PROXY".into(), "http://evil:1".into());
        let p = plan(&m, &facts(Backend::Microvm)).unwrap();
        assert_eq!(p.agent.env["FOO"], "bar");
        assert_eq!(p.agent.env["HTTPS_PROXY"], "http://127.0.0.17:3128");
    }

    #[test]
    fn credential_values_never_enter_the_plan() {
        let p = plan(&manifest("claude"), &facts(Backend::Microvm)).unwrap();
        assert_eq!(p.egress.credential_hosts, vec!["api.anthropic.com"]);
        let json = serde_json::to_string(&p).unwrap();
        assert!(!json.contains("BOT_BOTTLE_CLAUDE_OAUTH_TOKEN"));
    }

    #[test]
    fn only_an_agent_with_credentials_is_pointed_at_the_bottle_ca() {
        for backend in [Backend::Docker, Backend::Microvm] {
            let with = plan(&manifest("claude"), &facts(backend)).unwrap();
            let plain = plan(&manifest("test"), &facts(backend)).unwrap();

            assert_eq!(
                with.agent
                    .env
                    .get("NODE_EXTRA_CA_CERTS")
                    .map(String::as_str),
                Some(bottle_proto::config::CA_CERT_PATH)
            );
            assert!(!plain.agent.env.contains_key("NODE_EXTRA_CA_CERTS"));
        }
    }

    #[test]
    fn runsc_is_used_only_for_the_docker_backend_when_registered() {
        let mut f = facts(Backend::Docker);
        f.runsc = true;
        assert_eq!(
            plan(&manifest("test"), &f)
                .unwrap()
                .agent
                .runtime
                .as_deref(),
            Some("runsc")
        );
        f.backend = Backend::Microvm;
        assert_eq!(plan(&manifest("test"), &f).unwrap().agent.runtime, None);
    }

    #[test]
    fn plan_round_trips_through_json_as_stored_in_the_state_db() {
        let p = plan(&manifest("claude"), &facts(Backend::Docker)).unwrap();
        let back: BottlePlan = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn request_rules_ride_in_the_egress_plan_and_a_plan_from_before_them_still_parses() {
        let mut m = manifest("claude");
        m.egress.request_rules = vec![crate::bundle::egress::RequestRuleSpec {
            host: "api.anthropic.com".into(),
            methods: Some(vec!["POST".into()]),
            paths: Some(vec!["/v1/**".into()]),
        }];
        let with = plan(&m, &facts(Backend::Docker)).unwrap();
        let mut old =
            serde_json::to_value(plan(&manifest("claude"), &facts(Backend::Docker)).unwrap())
                .unwrap();
        old["egress"]
            .as_object_mut()
            .unwrap()
            .remove("request_rules");

        let back: BottlePlan =
            serde_json::from_str(&serde_json::to_string(&with).unwrap()).unwrap();
        let old: BottlePlan = serde_json::from_value(old).unwrap();

        assert_eq!(back.egress.request_rules, m.egress.request_rules);
        assert!(old.egress.request_rules.is_empty());
    }

    #[test]
    fn plan_is_deterministic() {
        let f = facts(Backend::Docker);
        assert_eq!(
            plan(&manifest("codex"), &f).unwrap(),
            plan(&manifest("codex"), &f).unwrap()
        );
    }

    #[test]
    fn single_mount_defaults_to_workspace() {
        let mut f = facts(Backend::Microvm);
        f.mounts = vec![HostMount {
            host: "/src/app".into(),
            guest: None,
        }];
        let p = plan(&manifest("test"), &f).unwrap();
        assert_eq!(p.mounts[0].guest, PathBuf::from("/workspace"));
    }

    #[test]
    fn two_mounts_without_guest_paths_are_ambiguous() {
        let mut f = facts(Backend::Microvm);
        f.mounts = vec![
            HostMount {
                host: "/a".into(),
                guest: None,
            },
            HostMount {
                host: "/b".into(),
                guest: None,
            },
        ];
        let err = plan(&manifest("test"), &f).unwrap_err();
        assert!(matches!(err, PlanError::AmbiguousDefaultGuest { count: 2 }));
    }

    #[test]
    fn duplicate_guest_paths_are_rejected_even_when_spelled_differently() {
        let mut f = facts(Backend::Microvm);
        f.mounts = vec![
            HostMount {
                host: "/a".into(),
                guest: Some("/work/x".into()),
            },
            HostMount {
                host: "/b".into(),
                guest: Some("/work//x/".into()),
            },
        ];
        let err = plan(&manifest("test"), &f).unwrap_err();
        assert!(matches!(err, PlanError::DuplicateGuestPath { .. }), "{err}");
    }

    #[test]
    fn relative_guest_path_is_rejected() {
        let mut f = facts(Backend::Microvm);
        f.mounts = vec![HostMount {
            host: "/a".into(),
            guest: Some("work".into()),
        }];
        let err = plan(&manifest("test"), &f).unwrap_err();
        assert!(matches!(err, PlanError::GuestPathNotAbsolute { .. }));
    }

    #[test]
    fn mount_over_a_system_directory_is_rejected() {
        let mut f = facts(Backend::Microvm);
        f.mounts = vec![HostMount {
            host: "/a".into(),
            guest: Some("/etc".into()),
        }];
        let err = plan(&manifest("test"), &f).unwrap_err();
        assert!(matches!(err, PlanError::GuestPathReserved { .. }));
    }

    #[test]
    fn non_loopback_alias_is_rejected() {
        let mut f = facts(Backend::Microvm);
        f.alias = Ipv4Addr::new(10, 0, 0, 1);
        assert!(matches!(
            plan(&manifest("test"), &f).unwrap_err(),
            PlanError::AliasNotLoopback { .. }
        ));
    }

    #[test]
    fn derived_cids_avoid_reserved_values_and_change_per_attempt() {
        for i in 0..10_000u32 {
            let cid = derive_cid(&format!("b-{i}"), i % 3);
            assert!(!RESERVED_CIDS.contains(&cid), "{cid}");
        }
        assert_ne!(derive_cid("x", 0), derive_cid("x", 1));
        assert_eq!(derive_cid("x", 0), derive_cid("x", 0));
    }
}
