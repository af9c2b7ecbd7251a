//! Bottle manifests: TOML files describing one bottle (agent, egress, credentials, mounts,
//! resources). Bundled bottles are compiled in; the user's own live in
//! `$XDG_CONFIG_HOME/bot-bottle/bottles/` and shadow bundled ones of the same name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Bottles shipped inside the binary: (name, TOML source).
pub const BUNDLED: &[(&str, &str)] = &[
    ("claude", include_str!("../../../../bottles/claude.toml")),
    ("codex", include_str!("../../../../bottles/codex.toml")),
    ("test", include_str!("../../../../bottles/test.toml")),
];

/// Longest `extends` chain we follow before calling it a mistake.
const MAX_EXTENDS_DEPTH: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(
        "no bottle named `{name}`; available bottles: {}. Add your own as {}/{name}.toml",
        available.join(", "),
        user_dir.display()
    )]
    NotFound {
        name: String,
        available: Vec<String>,
        user_dir: PathBuf,
    },
    #[error("invalid bottle manifest {origin}:\n{message}")]
    Parse { origin: String, message: String },
    #[error("{BACKEND_ENV}={value:?} is not a backend: set it to microvm or docker, or unset it")]
    BackendEnv { value: String },
    #[error("cannot read bottle manifest {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bottle `extends` forms a cycle: {}", chain.join(" -> "))]
    ExtendsCycle { chain: Vec<String> },
    #[error("bottle `extends` chain is longer than {MAX_EXTENDS_DEPTH}: {}", chain.join(" -> "))]
    ExtendsTooDeep { chain: Vec<String> },
    #[error(
        "invalid bottle name `{name}`: use lowercase letters, digits and `-` (at most 32 characters)"
    )]
    BadName { name: String },
    #[error("bottle `{bottle}`: {message}")]
    Invalid { bottle: String, message: String },
    /// The egress error is the message (it names the rule and why), not a cause to repeat.
    #[error("bottle `{bottle}`: `[egress]`: {error}")]
    Egress {
        bottle: String,
        error: crate::bundle::egress::EgressError,
    },
}

/// Chooses the backend when `--backend` does not (before the manifest's `backend`).
pub const BACKEND_ENV: &str = "BOT_BOTTLE_BACKEND";

/// The backend [`BACKEND_ENV`] names (unset or empty: none).
pub fn backend_from_env() -> Result<Option<Backend>, ManifestError> {
    let Some(value) = std::env::var_os(BACKEND_ENV).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let value = value.to_string_lossy().into_owned();
    match value.trim().to_ascii_lowercase().as_str() {
        "microvm" => Ok(Some(Backend::Microvm)),
        "docker" => Ok(Some(Backend::Docker)),
        _ => Err(ManifestError::BackendEnv { value }),
    }
}

/// Which isolation backend runs the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The agent in our embedded microVM; the sidecar bundle in Docker.
    Microvm,
    /// Legacy: the agent in a Docker container (gVisor's runsc when registered).
    Docker,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Microvm => "microvm",
            Backend::Docker => "docker",
        })
    }
}

/// A manifest file as written: every field optional, so `extends` can merge.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawManifest {
    pub description: Option<String>,
    pub extends: Option<String>,
    pub backend: Option<Backend>,
    #[serde(default)]
    pub agent: RawAgent,
    #[serde(default)]
    pub egress: RawEgress,
    #[serde(default)]
    pub credentials: BTreeMap<String, Credential>,
    #[serde(default)]
    pub mount: Vec<Mount>,
    #[serde(default)]
    pub resources: RawResources,
    #[serde(default)]
    pub git: RawGit,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub dockerfile: Option<String>,
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEgress {
    #[serde(default)]
    pub allow: Vec<EgressAllow>,
    #[serde(default)]
    pub deny: Vec<String>,
    pub deny_message: Option<String>,
    #[serde(default)]
    pub hosts: BTreeMap<String, String>,
    /// Names (or addresses) the proxy may dial although they resolve to a private, shared,
    /// benchmark, documentation, unique-local or Docker-host address.
    #[serde(default)]
    pub allow_private: Vec<String>,
    /// What a request to a host no rule lists gets: refused at once, or held for approval.
    pub unknown: Option<Unknown>,
    /// With `unknown = "ask"`: seconds a request is held before it is refused as waiting.
    pub ask_hold_secs: Option<u64>,
    /// What a request the proxy sees carrying a secret gets (`block`, `ask`, `redact`, `log`,
    /// `off`).
    pub secrets: Option<crate::bundle::egress::SecretMode>,
}

/// `[egress] unknown`: a request to a host no rule lists is refused (`deny`, the default, for
/// CI) or held until a human answers in `bot-bottle approvals` (`ask`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unknown {
    #[default]
    Deny,
    Ask,
}

/// One `[egress] allow` entry: a rule string (`"api.example.com"`, `"*.example.org:*"`), or a
/// table `{ host, methods?, paths? }` that also limits the requests to its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EgressAllow {
    Rule(String),
    Table(crate::bundle::egress::RequestRuleSpec),
}

impl<'de> Deserialize<'de> for EgressAllow {
    // By hand rather than `untagged`, so that a bad table names its key (`methds`, line 4).
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = EgressAllow;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a rule such as \"api.example.com\", or a table { host = \"api.example.com\", methods = [\"GET\"], paths = [\"/a/**\"] }",
                )
            }

            fn visit_str<E: serde::de::Error>(self, rule: &str) -> Result<EgressAllow, E> {
                Ok(EgressAllow::Rule(rule.to_owned()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<EgressAllow, A::Error> {
                Deserialize::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(EgressAllow::Table)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResources {
    pub vcpus: Option<u8>,
    pub memory_mib: Option<u32>,
    pub pids: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGit {
    pub enabled: Option<bool>,
    /// Ref patterns the agent may push (`refs/heads/bot/*`); a trailing `*` matches the rest.
    pub push: Option<Vec<String>>,
    /// Allow non-fast-forward pushes (force-push).
    pub force: Option<bool>,
    /// Allow ref deletions.
    pub delete: Option<bool>,
    /// Largest pack one push may send, in MiB.
    pub max_pack_mib: Option<u32>,
    /// Where accepted pushes are forwarded (`https://...`, or a repository path), with the
    /// credential of its host from `[credentials]` added on the host side.
    pub upstream: Option<String>,
}

/// The git gate's policy (`[git]`): what the agent may push to the bottle's gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Git {
    pub enabled: bool,
    pub push: Vec<String>,
    pub force: bool,
    pub delete: bool,
    pub max_pack_mib: u32,
    pub upstream: Option<String>,
}

/// What the agent may push when the manifest says nothing: branches under `bot/`.
pub const DEFAULT_PUSH_REFS: &str = "refs/heads/bot/*";
/// Largest pack of one push when the manifest says nothing.
pub const DEFAULT_MAX_PACK_MIB: u32 = 100;

/// A secret the egress proxy adds to requests for one host. The value never enters the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// Host environment variable holding the secret.
    pub env: Option<String>,
    /// Host file holding the secret.
    pub file: Option<PathBuf>,
    #[serde(default = "default_credential_header")]
    pub header: String,
    pub scheme: Option<String>,
    /// Request paths on the host the credential may be used for (prefixes on whole segments;
    /// empty: all). Requests elsewhere on that host are refused by the proxy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

fn default_credential_header() -> String {
    "Authorization".to_owned()
}

/// A host directory the agent gets a writable copy of (the host files are never modified).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    pub host: PathBuf,
    pub guest: Option<PathBuf>,
}

/// A resolved manifest: `extends` applied, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Manifest {
    pub name: String,
    pub description: String,
    pub backend: Option<Backend>,
    pub agent: Agent,
    pub egress: Egress,
    pub credentials: BTreeMap<String, Credential>,
    pub mounts: Vec<Mount>,
    pub resources: Resources,
    pub git: Git,
    /// Where each layer came from, child first (for error messages and `plan`).
    pub sources: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Agent {
    pub dockerfile: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub user: String,
    pub workdir: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Egress {
    /// The allow rules as strings; a table's `host` among them.
    pub allow: Vec<String>,
    /// The `allow` tables with `methods` or `paths`, checked on each request to their host.
    pub request_rules: Vec<crate::bundle::egress::RequestRuleSpec>,
    pub deny: Vec<String>,
    pub deny_message: String,
    pub hosts: BTreeMap<String, String>,
    /// Exceptions to the proxy's address floor (see `prds/0003-egress-policy.md`).
    pub allow_private: Vec<String>,
    pub unknown: Unknown,
    /// How long a request to an unlisted host is held for approval (`unknown = "ask"`), and a
    /// request carrying a secret (`secrets = "ask"`).
    pub ask_hold_secs: u64,
    /// Outbound secret scanning (see `crate::bundle::egress::secrets`); `block` by default.
    pub secrets: crate::bundle::egress::SecretMode,
}

/// `ask_hold_secs` when the manifest gives none.
pub const DEFAULT_ASK_HOLD_SECS: u64 = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Resources {
    pub vcpus: u8,
    pub memory_mib: u32,
    /// Most processes and threads the agent may have at once (the Docker backend's pids
    /// limit; a microVM's guest is bounded by its own memory).
    pub pids: u32,
}

pub const DEFAULT_DENY_MESSAGE: &str =
    "bot-bottle: egress to this host is not allowed by the bottle's manifest";
const DEFAULT_VCPUS: u8 = 2;
const DEFAULT_MEMORY_MIB: u32 = 2048;
/// Room for Node.js, git, language servers and builds; a fork bomb stops here.
const DEFAULT_PIDS: u32 = 4096;

/// Where manifests are looked up.
#[derive(Debug, Clone)]
pub struct ManifestSource {
    /// The user's bottle directory (may not exist).
    pub user_dir: PathBuf,
    /// Whether the bundled bottles are visible.
    pub bundled: bool,
}

impl ManifestSource {
    pub fn new(user_dir: PathBuf) -> Self {
        Self {
            user_dir,
            bundled: true,
        }
    }

    /// Every bottle name visible from this source, sorted.
    pub fn available(&self) -> Vec<String> {
        let mut names: BTreeSet<String> = BTreeSet::new();
        if self.bundled {
            names.extend(BUNDLED.iter().map(|(n, _)| (*n).to_owned()));
        }
        if let Ok(entries) = std::fs::read_dir(&self.user_dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "toml") {
                    if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                        names.insert(stem.to_owned());
                    }
                }
            }
        }
        names.into_iter().collect()
    }

    /// The user's own manifest of bottle `name` (which may not exist).
    pub fn user_path(&self, name: &str) -> PathBuf {
        self.user_dir.join(format!("{name}.toml"))
    }

    /// Read one layer (no `extends` applied): (origin description, parsed file).
    fn read_layer(&self, name: &str) -> Result<(String, RawManifest), ManifestError> {
        validate_name(name)?;
        let user_path = self.user_path(name);
        let (origin, text) = match std::fs::read_to_string(&user_path) {
            Ok(text) => (user_path.display().to_string(), text),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                match BUNDLED.iter().find(|(n, _)| self.bundled && *n == name) {
                    Some((_, text)) => (format!("bundled bottles/{name}.toml"), (*text).to_owned()),
                    None => {
                        return Err(ManifestError::NotFound {
                            name: name.to_owned(),
                            available: self.available(),
                            user_dir: self.user_dir.clone(),
                        })
                    }
                }
            }
            Err(source) => {
                return Err(ManifestError::Read {
                    path: user_path,
                    source,
                })
            }
        };
        let raw = parse_raw(&origin, &text)?;
        Ok((origin, raw))
    }

    /// Load a bottle by name, following `extends`.
    pub fn load(&self, name: &str) -> Result<Manifest, ManifestError> {
        self.load_with(name, None)
    }

    /// Load bottle `name` as if the user's file of it read `text` (checks an edit before it
    /// is written).
    pub fn load_edited(&self, name: &str, text: &str) -> Result<Manifest, ManifestError> {
        self.load_with(name, Some(text))
    }

    fn load_with(&self, name: &str, edited: Option<&str>) -> Result<Manifest, ManifestError> {
        let mut chain: Vec<String> = vec![name.to_owned()];
        let mut layers: Vec<(String, RawManifest)> = Vec::new();
        let mut current = name.to_owned();
        loop {
            let (origin, raw) = match edited {
                Some(text) if current == name => {
                    let origin = self.user_path(name).display().to_string();
                    let raw = parse_raw(&origin, text)?;
                    (origin, raw)
                }
                _ => self.read_layer(&current)?,
            };
            let parent = raw.extends.clone();
            layers.push((origin, raw));
            let Some(parent) = parent else { break };
            if chain.contains(&parent) {
                chain.push(parent);
                return Err(ManifestError::ExtendsCycle { chain });
            }
            chain.push(parent.clone());
            if chain.len() > MAX_EXTENDS_DEPTH {
                return Err(ManifestError::ExtendsTooDeep { chain });
            }
            current = parent;
        }
        resolve(name, layers)
    }
}

/// Parse one manifest file; errors carry the origin and toml's line/column and key name.
pub fn parse_raw(origin: &str, text: &str) -> Result<RawManifest, ManifestError> {
    toml::from_str(text).map_err(|err| ManifestError::Parse {
        origin: origin.to_owned(),
        message: err.to_string().trim_end().to_owned(),
    })
}

fn validate_name(name: &str) -> Result<(), ManifestError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(ManifestError::BadName {
            name: name.to_owned(),
        })
    }
}

fn push_unique(into: &mut Vec<String>, items: &[String]) {
    for item in items {
        if !into.contains(item) {
            into.push(item.clone());
        }
    }
}

/// Merge layers (child first) into one manifest. Scalars: the child wins. Lists: parent entries
/// first, then the child's, duplicates dropped. Maps: merged, the child wins per key.
fn resolve(name: &str, layers: Vec<(String, RawManifest)>) -> Result<Manifest, ManifestError> {
    let sources: Vec<String> = layers.iter().map(|(o, _)| o.clone()).collect();
    let mut description = None;
    let mut backend = None;
    let mut dockerfile = None;
    let mut command = None;
    let mut user = None;
    let mut workdir = None;
    let mut deny_message = None;
    let mut unknown = None;
    let mut ask_hold_secs = None;
    let mut secrets = None;
    let mut vcpus = None;
    let mut memory_mib = None;
    let mut pids = None;
    let mut git_enabled = None;
    let mut git_push = None;
    let mut git_force = None;
    let mut git_delete = None;
    let mut git_max_pack = None;
    let mut git_upstream = None;
    let mut env = BTreeMap::new();
    let mut allow = Vec::new();
    let mut request_rules = Vec::new();
    let mut deny = Vec::new();
    let mut hosts = BTreeMap::new();
    let mut allow_private = Vec::new();
    let mut credentials = BTreeMap::new();
    let mut mounts: Vec<Mount> = Vec::new();
    // Walk parent-most first so children override.
    for (_, raw) in layers.into_iter().rev() {
        description = raw.description.or(description);
        backend = raw.backend.or(backend);
        dockerfile = raw.agent.dockerfile.or(dockerfile);
        command = raw.agent.command.or(command);
        user = raw.agent.user.or(user);
        workdir = raw.agent.workdir.or(workdir);
        deny_message = raw.egress.deny_message.or(deny_message);
        unknown = raw.egress.unknown.or(unknown);
        ask_hold_secs = raw.egress.ask_hold_secs.or(ask_hold_secs);
        secrets = raw.egress.secrets.or(secrets);
        vcpus = raw.resources.vcpus.or(vcpus);
        memory_mib = raw.resources.memory_mib.or(memory_mib);
        pids = raw.resources.pids.or(pids);
        git_enabled = raw.git.enabled.or(git_enabled);
        git_push = raw.git.push.or(git_push);
        git_force = raw.git.force.or(git_force);
        git_delete = raw.git.delete.or(git_delete);
        git_max_pack = raw.git.max_pack_mib.or(git_max_pack);
        git_upstream = raw.git.upstream.or(git_upstream);
        env.extend(raw.agent.env);
        for entry in raw.egress.allow {
            let spec = match entry {
                EgressAllow::Rule(rule) => {
                    push_unique(&mut allow, &[rule]);
                    continue;
                }
                EgressAllow::Table(spec) => spec,
            };
            push_unique(&mut allow, std::slice::from_ref(&spec.host));
            if spec.restricts() && !request_rules.contains(&spec) {
                request_rules.push(spec);
            }
        }
        push_unique(&mut deny, &raw.egress.deny);
        hosts.extend(raw.egress.hosts);
        push_unique(&mut allow_private, &raw.egress.allow_private);
        credentials.extend(raw.credentials);
        for m in raw.mount {
            if !mounts.contains(&m) {
                mounts.push(m);
            }
        }
    }
    let invalid = |message: String| ManifestError::Invalid {
        bottle: name.to_owned(),
        message,
    };
    let dockerfile = dockerfile.ok_or_else(|| {
        invalid("`[agent] dockerfile` is missing: name a file in dockerfiles/, e.g. \"Dockerfile.claude\"".into())
    })?;
    let command = command.unwrap_or_else(|| vec!["/bin/sh".to_owned()]);
    if command.is_empty() || command[0].is_empty() {
        return Err(invalid(
            "`[agent] command` is empty: give the program to run, e.g. [\"claude\"]".into(),
        ));
    }
    let vcpus = vcpus.unwrap_or(DEFAULT_VCPUS);
    if vcpus == 0 || vcpus > 64 {
        return Err(invalid(format!(
            "`[resources] vcpus = {vcpus}` is out of range: use 1..=64"
        )));
    }
    let memory_mib = memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
    if !(128..=65536).contains(&memory_mib) {
        return Err(invalid(format!(
            "`[resources] memory_mib = {memory_mib}` is out of range: use 128..=65536"
        )));
    }
    let pids = pids.unwrap_or(DEFAULT_PIDS);
    if !(16..=1_000_000).contains(&pids) {
        return Err(invalid(format!(
            "`[resources] pids = {pids}` is out of range: use 16..=1000000"
        )));
    }
    let ask_hold_secs = ask_hold_secs.unwrap_or(DEFAULT_ASK_HOLD_SECS);
    if !(1..=600).contains(&ask_hold_secs) {
        return Err(invalid(format!(
            "`[egress] ask_hold_secs = {ask_hold_secs}` is out of range: use 1..=600"
        )));
    }
    let credential_hosts: Vec<String> = credentials.keys().cloned().collect();
    check_egress(
        &allow,
        &deny,
        &allow_private,
        &request_rules,
        &credential_hosts,
    )
    .map_err(|error| ManifestError::Egress {
        bottle: name.to_owned(),
        error,
    })?;
    for pattern in git_push.iter().flatten() {
        if let Err(why) = crate::bundle::gate::policy::check_pattern(pattern) {
            return Err(invalid(format!(
                "`[git] push` pattern `{pattern}` {why}: write it as refs/heads/NAME or refs/heads/PREFIX/*"
            )));
        }
    }
    if let Some(url) = &git_upstream {
        if let Err(why) = crate::bundle::gate::upstream::check_url(url) {
            return Err(invalid(format!(
                "`[git] upstream = \"{url}\"` {why}: write https://HOST/PATH (its credential comes from [credentials.\"HOST\"]) or an absolute path"
            )));
        }
    }
    if git_max_pack == Some(0) {
        return Err(invalid(
            "`[git] max_pack_mib = 0` would refuse every push: use 1 or more".to_owned(),
        ));
    }
    for (host, cred) in &credentials {
        if cred.env.is_some() == cred.file.is_some() {
            return Err(invalid(format!(
                "`[credentials.\"{host}\"]` needs exactly one of `env` or `file`"
            )));
        }
        if let Err(why) = crate::bundle::egress::CredentialPaths::new(&cred.paths) {
            return Err(invalid(format!(
                "`[credentials.\"{host}\"] paths`: {why} (e.g. `paths = [\"/owner/repo\"]`)"
            )));
        }
    }
    Ok(Manifest {
        name: name.to_owned(),
        description: description.unwrap_or_default(),
        backend,
        agent: Agent {
            dockerfile,
            command,
            env,
            user: user.unwrap_or_else(|| "root".to_owned()),
            workdir: workdir.unwrap_or_else(|| "/workspace".to_owned()),
        },
        egress: Egress {
            allow,
            request_rules,
            deny,
            deny_message: deny_message.unwrap_or_else(|| DEFAULT_DENY_MESSAGE.to_owned()),
            hosts,
            allow_private,
            unknown: unknown.unwrap_or_default(),
            ask_hold_secs,
            secrets: secrets.unwrap_or_default(),
        },
        credentials,
        mounts,
        resources: Resources {
            vcpus,
            memory_mib,
            pids,
        },
        git: Git {
            enabled: git_enabled.unwrap_or(true),
            push: git_push.unwrap_or_else(|| vec![DEFAULT_PUSH_REFS.to_owned()]),
            force: git_force.unwrap_or(false),
            delete: git_delete.unwrap_or(false),
            max_pack_mib: git_max_pack.unwrap_or(DEFAULT_MAX_PACK_MIB),
            upstream: git_upstream,
        },
        sources,
    })
}

/// The egress rules, request rules and `allow_private` entries parse (the bundle would refuse
/// them later), and the proxy can see the requests each request rule limits: its host has a
/// credential (it is intercepted), or the rule is for plain HTTP. A `hosts` entry that leads
/// below the proxy's address floor is not an error here: the proxy refuses it with a 403 that
/// names `allow_private`.
fn check_egress(
    allow: &[String],
    deny: &[String],
    allow_private: &[String],
    request_rules: &[crate::bundle::egress::RequestRuleSpec],
    credential_hosts: &[String],
) -> Result<(), crate::bundle::egress::EgressError> {
    crate::bundle::egress::EgressPolicy::new(allow, deny, "")
        .and_then(|p| p.with_private_exceptions(allow_private))
        .and_then(|p| p.with_request_rules(request_rules))?;
    request_rules
        .iter()
        .try_for_each(|rule| rule.check_visible(credential_hosts))
}

/// Expand a leading `~/` against `home`.
pub fn expand_home(path: &Path, home: &Path) -> PathBuf {
    match path.strip_prefix("~") {
        Ok(rest) => home.join(rest),
        Err(_) => path.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source_with(files: &[(&str, &str)]) -> (tempfile::TempDir, ManifestSource) {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(format!("{name}.toml")), text).unwrap();
        }
        let src = ManifestSource::new(dir.path().to_path_buf());
        (dir, src)
    }

    #[test]
    fn bundled_bottles_all_parse_and_resolve() {
        let (_d, src) = source_with(&[]);
        for (name, _) in BUNDLED {
            let m = src.load(name).unwrap();
            assert_eq!(&m.name, name);
            assert!(!m.agent.dockerfile.is_empty());
        }
    }

    #[test]
    fn unknown_key_is_named_with_its_position() {
        let (_d, src) = source_with(&[("bad", "[agent]\ndockerfile = \"x\"\ncomand = [\"sh\"]\n")]);
        let err = src.load("bad").unwrap_err().to_string();
        assert!(err.contains("comand"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let (_d, src) = source_with(&[("bad", "[resources]\nvcpus = \"two\"\n")]);
        let err = src.load("bad").unwrap_err().to_string();
        assert!(err.contains("vcpus"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn missing_bottle_lists_the_available_ones() {
        let (_d, src) = source_with(&[("mine", "[agent]\ndockerfile = \"x\"\n")]);
        let err = src.load("nope").unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
        assert!(err.contains("claude, codex, mine, test"), "{err}");
    }

    #[test]
    fn extends_cycle_prints_the_cycle() {
        let (_d, src) = source_with(&[
            ("a", "extends = \"b\"\n"),
            ("b", "extends = \"c\"\n"),
            ("c", "extends = \"a\"\n"),
        ]);
        let err = src.load("a").unwrap_err().to_string();
        assert!(err.contains("a -> b -> c -> a"), "{err}");
    }

    #[test]
    fn self_extends_is_a_cycle() {
        let (_d, src) = source_with(&[("a", "extends = \"a\"\n")]);
        let err = src.load("a").unwrap_err();
        assert!(matches!(err, ManifestError::ExtendsCycle { .. }));
    }

    #[test]
    fn extends_merges_lists_and_child_scalars_win() {
        let (_d, src) = source_with(&[(
            "mine",
            "extends = \"claude\"\n[agent]\ncommand = [\"bash\"]\n[egress]\nallow = [\"example.com\"]\n",
        )]);
        let m = src.load("mine").unwrap();
        assert_eq!(m.agent.command, vec!["bash"]);
        assert_eq!(m.agent.dockerfile, "Dockerfile.claude");
        assert!(m.egress.allow.contains(&"api.anthropic.com:443".to_owned()));
        assert_eq!(m.egress.allow.last().unwrap(), "example.com");
        assert_eq!(m.sources.len(), 2);
    }

    #[test]
    fn user_bottle_shadows_bundled_one() {
        let (_d, src) = source_with(&[("test", "[agent]\ndockerfile = \"Dockerfile.mine\"\n")]);
        assert_eq!(
            src.load("test").unwrap().agent.dockerfile,
            "Dockerfile.mine"
        );
    }

    #[test]
    fn bad_bottle_name_is_rejected_before_touching_the_filesystem() {
        let (_d, src) = source_with(&[]);
        let err = src.load("../etc/passwd").unwrap_err();
        assert!(matches!(err, ManifestError::BadName { .. }));
    }

    #[test]
    fn credential_without_source_is_invalid() {
        let (_d, src) = source_with(&[(
            "c",
            "[agent]\ndockerfile = \"x\"\n[credentials.\"a.com\"]\nheader = \"X\"\n",
        )]);
        let err = src.load("c").unwrap_err().to_string();
        assert!(err.contains("exactly one of `env` or `file`"), "{err}");
    }

    #[test]
    fn credential_paths_that_could_be_read_two_ways_are_invalid() {
        let (_d, src) = source_with(&[(
            "c",
            "[agent]\ndockerfile = \"x\"\n[credentials.\"a.com\"]\nenv = \"T\"\npaths = [\"/me/../x\"]\n",
        )]);
        let err = src.load("c").unwrap_err().to_string();
        assert!(err.contains("`[credentials.\"a.com\"] paths`"), "{err}");
        assert!(err.contains("`..`"), "{err}");
    }

    #[test]
    fn allow_private_merges_across_extends_and_a_bad_entry_is_named() {
        let (_d, src) = source_with(&[
            (
                "base",
                "[agent]\ndockerfile = \"x\"\n[egress]\nallow_private = [\"a.test\"]\n",
            ),
            (
                "child",
                "extends = \"base\"\n[egress]\nallow_private = [\"*.corp.test\", \"a.test\"]\n",
            ),
            (
                "bad",
                "[agent]\ndockerfile = \"x\"\n[egress]\nallow_private = [\"a.test:443\"]\n",
            ),
        ]);

        let child = src.load("child").unwrap();
        let err = src.load("bad").unwrap_err().to_string();

        assert_eq!(child.egress.allow_private, vec!["a.test", "*.corp.test"]);
        assert!(err.contains("\"a.test:443\""), "{err}");
        assert!(err.contains("without a port"), "{err}");
    }

    const GITHUB_CREDENTIAL: &str = "[credentials.\"api.github.com\"]\nenv = \"GH_TOKEN\"\n";

    #[test]
    fn egress_allow_takes_tables_with_methods_and_paths_next_to_strings() {
        let text = format!(
            "[agent]\ndockerfile = \"x\"\n[egress]\nallow = [\n  \"plain.example\",\n  {{ host = \"api.github.com\", methods = [\"GET\"], paths = [\"/repos/me/app/**\"] }},\n  {{ host = \"plain.test:80\", methods = [\"GET\", \"HEAD\"] }},\n  {{ host = \"free.test\" }},\n]\n{GITHUB_CREDENTIAL}"
        );
        let (_d, src) = source_with(&[("t", &text)]);

        let m = src.load("t").unwrap();

        assert_eq!(
            m.egress.allow,
            vec![
                "plain.example",
                "api.github.com",
                "plain.test:80",
                "free.test"
            ]
        );
        let rules: Vec<String> = m.egress.request_rules.iter().map(|r| r.text()).collect();
        assert_eq!(
            rules,
            vec![
                "{ host = \"api.github.com\", methods = [\"GET\"], paths = [\"/repos/me/app/**\"] }",
                "{ host = \"plain.test:80\", methods = [\"GET\", \"HEAD\"] }",
            ]
        );
    }

    #[test]
    fn a_bad_method_pattern_or_key_in_an_allow_table_is_named() {
        let layer = |table: &str| {
            format!("[agent]\ndockerfile = \"x\"\n[egress]\nallow = [{table}]\n{GITHUB_CREDENTIAL}")
        };
        let cases = [
            (
                "{ host = \"api.github.com\", methods = [\"get it\"] }",
                "\"get it\" is not an HTTP method",
            ),
            (
                "{ host = \"api.github.com\", methods = [\"get\"] }",
                "write \"GET\"",
            ),
            (
                "{ host = \"api.github.com\", methods = [] }",
                "`methods = []` allows nothing",
            ),
            (
                "{ host = \"api.github.com\", paths = [\"/repos/me/../x\"] }",
                "\"/repos/me/../x\": it must be in canonical form",
            ),
            (
                "{ host = \"api.github.com\", paths = [\"/repos/me*\"] }",
                "`*` stands for one whole segment",
            ),
            (
                "{ host = \"api.github.com\", paths = [\"repos\"] }",
                "must start with `/`",
            ),
            (
                "{ host = \"*.github.com\", methods = [\"GET\"] }",
                "not a `*.suffix`",
            ),
            (
                "{ host = \"api.github.com\", methds = [\"GET\"] }",
                "methds",
            ),
            ("{ methods = [\"GET\"] }", "host"),
            ("42", "a rule such as"),
        ];
        for (table, expected) in cases {
            let (_d, src) = source_with(&[("t", &layer(table))]);
            let err = src.load("t").unwrap_err().to_string();
            assert!(err.contains(expected), "{table}: {err}");
        }
        let (_d, src) = source_with(&[(
            "t",
            &layer("{ host = \"api.github.com\", methods = [\"get it\"] }"),
        )]);
        let err = src.load("t").unwrap_err().to_string();
        assert!(
            err.contains("{ host = \"api.github.com\", methods = [\"get it\"] }"),
            "{err}"
        );
    }

    #[test]
    fn methods_or_paths_on_an_https_host_the_proxy_does_not_intercept_are_refused() {
        let (_d, src) = source_with(&[
            (
                "bare",
                "[agent]\ndockerfile = \"x\"\n[egress]\nallow = [{ host = \"api.github.com\", methods = [\"GET\"] }]\n",
            ),
            (
                "every-port",
                "[agent]\ndockerfile = \"x\"\n[egress]\nallow = [{ host = \"api.github.com:*\", paths = [\"/a/**\"] }]\n",
            ),
            ("base", &format!("[agent]\ndockerfile = \"x\"\n{GITHUB_CREDENTIAL}")),
            (
                "child",
                "extends = \"base\"\n[egress]\nallow = [{ host = \"API.GitHub.com\", methods = [\"GET\"] }]\n",
            ),
            (
                "plain",
                "[agent]\ndockerfile = \"x\"\n[egress]\nallow = [{ host = \"plain.test:80\", methods = [\"GET\"] }]\n",
            ),
            (
                "unlimited",
                "[agent]\ndockerfile = \"x\"\n[egress]\nallow = [{ host = \"api.github.com\" }]\n",
            ),
        ]);

        let bare = src.load("bare").unwrap_err().to_string();
        let every_port = src.load("every-port").unwrap_err().to_string();

        assert!(
            bare.contains("{ host = \"api.github.com\", methods = [\"GET\"] }"),
            "{bare}"
        );
        assert!(
            bare.contains("add `[credentials.\"api.github.com\"]`"),
            "{bare}"
        );
        assert!(bare.contains("drop `methods` and `paths`"), "{bare}");
        assert!(every_port.contains("cannot see"), "{every_port}");
        // A credential (here the parent's) makes the host intercepted; plain HTTP is seen.
        assert_eq!(src.load("child").unwrap().egress.request_rules.len(), 1);
        assert_eq!(src.load("plain").unwrap().egress.request_rules.len(), 1);
        assert!(src
            .load("unlimited")
            .unwrap()
            .egress
            .request_rules
            .is_empty());
    }

    #[test]
    fn pids_default_and_out_of_range_pids() {
        let (_d, src) = source_with(&[
            ("ok", "[agent]\ndockerfile = \"x\"\n"),
            (
                "bad",
                "[agent]\ndockerfile = \"x\"\n[resources]\npids = 3\n",
            ),
        ]);
        assert_eq!(src.load("ok").unwrap().resources.pids, 4096);
        let err = src.load("bad").unwrap_err().to_string();
        assert!(
            err.contains("`[resources] pids = 3` is out of range"),
            "{err}"
        );
    }

    #[test]
    fn out_of_range_memory_is_invalid() {
        let (_d, src) = source_with(&[(
            "c",
            "[agent]\ndockerfile = \"x\"\n[resources]\nmemory_mib = 1\n",
        )]);
        assert!(src
            .load("c")
            .unwrap_err()
            .to_string()
            .contains("memory_mib"));
    }
}
