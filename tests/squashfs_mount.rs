//! The squashfs writer checked by the real reader: images written by `bot_bottle::image::squashfs`
//! are loop-mounted by this host's Linux kernel and every property is read back through the
//! mount (stat, readdir, read, getxattr). A second reader, `unsquashfs` from squashfs-tools,
//! must list the same tree. The last test goes through Docker: an image with hard links and a
//! file capability becomes a root image by the code path `start --backend microvm` uses.
//!
//! Loop mounts need root; in CI (CI=true) a host that cannot mount fails the test.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use bot_bottle::image::squashfs::{Builder, Content, Meta, BLOCK_SIZE};

use common::in_ci;

/// A loop-mounted image, unmounted on drop.
struct Mounted {
    dir: tempfile::TempDir,
}

impl Mounted {
    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Mounts `image` read-only, or explains why it cannot (and fails in CI).
fn mount(image: &Path, test: &str) -> Option<Mounted> {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("mount")
        .args(["-t", "squashfs", "-o", "loop,ro"])
        .arg(image)
        .arg(dir.path())
        .output()
        .expect("run mount");
    if out.status.success() {
        return Some(Mounted { dir });
    }
    let why = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !in_ci(),
        "{test}: CI=true but the kernel would not mount the image: {why}"
    );
    eprintln!(
        "SKIPPED {test}: cannot loop-mount squashfs here (needs root and loop devices): {why}"
    );
    None
}

fn put(b: &mut Builder, path: &str, meta: Meta, content: Content) {
    b.insert(Path::new(path), meta, content).unwrap();
}

fn meta(mode: u16, uid: u32, gid: u32) -> Meta {
    Meta {
        mode,
        uid,
        gid,
        mtime: 1_700_000_000,
        xattrs: Vec::new(),
    }
}

/// Content that compresses badly: a simple xorshift stream.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Sample {
    work: tempfile::TempDir,
    image: PathBuf,
    stats: bot_bottle::image::squashfs::WriteStats,
    big: Vec<u8>,
}

/// A tree with every kind of node, hard links, xattrs, a directory too big for one header and
/// one metadata block, and content larger than a data block.
fn sample() -> Sample {
    let work = tempfile::tempdir().unwrap();
    let spool = |name: &str, data: &[u8]| {
        let p = work.path().join(name);
        fs::write(&p, data).unwrap();
        Content::File(p)
    };
    let big: Vec<u8> = noise(BLOCK_SIZE * 2 + 1234, 7)
        .into_iter()
        .chain(std::iter::repeat_n(b'z', BLOCK_SIZE))
        .collect();
    let mut b = Builder::new();
    put(&mut b, "usr", meta(0o755, 0, 0), Content::Dir);
    put(&mut b, "usr/bin", meta(0o755, 0, 0), Content::Dir);
    put(
        &mut b,
        "usr/bin/su",
        meta(0o4755, 0, 0),
        spool("su", b"setuid!"),
    );
    b.link(Path::new("usr/bin/su-again"), Path::new("usr/bin/su"))
        .unwrap();
    b.link(Path::new("sbin-su"), Path::new("usr/bin/su"))
        .unwrap();
    let mut ping = meta(0o755, 0, 0);
    ping.xattrs = vec![
        (b"security.capability".to_vec(), cap_net_raw()),
        (b"user.origin".to_vec(), b"test".to_vec()),
        (b"system.posix_acl_access".to_vec(), vec![2, 0, 0, 0]),
    ];
    put(&mut b, "usr/bin/ping", ping, spool("ping", b"ping binary"));
    put(&mut b, "usr/bin/big", meta(0o644, 0, 0), spool("big", &big));
    put(
        &mut b,
        "usr/bin/empty",
        meta(0o600, 0, 0),
        spool("empty", b""),
    );
    put(
        &mut b,
        "usr/bin/copy-of-su",
        meta(0o755, 0, 0),
        spool("copy", b"setuid!"),
    );
    put(
        &mut b,
        "usr/bin/sh",
        meta(0o777, 0, 0),
        Content::Symlink(b"busybox".to_vec()),
    );
    let long_target = "d/".repeat(1000);
    put(
        &mut b,
        "usr/long-link",
        meta(0o777, 0, 0),
        Content::Symlink(long_target.clone().into_bytes()),
    );
    put(
        &mut b,
        "dev/null",
        meta(0o666, 0, 0),
        Content::CharDevice(0x103),
    );
    put(
        &mut b,
        "dev/sda",
        meta(0o660, 0, 6),
        Content::BlockDevice(0x800),
    );
    put(&mut b, "run/fifo", meta(0o620, 0, 0), Content::Fifo);
    put(&mut b, "run/sock", meta(0o755, 0, 0), Content::Socket);
    let mut tagged = meta(0o750, 100_000, 100_001);
    tagged.xattrs = vec![(b"user.dir".to_vec(), b"yes".to_vec())];
    put(&mut b, "home/agent", tagged, Content::Dir);
    put(
        &mut b,
        "home/agent/deep/er/file",
        meta(0o640, 1000, 1000),
        spool("deep", b"deep"),
    );
    // Replaced: the later entry wins, and the first inode is not written.
    put(
        &mut b,
        "etc/motd",
        meta(0o644, 0, 0),
        spool("motd1", b"old"),
    );
    put(
        &mut b,
        "etc/motd",
        meta(0o644, 0, 0),
        spool("motd2", b"new"),
    );
    for i in 0..MANY {
        let name = format!("many/entry-with-a-longish-name-{i:04}");
        put(
            &mut b,
            &name,
            meta(0o644, i % 7, 0),
            spool(&format!("m{i}"), name.as_bytes()),
        );
    }
    let image = work.path().join("image.sqfs");
    let mut calls = 0;
    let stats = b.write(&image, &mut |_, _| calls += 1).unwrap();
    assert!(calls > 0, "progress was never reported");
    Sample {
        work,
        image,
        stats,
        big,
    }
}

/// Entries in the sample's big directory.
const MANY: u32 = 2000;

fn cap_net_raw() -> Vec<u8> {
    // VFS_CAP_REVISION_2 | effective, permitted = CAP_NET_RAW (bit 13).
    let mut v = vec![0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00];
    v.extend_from_slice(&[0; 12]);
    v
}

#[test]
fn kernel_mounts_the_image_with_hard_links_xattrs_and_every_node_kind() {
    let s = sample();
    let Some(m) = mount(&s.image, "kernel_mounts_the_image") else {
        return;
    };
    let root = m.path();
    let md = |p: &str| fs::symlink_metadata(root.join(p)).unwrap();

    // Hard links: one inode, three names, the link count says so.
    let su = md("usr/bin/su");
    for other in ["usr/bin/su-again", "sbin-su"] {
        assert_eq!(md(other).ino(), su.ino(), "{other} is not the same inode");
    }
    assert_eq!(su.nlink(), 3);
    assert_eq!(su.mode() & 0o7777, 0o4755);
    assert_eq!(fs::read(root.join("sbin-su")).unwrap(), b"setuid!");
    // The same content under another name is shared data but a separate inode.
    let copy = md("usr/bin/copy-of-su");
    assert_ne!(copy.ino(), su.ino());
    assert_eq!(copy.nlink(), 1);
    assert_eq!(
        fs::read(root.join("usr/bin/copy-of-su")).unwrap(),
        b"setuid!"
    );

    // Extended attributes, read by the kernel's squashfs xattr handlers.
    let ping = root.join("usr/bin/ping");
    assert_eq!(
        xattr::get(&ping, "security.capability").unwrap(),
        Some(cap_net_raw())
    );
    assert_eq!(
        xattr::get(&ping, "user.origin").unwrap(),
        Some(b"test".to_vec())
    );
    let mut names: Vec<String> = xattr::list(&ping)
        .unwrap()
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["security.capability", "user.origin"]);
    assert_eq!(
        s.stats.dropped_xattrs,
        [(
            "/usr/bin/ping".to_owned(),
            "system.posix_acl_access".to_owned()
        )]
    );
    assert_eq!(
        xattr::get(root.join("home/agent"), "user.dir").unwrap(),
        Some(b"yes".to_vec())
    );
    assert_eq!(xattr::list(root.join("usr/bin/sh")).unwrap().count(), 0);

    // Owners beyond 16 bits, modes, mtimes, implied parents.
    let home = md("home/agent");
    assert_eq!(
        (home.mode() & 0o7777, home.uid(), home.gid(), home.mtime()),
        (0o750, 100_000, 100_001, 1_700_000_000)
    );
    let deep = md("home/agent/deep/er");
    assert_eq!((deep.mode() & 0o7777, deep.uid()), (0o755, 0));
    assert_eq!(
        fs::read(root.join("home/agent/deep/er/file")).unwrap(),
        b"deep"
    );

    // Contents across blocks, empty files, replaced entries.
    assert_eq!(fs::read(root.join("usr/bin/big")).unwrap(), s.big);
    assert_eq!(md("usr/bin/empty").len(), 0);
    assert_eq!(fs::read(root.join("etc/motd")).unwrap(), b"new");

    // Symlinks, devices, FIFOs, sockets.
    assert_eq!(
        fs::read_link(root.join("usr/bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        fs::read_link(root.join("usr/long-link"))
            .unwrap()
            .as_os_str()
            .len(),
        2000
    );
    let null = md("dev/null");
    assert!(null.file_type().is_char_device());
    assert_eq!(
        (null.rdev(), null.mode() & 0o7777),
        (libc_makedev(1, 3), 0o666)
    );
    let sda = md("dev/sda");
    assert!(sda.file_type().is_block_device());
    assert_eq!((sda.rdev(), sda.gid()), (libc_makedev(8, 0), 6));
    assert!(md("run/fifo").file_type().is_fifo());
    assert!(md("run/sock").file_type().is_socket());

    // A directory of 2000 entries (a listing past 64 KiB, so an extended directory inode):
    // readdir returns all, sorted; lookups find each.
    let mut listed: Vec<String> = fs::read_dir(root.join("many"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed.len(), MANY as usize);
    listed.sort();
    for (i, name) in listed.iter().enumerate() {
        assert_eq!(*name, format!("entry-with-a-longish-name-{i:04}"));
    }
    for i in [0, 255, 256, 257, 511, 1024, MANY - 1] {
        let p = format!("many/entry-with-a-longish-name-{i:04}");
        assert_eq!(fs::read_to_string(root.join(&p)).unwrap(), p);
        assert_eq!(md(&p).uid(), i % 7);
    }

    // Directory link counts: 2 + subdirectories.
    assert_eq!(md("usr").nlink(), 3);
    assert_eq!(md("").nlink(), 2 + 6);
}

/// `makedev` as glibc computes it, for comparing `st_rdev`.
fn libc_makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xfffff000) << 32)
        | ((major & 0xfff) << 8)
        | ((minor & 0xffffff00) << 12)
        | (minor & 0xff)
}

#[test]
fn stats_count_hard_links_xattrs_and_shared_content() {
    let s = sample();

    assert_eq!(s.stats.hard_linked_inodes, 1);
    assert_eq!(s.stats.inodes_with_xattrs, 2);
    assert_eq!(s.stats.deduplicated_files, 1, "copy-of-su shares su's data");
    assert_eq!(s.stats.image_bytes % 4096, 0);
    assert_eq!(fs::metadata(&s.image).unwrap().len(), s.stats.image_bytes);
    assert!(!s.work.path().join("image.partial").exists());
}

#[test]
fn unsquashfs_reads_the_same_tree() {
    let s = sample();
    let Ok(out) = Command::new("unsquashfs")
        .args(["-lln", "-d", ""])
        .arg(&s.image)
        .output()
    else {
        assert!(
            !in_ci(),
            "CI=true but unsquashfs (squashfs-tools) is missing"
        );
        eprintln!("SKIPPED unsquashfs_reads_the_same_tree: install squashfs-tools");
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|l| {
            // perms owner size (or "major, minor") date time path [-> target]
            let path = l.split_whitespace().find(|t| t.starts_with('/'))?;
            Some((path, l))
        })
        .collect();
    assert!(
        lines["/usr/bin/su"].starts_with("-rwsr-xr-x 0/0"),
        "{}",
        lines["/usr/bin/su"]
    );
    assert!(lines["/home/agent"].starts_with("drwxr-x--- 100000/100001"));
    assert!(lines["/dev/null"].starts_with("crw-rw-rw- 0/0"));
    assert!(lines["/usr/bin/sh"].ends_with("/usr/bin/sh -> busybox"));
    assert_eq!(
        lines.keys().filter(|k| k.starts_with("/many/")).count(),
        MANY as usize
    );
    // squashfs-tools' own check pass over every file's data.
    let check = tempfile::tempdir().unwrap();
    let dest = check.path().join("x");
    let out = Command::new("unsquashfs")
        .args(["-q", "-d"])
        .arg(&dest)
        .arg(&s.image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(dest.join("usr/bin/big")).unwrap(), s.big);
    assert_eq!(
        fs::metadata(dest.join("usr/bin/su")).unwrap().ino(),
        fs::metadata(dest.join("sbin-su")).unwrap().ino(),
        "unsquashfs restores the hard link"
    );
    assert_eq!(
        xattr::get(dest.join("usr/bin/ping"), "user.origin").unwrap(),
        Some(b"test".to_vec()),
        "unsquashfs reads the xattr table"
    );
}

#[test]
fn a_file_under_a_non_directory_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let f = work.path().join("f");
    fs::write(&f, b"x").unwrap();
    let mut b = Builder::new();
    b.insert(
        Path::new("etc"),
        meta(0o644, 0, 0),
        Content::File(f.clone()),
    )
    .unwrap();
    b.insert(Path::new("etc/passwd"), meta(0o644, 0, 0), Content::File(f))
        .unwrap();

    let err = b
        .write(&work.path().join("i.sqfs"), &mut |_, _| {})
        .unwrap_err();

    assert!(
        err.to_string()
            .contains("etc/passwd lies under etc, which is not a directory"),
        "{err}"
    );
    assert!(!work.path().join("i.sqfs").exists());
    assert!(
        !work.path().join("i.partial").exists(),
        "the partial image is removed"
    );
}

#[test]
fn hard_link_to_a_directory_or_a_missing_path_is_refused() {
    let mut b = Builder::new();
    b.insert(Path::new("d"), meta(0o755, 0, 0), Content::Dir)
        .unwrap();

    let to_dir = b.link(Path::new("l"), Path::new("d")).unwrap_err();
    let missing = b.link(Path::new("l"), Path::new("nope")).unwrap_err();
    let escape = b
        .link(Path::new("l"), Path::new("../etc/shadow"))
        .unwrap_err();

    assert!(to_dir.to_string().contains("is a directory"), "{to_dir}");
    assert!(
        missing.to_string().contains("is not an earlier entry"),
        "{missing}"
    );
    assert!(
        escape.to_string().contains("escapes the image root"),
        "{escape}"
    );
}

/// A tar as Docker's own archiver writes one: PAX records carry `security.capability`.
fn image_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add =
        |path: &str, kind: tar::EntryType, mode: u32, data: &[u8], pax: &[(&str, &[u8])]| {
            if !pax.is_empty() {
                b.append_pax_extensions(pax.iter().copied()).unwrap();
            }
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(data.len() as u64);
            h.set_mtime(1_700_000_000);
            h.set_cksum();
            b.append_data(&mut h, path, data).unwrap();
        };
    add("etc/", tar::EntryType::Directory, 0o755, b"", &[]);
    add(
        "etc/passwd",
        tar::EntryType::Regular,
        0o644,
        b"root:x:0:0::/root:/bin/sh\n",
        &[],
    );
    add(
        "etc/group",
        tar::EntryType::Regular,
        0o644,
        b"root:x:0:\n",
        &[],
    );
    add("bin/", tar::EntryType::Directory, 0o755, b"", &[]);
    let cap = cap_net_raw();
    add(
        "bin/ping",
        tar::EntryType::Regular,
        0o755,
        b"ping",
        &[("SCHILY.xattr.security.capability", cap.as_slice())],
    );
    add(
        "bin/busybox",
        tar::EntryType::Regular,
        0o755,
        b"multi-call",
        &[],
    );
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Link);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_link(&mut h, "bin/ls", "bin/busybox").unwrap();
    b.into_inner().unwrap()
}

#[tokio::test]
async fn docker_image_hard_links_and_file_capabilities_reach_the_root_image() {
    let test = "docker_image_hard_links_and_file_capabilities_reach_the_root_image";
    if !common::docker_available(test) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let tar_path = work.path().join("image.tar");
    fs::write(&tar_path, image_tar()).unwrap();
    let tag = format!("bot-bottle-test/links-caps:{}", std::process::id());
    let out = Command::new("docker")
        .args(["import"])
        .arg(&tar_path)
        .arg(&tag)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let init = work.path().join("init");
    fs::write(&init, b"\x7fELF stand-in for bottle-init").unwrap();
    let cache = work.path().join("cache");
    let docker = bot_bottle::host::docker::connect().await.unwrap();
    let scratch = format!("bot-bottle-test-export-{}", std::process::id());
    let prepared = bot_bottle::image::export::prepare_rootfs(
        &docker,
        &tag,
        &init,
        &cache,
        &BTreeMap::from([("bot-bottle.test".to_owned(), "squashfs".to_owned())]),
        &scratch,
    )
    .await;
    let _ = Command::new("docker").args(["rmi", "-f", &tag]).output();
    let (image, accounts) = prepared.unwrap();
    assert!(accounts.passwd.starts_with("root:x:0:0"));
    let left: Vec<PathBuf> = fs::read_dir(cache.join("rootfs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        left,
        std::slice::from_ref(&image),
        "the export and the spool are removed"
    );

    let Some(m) = mount(&image, test) else {
        return;
    };
    let root = m.path();
    let busybox = fs::symlink_metadata(root.join("bin/busybox")).unwrap();
    let ls = fs::symlink_metadata(root.join("bin/ls")).unwrap();
    assert_eq!(
        (ls.ino(), ls.nlink()),
        (busybox.ino(), 2),
        "the hard link survived"
    );
    assert_eq!(
        xattr::get(root.join("bin/ping"), "security.capability").unwrap(),
        Some(cap_net_raw()),
        "the file capability survived"
    );
    assert_eq!(
        fs::read(root.join(".bottle/init")).unwrap(),
        b"\x7fELF stand-in for bottle-init"
    );
}

/// Deterministic xorshift, so a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// A random host tree: nested directories, files of sizes around the block size, shared
/// contents, hard links, symlinks, FIFOs, names with non-ASCII and non-UTF-8 bytes, setuid
/// and sticky modes, owners beyond 16 bits.
fn random_tree(root: &Path, seed: u64) {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut dirs = vec![root.to_path_buf()];
    let mut files: Vec<PathBuf> = Vec::new();
    let alphabet: &[&[u8]] = &[
        b"a",
        b"b",
        b"Z",
        b"0",
        b".",
        b"-",
        b" ",
        "é".as_bytes(),
        b"\xff",
        b"_",
    ];
    for i in 0..150 {
        let parent = dirs[rng.below(dirs.len())].clone();
        let mut name: Vec<u8> = Vec::new();
        let len = if rng.below(20) == 0 {
            240
        } else {
            1 + rng.below(12)
        };
        while name.len() < len {
            name.extend_from_slice(rng.pick(alphabet));
        }
        name.truncate(len);
        if name == b"." || name == b".." || name.starts_with(b"\xc3") && name.len() == 1 {
            name.push(b'x');
        }
        name.extend_from_slice(format!("~{i}").as_bytes());
        let path = parent.join(OsStr::from_bytes(&name));
        match rng.below(10) {
            0 | 1 => {
                fs::create_dir(&path).unwrap();
                let mode = rng.pick(&[0o755, 0o700, 0o1777, 0o2755]);
                fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
                dirs.push(path.clone());
            }
            2..=5 => {
                let size = rng.pick(&[
                    0,
                    1,
                    100,
                    4095,
                    BLOCK_SIZE - 1,
                    BLOCK_SIZE,
                    BLOCK_SIZE + 1,
                    300_000,
                ]);
                let data = if rng.below(2) == 0 {
                    noise(size, rng.next())
                } else {
                    vec![b'a' + rng.below(26) as u8; size]
                };
                fs::write(&path, data).unwrap();
                let mode = rng.pick(&[0o644, 0o600, 0o755, 0o4755, 0o2711, 0o000]);
                fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
                files.push(path.clone());
            }
            6 if !files.is_empty() => {
                fs::hard_link(&files[rng.below(files.len())], &path).unwrap();
            }
            7 => {
                let target = rng.pick(&["../x", "/etc/shadow", "é/\u{1F600}", "a/b/c/d", "~1"]);
                std::os::unix::fs::symlink(target, &path).unwrap();
            }
            8 => {
                nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o640))
                    .unwrap();
            }
            _ if !files.is_empty() => {
                fs::copy(&files[rng.below(files.len())], &path).unwrap();
                files.push(path.clone());
            }
            _ => continue,
        }
        let uid = rng.pick(&[0, 1000, 65534, 70_000, 123_456]);
        let gid = rng.pick(&[0, 1000, 100_000]);
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid)).unwrap();
    }
}

/// Everything `stat`, `readlink` and `read` tell about a tree, keyed by relative path; hard
/// links are recorded as the first path (in sorted order) of the same inode.
fn observe(root: &Path) -> BTreeMap<PathBuf, String> {
    use sha2::Digest;
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p.clone());
            }
            paths.push(p);
        }
    }
    paths.push(root.to_path_buf());
    paths.sort();
    let mut first_of: BTreeMap<u64, PathBuf> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for p in paths {
        let m = fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().to_path_buf();
        let ft = m.file_type();
        let what = if ft.is_symlink() {
            format!("link {:?}", fs::read_link(&p).unwrap())
        } else if ft.is_dir() {
            "dir".to_owned()
        } else if ft.is_fifo() {
            "fifo".to_owned()
        } else {
            let data = fs::read(&p).unwrap();
            format!(
                "file {} {}",
                data.len(),
                hex::encode(sha2::Sha256::digest(&data))
            )
        };
        let group = if ft.is_dir() {
            String::new()
        } else {
            format!("{:?}", first_of.entry(m.ino()).or_insert(rel.clone()))
        };
        // Symlink mtimes are not compared: the host sets them when the link is made, and
        // readers may report them either way.
        let mtime = if ft.is_symlink() { 0 } else { m.mtime() };
        out.insert(
            rel,
            format!(
                "{what} mode={:o} uid={} gid={} mtime={mtime} nlink={} same-as={group}",
                m.mode() & 0o7777,
                m.uid(),
                m.gid(),
                m.nlink()
            ),
        );
    }
    out
}

#[test]
fn random_host_trees_read_back_identically_through_the_kernel() {
    for seed in 1..=12 {
        let work = tempfile::tempdir().unwrap();
        let host = work.path().join("host");
        fs::create_dir(&host).unwrap();
        random_tree(&host, seed);
        let image = work.path().join("ws.sqfs");

        bot_bottle::image::workspace::snapshot(&host, &image, &mut |_, _| {}).unwrap();

        let Some(m) = mount(&image, "random_host_trees_read_back_identically") else {
            return;
        };
        let (want, got) = (observe(&host), observe(&m.path()));
        let differ: Vec<String> = want
            .iter()
            .filter(|(p, w)| got.get(*p) != Some(*w))
            .map(|(p, w)| format!("{p:?}\n  host:  {w}\n  image: {:?}", got.get(p)))
            .collect();
        assert!(
            differ.is_empty() && want.len() == got.len(),
            "seed {seed}: {} of {} entries differ ({} in the image):\n{}",
            differ.len(),
            want.len(),
            got.len(),
            differ.join("\n")
        );
    }
}

#[test]
fn root_images_keep_file_capabilities_and_user_xattrs_and_nothing_else() {
    let test = "root_images_keep_file_capabilities_and_user_xattrs_and_nothing_else";
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, pax: &[(&str, &[u8])]| {
        b.append_pax_extensions(pax.iter().copied()).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_cksum();
        b.append_data(&mut h, path, &b""[..]).unwrap();
    };
    let cap = cap_net_raw();
    add(
        "lower/",
        tar::EntryType::Directory,
        &[("SCHILY.xattr.trusted.overlay.opaque", b"y")],
    );
    add(
        "lower/ping",
        tar::EntryType::Regular,
        &[
            ("SCHILY.xattr.security.capability", cap.as_slice()),
            ("SCHILY.xattr.user.note", b"kept"),
            (
                "SCHILY.xattr.security.selinux",
                b"system_u:object_r:bin_t:s0",
            ),
        ],
    );
    let tar = b.into_inner().unwrap();
    let work = tempfile::tempdir().unwrap();
    let init = work.path().join("init");
    fs::write(&init, b"init").unwrap();
    let image = work.path().join("root.sqfs");

    let stats = bot_bottle::image::rootfs::tar_to_squashfs(
        tar.as_slice(),
        &init,
        &work.path().join("spool"),
        &image,
        &mut |_, _| {},
    )
    .unwrap();

    assert_eq!((stats.xattrs, stats.ignored_xattrs), (1, 2));
    let Some(m) = mount(&image, test) else {
        return;
    };
    let names = |p: &str| -> Vec<String> {
        let mut v: Vec<String> = xattr::list(m.path().join(p))
            .unwrap()
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names("lower/ping"), ["security.capability", "user.note"]);
    assert!(names("lower").is_empty(), "{:?}", names("lower"));
}

/// Small files go into shared fragment blocks (more than 512 of them, so the fragment table
/// spans two metadata blocks); files of a block or more keep their own blocks; everything
/// reads back through the kernel byte for byte.
#[test]
fn small_files_share_fragment_blocks_and_read_back_through_the_kernel() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    let mut b = Builder::new();
    b.set_root(Meta::root(0o755));
    let mut expected: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut add = |b: &mut Builder, path: String, bytes: Vec<u8>| {
        let file = src.join(path.replace('/', "_"));
        fs::write(&file, &bytes).unwrap();
        put(b, &path, meta(0o644, 0, 0), Content::File(file));
        expected.insert(path, bytes);
    };
    // 520 files of 70 KB and more: two never fit in one 128 KiB fragment block.
    const LARGE_SMALL: usize = 520;
    for i in 0..LARGE_SMALL {
        let mut bytes = format!("file {i:04}\n").repeat(7_100).into_bytes();
        bytes.truncate(70_000 + i);
        add(&mut b, format!("big-small/{i:04}"), bytes);
    }
    // 2,000 tiny files, many to a fragment block.
    for i in 0..2000u64 {
        add(
            &mut b,
            format!("tiny/{i:04}"),
            noise(10 + (i as usize * 7) % 190, i + 1),
        );
    }
    // A copy of a tiny file shares its fragment; edge sizes keep their own blocks.
    add(&mut b, "copy-of-tiny-7".into(), noise(10 + 49, 8));
    add(&mut b, "one-block".into(), noise(BLOCK_SIZE, 3));
    add(&mut b, "block-and-a-byte".into(), noise(BLOCK_SIZE + 1, 4));
    add(
        &mut b,
        "just-under-a-block".into(),
        noise(BLOCK_SIZE - 1, 5),
    );
    add(&mut b, "empty".into(), Vec::new());

    let image = work.path().join("image.sqfs");
    let stats = b.write(&image, &mut |_, _| {}).unwrap();
    // Distinct small contents: 520 + 2000 + the one just under a block (the copy is shared).
    assert_eq!(stats.fragmented_files, 2521, "{stats:?}");
    assert_eq!(stats.deduplicated_files, 1, "{stats:?}");
    assert!(stats.fragment_blocks > 512, "{stats:?}");

    let Some(m) = mount(&image, "small_files_share_fragment_blocks") else {
        return;
    };
    for (path, bytes) in &expected {
        let got = fs::read(m.path().join(path)).unwrap();
        assert!(
            got == *bytes,
            "{path}: {} bytes read, {} written",
            got.len(),
            bytes.len()
        );
    }
    let tiny = fs::read_dir(m.path().join("tiny")).unwrap().count();
    assert_eq!(tiny, 2000);
}
