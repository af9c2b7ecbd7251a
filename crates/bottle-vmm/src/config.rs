//! What the caller configures: one machine, its kernel, its serial output and its vsock channel.
//!
//! The configuration is serialised to a file by the parent (`bot-bottle`) and read back by the
//! child (`bot-bottle __vmm --config FILE`), so every type here is `serde`-friendly.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Smallest guest memory we accept: below this the boot structures and a kernel do not fit.
pub const MIN_MEM_MIB: u32 = 16;
/// Largest guest memory we accept (a bottle is a coding agent, not a database server).
pub const MAX_MEM_MIB: u32 = 64 * 1024;
/// Most vCPUs the MP table and the APIC id space we build can describe.
pub const MAX_VCPUS: u8 = 32;
/// Most disks: IRQs 5..=23 serve virtio devices, one of them vsock.
pub const MAX_DISKS: usize = 16;
/// Guest CIDs 0..=2 are reserved by virtio-vsock (hypervisor, local, host).
pub const FIRST_GUEST_CID: u32 = 3;

/// Errors found when checking or reading a [`VmmConfig`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u8),
    #[error("mem_mib must be between {MIN_MEM_MIB} and {MAX_MEM_MIB}, got {0}")]
    Memory(u32),
    #[error("guest_cid must be at least {FIRST_GUEST_CID} and below u32::MAX, got {0}")]
    GuestCid(u32),
    #[error("the vsock allowlist is empty: a guest without an allowlisted destination cannot reach anything, drop the vsock section instead")]
    EmptyAllowlist,
    #[error("allowlist rule {addr}:{port} is not usable: port 0 and the unspecified or broadcast address are refused")]
    BadRule { addr: Ipv4Addr, port: u16 },
    #[error("{0} disks do not fit the virtio IRQ range next to vsock: use at most {MAX_DISKS}")]
    TooManyDisks(usize),
    #[error("cannot read the VMM configuration {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM configuration {path} is not valid JSON for a VmmConfig")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// One machine.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VmmConfig {
    /// vmlinux ELF (PVH note honoured, else its 64-bit entry) or bzImage.
    pub kernel: PathBuf,
    /// Extra kernel arguments; the VMM appends its own (console, devices, reboot mode).
    pub cmdline: String,
    /// Initial ramdisk (e.g. a gzip'd cpio holding bottle-init), placed at the top of low memory.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub serial: SerialOutput,
    pub vsock: Option<VsockConfig>,
    /// virtio-blk disks, in order: the first is /dev/vda in a Linux guest.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
}

/// Where the guest's serial console goes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum SerialOutput {
    Stdout,
    File(PathBuf),
    Sink,
}

/// The guest's only channel out.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    pub guest_cid: u32,
    /// Unix socket the host connects to (`CONNECT <port>\n` → `OK <port>\n`).
    pub uds_path: PathBuf,
    /// The only TCP destinations a guest may reach; everything else is reset.
    pub allowlist: Vec<AllowRule>,
    /// JSON lines of denied-egress events, appended.
    pub event_log: Option<PathBuf>,
}

/// One TCP destination the guest may reach: exactly this address and this port.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllowRule {
    pub addr: Ipv4Addr,
    pub port: u16,
}

/// A virtio-blk disk backed by a host file (raw image; its size is rounded down to 512 bytes).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

impl VmmConfig {
    /// Reads a configuration written by the parent process as JSON.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Checks every bound; a configuration that fails here never reaches KVM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(ConfigError::Memory(self.mem_mib));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::TooManyDisks(self.disks.len()));
        }
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        Ok(())
    }
}

impl VsockConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.guest_cid < FIRST_GUEST_CID || self.guest_cid == u32::MAX {
            return Err(ConfigError::GuestCid(self.guest_cid));
        }
        if self.allowlist.is_empty() {
            return Err(ConfigError::EmptyAllowlist);
        }
        for rule in &self.allowlist {
            if rule.port == 0 || rule.addr.is_unspecified() || rule.addr.is_broadcast() {
                return Err(ConfigError::BadRule {
                    addr: rule.addr,
                    port: rule.port,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmmConfig {
        VmmConfig {
            kernel: "/k".into(),
            cmdline: String::new(),
            initrd: None,
            vcpus: 1,
            mem_mib: 64,
            serial: SerialOutput::Sink,
            vsock: Some(VsockConfig {
                guest_cid: 3,
                uds_path: "/tmp/v.sock".into(),
                allowlist: vec![AllowRule {
                    addr: Ipv4Addr::new(127, 0, 0, 17),
                    port: 8080,
                }],
                event_log: None,
            }),
            disks: vec![],
        }
    }

    #[test]
    fn test_config_round_trips_through_json() {
        let config = sample();
        let text = serde_json::to_string(&config).unwrap();
        assert_eq!(serde_json::from_str::<VmmConfig>(&text).unwrap(), config);
    }

    #[test]
    fn test_zero_vcpus_is_refused() {
        let config = VmmConfig {
            vcpus: 0,
            ..sample()
        };
        assert!(matches!(config.validate(), Err(ConfigError::Vcpus(0))));
    }

    #[test]
    fn test_reserved_guest_cid_is_refused() {
        let mut config = sample();
        config.vsock.as_mut().unwrap().guest_cid = 2;
        assert!(matches!(config.validate(), Err(ConfigError::GuestCid(2))));
    }

    #[test]
    fn test_empty_allowlist_is_refused() {
        let mut config = sample();
        config.vsock.as_mut().unwrap().allowlist.clear();
        assert!(matches!(
            config.validate(),
            Err(ConfigError::EmptyAllowlist)
        ));
    }
}
