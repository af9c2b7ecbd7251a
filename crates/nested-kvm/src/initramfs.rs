//! The emulated machine's initramfs: busybox, the kernel modules it loads, and an `/init` that
//! loads them, mounts the shares, brings up the network when there is one, runs the job and
//! powers off. Written as an uncompressed `newc` cpio archive (the kernel unpacks it as is).

use std::io::{self, Write};
use std::path::Path;

use crate::machine::{Share, JOB_MOUNT};

/// Modules in load order (each after what it needs). `.ci/setup-l1` copies exactly these.
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
    "failover",
    "net_failover",
    "virtio_net",
    "irqbypass",
    "ccp",
    "kvm",
    "kvm-amd",
];

/// The job's result file under the job share: the exit status of `run.sh`.
pub const RC_FILE: &str = "out/rc";
/// Everything `run.sh` printed (also on the machine's console).
pub const LOG_FILE: &str = "out/run.log";

/// The `/init` script for `shares` (the job share first) and an optional network.
pub fn init_script(shares: &[Share], net: bool) -> String {
    let mut s = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin\n\
         mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n\
         mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts\n\
         mount -t tmpfs tmpfs /tmp; mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /dev/shm\n\
         echo \"L1: init at $(cut -d' ' -f1 /proc/uptime) s, kernel $(uname -r), $(nproc) cpus\"\n",
    );
    s.push_str("for m in");
    for m in MODULES {
        s.push(' ');
        s.push_str(m);
    }
    s.push_str(
        "; do insmod /lib/modules/$m.ko || echo \"L1: cannot load module $m\"; done\n\
         ip link set lo up\n",
    );
    for (i, share) in shares.iter().enumerate() {
        // Read-only shares hold programs and kernels: cached, so they map and run quickly.
        // Writable ones hold disks and logs the host reads while the job runs: uncached.
        let cache = if share.read_only { "loose" } else { "none" };
        let ro = if share.read_only { ",ro" } else { "" };
        let guest = share.guest.display();
        s.push_str(&format!(
            "mkdir -p '{guest}' && mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache={cache}{ro} s{i} '{guest}' || echo \"L1: cannot mount share s{i} on {guest}\"\n"
        ));
    }
    if net {
        // QEMU's user network: the host is 10.0.2.2, this machine 10.0.2.15.
        s.push_str(
            "ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 \
             || echo \"L1: no network\"\n",
        );
    }
    s.push_str(&format!(
        "[ -c /dev/kvm ] || echo \"L1: no /dev/kvm\"\n\
         mkdir -p {JOB_MOUNT}/out\n\
         echo \"L1: job at $(cut -d' ' -f1 /proc/uptime) s\"\n\
         ( cd /tmp && sh {JOB_MOUNT}/run.sh; echo $? > {JOB_MOUNT}/{RC_FILE} ) 2>&1 | tee {JOB_MOUNT}/{LOG_FILE}\n\
         echo \"L1: job done at $(cut -d' ' -f1 /proc/uptime) s, status $(cat {JOB_MOUNT}/{RC_FILE})\"\n\
         sync\n\
         poweroff -f\n"
    ));
    s
}

/// Writes the archive: `/init`, busybox and the modules from `modules_dir`.
pub fn write(
    out: &mut impl Write,
    init: &str,
    busybox: &Path,
    modules_dir: &Path,
) -> io::Result<()> {
    let mut cpio = Cpio { out, ino: 1 };
    for dir in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "mnt",
        "lib",
        "lib/modules",
    ] {
        cpio.entry(dir, 0o040755, &[])?;
    }
    cpio.entry("init", 0o100755, init.as_bytes())?;
    cpio.entry("bin/busybox", 0o100755, &std::fs::read(busybox)?)?;
    for m in MODULES {
        let path = modules_dir.join(format!("{m}.ko"));
        let bytes = std::fs::read(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        cpio.entry(&format!("lib/modules/{m}.ko"), 0o100644, &bytes)?;
    }
    cpio.entry("TRAILER!!!", 0, &[])
}

/// A `newc` cpio writer (the format the kernel's initramfs unpacker reads).
struct Cpio<'a, W: Write> {
    out: &'a mut W,
    ino: u32,
}

impl<W: Write> Cpio<'_, W> {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let namesize = name.len() + 1;
        let nlink = if mode & 0o040000 != 0 { 2 } else { 1 };
        let header = format!(
            "070701{:08X}{mode:08X}{:08X}{:08X}{nlink:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{namesize:08X}{:08X}",
            self.ino,
            0,
            0,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            0
        );
        self.ino += 1;
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(header.len() + namesize)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    fn pad(&mut self, len: usize) -> io::Result<()> {
        let zeros = [0u8; 3];
        self.out.write_all(&zeros[..(4 - len % 4) % 4])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned_to_four_bytes_and_end_with_the_trailer() {
        let mut out = Vec::new();
        let mut cpio = Cpio {
            out: &mut out,
            ino: 1,
        };
        cpio.entry("init", 0o100755, b"abcde").unwrap();
        cpio.entry("TRAILER!!!", 0, &[]).unwrap();

        // Header 110 bytes + "init\0" = 115, padded to 116; data 5, padded to 8.
        assert_eq!(&out[..6], b"070701");
        assert_eq!(&out[110..115], b"init\0");
        assert_eq!(&out[116..121], b"abcde");
        assert_eq!(&out[124..130], b"070701");
        assert_eq!(out.len() % 4, 0);
        assert!(String::from_utf8_lossy(&out).contains("TRAILER!!!"));
    }

    #[test]
    fn init_mounts_every_share_and_runs_the_job_then_powers_off() {
        let shares = [
            Share::new("/tmp/job", JOB_MOUNT, false),
            Share::new("/work/target/debug", "/work/target/debug", true),
        ];

        let s = init_script(&shares, true);

        assert!(s.contains("cache=none s0 '/job'"), "{s}");
        assert!(s.contains("cache=loose,ro s1 '/work/target/debug'"), "{s}");
        assert!(s.contains("insmod /lib/modules/$m.ko"));
        assert!(s.contains("10.0.2.15/24"));
        assert!(s.trim_end().ends_with("poweroff -f"));
    }
}
