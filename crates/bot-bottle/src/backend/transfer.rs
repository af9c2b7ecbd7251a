//! `bot-bottle cp`: tar streams in and out of a bottle. What comes out of a bottle was made by
//! the agent's side and is untrusted: it is unpacked only inside the destination directory
//! (no absolute paths, no `..`, no writing through links), without owners or setuid bits.
//! Workspaces on the Docker backend go in the same way ([`pack_tree`]): packed as they are
//! streamed, owned by the agent's user.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use crate::image::workspace::{walk_tree, Node, ReadError, TreeEntry, TreeStats, WalkError};

/// The most `cp` accepts from a bottle, in bytes of tar stream, unless `MAX_COPY_ENV` says
/// otherwise: the archive is streamed to the destination (never held in memory), and this
/// bound keeps an agent that sends an endless one from filling the host's disk.
pub const DEFAULT_MAX_COPY_BYTES: u64 = 4 << 30;
/// Overrides [`DEFAULT_MAX_COPY_BYTES`] (bytes).
pub const MAX_COPY_ENV: &str = "BOT_BOTTLE_CP_MAX_BYTES";

/// The bound on what `cp` accepts: `$BOT_BOTTLE_CP_MAX_BYTES`, else the default.
pub fn max_copy_bytes() -> Result<u64, TransferError> {
    match std::env::var(MAX_COPY_ENV) {
        Err(_) => Ok(DEFAULT_MAX_COPY_BYTES),
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| TransferError::BadLimit { value: v }),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("`{arg}` names no bottle path: write BOTTLE:/path on exactly one side, e.g. `bot-bottle cp claude:/workspace/out ./out`")]
    NoBottleSide { arg: String },
    #[error("both `{src}` and `{dst}` name a bottle: copy between a bottle and this host")]
    BothBottles { src: String, dst: String },
    #[error("the path in the bottle must be absolute: `{path}`")]
    RelativeGuestPath { path: String },
    #[error("cannot read {path} to copy it in")]
    Pack {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot unpack into {path}")]
    Unpack {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the archive from the bottle has an entry that would land outside {dst}: `{entry}` (refused)")]
    Escape { dst: PathBuf, entry: String },
    #[error("the archive from the bottle is larger than {limit} bytes, the bound on what `cp` accepts: copy a smaller path, or raise the bound with {MAX_COPY_ENV}=BYTES")]
    TooLarge { limit: u64 },
    #[error("{MAX_COPY_ENV}={value} is not a number of bytes")]
    BadLimit { value: String },
    #[error("{path} is not a directory: a workspace must be one")]
    NotADirectory { path: PathBuf },
    #[error("the copy of {path} into the bottle stopped")]
    Stream {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A writer that refuses (with [`TransferError::TooLarge`]) whatever would go past `limit`
/// bytes in all.
pub struct Bounded<W> {
    inner: W,
    limit: u64,
    written: u64,
}

impl<W> Bounded<W> {
    pub fn new(inner: W, limit: u64) -> Self {
        Self {
            inner,
            limit,
            written: 0,
        }
    }

    /// Account for `n` more bytes; the error once they pass the limit.
    pub fn admit(&mut self, n: usize) -> Result<(), TransferError> {
        self.written = self.written.saturating_add(n as u64);
        if self.written > self.limit {
            return Err(TransferError::TooLarge { limit: self.limit });
        }
        Ok(())
    }
}

impl<W: Write> Write for Bounded<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.admit(buf.len()).map_err(std::io::Error::other)?;
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Copy a tar stream out of a bottle into `dst` without holding it: `produce` writes the
/// stream (bounded by `limit`) into a pipe on its own thread while this one unpacks it.
/// A producer failure (the bound included) is the error reported.
pub fn stream_out<P, E>(produce: P, dst: &Path, limit: u64) -> Result<usize, StreamError<E>>
where
    P: FnOnce(&mut dyn Write) -> Result<(), E> + Send + 'static,
    E: Send + 'static,
{
    let (reader, writer) = std::io::pipe().map_err(|source| {
        StreamError::Transfer(TransferError::Unpack {
            path: dst.to_path_buf(),
            source,
        })
    })?;
    let producer = std::thread::spawn(move || {
        let mut bounded = Bounded::new(writer, limit);
        produce(&mut bounded)
        // The writer drops here: the unpacker sees the end of the stream.
    });
    let unpacked = unpack_safely(reader, dst);
    let produced = producer.join().map_err(|_| StreamError::ProducerPanicked)?;
    match (produced, unpacked) {
        (Err(e), _) => Err(StreamError::Produce(e)),
        (Ok(()), result) => result.map_err(StreamError::Transfer),
    }
}

/// A blocking reader over chunks sent from async code (a Docker archive stream), so the
/// archive is unpacked as it arrives instead of being collected first. Use it on a blocking
/// thread only.
pub struct ChunkReader {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    current: bytes::Bytes,
}

impl ChunkReader {
    pub fn new(rx: tokio::sync::mpsc::Receiver<bytes::Bytes>) -> Self {
        Self {
            rx,
            current: bytes::Bytes::new(),
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Why [`stream_out`] failed: the producer (the bottle's side) or the unpacking.
#[derive(Debug, thiserror::Error)]
pub enum StreamError<E> {
    #[error("reading the archive from the bottle failed")]
    Produce(#[source] E),
    #[error(transparent)]
    Transfer(TransferError),
    #[error("the thread reading from the bottle panicked")]
    ProducerPanicked,
}

/// Write a tar of `local` into `out` (see [`pack`]), streaming.
pub fn pack_into(local: &Path, out: impl Write) -> Result<(), TransferError> {
    let err = |source| TransferError::Pack {
        path: local.to_path_buf(),
        source,
    };
    let name = local
        .file_name()
        .map(PathBuf::from)
        .ok_or_else(|| err(std::io::Error::other("no file name")))?;
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let meta = std::fs::symlink_metadata(local).map_err(err)?;
    if meta.is_dir() {
        builder.append_dir_all(&name, local).map_err(err)?;
    } else {
        builder.append_path_with_name(local, &name).map_err(err)?;
    }
    builder.into_inner().map_err(err)?.flush().map_err(err)
}

/// Who owns every entry of a tree packed by [`pack_tree`], whatever owns it on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// Write a tar of the host directory `host` into `out`, to be unpacked at a container's `/`:
/// entries are named below `prefix` (the guest path without its leading `/`; the first entry
/// is `prefix` itself) and every one is owned by `owner`. What goes in follows the workspace
/// rules ([`walk_tree`]): modes and mtimes kept, symlinks kept as links (never followed),
/// further names of a hard-linked file as links to its first, FIFOs; sockets and device nodes
/// left out; no extended attributes. A file whose size changes while it is read is cut or
/// zero-padded to the size its header gave (the archive stays well formed).
/// `progress(done)` gets the content bytes written so far.
pub fn pack_tree(
    host: &Path,
    prefix: &Path,
    owner: Owner,
    out: impl Write,
    progress: &mut dyn FnMut(u64),
) -> Result<TreeStats, TransferError> {
    use std::os::unix::fs::MetadataExt;
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TransferError::Pack { path, source }
    };
    let write_err = |source| TransferError::Stream {
        path: host.to_path_buf(),
        source,
    };
    let header = |meta: &std::fs::Metadata, kind: tar::EntryType| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(meta.mode() & 0o7777);
        h.set_uid(owner.uid.into());
        h.set_gid(owner.gid.into());
        h.set_mtime(meta.mtime().max(0) as u64);
        h.set_size(0);
        h
    };
    let root = std::fs::metadata(host).map_err(read_err(host))?;
    if !root.is_dir() {
        return Err(TransferError::NotADirectory {
            path: host.to_path_buf(),
        });
    }
    let mut builder = tar::Builder::new(out);
    builder
        .append_data(
            &mut header(&root, tar::EntryType::Directory),
            prefix,
            std::io::empty(),
        )
        .map_err(write_err)?;
    let mut done = 0u64;
    let stats = walk_tree(host, &mut |e: TreeEntry<'_>| {
        let name = prefix.join(e.name);
        let appended = match e.node {
            Node::Dir => builder.append_data(
                &mut header(e.meta, tar::EntryType::Directory),
                &name,
                std::io::empty(),
            ),
            Node::Fifo => builder.append_data(
                &mut header(e.meta, tar::EntryType::Fifo),
                &name,
                std::io::empty(),
            ),
            Node::Symlink(target) => {
                builder.append_link(&mut header(e.meta, tar::EntryType::Symlink), &name, target)
            }
            Node::HardLink(first) => builder.append_link(
                &mut header(e.meta, tar::EntryType::Link),
                &name,
                prefix.join(first),
            ),
            Node::File => {
                let file = std::fs::File::open(e.path).map_err(read_err(e.path))?;
                let len = e.meta.len();
                let mut h = header(e.meta, tar::EntryType::Regular);
                h.set_size(len);
                let mut content = Content {
                    inner: file.take(len).chain(std::io::repeat(0)).take(len),
                    done: &mut done,
                    progress: &mut *progress,
                    failed: None,
                };
                let appended = builder.append_data(&mut h, &name, &mut content);
                if let Some(source) = content.failed.take() {
                    return Err(read_err(e.path)(source));
                }
                appended
            }
        };
        appended.map_err(write_err)
    })
    .map_err(|e| match e {
        WalkError::Read(ReadError { path, source }) => TransferError::Pack { path, source },
        WalkError::Visit(e) => e,
    })?;
    builder
        .into_inner()
        .and_then(|mut out| out.flush())
        .map_err(write_err)?;
    Ok(stats)
}

/// A file's content on its way into the archive: counts what is read for the progress, and
/// keeps a read error apart from the archive's write errors.
struct Content<'a, R> {
    inner: R,
    done: &'a mut u64,
    progress: &'a mut dyn FnMut(u64),
    failed: Option<std::io::Error>,
}

impl<R: Read> Read for Content<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                *self.done += n as u64;
                (self.progress)(*self.done);
                Ok(n)
            }
            Err(e) => {
                let kind = e.kind();
                self.failed = Some(e);
                Err(std::io::Error::new(kind, "reading the file failed"))
            }
        }
    }
}

/// A blocking writer that hands what it is given to async code (a Docker upload) in chunks of
/// about `chunk` bytes: the counterpart of [`ChunkReader`]. Use it on a blocking thread only;
/// `flush` sends what is buffered. Once the receiver is gone, writes fail (`BrokenPipe`).
pub struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    buf: bytes::BytesMut,
    chunk: usize,
}

impl ChunkWriter {
    pub fn new(tx: tokio::sync::mpsc::Sender<bytes::Bytes>, chunk: usize) -> Self {
        Self {
            tx,
            buf: bytes::BytesMut::with_capacity(chunk),
            chunk,
        }
    }

    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.buf.reserve(self.chunk);
        self.tx.blocking_send(chunk).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the receiving side of the copy stopped",
            )
        })
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= self.chunk {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// Which way a copy goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Direction {
    /// `bottle:/guest/path` → local directory.
    Out {
        bottle: String,
        guest: String,
        local: PathBuf,
    },
    /// local path → `bottle:/guest/dir`.
    In {
        local: PathBuf,
        bottle: String,
        guest: String,
    },
}

fn split_bottle(arg: &str) -> Option<(String, String)> {
    // A local path may contain ':' too; a bottle side starts with a bottle name or id.
    let (bottle, path) = arg.split_once(':')?;
    let ok = !bottle.is_empty()
        && bottle
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    ok.then(|| (bottle.to_owned(), path.to_owned()))
}

/// Parse `cp SRC DST`.
pub fn parse(src: &str, dst: &str) -> Result<Direction, TransferError> {
    let checked = |path: String| {
        if path.starts_with('/') {
            Ok(path)
        } else {
            Err(TransferError::RelativeGuestPath { path })
        }
    };
    match (split_bottle(src), split_bottle(dst)) {
        (Some(_), Some(_)) => Err(TransferError::BothBottles {
            src: src.to_owned(),
            dst: dst.to_owned(),
        }),
        (Some((bottle, guest)), None) => Ok(Direction::Out {
            bottle,
            guest: checked(guest)?,
            local: PathBuf::from(dst),
        }),
        (None, Some((bottle, guest))) => Ok(Direction::In {
            local: PathBuf::from(src),
            bottle,
            guest: checked(guest)?,
        }),
        (None, None) => Err(TransferError::NoBottleSide {
            arg: format!("{src} {dst}"),
        }),
    }
}

/// A tar of `local` (a file or a directory, recursively; links kept as links) whose top entry
/// is its file name.
pub fn pack(local: &Path) -> Result<Vec<u8>, TransferError> {
    let mut tar = Vec::new();
    pack_into(local, &mut tar)?;
    Ok(tar)
}

/// A tar of `local` as a reader: packed on a thread of its own into a pipe, so copying in
/// never holds the archive either. A packing failure ends the stream early (the receiver
/// sees a truncated archive) and is returned by the handle.
pub fn pack_stream(
    local: &Path,
) -> Result<
    (
        std::io::PipeReader,
        std::thread::JoinHandle<Result<(), TransferError>>,
    ),
    TransferError,
> {
    let local = local.to_path_buf();
    let (reader, writer) = std::io::pipe().map_err(|source| TransferError::Pack {
        path: local.clone(),
        source,
    })?;
    let packer = std::thread::spawn(move || pack_into(&local, writer));
    Ok((reader, packer))
}

/// Unpack an untrusted tar stream into `dst` (created if missing). Returns the entry count.
pub fn unpack_safely(tar: impl Read, dst: &Path) -> Result<usize, TransferError> {
    let err = |source| TransferError::Unpack {
        path: dst.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dst).map_err(err)?;
    let mut archive = tar::Archive::new(tar);
    archive.set_preserve_permissions(false);
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let mut count = 0;
    for entry in archive.entries().map_err(err)? {
        let mut entry = entry.map_err(err)?;
        let path = entry.path().map_err(err)?.into_owned();
        let bad = path.is_absolute()
            || path
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::Prefix(_)));
        if bad {
            return Err(TransferError::Escape {
                dst: dst.to_path_buf(),
                entry: path.display().to_string(),
            });
        }
        // `unpack_in` also refuses to write through a symlink that leads outside `dst`.
        if !entry.unpack_in(dst).map_err(err)? {
            return Err(TransferError::Escape {
                dst: dst.to_path_buf(),
                entry: path.display().to_string(),
            });
        }
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(dir: &Path) -> Vec<u8> {
        pack(dir).unwrap()
    }

    #[test]
    fn stream_out_past_the_bound_is_refused_naming_it() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("blob"), vec![0u8; 64 * 1024]).unwrap();
        let tar = tar_of(src.path());
        let dst = tempfile::tempdir().unwrap();

        let result = stream_out(
            move |out| out.write_all(&tar),
            &dst.path().join("out"),
            16 * 1024,
        );

        let err = result.unwrap_err();
        let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(chain.contains("larger than 16384 bytes"), "{chain}");
    }

    #[test]
    fn stream_out_under_the_bound_unpacks_what_came() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("note"), "hi\n").unwrap();
        let tar = tar_of(src.path());
        let limit = tar.len() as u64;
        let dst = tempfile::tempdir().unwrap();
        let name = src.path().file_name().unwrap().to_owned();

        let n = stream_out(move |out| out.write_all(&tar), dst.path(), limit).unwrap();

        assert_eq!(n, 2);
        assert_eq!(
            std::fs::read_to_string(dst.path().join(name).join("note")).unwrap(),
            "hi\n"
        );
    }

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o4755);
        h.set_size(size);
        h
    }

    #[test]
    fn parse_tells_the_bottle_side_and_checks_the_guest_path() {
        assert_eq!(
            parse("claude-1a2b3c:/workspace/out", "./here").unwrap(),
            Direction::Out {
                bottle: "claude-1a2b3c".into(),
                guest: "/workspace/out".into(),
                local: "./here".into()
            }
        );
        assert!(matches!(
            parse("./a", "test:/tmp").unwrap(),
            Direction::In { .. }
        ));
        assert!(matches!(
            parse("a:/x", "b:/y"),
            Err(TransferError::BothBottles { .. })
        ));
        assert!(matches!(
            parse("./a", "./b"),
            Err(TransferError::NoBottleSide { .. })
        ));
        assert!(matches!(
            parse("test:tmp", "."),
            Err(TransferError::RelativeGuestPath { .. })
        ));
    }

    #[test]
    fn pack_then_unpack_round_trips_a_tree_without_setuid() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("proj");
        std::fs::create_dir_all(src.join("a/b")).unwrap();
        std::fs::write(src.join("a/b/f.txt"), "content").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            src.join("a/b/f.txt"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        let tar = pack(&src).unwrap();
        let dst = dir.path().join("out");
        let n = unpack_safely(tar.as_slice(), &dst).unwrap();
        assert!(n >= 3);
        assert_eq!(
            std::fs::read_to_string(dst.join("proj/a/b/f.txt")).unwrap(),
            "content"
        );
        let mode = std::fs::metadata(dst.join("proj/a/b/f.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o4000, 0, "setuid kept: {mode:o}");
    }

    #[test]
    fn pack_tree_names_entries_below_the_prefix_owned_by_the_agent_and_keeps_links() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("proj");
        std::fs::create_dir_all(host.join("src")).unwrap();
        std::fs::write(host.join("src/run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            host.join("src/run.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::fs::hard_link(host.join("src/run.sh"), host.join("again.sh")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", host.join("escape")).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(host.join("s.sock")).unwrap();
        let owner = Owner {
            uid: 1234,
            gid: 5678,
        };
        let mut tar = Vec::new();
        let mut seen_bytes = 0;
        let stats = pack_tree(
            &host,
            Path::new("home/agent/proj"),
            owner,
            &mut tar,
            &mut |done| seen_bytes = done,
        )
        .unwrap();

        assert_eq!((stats.files, stats.hardlinks, stats.symlinks), (1, 1, 1));
        assert_eq!(stats.skipped, 1, "the socket is left out");
        assert_eq!(seen_bytes, 10);
        let mut archive = tar::Archive::new(tar.as_slice());
        let mut entries = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let h = entry.header();
            assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (1234, 5678));
            let link = entry
                .link_name()
                .unwrap()
                .map(|l| l.display().to_string())
                .unwrap_or_default();
            let what = format!(
                "{} {:?} {:o} {link}",
                entry.path().unwrap().display(),
                h.entry_type(),
                h.mode().unwrap() & 0o7777
            );
            let mut data = String::new();
            entry.read_to_string(&mut data).unwrap();
            entries.push(format!("{what} {data:?}"));
        }
        let mode = |p: &str| {
            std::fs::symlink_metadata(host.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(
            entries,
            [
                format!("home/agent/proj Directory {:o}  \"\"", mode("")),
                "home/agent/proj/again.sh Regular 755  \"#!/bin/sh\\n\"".to_owned(),
                format!(
                    "home/agent/proj/escape Symlink {:o} /etc/passwd \"\"",
                    mode("escape")
                ),
                format!("home/agent/proj/src Directory {:o}  \"\"", mode("src")),
                "home/agent/proj/src/run.sh Link 755 home/agent/proj/again.sh \"\"".to_owned(),
            ]
        );
    }

    #[test]
    fn archive_climbing_out_with_dotdot_is_refused_and_writes_nothing_outside() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = header(tar::EntryType::Regular, 4);
        // `append_data` refuses `..`; write the name into the header directly, as an attacker would.
        h.as_gnu_mut().unwrap().name[..12].copy_from_slice(b"../escaped.t");
        h.set_cksum();
        b.append(&h, &b"evil"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let dst = dir.path().join("out");
        let err = unpack_safely(tar.as_slice(), &dst).unwrap_err();
        assert!(matches!(err, TransferError::Escape { .. }), "{err}");
        assert!(!dir.path().join("escaped.t").exists());
    }

    #[test]
    fn archive_writing_through_a_symlink_out_of_the_destination_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut link = header(tar::EntryType::Symlink, 0);
        b.append_link(&mut link, "link", &outside).unwrap();
        let mut file = header(tar::EntryType::Regular, 4);
        b.append_data(&mut file, "link/pwned", &b"evil"[..])
            .unwrap();
        let tar = b.into_inner().unwrap();
        let result = unpack_safely(tar.as_slice(), &dir.path().join("out"));
        assert!(result.is_err(), "{result:?}");
        assert!(!outside.join("pwned").exists());
    }
}
