//! Images built locally through bollard (there is no registry to pull from): the sidecar
//! bundle (`FROM scratch` + this very binary, which is statically linked) and the agent image
//! from the bottle's Dockerfile. Tags are content-addressed, so an image is built once per
//! distinct input and reused after.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use bollard::image::BuildImageOptions;
use bollard::Docker;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use crate::host::docker::DockerError;

/// Dockerfiles shipped inside the binary.
pub const BUNDLED_DOCKERFILES: &[(&str, &str)] = &[
    (
        "Dockerfile.claude",
        include_str!("../../../../dockerfiles/Dockerfile.claude"),
    ),
    (
        "Dockerfile.codex",
        include_str!("../../../../dockerfiles/Dockerfile.codex"),
    ),
    (
        "Dockerfile.test",
        include_str!("../../../../dockerfiles/Dockerfile.test"),
    ),
];

/// A Dockerfile line naming host files for the build context: `# bot-bottle: context NAME=PATH ...`.
const CONTEXT_DIRECTIVE: &str = "# bot-bottle: context ";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "Dockerfile `{name}` not found: use a bundled one ({}) or a path relative to {}",
        BUNDLED_DOCKERFILES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "),
        dir.display()
    )]
    DockerfileMissing { name: String, dir: PathBuf },
    #[error("{dockerfile} needs the host file {path} in its build context: {hint}")]
    ContextFileMissing {
        dockerfile: String,
        path: PathBuf,
        hint: String,
    },
    #[error("bad build-context directive in {dockerfile}: `{entry}` (write NAME=/absolute/path)")]
    BadDirective { dockerfile: String, entry: String },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the running binary {path} is dynamically linked and cannot run in the FROM scratch sidecar: build bot-bottle with the repository's .cargo/config.toml (static glibc)")]
    NotStatic { path: PathBuf },
    #[error(transparent)]
    Docker(#[from] DockerError),
}

/// What goes into a build: the Dockerfile text and extra files (name in context -> host path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSpec {
    pub dockerfile_name: String,
    pub dockerfile: String,
    pub files: BTreeMap<String, PathBuf>,
}

/// Load a Dockerfile by bundled name, or from `user_dir` (the user's bottles directory).
pub fn load_dockerfile(name: &str, user_dir: &Path) -> Result<BuildSpec, ImageError> {
    let user_path = user_dir.join(name);
    let text = if let Ok(text) = std::fs::read_to_string(&user_path) {
        text
    } else if let Some((_, text)) = BUNDLED_DOCKERFILES.iter().find(|(n, _)| *n == name) {
        (*text).to_owned()
    } else {
        return Err(ImageError::DockerfileMissing {
            name: name.to_owned(),
            dir: user_dir.to_path_buf(),
        });
    };
    let mut files = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(CONTEXT_DIRECTIVE) else {
            continue;
        };
        for entry in rest.split_whitespace() {
            match entry.split_once('=') {
                Some((n, p)) if !n.is_empty() && !n.contains('/') && p.starts_with('/') => {
                    files.insert(n.to_owned(), PathBuf::from(p));
                }
                _ => {
                    return Err(ImageError::BadDirective {
                        dockerfile: name.to_owned(),
                        entry: entry.to_owned(),
                    })
                }
            }
        }
    }
    Ok(BuildSpec {
        dockerfile_name: name.to_owned(),
        dockerfile: text,
        files,
    })
}

fn package_hint(path: &Path) -> String {
    match path.to_str() {
        Some("/bin/busybox") => {
            "install it (Debian/Ubuntu: `apt-get install busybox-static`)".into()
        }
        _ => "create it, or edit the Dockerfile's `# bot-bottle: context` line".into(),
    }
}

/// Hash of every input of a build, and the tar build context.
fn context(spec: &BuildSpec) -> Result<(String, Vec<u8>), ImageError> {
    let mut hasher = Sha256::new();
    hasher.update(spec.dockerfile.as_bytes());
    let mut builder = tar::Builder::new(Vec::new());
    let add = |builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8], mode: u32| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_mtime(0);
        header.set_cksum();
        builder
            .append_data(&mut header, name, data)
            .map_err(|source| ImageError::Read {
                path: PathBuf::from(name),
                source,
            })
    };
    add(
        &mut builder,
        "Dockerfile",
        spec.dockerfile.as_bytes(),
        0o644,
    )?;
    for (name, path) in &spec.files {
        let data = std::fs::read(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => ImageError::ContextFileMissing {
                dockerfile: spec.dockerfile_name.clone(),
                path: path.clone(),
                hint: package_hint(path),
            },
            _ => ImageError::Read {
                path: path.clone(),
                source,
            },
        })?;
        hasher.update(name.as_bytes());
        hasher.update((data.len() as u64).to_le_bytes());
        hasher.update(&data);
        add(&mut builder, name, &data, 0o755)?;
    }
    let tar = builder.into_inner().map_err(|source| ImageError::Read {
        path: PathBuf::from("build context"),
        source,
    })?;
    Ok((hex::encode(&hasher.finalize()[..8]), tar))
}

/// Add the likely fix to a build failure Docker reported.
fn explain_build_failure(message: &str) -> String {
    let lower = message.to_lowercase();
    let pull = [
        "pull access denied",
        "dial tcp",
        "no such host",
        "registry",
        "manifest unknown",
        "tls handshake",
    ];
    if pull.iter().any(|p| lower.contains(p)) {
        format!(
            "{message}\nthe Dockerfile's base image could not be pulled: make it available locally \
             (`docker load`, or build it on this host), or point the bottle at a Dockerfile whose \
             base is local"
        )
    } else {
        message.to_owned()
    }
}

async fn image_exists(docker: &Docker, tag: &str) -> bool {
    docker.inspect_image(tag).await.is_ok()
}

/// Build `spec` as `<repo>:<content hash>` unless that image exists. Returns the tag.
/// Progress: the build log streams to stderr when it is a terminal, else to the debug log.
pub async fn ensure_image(
    docker: &Docker,
    repo: &str,
    spec: &BuildSpec,
    labels: &BTreeMap<String, String>,
) -> Result<String, ImageError> {
    let (hash, tar) = context(spec)?;
    let tag = format!("{repo}:{hash}");
    if image_exists(docker, &tag).await {
        tracing::debug!(%tag, "image up to date");
        return Ok(tag);
    }
    build(docker, &tag, spec, tar, labels).await?;
    Ok(tag)
}

/// Build the context `tar` as `tag`, streaming progress.
async fn build(
    docker: &Docker,
    tag: &str,
    spec: &BuildSpec,
    tar: Vec<u8>,
    labels: &BTreeMap<String, String>,
) -> Result<(), ImageError> {
    let tag = tag.to_owned();
    let tty = std::io::stderr().is_terminal();
    eprintln!(
        "bot-bottle: building image {tag} ({})",
        spec.dockerfile_name
    );
    let options = BuildImageOptions::<String> {
        dockerfile: "Dockerfile".into(),
        t: tag.clone(),
        rm: true,
        forcerm: true,
        labels: labels.clone().into_iter().collect::<HashMap<_, _>>(),
        ..Default::default()
    };
    let mut stream = docker.build_image(options, None, Some(tar.into()));
    let mut last_lines: Vec<String> = Vec::new();
    while let Some(item) = stream.next().await {
        let info = match item {
            Ok(info) => info,
            Err(bollard::errors::Error::DockerStreamError { error }) => {
                return Err(DockerError::BuildFailed {
                    message: explain_build_failure(&error),
                    tag,
                }
                .into())
            }
            Err(source) => return Err(DockerError::Build { tag, source }.into()),
        };
        if let Some(err) = info.error {
            let detail = info
                .error_detail
                .and_then(|d| d.message)
                .unwrap_or_default();
            let context = last_lines.join("");
            let message = format!("{err} {detail}\n{context}");
            return Err(DockerError::BuildFailed {
                tag,
                message: explain_build_failure(message.trim()),
            }
            .into());
        }
        if let Some(line) = info.stream {
            if tty {
                eprint!("  {line}");
            } else {
                tracing::debug!(build = %line.trim_end());
            }
            last_lines.push(line);
            if last_lines.len() > 10 {
                last_lines.remove(0);
            }
        }
    }
    Ok(())
}

/// The sidecar image: `FROM scratch` plus this static binary as `/bot-bottle`.
///
/// The tag comes from the binary's GNU build id (a hash of its content that the linker
/// writes), so the check for an existing image reads a few KiB instead of the whole binary.
pub async fn ensure_sidecar_image(
    docker: &Docker,
    labels: &BTreeMap<String, String>,
) -> Result<String, ImageError> {
    let exe = std::env::current_exe().map_err(|source| ImageError::Read {
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    let info = elf_info(&exe)?;
    if !info.is_static {
        return Err(ImageError::NotStatic { path: exe });
    }
    let dockerfile =
        "FROM scratch\nCOPY bot-bottle /bot-bottle\nENTRYPOINT [\"/bot-bottle\", \"sidecar\"]\n";
    // Images outlive bottles: only the managed label, never the bottle id (cleanup keeps them).
    let image_labels: BTreeMap<String, String> = labels
        .iter()
        .filter(|(k, _)| k.as_str() == crate::plan::LABEL_MANAGED)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let spec = BuildSpec {
        dockerfile_name: "sidecar".into(),
        dockerfile: dockerfile.into(),
        files: BTreeMap::from([("bot-bottle".to_owned(), exe)]),
    };
    if let Some(build_id) = info.build_id {
        let tag = format!(
            "bot-bottle-sidecar:b{}",
            &build_id[..build_id.len().min(16)]
        );
        if image_exists(docker, &tag).await {
            return Ok(tag);
        }
        let (_, tar) = context(&spec)?;
        build(docker, &tag, &spec, tar, &image_labels).await?;
        return Ok(tag);
    }
    ensure_image(docker, "bot-bottle-sidecar", &spec, &image_labels).await
}

/// Repository of the sidecar images.
pub const SIDECAR_REPO: &str = "bot-bottle-sidecar";

fn sidecar_tag_for(build_id: Option<&str>) -> Option<String> {
    build_id.map(|id| format!("{SIDECAR_REPO}:b{}", &id[..id.len().min(16)]))
}

/// The sidecar tag this binary uses (when it has a build id).
pub fn current_sidecar_tag() -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    sidecar_tag_for(elf_info(&exe).ok()?.build_id.as_deref())
}

/// Remove sidecar images of other bot-bottle builds that no container uses. Returns the tags
/// removed; images in use are skipped.
pub async fn prune_sidecar_images(docker: &Docker) -> Result<Vec<String>, DockerError> {
    use bollard::image::{ListImagesOptions, RemoveImageOptions};
    let keep = current_sidecar_tag();
    let images = docker
        .list_images(Some(ListImagesOptions::<String> {
            filters: HashMap::from([("reference".to_owned(), vec![SIDECAR_REPO.to_owned()])]),
            ..Default::default()
        }))
        .await
        .map_err(|source| DockerError::List {
            what: "images",
            source,
        })?;
    let mut removed = Vec::new();
    for image in images {
        for tag in image.repo_tags {
            if Some(&tag) == keep.as_ref() {
                continue;
            }
            let options = RemoveImageOptions {
                force: false,
                noprune: false,
            };
            if docker.remove_image(&tag, Some(options), None).await.is_ok() {
                removed.push(tag);
            }
        }
    }
    Ok(removed)
}

/// What the sidecar needs to know about an ELF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    /// No PT_INTERP: needs no dynamic loader.
    pub is_static: bool,
    /// The NT_GNU_BUILD_ID note, hex.
    pub build_id: Option<String>,
}

/// Read the ELF header, program headers and notes (not the whole file).
pub fn elf_info(path: &Path) -> Result<ElfInfo, ImageError> {
    use std::io::{Read, Seek, SeekFrom};
    const PT_INTERP: u32 = 3;
    const PT_NOTE: u32 = 4;
    const NT_GNU_BUILD_ID: u32 = 3;
    const MAX_NOTE_BYTES: u64 = 64 * 1024;
    let io = |source| ImageError::Read {
        path: path.to_path_buf(),
        source,
    };
    let bad = || {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a 64-bit little-endian ELF file",
        ))
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut header = [0u8; 64];
    file.read_exact(&mut header).map_err(|_| bad())?;
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Err(bad());
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a)
    };
    let phoff = u64_at(&header, 0x20);
    let phentsize = usize::from(u16_at(&header, 0x36));
    let phnum = usize::from(u16_at(&header, 0x38));
    if phentsize < 56 || phnum > 256 {
        return Err(bad());
    }
    let mut table = vec![0u8; phentsize * phnum];
    file.seek(SeekFrom::Start(phoff)).map_err(io)?;
    file.read_exact(&mut table).map_err(|_| bad())?;
    let mut info = ElfInfo {
        is_static: true,
        build_id: None,
    };
    for ph in table.chunks_exact(phentsize) {
        match u32_at(ph, 0) {
            PT_INTERP => info.is_static = false,
            PT_NOTE if info.build_id.is_none() => {
                let (offset, size) = (u64_at(ph, 8), u64_at(ph, 32).min(MAX_NOTE_BYTES));
                let mut notes = vec![0u8; size as usize];
                file.seek(SeekFrom::Start(offset)).map_err(io)?;
                file.read_exact(&mut notes).map_err(|_| bad())?;
                let mut at = 0usize;
                while at + 12 <= notes.len() {
                    let namesz = u32_at(&notes, at) as usize;
                    let descsz = u32_at(&notes, at + 4) as usize;
                    let kind = u32_at(&notes, at + 8);
                    let name_end = at + 12 + namesz;
                    let desc_start = at + 12 + namesz.div_ceil(4) * 4;
                    let desc_end = desc_start + descsz;
                    if desc_end > notes.len() {
                        break;
                    }
                    if kind == NT_GNU_BUILD_ID && notes.get(at + 12..name_end) == Some(b"GNU\0") {
                        info.build_id = Some(hex::encode(&notes[desc_start..desc_end]));
                        break;
                    }
                    at = desc_start + descsz.div_ceil(4) * 4;
                }
            }
            _ => {}
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_test_dockerfile_names_busybox_for_its_context() {
        let spec = load_dockerfile("Dockerfile.test", Path::new("/nonexistent")).unwrap();
        assert_eq!(spec.files["busybox"], PathBuf::from("/bin/busybox"));
    }

    #[test]
    fn unknown_dockerfile_lists_the_bundled_ones() {
        let err = load_dockerfile("Dockerfile.nope", Path::new("/x"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("Dockerfile.claude"), "{err}");
    }

    #[test]
    fn relative_context_path_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("Dockerfile.mine"),
            "# bot-bottle: context tool=relative/path\nFROM scratch\n",
        )
        .unwrap();
        let err = load_dockerfile("Dockerfile.mine", dir.path()).unwrap_err();
        assert!(matches!(err, ImageError::BadDirective { .. }));
    }

    #[test]
    fn context_hash_changes_with_file_content() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tool");
        std::fs::write(&f, b"one").unwrap();
        let spec = BuildSpec {
            dockerfile_name: "x".into(),
            dockerfile: "FROM scratch\n".into(),
            files: BTreeMap::from([("tool".to_owned(), f.clone())]),
        };
        let (h1, _) = context(&spec).unwrap();
        std::fs::write(&f, b"two").unwrap();
        let (h2, _) = context(&spec).unwrap();
        assert_ne!(h1, h2);
    }

    #[test]
    fn missing_context_file_names_the_package() {
        let spec = BuildSpec {
            dockerfile_name: "Dockerfile.test".into(),
            dockerfile: "FROM scratch\n".into(),
            files: BTreeMap::from([("busybox".to_owned(), PathBuf::from("/nonexistent/busybox"))]),
        };
        let err = context(&spec).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/busybox"), "{err}");
    }

    #[test]
    fn this_test_binary_is_static_with_a_build_id() {
        // The workspace builds with +crt-static (.cargo/config.toml): the sidecar relies on it.
        let me = elf_info(&std::env::current_exe().unwrap()).unwrap();
        assert!(me.is_static);
        assert_eq!(me.build_id.as_ref().map(String::len), Some(40));
        assert!(!elf_info(Path::new("/bin/ls")).unwrap().is_static);
    }

    #[test]
    fn a_text_file_is_not_an_elf() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x");
        std::fs::write(&f, [b'#'; 100]).unwrap();
        assert!(elf_info(&f).is_err());
    }
}
