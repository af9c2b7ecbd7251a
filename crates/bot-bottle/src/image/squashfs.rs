//! A squashfs 4.0 image writer (zstd), written for bot-bottle's read-only images.
//!
//! Root images must keep what the agent's Docker image holds: owners, modes (setuid and
//! setgid included), mtimes, symlinks, device nodes, FIFOs, sockets, **hard links** (one inode
//! with several names and its link count) and **extended attributes** (`security.capability`
//! on `ping`-like binaries, `user.*`). No library writer we could use keeps the last two, so
//! this module writes the format itself. The layout follows the kernel's reader
//! (`fs/squashfs`): superblock, data blocks, inode table, directory table, id table, xattr
//! tables, padded to 4 KiB. Files smaller than a block are packed together into fragment
//! blocks (as mksquashfs does by default: a larger file's tail stays its own block); there is
//! no NFS export table; identical file contents are stored once.
//!
//! Building is two steps: [`Builder`] collects paths (a pure, in-memory tree, checked as it
//! grows), and [`Builder::write`] streams file contents from their spool files into the image.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufWriter, IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

/// Data block size (the kernel's default, 128 KiB).
pub const BLOCK_SIZE: usize = 128 * 1024;
const BLOCK_LOG: u16 = 17;
const METADATA_SIZE: usize = 8192;
const SUPERBLOCK_LEN: u64 = 96;
const MAGIC: u32 = 0x7371_7368;
const ZSTD: u16 = 6;
/// zstd level for data and metadata: a fast level; images are built once per agent image.
const ZSTD_LEVEL: i32 = 6;
const NO_TABLE: u64 = u64::MAX;
const NO_FRAGMENT: u32 = u32::MAX;
const NO_XATTR: u32 = u32::MAX;
const FLAG_NO_FRAGMENTS: u16 = 1 << 4;
const FLAG_DUPLICATES: u16 = 1 << 6;
const FLAG_NO_XATTRS: u16 = 1 << 9;
const UNCOMPRESSED_METADATA: u16 = 1 << 15;
const UNCOMPRESSED_BLOCK: u32 = 1 << 24;
/// Most compression threads.
const MAX_THREADS: usize = 16;
/// Data blocks each thread compresses per batch (1 MiB).
const BATCH_PER_THREAD: usize = 8;
/// Longest name in a directory entry.
const NAME_MAX: usize = 256;
/// Longest symlink target the kernel reads (one page).
const SYMLINK_MAX: usize = 4096;
/// Most entries one directory header may cover.
const DIR_HEADER_MAX: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum SquashfsError {
    #[error("cannot read the content of {path} from {source_file}")]
    Read {
        path: String,
        source_file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the image {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} escapes the image root (absolute or `..`)")]
    UnsafePath { path: String },
    #[error("{path} lies under {parent}, which is not a directory")]
    NotADirectory { path: String, parent: String },
    #[error("hard link {path} points at {target}, which {reason}")]
    BadHardLink {
        path: String,
        target: String,
        reason: &'static str,
    },
    #[error("{path}: a name longer than {NAME_MAX} bytes cannot be stored in squashfs")]
    NameTooLong { path: String },
    #[error("{path}: a symlink target longer than {SYMLINK_MAX} bytes cannot be read by Linux")]
    SymlinkTooLong { path: String },
    #[error("the image has more than 65536 distinct uids and gids; squashfs cannot store them")]
    TooManyIds,
    #[error("{what} does not fit in a squashfs image (the format's 32-bit field overflowed)")]
    TooLarge { what: &'static str },
    #[error("zstd compression failed")]
    Compress(#[source] io::Error),
}

/// Owner, mode and times of one inode, and its extended attributes (full names such as
/// `security.capability`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u32,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    /// A root-owned node with `mode` and no times or xattrs.
    pub fn root(mode: u16) -> Self {
        Meta {
            mode,
            ..Meta::default()
        }
    }
}

/// What an inode is. File contents live in a spool file until the image is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Dir,
    File(PathBuf),
    Symlink(Vec<u8>),
    CharDevice(u32),
    BlockDevice(u32),
    Fifo,
    Socket,
}

impl Content {
    /// The basic inode type, which is also the type stored in directory entries.
    fn basic_type(&self) -> u16 {
        match self {
            Content::Dir => 1,
            Content::File(_) => 2,
            Content::Symlink(_) => 3,
            Content::BlockDevice(_) => 4,
            Content::CharDevice(_) => 5,
            Content::Fifo => 6,
            Content::Socket => 7,
        }
    }
}

/// What [`Builder::write`] put into an image.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WriteStats {
    pub inodes: u32,
    /// Inodes with more than one name.
    pub hard_linked_inodes: u32,
    pub inodes_with_xattrs: u32,
    /// Extended attributes squashfs cannot hold (only `user.`, `trusted.` and `security.`
    /// exist in the format; POSIX ACLs live under `system.`): `(path, name)`.
    pub dropped_xattrs: Vec<(String, String)>,
    /// Regular files whose content was already in the image and is shared.
    pub deduplicated_files: u32,
    /// Distinct small file contents packed into fragment blocks, and those blocks.
    pub fragmented_files: u32,
    pub fragment_blocks: u32,
    /// File content bytes read.
    pub data_in: u64,
    /// Size of the finished image.
    pub image_bytes: u64,
}

/// A tree of paths to be written as one squashfs image. Paths are relative to the root; a
/// later [`insert`](Builder::insert) of a path replaces the earlier node, as extracting a tar
/// would; parents never inserted become root-owned 0755 directories.
#[derive(Debug, Default)]
pub struct Builder {
    nodes: Vec<(Meta, Content)>,
    paths: BTreeMap<PathBuf, usize>,
    root: Meta,
}

/// A path as a clean relative path; `None` for the root itself.
pub fn clean_path(path: &Path) -> Result<Option<PathBuf>, SquashfsError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => {
                return Err(SquashfsError::UnsafePath {
                    path: path.display().to_string(),
                })
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

impl Builder {
    pub fn new() -> Self {
        Builder {
            root: Meta::root(0o755),
            ..Builder::default()
        }
    }

    /// Owner, mode and xattrs of the root directory.
    pub fn set_root(&mut self, meta: Meta) {
        self.root = meta;
    }

    /// Adds (or replaces) `path`. An empty path or `.` sets the root directory's metadata.
    pub fn insert(
        &mut self,
        path: &Path,
        meta: Meta,
        content: Content,
    ) -> Result<(), SquashfsError> {
        let Some(path) = clean_path(path)? else {
            self.root = meta;
            return Ok(());
        };
        check_name(&path)?;
        if let Content::Symlink(target) = &content {
            if target.len() > SYMLINK_MAX {
                return Err(SquashfsError::SymlinkTooLong {
                    path: path.display().to_string(),
                });
            }
        }
        self.nodes.push((meta, content));
        self.paths.insert(path, self.nodes.len() - 1);
        Ok(())
    }

    /// Adds `path` as another name of the inode at `target` (which must not be a directory).
    pub fn link(&mut self, path: &Path, target: &Path) -> Result<(), SquashfsError> {
        let bad = |reason| SquashfsError::BadHardLink {
            path: path.display().to_string(),
            target: target.display().to_string(),
            reason,
        };
        let Some(clean) = clean_path(path)? else {
            return Err(bad("cannot replace the root"));
        };
        let Some(target_clean) = clean_path(target)? else {
            return Err(bad("is the root directory"));
        };
        let Some(&id) = self.paths.get(&target_clean) else {
            return Err(bad("is not an earlier entry"));
        };
        if self.nodes[id].1 == Content::Dir {
            return Err(bad("is a directory"));
        }
        check_name(&clean)?;
        self.paths.insert(clean, id);
        Ok(())
    }

    /// The content at `path`, if any.
    pub fn get(&self, path: &Path) -> Option<&Content> {
        self.paths.get(path).map(|&id| &self.nodes[id].1)
    }

    /// Writes the image to `out` (through `out.partial`, renamed when complete).
    /// `progress(done, total)` is called with content bytes as files are compressed.
    pub fn write(
        self,
        out: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<WriteStats, SquashfsError> {
        let tmp = out.with_extension("partial");
        let write_err = |source| SquashfsError::Write {
            path: out.to_path_buf(),
            source,
        };
        let file = File::create(&tmp).map_err(write_err)?;
        let result = self.write_to(file, out, progress);
        match result {
            Ok(stats) => {
                std::fs::rename(&tmp, out).map_err(write_err)?;
                Ok(stats)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn write_to(
        mut self,
        file: File,
        path: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<WriteStats, SquashfsError> {
        let tree = self.tree()?;
        let mut w = ImageWriter {
            out: BufWriter::new(file),
            path: path.to_path_buf(),
            pos: 0,
            compressor: zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(SquashfsError::Compress)?,
            inodes: MetaWriter::default(),
            dirs: MetaWriter::default(),
            ids: Vec::new(),
            id_index: HashMap::new(),
            xattr_sets: Vec::new(),
            xattr_index: HashMap::new(),
            fragments: Vec::new(),
            stats: WriteStats::default(),
            done: 0,
            total: 0,
        };
        // The superblock is written last, once the tables' places are known.
        w.put(&[0u8; SUPERBLOCK_LEN as usize])?;
        let data = w.write_data(&self.nodes, &tree, progress)?;
        let root_ref = w.write_tree(&self.nodes, &tree, &data)?;
        w.finish(root_ref, tree.order.len() as u32)
    }

    /// Resolves the paths into directories with sorted children and numbers the inodes in the
    /// order they are written: every child before its directory, the root last.
    fn tree(&mut self) -> Result<Tree, SquashfsError> {
        let root = self.nodes.len();
        self.nodes
            .push((std::mem::take(&mut self.root), Content::Dir));
        let paths = std::mem::take(&mut self.paths);
        let mut dir_at: HashMap<PathBuf, usize> = HashMap::from([(PathBuf::new(), root)]);
        let mut children: HashMap<usize, Vec<(Vec<u8>, usize)>> =
            HashMap::from([(root, Vec::new())]);
        let mut path_of: HashMap<usize, PathBuf> = HashMap::new();
        // Sorted paths visit a directory before anything under it.
        for (path, &id) in &paths {
            let parent = path.parent().unwrap_or(Path::new(""));
            let parent_id = self.ensure_dir(parent, path, &paths, &mut dir_at, &mut children)?;
            children
                .entry(parent_id)
                .or_default()
                .push((file_name(path), id));
            path_of.entry(id).or_insert_with(|| path.clone());
            if self.nodes[id].1 == Content::Dir {
                dir_at.insert(path.clone(), id);
                children.entry(id).or_default();
            }
        }
        for (path, id) in dir_at {
            path_of.entry(id).or_insert(path);
        }
        for list in children.values_mut() {
            list.sort_by(|a, b| a.0.cmp(&b.0));
        }
        let n = self.nodes.len();
        let mut tree = Tree {
            root,
            children,
            order: Vec::new(),
            number: vec![0; n],
            parent: vec![root; n],
            links: vec![0; n],
            path_of,
        };
        tree.number_from(root, &self.nodes);
        Ok(tree)
    }

    /// The directory node at `dir`, created (root-owned, 0755) when no entry named it.
    fn ensure_dir(
        &mut self,
        dir: &Path,
        child: &Path,
        paths: &BTreeMap<PathBuf, usize>,
        dir_at: &mut HashMap<PathBuf, usize>,
        children: &mut HashMap<usize, Vec<(Vec<u8>, usize)>>,
    ) -> Result<usize, SquashfsError> {
        if let Some(&id) = dir_at.get(dir) {
            return Ok(id);
        }
        if paths.contains_key(dir) {
            // Directories are registered when visited, so this entry is something else.
            return Err(SquashfsError::NotADirectory {
                path: child.display().to_string(),
                parent: dir.display().to_string(),
            });
        }
        let grandparent = dir.parent().unwrap_or(Path::new(""));
        let parent_id = self.ensure_dir(grandparent, dir, paths, dir_at, children)?;
        self.nodes.push((Meta::root(0o755), Content::Dir));
        let id = self.nodes.len() - 1;
        children
            .entry(parent_id)
            .or_default()
            .push((file_name(dir), id));
        children.insert(id, Vec::new());
        dir_at.insert(dir.to_path_buf(), id);
        Ok(id)
    }
}

fn file_name(path: &Path) -> Vec<u8> {
    path.file_name()
        .map(|n| n.as_encoded_bytes().to_vec())
        .unwrap_or_default()
}

fn check_name(path: &Path) -> Result<(), SquashfsError> {
    if file_name(path).len() > NAME_MAX {
        return Err(SquashfsError::NameTooLong {
            path: path.display().to_string(),
        });
    }
    Ok(())
}

/// The resolved tree; node ids index [`Builder::nodes`].
struct Tree {
    root: usize,
    children: HashMap<usize, Vec<(Vec<u8>, usize)>>,
    /// Reachable nodes in writing order.
    order: Vec<usize>,
    /// Inode number per node, 0 when unreachable (replaced by a later entry).
    number: Vec<u32>,
    /// Parent directory of each directory.
    parent: Vec<usize>,
    /// Names per non-directory node; subdirectories per directory.
    links: Vec<u32>,
    /// One path per node, for error messages.
    path_of: HashMap<usize, PathBuf>,
}

impl Tree {
    fn number_from(&mut self, dir: usize, nodes: &[(Meta, Content)]) {
        let count = self.children.get(&dir).map_or(0, Vec::len);
        for k in 0..count {
            let child = self.children[&dir][k].1;
            if nodes[child].1 == Content::Dir {
                self.parent[child] = dir;
                self.links[dir] += 1;
                self.number_from(child, nodes);
            } else {
                self.links[child] += 1;
                if self.number[child] == 0 {
                    self.order.push(child);
                    self.number[child] = self.order.len() as u32;
                }
            }
        }
        self.order.push(dir);
        self.number[dir] = self.order.len() as u32;
    }

    fn path(&self, id: usize) -> String {
        self.path_of
            .get(&id)
            .map(|p| format!("/{}", p.display()))
            .unwrap_or_else(|| "/".to_owned())
    }
}

/// Where an inode or a listing starts: the metadata block's offset in its table, and the
/// offset inside the uncompressed block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MetaRef {
    block: u64,
    offset: u16,
}

impl MetaRef {
    fn packed(self) -> u64 {
        (self.block << 16) | u64::from(self.offset)
    }

    fn block32(self, what: &'static str) -> Result<u32, SquashfsError> {
        u32::try_from(self.block).map_err(|_| SquashfsError::TooLarge { what })
    }
}

/// A metadata table: 8 KiB blocks, each compressed when that makes it smaller, behind a
/// two-byte length header.
#[derive(Default)]
struct MetaWriter {
    out: Vec<u8>,
    buf: Vec<u8>,
    block_starts: Vec<u64>,
}

impl MetaWriter {
    fn pos(&self) -> MetaRef {
        MetaRef {
            block: self.out.len() as u64,
            offset: self.buf.len() as u16,
        }
    }

    fn write(
        &mut self,
        bytes: &[u8],
        c: &mut zstd::bulk::Compressor<'static>,
    ) -> Result<(), SquashfsError> {
        self.buf.extend_from_slice(bytes);
        while self.buf.len() >= METADATA_SIZE {
            let rest = self.buf.split_off(METADATA_SIZE);
            let block = std::mem::replace(&mut self.buf, rest);
            self.flush(&block, c)?;
        }
        Ok(())
    }

    fn flush(
        &mut self,
        block: &[u8],
        c: &mut zstd::bulk::Compressor<'static>,
    ) -> Result<(), SquashfsError> {
        self.block_starts.push(self.out.len() as u64);
        let z = c.compress(block).map_err(SquashfsError::Compress)?;
        if z.len() < block.len() {
            self.out.extend_from_slice(&(z.len() as u16).to_le_bytes());
            self.out.extend_from_slice(&z);
        } else {
            let header = block.len() as u16 | UNCOMPRESSED_METADATA;
            self.out.extend_from_slice(&header.to_le_bytes());
            self.out.extend_from_slice(block);
        }
        Ok(())
    }

    /// The table's bytes and where each of its blocks starts in them.
    fn finish(
        mut self,
        c: &mut zstd::bulk::Compressor<'static>,
    ) -> Result<(Vec<u8>, Vec<u64>), SquashfsError> {
        if !self.buf.is_empty() {
            let block = std::mem::take(&mut self.buf);
            self.flush(&block, c)?;
        }
        Ok((self.out, self.block_starts))
    }
}

/// Little-endian field appends.
trait Put {
    fn u16(&mut self, v: u16) -> &mut Self;
    fn u32(&mut self, v: u32) -> &mut Self;
    fn u64(&mut self, v: u64) -> &mut Self;
}

impl Put for Vec<u8> {
    fn u16(&mut self, v: u16) -> &mut Self {
        self.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.extend_from_slice(&v.to_le_bytes());
        self
    }
}

type XattrSet = Vec<(u16, Vec<u8>, Vec<u8>)>;

struct ImageWriter {
    out: BufWriter<File>,
    path: PathBuf,
    pos: u64,
    compressor: zstd::bulk::Compressor<'static>,
    inodes: MetaWriter,
    dirs: MetaWriter,
    ids: Vec<u32>,
    id_index: HashMap<u32, u16>,
    xattr_sets: Vec<XattrSet>,
    xattr_index: HashMap<XattrSet, u32>,
    /// Each fragment block's place and stored size (with `UNCOMPRESSED_BLOCK` when raw).
    fragments: Vec<(u64, u32)>,
    stats: WriteStats,
    done: u64,
    total: u64,
}

impl ImageWriter {
    fn put(&mut self, bytes: &[u8]) -> Result<(), SquashfsError> {
        self.out
            .write_all(bytes)
            .map_err(|source| SquashfsError::Write {
                path: self.path.clone(),
                source,
            })?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn id(&mut self, id: u32) -> Result<u16, SquashfsError> {
        if let Some(&i) = self.id_index.get(&id) {
            return Ok(i);
        }
        let i = u16::try_from(self.ids.len()).map_err(|_| SquashfsError::TooManyIds)?;
        self.ids.push(id);
        self.id_index.insert(id, i);
        Ok(i)
    }

    /// The xattr id of `meta`'s attributes, `NO_XATTR` when it has none squashfs can hold.
    fn xattr_id(&mut self, meta: &Meta, path: &str) -> u32 {
        let mut set: XattrSet = Vec::new();
        for (name, value) in &meta.xattrs {
            let prefixes: [(&[u8], u16); 3] = [(b"user.", 0), (b"trusted.", 1), (b"security.", 2)];
            match prefixes
                .iter()
                .find(|(p, _)| name.starts_with(p) && name.len() > p.len())
            {
                Some((p, ty)) => set.push((*ty, name[p.len()..].to_vec(), value.clone())),
                None => self
                    .stats
                    .dropped_xattrs
                    .push((path.to_owned(), String::from_utf8_lossy(name).into_owned())),
            }
        }
        if set.is_empty() {
            return NO_XATTR;
        }
        set.sort();
        set.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        self.stats.inodes_with_xattrs += 1;
        if let Some(&i) = self.xattr_index.get(&set) {
            return i;
        }
        let i = self.xattr_sets.len() as u32;
        self.xattr_sets.push(set.clone());
        self.xattr_index.insert(set, i);
        i
    }

    /// Writes every reachable inode (and file contents and directory listings) in tree order;
    /// returns the root inode's place.
    fn write_tree(
        &mut self,
        nodes: &[(Meta, Content)],
        tree: &Tree,
        data: &[Option<FileData>],
    ) -> Result<MetaRef, SquashfsError> {
        let mut refs: Vec<Option<MetaRef>> = vec![None; nodes.len()];
        let count = tree.order.len() as u32;
        for &id in &tree.order {
            let (meta, content) = &nodes[id];
            let path = tree.path(id);
            let xattr = self.xattr_id(meta, &path);
            let mut b: Vec<u8> = Vec::with_capacity(64);
            let number = tree.number[id];
            let nlink = tree.links[id];
            let ext = xattr != NO_XATTR;
            let header = |b: &mut Vec<u8>, ty: u16, w: &mut Self| -> Result<(), SquashfsError> {
                let (uid, gid) = (w.id(meta.uid)?, w.id(meta.gid)?);
                b.u16(ty)
                    .u16(meta.mode & 0o7777)
                    .u16(uid)
                    .u16(gid)
                    .u32(meta.mtime)
                    .u32(number);
                Ok(())
            };
            match content {
                Content::File(_) => {
                    let FileData {
                        start,
                        sizes,
                        size,
                        fragment,
                        offset,
                    } = data[id]
                        .clone()
                        .expect("every file's content is written first");
                    if nlink > 1 {
                        self.stats.hard_linked_inodes += 1;
                    }
                    match (u32::try_from(start), u32::try_from(size)) {
                        (Ok(start), Ok(size)) if !ext && nlink <= 1 => {
                            header(&mut b, 2, self)?;
                            b.u32(start).u32(fragment).u32(offset).u32(size);
                        }
                        _ => {
                            header(&mut b, 9, self)?;
                            b.u64(start)
                                .u64(size)
                                .u64(0)
                                .u32(nlink)
                                .u32(fragment)
                                .u32(offset)
                                .u32(xattr);
                        }
                    }
                    for s in sizes {
                        b.u32(s);
                    }
                }
                Content::Dir => {
                    let list = tree.children.get(&id).map(Vec::as_slice).unwrap_or(&[]);
                    let (at, listing) = self.write_listing(list, &refs, tree, nodes)?;
                    let file_size = listing + 3;
                    let parent = if id == tree.root {
                        count + 1
                    } else {
                        tree.number[tree.parent[id]]
                    };
                    let start = at.block32("the directory table")?;
                    match u16::try_from(file_size) {
                        Ok(small) if !ext => {
                            header(&mut b, 1, self)?;
                            b.u32(start)
                                .u32(nlink + 2)
                                .u16(small)
                                .u16(at.offset)
                                .u32(parent);
                        }
                        _ => {
                            header(&mut b, 8, self)?;
                            b.u32(nlink + 2)
                                .u32(file_size)
                                .u32(start)
                                .u32(parent)
                                .u16(0)
                                .u16(at.offset)
                                .u32(xattr);
                        }
                    }
                }
                Content::Symlink(target) => {
                    header(&mut b, if ext { 10 } else { 3 }, self)?;
                    b.u32(nlink).u32(target.len() as u32);
                    b.extend_from_slice(target);
                    if ext {
                        b.u32(xattr);
                    }
                }
                Content::BlockDevice(dev) | Content::CharDevice(dev) => {
                    let ty = content.basic_type() + if ext { 7 } else { 0 };
                    header(&mut b, ty, self)?;
                    b.u32(nlink).u32(*dev);
                    if ext {
                        b.u32(xattr);
                    }
                }
                Content::Fifo | Content::Socket => {
                    let ty = content.basic_type() + if ext { 7 } else { 0 };
                    header(&mut b, ty, self)?;
                    b.u32(nlink);
                    if ext {
                        b.u32(xattr);
                    }
                }
            }
            let at = self.inodes.pos();
            at.block32("the inode table")?;
            self.inodes.write(&b, &mut self.compressor)?;
            refs[id] = Some(at);
            self.stats.inodes += 1;
        }
        Ok(refs[tree.root].expect("the root is written last"))
    }

    /// A directory's listing: runs of entries under headers that share an inode block and a
    /// base inode number. Returns where it starts and its length.
    fn write_listing(
        &mut self,
        list: &[(Vec<u8>, usize)],
        refs: &[Option<MetaRef>],
        tree: &Tree,
        nodes: &[(Meta, Content)],
    ) -> Result<(MetaRef, u32), SquashfsError> {
        let at = self.dirs.pos();
        let mut b: Vec<u8> = Vec::new();
        let place = |id: usize| refs[id].expect("children are written before their directory");
        let mut i = 0;
        while i < list.len() {
            let first = place(list[i].1);
            let base = tree.number[list[i].1];
            let mut j = i;
            while j < list.len() && j - i < DIR_HEADER_MAX {
                let r = place(list[j].1);
                let delta = i64::from(tree.number[list[j].1]) - i64::from(base);
                if r.block != first.block || i16::try_from(delta).is_err() {
                    break;
                }
                j += 1;
            }
            b.u32((j - i - 1) as u32)
                .u32(first.block32("the inode table")?)
                .u32(base);
            for (name, id) in &list[i..j] {
                let delta = (tree.number[*id] as i64 - i64::from(base)) as i16;
                b.u16(place(*id).offset)
                    .u16(delta as u16)
                    .u16(nodes[*id].1.basic_type())
                    .u16((name.len() - 1) as u16);
                b.extend_from_slice(name);
            }
            i = j;
        }
        self.dirs.write(&b, &mut self.compressor)?;
        Ok((at, b.len() as u32))
    }

    /// Writes every distinct file content as data blocks, compressing on every core, in tree
    /// order. Returns where each file node's content is.
    fn write_data(
        &mut self,
        nodes: &[(Meta, Content)],
        tree: &Tree,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Vec<Option<FileData>>, SquashfsError> {
        let read_err = |id: usize, src: &Path| {
            let (path, source_file) = (tree.path(id), src.to_path_buf());
            move |source| SquashfsError::Read {
                path,
                source_file,
                source,
            }
        };
        let mut block = vec![0u8; BLOCK_SIZE];
        // Pass 1: each distinct content is written once. Only files whose size another file
        // shares can be copies, so only they are read (and hashed) here; the others are read
        // once, when written.
        let files: Vec<(usize, &Path, u64)> = tree
            .order
            .iter()
            .filter_map(|&id| match &nodes[id].1 {
                Content::File(src) => Some((id, src.as_path())),
                _ => None,
            })
            .map(|(id, src)| {
                let size = std::fs::metadata(src).map_err(read_err(id, src))?.len();
                Ok((id, src, size))
            })
            .collect::<Result<_, SquashfsError>>()?;
        let mut per_size: HashMap<u64, usize> = HashMap::new();
        for &(_, _, size) in &files {
            *per_size.entry(size).or_default() += 1;
        }
        let mut first: HashMap<(u64, [u8; 32]), usize> = HashMap::new();
        let mut same_as: Vec<(usize, usize)> = Vec::new();
        let mut unique: Vec<(usize, &Path, u64)> = Vec::new();
        for (id, src, size) in files {
            self.stats.data_in += size;
            if per_size[&size] == 1 {
                unique.push((id, src, size));
                continue;
            }
            let mut f = File::open(src).map_err(read_err(id, src))?;
            let mut hash = Sha256::new();
            loop {
                let n = read_block(&mut f, &mut block).map_err(read_err(id, src))?;
                if n == 0 {
                    break;
                }
                hash.update(&block[..n]);
            }
            match first.entry((size, hash.finalize().into())) {
                std::collections::hash_map::Entry::Occupied(e) => {
                    self.stats.deduplicated_files += 1;
                    same_as.push((id, *e.get()));
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(id);
                    unique.push((id, src, size));
                }
            }
        }
        self.total = unique.iter().map(|u| u.2).sum();

        // Pass 2: batches of blocks read in order, compressed in parallel, written in order.
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, MAX_THREADS);
        let mut compressors = (0..threads)
            .map(|_| zstd::bulk::Compressor::new(ZSTD_LEVEL))
            .collect::<Result<Vec<_>, _>>()
            .map_err(SquashfsError::Compress)?;
        let mut data: Vec<Option<FileData>> = vec![None; nodes.len()];
        let mut next = 0;
        let mut open: Option<(usize, File, u64)> = None;
        // Small files are gathered here until the next one would not fit.
        let mut fragment: Vec<u8> = Vec::with_capacity(BLOCK_SIZE);
        loop {
            let mut jobs: Vec<(Slot, Vec<u8>)> = Vec::with_capacity(threads * BATCH_PER_THREAD);
            while jobs.len() < threads * BATCH_PER_THREAD {
                if open.is_none() {
                    let Some(&(id, src, size)) = unique.get(next) else {
                        if !fragment.is_empty() {
                            jobs.push((Slot::Fragment, std::mem::take(&mut fragment)));
                        }
                        break;
                    };
                    let mut f = File::open(src).map_err(read_err(id, src))?;
                    next += 1;
                    if size > 0 && size < BLOCK_SIZE as u64 {
                        // Read one byte past the size: a file that grew is caught too.
                        let mut buf = vec![0u8; size as usize + 1];
                        let n = read_block(&mut f, &mut buf).map_err(read_err(id, src))?;
                        if n as u64 != size {
                            return Err(read_err(id, src)(io::Error::other(
                                "the file changed while the image was written",
                            )));
                        }
                        if fragment.len() + n > BLOCK_SIZE {
                            jobs.push((Slot::Fragment, std::mem::take(&mut fragment)));
                        }
                        let index = self.fragments.len() as u32
                            + jobs.iter().filter(|j| j.0 == Slot::Fragment).count() as u32;
                        data[id] = Some(FileData {
                            fragment: index,
                            offset: fragment.len() as u32,
                            ..FileData::at(0, size)
                        });
                        fragment.extend_from_slice(&buf[..n]);
                        self.stats.fragmented_files += 1;
                        continue;
                    }
                    open = Some((next - 1, f, 0));
                }
                let Some((u, f, got)) = open.as_mut() else {
                    break;
                };
                let (id, src, size) = unique[*u];
                let mut buf = vec![0u8; BLOCK_SIZE];
                let n = read_block(f, &mut buf).map_err(read_err(id, src))?;
                if n == 0 {
                    if *got != size {
                        return Err(read_err(id, src)(io::Error::other(
                            "the file changed while the image was written",
                        )));
                    }
                    if size == 0 {
                        // No blocks: its place is anywhere. Others get theirs when written.
                        data[id] = Some(FileData::at(self.pos, 0));
                    }
                    open = None;
                    continue;
                }
                buf.truncate(n);
                *got += n as u64;
                jobs.push((Slot::Data(*u), buf));
            }
            if jobs.is_empty() {
                break;
            }
            let compressed = compress_all(&jobs, &mut compressors);
            for ((slot, raw), z) in jobs.iter().zip(compressed) {
                let z = z.map_err(SquashfsError::Compress)?;
                let pos = self.pos;
                let stored = if z.len() < raw.len() {
                    self.put(&z)?;
                    z.len() as u32
                } else {
                    self.put(raw)?;
                    raw.len() as u32 | UNCOMPRESSED_BLOCK
                };
                match slot {
                    Slot::Data(u) => {
                        let (id, _, size) = unique[*u];
                        let entry = data[id].get_or_insert_with(|| FileData::at(pos, size));
                        entry.sizes.push(stored);
                    }
                    Slot::Fragment => {
                        self.fragments.push((pos, stored));
                        self.stats.fragment_blocks += 1;
                    }
                }
                self.done += raw.len() as u64;
            }
            progress(self.done, self.total);
        }
        for (id, original) in same_as {
            data[id] = data[original].clone();
        }
        Ok(data)
    }

    /// Writes a table's metadata blocks, then the index of where each starts in the image;
    /// returns where the index is (what the superblock points at).
    fn put_indexed(&mut self, blocks: &[u8], starts: &[u64]) -> Result<u64, SquashfsError> {
        let blocks_start = self.pos;
        self.put(blocks)?;
        let index_start = self.pos;
        let mut index: Vec<u8> = Vec::with_capacity(starts.len() * 8);
        for s in starts {
            index.u64(blocks_start + s);
        }
        self.put(&index)?;
        Ok(index_start)
    }

    /// Writes the tables after the data, then the superblock.
    fn finish(mut self, root: MetaRef, inodes: u32) -> Result<WriteStats, SquashfsError> {
        let c = &mut self.compressor;
        let (inode_table, _) = std::mem::take(&mut self.inodes).finish(c)?;
        let (dir_table, _) = std::mem::take(&mut self.dirs).finish(c)?;
        let mut idw = MetaWriter::default();
        for id in &self.ids {
            idw.write(&id.to_le_bytes(), c)?;
        }
        let (id_blocks, id_starts) = idw.finish(c)?;
        let fragment_table = if self.fragments.is_empty() {
            None
        } else {
            let mut fw = MetaWriter::default();
            for &(start, size) in &self.fragments {
                let mut entry: Vec<u8> = Vec::with_capacity(16);
                entry.u64(start).u32(size).u32(0);
                fw.write(&entry, c)?;
            }
            Some(fw.finish(c)?)
        };
        let xattr_tables = if self.xattr_sets.is_empty() {
            None
        } else {
            let mut kv = MetaWriter::default();
            let mut entries: Vec<u8> = Vec::new();
            for set in &self.xattr_sets {
                let at = kv.pos();
                let mut pairs: Vec<u8> = Vec::new();
                for (ty, name, value) in set {
                    pairs.u16(*ty).u16(name.len() as u16);
                    pairs.extend_from_slice(name);
                    pairs.u32(value.len() as u32);
                    pairs.extend_from_slice(value);
                }
                kv.write(&pairs, c)?;
                entries
                    .u64(at.packed())
                    .u32(set.len() as u32)
                    .u32(pairs.len() as u32);
            }
            let mut idw = MetaWriter::default();
            idw.write(&entries, c)?;
            Some((kv.finish(c)?.0, idw.finish(c)?))
        };

        let inode_table_start = self.pos;
        self.put(&inode_table)?;
        let directory_table_start = self.pos;
        self.put(&dir_table)?;
        // The kernel wants the fragment table after the directory table and before the id
        // table's blocks (it bounds each table by the next one's start).
        let mut flags = FLAG_DUPLICATES;
        let fragment_table_start = match fragment_table {
            Some((blocks, starts)) => self.put_indexed(&blocks, &starts)?,
            None => {
                flags |= FLAG_NO_FRAGMENTS;
                NO_TABLE
            }
        };
        let id_table_start = self.put_indexed(&id_blocks, &id_starts)?;
        let xattr_id_table_start = match xattr_tables {
            None => {
                flags |= FLAG_NO_XATTRS;
                NO_TABLE
            }
            Some((kv, (ids, starts))) => {
                let kv_start = self.pos;
                self.put(&kv)?;
                let ids_start = self.pos;
                self.put(&ids)?;
                let table_start = self.pos;
                let mut t: Vec<u8> = Vec::new();
                t.u64(kv_start).u32(self.xattr_sets.len() as u32).u32(0);
                for s in starts {
                    t.u64(ids_start + s);
                }
                self.put(&t)?;
                table_start
            }
        };
        let bytes_used = self.pos;
        let pad = (4096 - bytes_used % 4096) % 4096;
        self.put(&vec![0u8; pad as usize])?;

        let mut sb: Vec<u8> = Vec::with_capacity(SUPERBLOCK_LEN as usize);
        sb.u32(MAGIC)
            .u32(inodes)
            .u32(0)
            .u32(BLOCK_SIZE as u32)
            .u32(self.fragments.len() as u32)
            .u16(ZSTD)
            .u16(BLOCK_LOG)
            .u16(flags)
            .u16(self.ids.len() as u16)
            .u16(4)
            .u16(0)
            .u64(root.packed())
            .u64(bytes_used)
            .u64(id_table_start)
            .u64(xattr_id_table_start)
            .u64(inode_table_start)
            .u64(directory_table_start)
            .u64(fragment_table_start)
            .u64(NO_TABLE);
        let path = self.path.clone();
        let write_err = |source| SquashfsError::Write {
            path: path.clone(),
            source,
        };
        self.out.flush().map_err(write_err)?;
        let file = self.out.get_mut();
        file.seek(SeekFrom::Start(0)).map_err(write_err)?;
        file.write_all(&sb).map_err(write_err)?;
        file.sync_all().map_err(write_err)?;
        self.stats.image_bytes = bytes_used + pad;
        Ok(self.stats)
    }
}

/// Where one file's content is: its first block, each block's stored size, its length, and
/// for a small file the fragment block holding it and its offset there.
#[derive(Debug, Clone)]
struct FileData {
    start: u64,
    sizes: Vec<u32>,
    size: u64,
    fragment: u32,
    offset: u32,
}

impl FileData {
    fn at(start: u64, size: u64) -> Self {
        FileData {
            start,
            sizes: Vec::new(),
            size,
            fragment: NO_FRAGMENT,
            offset: 0,
        }
    }
}

/// What a block to compress belongs to: a file's data (its index among the distinct
/// contents), or the fragment block of small files being filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Data(usize),
    Fragment,
}

/// Compresses each job's block, the jobs split in contiguous runs over the compressors'
/// threads; results in job order.
fn compress_all<T: Sync>(
    jobs: &[(T, Vec<u8>)],
    compressors: &mut [zstd::bulk::Compressor<'static>],
) -> Vec<io::Result<Vec<u8>>> {
    if compressors.len() == 1 || jobs.len() == 1 {
        return jobs
            .iter()
            .map(|(_, b)| compressors[0].compress(b))
            .collect();
    }
    let per = jobs.len().div_ceil(compressors.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .chunks(per)
            .zip(compressors.iter_mut())
            .map(|(run, c)| {
                s.spawn(move || run.iter().map(|(_, b)| c.compress(b)).collect::<Vec<_>>())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join().unwrap_or_else(|_| {
                    vec![Err(io::Error::other("a compression thread panicked"))]
                })
            })
            .collect()
    })
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_block(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Progress of an image build on stderr, as `bot-bottle: {what}: 45% (12 of 27 MiB)`: one
/// updating line on a terminal, a line per quarter otherwise.
pub fn progress_on_stderr(what: &str) -> impl FnMut(u64, u64) {
    let what = what.to_owned();
    let tty = io::stderr().is_terminal();
    let mut shown = 0u64;
    move |done, total| {
        let step = if tty { 1 } else { 25 };
        let pct = (done * 100).checked_div(total).unwrap_or(100).min(100);
        if pct / step > shown / step || (pct == 100 && shown < 100) {
            shown = pct;
            let mib = |b: u64| format!("{:.1}", b as f64 / (1024.0 * 1024.0));
            let line = format!(
                "bot-bottle: {what}: {pct:>3}% ({} of {} MiB)",
                mib(done),
                mib(total)
            );
            let mut err = io::stderr().lock();
            let _ = if tty {
                write!(err, "\r{line}{}", if pct == 100 { "\n" } else { "" })
            } else {
                writeln!(err, "{line}")
            };
        }
    }
}
