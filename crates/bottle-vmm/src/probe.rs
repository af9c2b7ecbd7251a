//! Test support: building the probe guest, a tiny `no_std` guest whose source lives in
//! `tests/probe/guest.rs`. It checks the boot parameters it was handed and drives our
//! virtio-mmio devices through real KVM exits (the recipe is in shared/docs/FINDINGS.md).
//! Used by this crate's tests and benchmarks and by bot-bottle's process tests: compiled only
//! with the `testing` feature (and for this crate's unit tests), never into a shipped VMM.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the probe guest's source is.
pub fn source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/probe/guest.rs")
}

/// A probe guest built elsewhere, used instead of compiling one: the nested-KVM harness sets
/// it inside its emulated machine, which has no toolchain (the host builds the guest).
pub const PREBUILT_ENV: &str = "BOTTLE_VMM_PROBE_ELF";

/// Compile the probe guest into `out_dir/guest.elf` with `$RUSTC` (or `rustc`): no SSE (the
/// nested KVM here faults on it), static, no std, loaded at 2 MiB like a vmlinux. With
/// [`PREBUILT_ENV`] set, that file is copied there instead.
pub fn build(out_dir: &Path) -> Result<PathBuf, String> {
    let out = out_dir.join("guest.elf");
    if let Some(prebuilt) = std::env::var_os(PREBUILT_ENV).filter(|v| !v.is_empty()) {
        std::fs::copy(&prebuilt, &out).map_err(|e| {
            format!(
                "cannot copy the prebuilt probe guest {} ({PREBUILT_ENV}): {e}",
                Path::new(&prebuilt).display()
            )
        })?;
        return Ok(out);
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let output = Command::new(&rustc)
        .args(["--edition", "2021", "-O", "-C", "panic=abort"])
        .args(["-C", "relocation-model=static"])
        .args(["-C", "target-feature=-sse,-sse2,-avx,-avx2"])
        .args(["-C", "link-arg=-nostdlib", "-C", "link-arg=-static"])
        .args(["-C", "link-arg=-Wl,--image-base=0x200000"])
        .args(["-C", "link-arg=-Wl,--build-id=none", "--crate-type", "bin"])
        .arg(source())
        .arg("-o")
        .arg(&out)
        .output()
        .map_err(|e| format!("cannot run {rustc} to build the probe guest: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "building the probe guest failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(out)
}
