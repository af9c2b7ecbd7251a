//! What the host tells `bottle-init` at boot, and how it travels.
//!
//! The host serialises a [`GuestConfig`] to JSON and passes it either inline on the kernel
//! command line as `bottle.config=<base64url JSON>` (see [`GuestConfig::to_cmdline_arg`]) or,
//! when that would not fit the 2048-byte x86 command line, on a small raw block device as
//! `bottle.config=dev:/dev/vdX` (JSON, padded with NUL bytes). `bottle-init` never guesses: with
//! no `bottle.config=` it refuses to start the agent and powers off.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::message::UserIds;

/// Kernel command line key that carries the configuration.
pub const CMDLINE_KEY: &str = "bottle.config";

/// x86 Linux keeps at most 2048 bytes of command line (COMMAND_LINE_SIZE).
pub const KERNEL_CMDLINE_MAX: usize = 2048;

/// vsock port the control agent listens on in production.
pub const CONTROL_VSOCK_PORT: u32 = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestConfig {
    /// Per-boot secret every control session must present (see [`crate::Hello`]).
    pub token: String,
    pub hostname: String,
    pub control: ControlChannel,
    /// Read-only root image; `None` keeps the initramfs as the root (tests).
    #[serde(default)]
    pub root: Option<BlockFs>,
    /// Where the writable layer over the root lives.
    #[serde(default)]
    pub upper: Upper,
    /// Workspaces: read-only lower from the host, writable upper in the guest.
    #[serde(default)]
    pub mounts: Vec<WorkspaceMount>,
    pub user: AgentUser,
    /// Base environment of every command the agent runs.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The agent's own command; the guest powers off when it exits. `None`: only serve the
    /// control channel until a `shutdown` request.
    #[serde(default)]
    pub agent: Option<AgentCommand>,
    /// Egress forwarders: listen on TCP inside the guest, forward over vsock to the host.
    #[serde(default)]
    pub egress: Vec<EgressForward>,
    /// The bottle CA's certificate (PEM), written to [`CA_CERT_PATH`] for the agent to trust:
    /// the egress proxy answers TLS for credential hosts with certificates from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<String>,
}

/// Where bottle-init puts [`GuestConfig::ca_cert`] (root-owned, world-readable).
pub const CA_CERT_PATH: &str = "/etc/bot-bottle/ca.pem";

/// How the host reaches the control agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlChannel {
    /// Listen on AF_VSOCK, any CID, this port (production).
    Vsock { port: u32 },
    /// A virtio-console port with this name (`/sys/class/virtio-ports/*/name`): QEMU tests.
    VirtioPort { name: String },
}

/// A filesystem on a block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockFs {
    /// e.g. `/dev/vda`
    pub device: String,
    /// e.g. `squashfs`, `ext4`
    pub fstype: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Upper {
    /// Writes live in guest memory and vanish at power-off.
    #[default]
    Tmpfs,
    /// Writes go to a per-bottle disk (kept for `resume`).
    Device(BlockFs),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceMount {
    /// Read-only lower layer (the host directory, as an image).
    pub lower: BlockFs,
    /// Absolute path in the guest, e.g. `/workspace`.
    pub guest_path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentUser {
    pub ids: UserIds,
    /// Home directory; created if missing and chowned to `ids`.
    pub home: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentCommand {
    pub argv: Vec<String>,
    #[serde(default)]
    pub cwd: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressForward {
    /// Address to listen on in the guest: the bottle's alias and a published port.
    pub listen: SocketAddrV4,
    /// vsock port on the host (CID 2) that the VMM maps to the same alias:port.
    pub vsock_port: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("kernel command line has no {CMDLINE_KEY}= entry: the VMM must pass the bottle configuration")]
    Missing,
    #[error("{CMDLINE_KEY}= is not valid base64url")]
    Base64(#[source] base64::DecodeError),
    #[error("bottle configuration is not valid JSON for this bottle-init version")]
    Json(#[source] serde_json::Error),
    #[error("bottle configuration is {len} bytes encoded, over the {limit}-byte kernel command line: pass it on a config disk (`{CMDLINE_KEY}=dev:/dev/vdX`)")]
    TooLong { len: usize, limit: usize },
}

/// Where the configuration is, as found on the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    Inline(Box<GuestConfig>),
    /// Read the JSON from this block device.
    Device(String),
}

impl GuestConfig {
    /// `bottle.config=<base64url JSON>`, refused when it leaves less than `room` bytes free of
    /// [`KERNEL_CMDLINE_MAX`] for the rest of the command line.
    pub fn to_cmdline_arg(&self, room: usize) -> Result<String, ConfigError> {
        let json = serde_json::to_vec(self).map_err(ConfigError::Json)?;
        let arg = format!(
            "{CMDLINE_KEY}={}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        );
        let limit = KERNEL_CMDLINE_MAX.saturating_sub(room);
        if arg.len() > limit {
            return Err(ConfigError::TooLong {
                len: arg.len(),
                limit,
            });
        }
        Ok(arg)
    }

    /// The JSON for a config disk (pad it with NUL bytes to the device size).
    pub fn to_disk_bytes(&self) -> Result<Vec<u8>, ConfigError> {
        serde_json::to_vec(self).map_err(ConfigError::Json)
    }

    /// Parses the config disk's content (JSON up to the first NUL byte).
    pub fn from_disk_bytes(bytes: &[u8]) -> Result<GuestConfig, ConfigError> {
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        serde_json::from_slice(&bytes[..end]).map_err(ConfigError::Json)
    }
}

/// Finds `bottle.config=` in a kernel command line (`/proc/cmdline`).
pub fn parse_cmdline(cmdline: &str) -> Result<ConfigSource, ConfigError> {
    let prefix = format!("{CMDLINE_KEY}=");
    let value = cmdline
        .split_ascii_whitespace()
        .rev()
        .find_map(|w| w.strip_prefix(&prefix))
        .ok_or(ConfigError::Missing)?;
    if let Some(dev) = value.strip_prefix("dev:") {
        return Ok(ConfigSource::Device(dev.to_string()));
    }
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(value)
        .map_err(ConfigError::Base64)?;
    serde_json::from_slice(&json)
        .map(ConfigSource::Inline)
        .map_err(ConfigError::Json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GuestConfig {
        GuestConfig {
            token: "00112233445566778899aabbccddeeff".into(),
            hostname: "bottle-test".into(),
            control: ControlChannel::Vsock {
                port: CONTROL_VSOCK_PORT,
            },
            root: Some(BlockFs {
                device: "/dev/vda".into(),
                fstype: "squashfs".into(),
            }),
            upper: Upper::Tmpfs,
            mounts: vec![WorkspaceMount {
                lower: BlockFs {
                    device: "/dev/vdb".into(),
                    fstype: "ext4".into(),
                },
                guest_path: "/workspace".into(),
            }],
            user: AgentUser {
                ids: UserIds {
                    uid: 1000,
                    gid: 1000,
                },
                home: "/home/agent".into(),
            },
            env: BTreeMap::from([("LANG".into(), "C.UTF-8 with spaces".into())]),
            agent: Some(AgentCommand {
                argv: vec!["claude".into()],
                cwd: Some("/workspace".into()),
            }),
            egress: vec![EgressForward {
                listen: "127.0.0.17:8080".parse().unwrap(),
                vsock_port: 8080,
            }],
            ca_cert: Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into()),
        }
    }

    #[test]
    fn config_survives_the_kernel_command_line() {
        let cfg = sample();
        let cmdline = format!(
            "console=ttyS0 reboot=k {} panic=-1",
            cfg.to_cmdline_arg(256).unwrap()
        );

        let parsed = parse_cmdline(&cmdline).unwrap();

        assert_eq!(parsed, ConfigSource::Inline(Box::new(cfg)));
    }

    #[test]
    fn device_source_names_the_device() {
        assert_eq!(
            parse_cmdline("quiet bottle.config=dev:/dev/vdc").unwrap(),
            ConfigSource::Device("/dev/vdc".into())
        );
    }

    #[test]
    fn missing_config_is_an_error_not_a_default() {
        assert!(matches!(
            parse_cmdline("console=ttyS0"),
            Err(ConfigError::Missing)
        ));
    }

    #[test]
    fn config_too_long_for_the_command_line_is_refused() {
        let mut cfg = sample();
        cfg.env.insert("BIG".into(), "x".repeat(KERNEL_CMDLINE_MAX));

        assert!(matches!(
            cfg.to_cmdline_arg(0),
            Err(ConfigError::TooLong { .. })
        ));
    }

    #[test]
    fn disk_bytes_padded_with_nul_parse_back() {
        let cfg = sample();
        let mut disk = cfg.to_disk_bytes().unwrap();
        disk.resize(4096, 0);

        assert_eq!(GuestConfig::from_disk_bytes(&disk).unwrap(), cfg);
    }
}
