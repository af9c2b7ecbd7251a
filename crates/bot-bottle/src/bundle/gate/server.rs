//! The gate's host side: `start` serves git's smart HTTP protocol on the run directory's gate
//! socket (the bundle relays the gate port to it) with `git http-backend`, one request per
//! connection. The request is checked before git sees it (a head of at most 64 KiB, the
//! gate repository's four smart-protocol endpoints only, strict body framing, de-chunked for
//! the CGI); git runs with a cleared environment: no host variable (no credential, no user
//! configuration) reaches it or its hooks.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::bundle::egress::{body, http};
use crate::host::run_dir::RunDir;

/// Longest request head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most requests served at once (git makes one or two per fetch or push).
const MAX_CONNECTIONS: usize = 8;
/// How long a client has to send its request head (a slot is not held by a silent client).
const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest CGI response head accepted from git.
const MAX_CGI_HEAD: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot start the git gate's server process")]
    Spawn {
        #[source]
        source: std::io::Error,
    },
    #[error("the git gate's server ended ({status}) before it listened; its log:\n{log}")]
    Ended { status: String, log: String },
    #[error("the git gate's server did not listen on {path} within {}s", GATE_READY_TIMEOUT.as_secs())]
    NotReady { path: PathBuf },
    #[error("cannot listen on the gate socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The gate's server, running until dropped (its socket is removed then).
pub struct GateServer {
    task: tokio::task::JoinHandle<()>,
    socket: PathBuf,
}

impl Drop for GateServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The gate server's own process (`bot-bottle __gate`), owned by `start`: a process of its
/// own so that git's pipes, and any signal a write to them raises, stay out of the session.
/// It ends with `start` however `start` ends (PR_SET_PDEATHSIG); dropping this stops it.
pub struct GateProcess {
    child: std::process::Child,
    socket: PathBuf,
}

impl Drop for GateProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// How long the gate process has to listen on its socket.
const GATE_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Start `exe __gate --run-dir <run>` and wait until it listens; its output goes to the run
/// directory's `gate-server.log`.
pub async fn spawn_process(
    run: &RunDir,
    exe: &Path,
    config: &GateConfig,
) -> Result<GateProcess, ServerError> {
    let socket = run.gate_socket();
    let _ = std::fs::remove_file(&socket);
    let log = std::fs::File::create(run.gate_dir().join("server.log"))
        .map_err(|source| ServerError::Spawn { source })?;
    let child = std::process::Command::new(exe)
        .arg("__gate")
        .arg("--run-dir")
        .arg(run.path())
        .env(
            crate::session::orphans::PARENT_PID_ENV,
            std::process::id().to_string(),
        )
        .stdin(Stdio::piped())
        .stdout(
            log.try_clone()
                .map_err(|source| ServerError::Spawn { source })?,
        )
        .stderr(log)
        .spawn()
        .map_err(|source| ServerError::Spawn { source })?;
    let mut process = GateProcess {
        child,
        socket: socket.clone(),
    };
    // The configuration on its stdin, then EOF.
    if let Some(mut stdin) = process.child.stdin.take() {
        use std::io::Write as _;
        let json = serde_json::to_vec(config).unwrap_or_default();
        stdin
            .write_all(&json)
            .map_err(|source| ServerError::Spawn { source })?;
    }
    let deadline = std::time::Instant::now() + GATE_READY_TIMEOUT;
    loop {
        if UnixStream::connect(&socket).await.is_ok() {
            return Ok(process);
        }
        if let Ok(Some(status)) = process.child.try_wait() {
            let log =
                std::fs::read_to_string(run.gate_dir().join("server.log")).unwrap_or_default();
            return Err(ServerError::Ended {
                status: status.to_string(),
                log,
            });
        }
        if std::time::Instant::now() > deadline {
            return Err(ServerError::NotReady { path: socket });
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// What the gate's server process is told on its stdin by `start` (the upstream's header is
/// a secret: it never goes on a command line or into the environment).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GateConfig {
    pub bottle_id: String,
    pub upstream: Option<super::upstream::Upstream>,
}

/// What each request's `git http-backend` is run with.
struct Backend {
    run: RunDir,
    exe: PathBuf,
    slots: Arc<tokio::sync::Semaphore>,
    config: GateConfig,
    /// How far the gate log has been read for pushes to forward (forwarding one at a time).
    forwarded: Arc<tokio::sync::Mutex<u64>>,
}

/// Serve run `run`'s gate on its socket; `exe` is this bot-bottle (for the hooks).
pub fn serve(run: &RunDir, exe: &Path, config: GateConfig) -> Result<GateServer, ServerError> {
    let socket = run.gate_socket();
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(|source| ServerError::Bind {
        path: socket.clone(),
        source,
    })?;
    let backend = Arc::new(Backend {
        run: run.clone(),
        exe: exe.to_path_buf(),
        slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
        config,
        forwarded: Arc::new(tokio::sync::Mutex::new(0)),
    });
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let backend = backend.clone();
            let Ok(slot) = backend.slots.clone().try_acquire_owned() else {
                tokio::spawn(async move {
                    let _ = respond(stream, 503, "the git gate is busy: try again").await;
                });
                continue;
            };
            tokio::spawn(async move {
                if let Err(e) = backend.handle(stream).await {
                    tracing::debug!(error = %e, "git gate request failed");
                }
                drop(slot);
            });
        }
    });
    Ok(GateServer { task, socket })
}

/// A short plain-text answer, then close.
async fn respond<W: tokio::io::AsyncWrite + Unpin>(
    mut out: W,
    status: u16,
    text: &str,
) -> std::io::Result<()> {
    let reason = match status {
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let reply = http::response(status, reason, &format!("bot-bottle git gate: {text}\n"));
    out.write_all(&reply).await?;
    out.shutdown().await
}

/// The smart-protocol endpoint a request names, if it is one the gate serves.
#[derive(Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub path_info: String,
    pub query: String,
}

/// `GET /workspace.git/info/refs?service=git-upload-pack|git-receive-pack`,
/// `POST /workspace.git/git-upload-pack|git-receive-pack`; anything else is `Err(status)`.
pub fn route(method: &str, target: &str) -> Result<Endpoint, u16> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let repo = format!("/{}", super::REPO_NAME);
    let rest = path.strip_prefix(&repo).ok_or(404u16)?;
    match (method, rest, query) {
        ("GET", "/info/refs", "service=git-upload-pack" | "service=git-receive-pack") => {
            Ok(Endpoint {
                path_info: path.to_owned(),
                query: query.to_owned(),
            })
        }
        ("POST", "/git-upload-pack" | "/git-receive-pack", "") => Ok(Endpoint {
            path_info: path.to_owned(),
            query: String::new(),
        }),
        ("GET", "/info/refs", _) => Err(400),
        (_, "/info/refs" | "/git-upload-pack" | "/git-receive-pack", _) => Err(405),
        _ => Err(404),
    }
}

/// A header value that may be handed to the CGI as it is (printable ASCII).
fn plain(value: &[u8]) -> Option<String> {
    (value.len() <= 256 && value.iter().all(|b| (0x20..0x7f).contains(b)))
        .then(|| String::from_utf8_lossy(value).into_owned())
}

impl Backend {
    async fn handle(&self, stream: UnixStream) -> std::io::Result<()> {
        let (read, mut write) = tokio::io::split(stream);
        let mut reader = BufReader::new(read);
        let head = tokio::time::timeout(HEAD_TIMEOUT, body::read_head(&mut reader, MAX_HEAD));
        let Ok(head) = head.await else {
            return respond(write, 400, "the request head did not come in time").await;
        };
        let Some(head_bytes) = head? else {
            return Ok(());
        };
        let head = match http::parse_head(&head_bytes) {
            Ok(Some((head, _))) => head,
            Ok(None) | Err(_) => return respond(write, 400, "malformed request head").await,
        };
        let endpoint = match route(&head.method, &head.target) {
            Ok(endpoint) => endpoint,
            Err(status) => {
                let text = format!(
                    "only git's smart HTTP protocol on /{} is served here",
                    super::REPO_NAME
                );
                return respond(write, status, &text).await;
            }
        };
        let framing = match http::body_framing(&head) {
            Ok(framing) => framing,
            Err(e) => return respond(write, 400, &e.to_string()).await,
        };
        let mut cmd = tokio::process::Command::new("git");
        cmd.arg("http-backend")
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("HOME", self.run.gate_home())
            .env("XDG_CONFIG_HOME", self.run.gate_home())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_PROJECT_ROOT", self.run.gate_dir())
            .env("GIT_HTTP_EXPORT_ALL", "1")
            .env("GATEWAY_INTERFACE", "CGI/1.1")
            .env("SERVER_PROTOCOL", "HTTP/1.1")
            .env("REQUEST_METHOD", &head.method)
            .env("PATH_INFO", &endpoint.path_info)
            .env("QUERY_STRING", &endpoint.query)
            .env("REMOTE_USER", "agent")
            .env("REMOTE_ADDR", "127.0.0.1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in super::repo::hook_env(&self.run, &self.exe) {
            cmd.env(key, value);
        }
        if let http::BodyFraming::Length(n) = framing {
            cmd.env("CONTENT_LENGTH", n.to_string());
        }
        for (header, var) in [
            ("content-type", "CONTENT_TYPE"),
            ("content-encoding", "HTTP_CONTENT_ENCODING"),
            ("git-protocol", "GIT_PROTOCOL"),
        ] {
            if let Some(value) = head.header_values(header).next().and_then(plain) {
                cmd.env(var, value);
            }
        }
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                tracing::warn!(error = %e, "cannot run git http-backend for the gate");
                return respond(write, 503, "git is not installed on the host").await;
            }
        };
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return respond(write, 503, "cannot talk to git").await;
        };
        let feed = async {
            // When git stops reading (it refused the push: a pack over the limit), the rest
            // of the body is read and dropped, so that the client finishes sending and reads
            // git's answer (it does not read while it sends).
            let mut sink = Drain::new(stdin);
            let fed = body::decode(&mut reader, &mut sink, framing).await;
            drop(sink);
            fed
        };
        let errors = async {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::info!(line = %line, "git http-backend");
            }
        };
        let answer = relay_cgi(stdout, &mut write);
        let (fed, answered, ()) = tokio::join!(feed, answer, errors);
        let _ = child.wait().await;
        if let Err(e) = fed {
            tracing::debug!(error = %e, "the gate request body was not read whole");
        }
        if endpoint.path_info.ends_with("/git-receive-pack") {
            self.forward_pushed().await;
        }
        answered
    }

    /// Forward to the upstream the refs the gate's log says were pushed since last time.
    async fn forward_pushed(&self) {
        let Some(upstream) = self.config.upstream.clone() else {
            return;
        };
        let mut offset = self.forwarded.lock().await;
        let (run, bottle, start) = (self.run.clone(), self.config.bottle_id.clone(), *offset);
        let done = tokio::task::spawn_blocking(move || {
            let log = run.gate_log();
            let Ok(text) = std::fs::read(&log) else {
                return start;
            };
            let end = text.len() as u64;
            let fresh = String::from_utf8_lossy(&text[start.min(end) as usize..]).into_owned();
            let updates: Vec<super::policy::Update> = fresh
                .lines()
                .filter_map(|l| serde_json::from_str::<super::policy::GateEvent>(l).ok())
                .filter(|e| e.event == "pushed")
                .filter_map(|e| {
                    Some(super::policy::Update {
                        old: e.old?,
                        new: e.new?,
                        refname: e.refname,
                    })
                })
                .collect();
            let events = super::upstream::forward(&run, &bottle, &upstream, &updates);
            if let Err(e) = super::policy::append_events(&log, &events) {
                tracing::warn!(error = %e, "cannot log the forwarded pushes");
            }
            // The lines appended after `end` (ours among them) are read next time; only
            // `pushed` ones are forwarded.
            end
        })
        .await;
        if let Ok(next) = done {
            *offset = next;
        }
    }
}

/// Most bytes read and dropped after git stopped reading a request body.
const MAX_DRAINED: u64 = 256 << 20;

/// A writer into git's stdin that, once git has stopped reading, drops what it is given (up to
/// [`MAX_DRAINED`] bytes, then it fails).
struct Drain<W> {
    inner: Option<W>,
    drained: u64,
}

impl<W> Drain<W> {
    fn new(inner: W) -> Self {
        Self {
            inner: Some(inner),
            drained: 0,
        }
    }

    fn drop_bytes(&mut self, n: usize) -> std::task::Poll<std::io::Result<usize>> {
        self.drained += n as u64;
        if self.drained > MAX_DRAINED {
            return std::task::Poll::Ready(Err(std::io::Error::other(
                "the request body went on long after git stopped reading it",
            )));
        }
        std::task::Poll::Ready(Ok(n))
    }
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Drain<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match this.inner.as_mut() {
            Some(inner) => match std::pin::Pin::new(inner).poll_write(cx, buf) {
                std::task::Poll::Ready(Err(_)) => {
                    // git is gone (EPIPE): from here on, drop.
                    this.inner = None;
                    this.drop_bytes(buf.len())
                }
                other => other,
            },
            None => this.drop_bytes(buf.len()),
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.inner.as_mut() {
            Some(inner) => match std::pin::Pin::new(inner).poll_flush(cx) {
                std::task::Poll::Ready(Err(_)) => {
                    self.inner = None;
                    std::task::Poll::Ready(Ok(()))
                }
                other => other,
            },
            None => std::task::Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.inner.as_mut() {
            Some(inner) => std::pin::Pin::new(inner).poll_shutdown(cx).map(|_| Ok(())),
            None => std::task::Poll::Ready(Ok(())),
        }
    }
}

/// Turns the CGI's answer (`Status:` and headers, a blank line, the body) into an HTTP/1.1
/// response delimited by closing the connection.
async fn relay_cgi<R, W>(stdout: R, out: &mut W) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut cgi = BufReader::new(stdout);
    let Some(head) = body::read_head(&mut cgi, MAX_CGI_HEAD).await? else {
        return respond(out, 503, "git ended without an answer").await;
    };
    let text = String::from_utf8_lossy(&head);
    let mut status = "200 OK".to_owned();
    let mut headers = String::new();
    for line in text.lines().map(str::trim_end).filter(|l| !l.is_empty()) {
        match line.split_once(':') {
            Some((name, value)) if name.eq_ignore_ascii_case("status") => {
                status = value.trim().to_owned()
            }
            Some((name, value))
                if !name.eq_ignore_ascii_case("connection")
                    && !name.eq_ignore_ascii_case("transfer-encoding")
                    && !name.eq_ignore_ascii_case("content-length") =>
            {
                headers.push_str(&format!("{name}: {}\r\n", value.trim()));
            }
            _ => {}
        }
    }
    out.write_all(format!("HTTP/1.1 {status}\r\n{headers}Connection: close\r\n\r\n").as_bytes())
        .await?;
    tokio::io::copy_buf(&mut cgi, out).await?;
    out.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_only_the_smart_protocol_endpoints_are_routed() {
        let r = route("GET", "/workspace.git/info/refs?service=git-receive-pack").unwrap();
        assert_eq!(r.path_info, "/workspace.git/info/refs");
        assert_eq!(r.query, "service=git-receive-pack");
        assert!(route("POST", "/workspace.git/git-receive-pack").is_ok());
        assert!(route("POST", "/workspace.git/git-upload-pack").is_ok());
        assert_eq!(route("GET", "/workspace.git/info/refs"), Err(400));
        assert_eq!(route("GET", "/workspace.git/HEAD"), Err(404));
        assert_eq!(
            route("GET", "/workspace.git/objects/info/alternates"),
            Err(404)
        );
        assert_eq!(
            route("GET", "/other.git/info/refs?service=git-upload-pack"),
            Err(404)
        );
        assert_eq!(
            route(
                "GET",
                "/workspace.git/../x/info/refs?service=git-upload-pack"
            ),
            Err(404)
        );
        assert_eq!(route("PUT", "/workspace.git/git-receive-pack"), Err(405));
        assert_eq!(
            route("POST", "/workspace.git/git-receive-pack?x=1"),
            Err(405)
        );
    }

    #[tokio::test]
    async fn test_a_body_git_stopped_reading_is_drained_then_refused_past_the_bound() {
        use tokio::io::AsyncWriteExt as _;
        // git's stdin with git gone: every write fails (EPIPE on the real pipe).
        let (stdin, reader) = tokio::io::duplex(64);
        drop(reader);
        let mut drain = Drain::new(stdin);
        let chunk = vec![7u8; 1 << 20];
        // The client's remaining body is taken, so it can finish sending and read the answer.
        for _ in 0..(MAX_DRAINED >> 20) {
            drain.write_all(&chunk).await.unwrap();
        }
        drain.flush().await.unwrap();
        // Beyond the bound, the connection is given up.
        assert!(drain.write_all(&chunk).await.is_err());
    }
}
