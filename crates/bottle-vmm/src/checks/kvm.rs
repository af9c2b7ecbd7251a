//! KVM preflight: can this user run our microVM on this host?
//!
//! Used by `bot-bottle doctor` and before `start --backend microvm`. Each failure names what is
//! wrong and the one thing the user should do about it.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kvm_ioctls::{Cap, Kvm};

/// The only KVM API version Linux has ever shipped; anything else is not a KVM we know.
pub const KVM_API_VERSION: i32 = 12;

/// The default KVM device node.
pub const DEFAULT_KVM_PATH: &str = "/dev/kvm";

/// Capabilities the VMM relies on, with the name shown to the user.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// Why this host cannot run the microVM backend.
#[derive(Debug, thiserror::Error)]
pub enum KvmCheckError {
    #[error(
        "{path} does not exist: load the KVM module (`modprobe kvm_intel` or `modprobe kvm_amd`) \
         and enable virtualisation (VT-x / AMD-V) in the firmware settings; or use --backend docker"
    )]
    Missing { path: PathBuf },
    #[error(
        "{path} is not readable and writable by this user: add the user to the `kvm` group \
         (`sudo usermod -aG kvm $USER`) and log in again"
    )]
    PermissionDenied { path: PathBuf },
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} speaks KVM API version {found}, bot-bottle needs version {KVM_API_VERSION}: \
         this is not a Linux KVM we can use"
    )]
    ApiVersion { path: PathBuf, found: i32 },
    #[error(
        "KVM at {path} lacks the capability {cap}: update the host kernel, or use --backend docker"
    )]
    MissingCapability { path: PathBuf, cap: &'static str },
}

/// What a successful check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmReport {
    pub path: PathBuf,
    pub api_version: i32,
    pub max_vcpus: usize,
}

/// Check that `path` is a usable KVM device for this user.
pub fn check_kvm(path: &Path) -> Result<KvmReport, KvmCheckError> {
    let owned = path.to_path_buf();
    // `symlink_metadata` would hide a dangling link; `metadata` follows it like open() will.
    if let Err(err) = std::fs::metadata(path) {
        return Err(match err.kind() {
            io::ErrorKind::NotFound => KvmCheckError::Missing { path: owned },
            io::ErrorKind::PermissionDenied => KvmCheckError::PermissionDenied { path: owned },
            _ => KvmCheckError::Open {
                path: owned,
                source: err,
            },
        });
    }
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| KvmCheckError::Open {
        path: owned.clone(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"),
    })?;
    let kvm = Kvm::new_with_path(&c_path).map_err(|err| {
        let err = io::Error::from_raw_os_error(err.errno());
        match err.kind() {
            io::ErrorKind::PermissionDenied => KvmCheckError::PermissionDenied {
                path: owned.clone(),
            },
            io::ErrorKind::NotFound => KvmCheckError::Missing {
                path: owned.clone(),
            },
            _ => KvmCheckError::Open {
                path: owned.clone(),
                source: err,
            },
        }
    })?;
    check_opened(&kvm, owned)
}

fn check_opened(kvm: &Kvm, path: PathBuf) -> Result<KvmReport, KvmCheckError> {
    let api_version = kvm.get_api_version();
    if api_version != KVM_API_VERSION {
        return Err(KvmCheckError::ApiVersion {
            path,
            found: api_version,
        });
    }
    if let Some(cap) = first_missing_cap(|cap| kvm.check_extension(cap)) {
        return Err(KvmCheckError::MissingCapability { path, cap });
    }
    Ok(KvmReport {
        path,
        api_version,
        max_vcpus: kvm.get_max_vcpus(),
    })
}

/// The name of the first required capability `has` says is missing.
pub fn first_missing_cap(has: impl Fn(Cap) -> bool) -> Option<&'static str> {
    REQUIRED_CAPS
        .iter()
        .find(|(cap, _)| !has(*cap))
        .map(|(_, name)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_capability_is_named() {
        // No host KVM lacks these on purpose, so the lookup is exercised with a stand-in for
        // KVM_CHECK_EXTENSION (the real ioctl path is covered by the tests under tests/).
        let found = first_missing_cap(|cap| !matches!(cap, Cap::Pit2));
        assert_eq!(found, Some("KVM_CAP_PIT2"));
        assert_eq!(first_missing_cap(|_| true), None);
        let err = KvmCheckError::MissingCapability {
            path: PathBuf::from("/dev/kvm"),
            cap: "KVM_CAP_PIT2",
        };
        assert!(err.to_string().contains("KVM_CAP_PIT2"));
    }

    #[test]
    fn check_kvm_on_the_real_device_passes_when_present() {
        let path = Path::new(DEFAULT_KVM_PATH);
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .is_err()
        {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but /dev/kvm is not usable"
            );
            eprintln!(
                "SKIPPED check_kvm_on_the_real_device_passes_when_present: no usable /dev/kvm"
            );
            return;
        }
        let report = check_kvm(path).unwrap();
        assert_eq!(report.api_version, KVM_API_VERSION);
    }

    #[test]
    fn check_kvm_on_missing_path_says_load_the_module() {
        let err = check_kvm(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(matches!(err, KvmCheckError::Missing { .. }));
        assert!(err.to_string().contains("modprobe kvm_intel"));
    }

    #[test]
    fn check_kvm_on_a_regular_file_is_refused_not_panicking() {
        let dir = std::env::temp_dir().join(format!("kvmcheck-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("not-kvm");
        std::fs::write(&file, b"").unwrap();
        let err = check_kvm(&file).unwrap_err();
        // KVM_GET_API_VERSION on a regular file fails (ENOTTY): not API version 12.
        assert!(matches!(err, KvmCheckError::ApiVersion { .. }), "{err}");
        assert!(err.to_string().contains("API version"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
