//! The control agent: serves protocol sessions on one connection (a vsock stream, or the
//! virtio serial port under QEMU tests). Generic over nothing but a `File`, so the tests run it
//! on the host over a Unix socket pair.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use bottle_proto::frame::DATA_CHUNK_LEN;
use bottle_proto::{
    read_frame, ErrorBody, ExecRequest, ExitStatus, Frame, FrameError, FrameKind, HealthInfo,
    Hello, PtyRequest, Request, Response, SignalBody, UserIds, WindowSize,
};

use crate::reaper;

/// How long the output of a finished PTY session may keep draining before the session ends
/// anyway (a background process may hold the terminal open).
const PTY_DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// PATH for commands when the bottle's environment sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("peer broke the protocol: {0}")]
    Protocol(String),
    #[error("bad frame from peer")]
    Frame(#[source] FrameError),
    #[error("writing to the control channel failed")]
    Write(#[source] FrameError),
    #[error("cannot duplicate the control channel descriptor")]
    Clone(#[source] io::Error),
}

/// What every session needs to know about the bottle.
pub struct AgentContext {
    pub token: String,
    pub env: BTreeMap<String, String>,
    pub user: UserIds,
    pub home: String,
    /// Called after a `shutdown` request was answered, or a `power_off_on_exit` PTY ended.
    pub on_shutdown: Box<dyn Fn() + Send + Sync>,
}

enum Event {
    Frame(Frame),
    Eof,
    Bad(FrameError),
    Exited { session: u64, status: ExitStatus },
}

type Writer = Arc<Mutex<File>>;

fn send(w: &Writer, frame: &Frame) -> Result<(), AgentError> {
    let mut f = w.lock().unwrap_or_else(|p| p.into_inner());
    frame.write_to(&mut *f).map_err(AgentError::Write)
}

fn send_json<T: serde::Serialize>(w: &Writer, kind: FrameKind, body: &T) -> Result<(), AgentError> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    send(w, &Frame::new(kind, body))
}

/// Sends an `Error` frame and returns the error that ends the connection.
fn fail(w: &Writer, message: String) -> AgentError {
    let _ = send_json(
        w,
        FrameKind::Error,
        &ErrorBody {
            message: message.clone(),
        },
    );
    AgentError::Protocol(message)
}

/// Serves sessions until the peer closes the connection (`Ok`) or breaks the protocol (an
/// `Error` frame is sent, then `Err`). Never panics on peer input.
///
/// Returns only when nothing more will be read from `conn`: a socket is shut down; any other
/// stream (a serial port) is drained until the peer goes away, so the next connection starts
/// on a frame boundary.
pub fn serve_connection(conn: File, ctx: &AgentContext) -> Result<(), AgentError> {
    let reader = conn.try_clone().map_err(AgentError::Clone)?;
    let shutdown_handle = conn.try_clone().map_err(AgentError::Clone)?;
    let writer: Writer = Arc::new(Mutex::new(conn));
    let (tx, rx) = mpsc::channel();
    let reader_tx = tx.clone();
    let reader = thread::Builder::new()
        .name("control-reader".into())
        .spawn(move || read_events(reader, reader_tx))
        .map_err(AgentError::Clone)?;
    let result = serve_sessions(ctx, &writer, &rx, &tx);
    drop(rx);
    // Not a socket (ENOTSOCK): the reader drains until the peer disconnects.
    let _ = nix::sys::socket::shutdown(
        shutdown_handle.as_raw_fd(),
        nix::sys::socket::Shutdown::Both,
    );
    let _ = reader.join();
    result
}

fn serve_sessions(
    ctx: &AgentContext,
    writer: &Writer,
    rx: &Receiver<Event>,
    tx: &Sender<Event>,
) -> Result<(), AgentError> {
    let mut session = 0u64;
    loop {
        session += 1;
        let hello = match next_frame(rx, writer)? {
            Some(f) => f,
            None => return Ok(()),
        };
        match hello.kind {
            FrameKind::Hello => {}
            // Stragglers from a session that already ended (input typed after exit).
            FrameKind::Stdin | FrameKind::StdinEof | FrameKind::Resize | FrameKind::Signal => {
                continue
            }
            kind => return Err(fail(writer, format!("expected Hello, got {kind:?}"))),
        }
        let hello: Hello = parse(writer, &hello)?;
        if !constant_time_eq(hello.token.as_bytes(), ctx.token.as_bytes()) {
            return Err(fail(writer, "wrong token for this boot".into()));
        }
        let req = match next_frame(rx, writer)? {
            Some(f) if f.kind == FrameKind::Request => parse::<Request>(writer, &f)?,
            Some(f) => return Err(fail(writer, format!("expected Request, got {:?}", f.kind))),
            None => return Ok(()),
        };
        match req {
            Request::Health => {
                send_json(writer, FrameKind::Done, &Response::Health(health()))?;
            }
            Request::Shutdown => {
                send_json(writer, FrameKind::Done, &Response::Ok)?;
                (ctx.on_shutdown)();
            }
            Request::Exec(req) => exec(&req, ctx, session, writer, rx, tx)?,
            Request::Pty(req) => {
                pty(&req, ctx, session, writer, rx, tx)?;
                if req.power_off_on_exit {
                    (ctx.on_shutdown)();
                }
            }
            Request::CopyIn { dest } => copy_in(Path::new(&dest), writer, rx)?,
            Request::CopyOut { path } => copy_out(Path::new(&path), writer)?,
        }
    }
}

fn read_events(mut reader: impl Read, tx: Sender<Event>) {
    loop {
        match read_frame(&mut reader) {
            Ok(Some(f)) => {
                if tx.send(Event::Frame(f)).is_err() {
                    break;
                }
            }
            Ok(None) => {
                // The peer is gone. Not one more byte is read here: on a serial port whatever
                // follows belongs to the next connection (draining it once lost a whole session).
                let _ = tx.send(Event::Eof);
                return;
            }
            Err(e) => {
                let _ = tx.send(Event::Bad(e));
                break;
            }
        }
    }
    // Framing is lost or the session gave up: discard until the peer goes away.
    let mut sink = [0u8; 4096];
    while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
}

/// The next frame from the peer; stale child exits are skipped. `None` at end of stream.
fn next_frame(rx: &Receiver<Event>, w: &Writer) -> Result<Option<Frame>, AgentError> {
    loop {
        match rx.recv() {
            Ok(Event::Frame(f)) => return Ok(Some(f)),
            Ok(Event::Eof) | Err(_) => return Ok(None),
            Ok(Event::Bad(e)) => {
                let _ = send_json(
                    w,
                    FrameKind::Error,
                    &ErrorBody {
                        message: e.to_string(),
                    },
                );
                return Err(AgentError::Frame(e));
            }
            Ok(Event::Exited { .. }) => {}
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(w: &Writer, f: &Frame) -> Result<T, AgentError> {
    serde_json::from_slice(&f.body).map_err(|e| fail(w, format!("invalid {:?} body: {e}", f.kind)))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn health() -> HealthInfo {
    let uptime_ms = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|secs| (secs * 1000.0) as u64)
        .unwrap_or(0);
    HealthInfo {
        agent_version: env!("CARGO_PKG_VERSION").into(),
        uptime_ms,
    }
}

fn base_command(
    argv: &[String],
    env: &BTreeMap<String, String>,
    cwd: Option<&str>,
    user: Option<UserIds>,
    ctx: &AgentContext,
) -> Command {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    cmd.env_clear();
    cmd.env("PATH", DEFAULT_PATH);
    cmd.env("HOME", &ctx.home);
    cmd.envs(&ctx.env);
    cmd.envs(env);
    cmd.current_dir(cwd.unwrap_or(&ctx.home));
    let ids = user.unwrap_or(ctx.user);
    cmd.uid(ids.uid).gid(ids.gid);
    cmd
}

/// A thread that writes whatever arrives on its channel into `sink`, so the control channel
/// never waits for a command that does not read its input.
fn input_pump(mut sink: impl Write + Send + 'static) -> (Sender<Vec<u8>>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let handle = thread::spawn(move || {
        for chunk in rx {
            if sink.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    (tx, handle)
}

/// A thread that sends everything read from `source` as `kind` frames, until end of file,
/// a read error, or `stop` is set.
fn output_pump(
    mut source: impl Read + Send + 'static,
    kind: FrameKind,
    w: Writer,
    stop: Arc<AtomicBool>,
) -> Receiver<()> {
    let (done_tx, done_rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = vec![0u8; DATA_CHUNK_LEN];
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let guard = w.lock().unwrap_or_else(|p| p.into_inner());
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let mut file = guard;
            if Frame::new(kind, buf[..n].to_vec())
                .write_to(&mut *file)
                .is_err()
            {
                break;
            }
        }
        let _ = done_tx.send(());
    });
    done_rx
}

fn waiter(
    exit_rx: Receiver<ExitStatus>,
    pid: i32,
    timeout: Option<Duration>,
    session: u64,
    events: Sender<Event>,
) {
    thread::spawn(move || {
        let status = match timeout {
            None => exit_rx.recv().ok(),
            Some(t) => match exit_rx.recv_timeout(t) {
                Ok(s) => Some(s),
                Err(_) => {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                    exit_rx.recv().ok().map(|s| ExitStatus {
                        timed_out: true,
                        ..s
                    })
                }
            },
        };
        let status = status.unwrap_or(ExitStatus {
            code: None,
            signal: None,
            timed_out: false,
        });
        let _ = events.send(Event::Exited { session, status });
    });
}

fn spawn_failed(w: &Writer, argv0: &str, e: &io::Error) -> Result<ExitStatus, AgentError> {
    let msg = format!("bottle-init: cannot run {argv0}: {e}\n");
    send(w, &Frame::new(FrameKind::Stderr, msg.into_bytes()))?;
    let code = if e.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    };
    Ok(ExitStatus {
        code: Some(code),
        signal: None,
        timed_out: false,
    })
}

fn exec(
    req: &ExecRequest,
    ctx: &AgentContext,
    session: u64,
    w: &Writer,
    rx: &Receiver<Event>,
    events: &Sender<Event>,
) -> Result<(), AgentError> {
    if req.argv.is_empty() {
        return Err(fail(w, "exec needs a non-empty argv".into()));
    }
    let mut cmd = base_command(&req.argv, &req.env, req.cwd.as_deref(), req.user, ctx);
    cmd.process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let stop = Arc::new(AtomicBool::new(false));
    let mut stdin_tx = None;
    let mut pumps = Vec::new();
    let mut pid = None;
    let mut exited = None;
    match reaper::spawn(&mut cmd) {
        Ok((mut child, exit_rx)) => {
            let id = child.id() as i32;
            pid = Some(id);
            if let Some(stdin) = child.stdin.take() {
                stdin_tx = Some(input_pump(stdin).0);
            }
            if let Some(out) = child.stdout.take() {
                pumps.push(output_pump(out, FrameKind::Stdout, w.clone(), stop.clone()));
            }
            if let Some(err) = child.stderr.take() {
                pumps.push(output_pump(err, FrameKind::Stderr, w.clone(), stop.clone()));
            }
            waiter(exit_rx, id, req.timeout(), session, events.clone());
        }
        Err(e) => exited = Some(spawn_failed(w, &req.argv[0], &e)?),
    }
    let mut stdin_done = false;
    let mut exit_sent = false;
    loop {
        if let (Some(status), false) = (exited, exit_sent) {
            if let Some(pid) = pid {
                // The command is done: whatever it left running in its group goes too.
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            for done in pumps.drain(..) {
                let _ = done.recv();
            }
            send_json(w, FrameKind::Exit, &status)?;
            exit_sent = true;
        }
        if exit_sent && stdin_done {
            return Ok(());
        }
        match rx.recv() {
            Ok(Event::Frame(f)) => match f.kind {
                FrameKind::Stdin => {
                    if let Some(tx) = &stdin_tx {
                        let _ = tx.send(f.body);
                    }
                }
                FrameKind::StdinEof => {
                    stdin_tx = None;
                    stdin_done = true;
                }
                kind => return Err(fail(w, format!("unexpected {kind:?} during exec"))),
            },
            Ok(Event::Exited { session: s, status }) if s == session => exited = Some(status),
            Ok(Event::Exited { .. }) => {}
            Ok(Event::Bad(e)) => {
                let _ = send_json(
                    w,
                    FrameKind::Error,
                    &ErrorBody {
                        message: e.to_string(),
                    },
                );
                stop.store(true, Ordering::SeqCst);
                return Err(AgentError::Frame(e));
            }
            Ok(Event::Eof) | Err(_) => {
                // Client went away: nobody will read the output.
                stop.store(true, Ordering::SeqCst);
                if let Some(pid) = pid {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                }
                return Ok(());
            }
        }
    }
}

fn set_window_size(fd: &impl AsRawFd, size: WindowSize) {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which points at a live local;
    // the descriptor is a PTY master we own. Errors only mean the size was not applied.
    unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

fn pty(
    req: &PtyRequest,
    ctx: &AgentContext,
    session: u64,
    w: &Writer,
    rx: &Receiver<Event>,
    events: &Sender<Event>,
) -> Result<(), AgentError> {
    if req.argv.is_empty() {
        return Err(fail(w, "pty needs a non-empty argv".into()));
    }
    let pty = nix::pty::openpty(None, None)
        .map_err(|e| fail(w, format!("cannot open a pseudo-terminal: {e}")))?;
    set_window_size(&pty.master, req.size);
    let master = File::from(pty.master);
    let slave: OwnedFd = pty.slave;
    let mut cmd = base_command(&req.argv, &req.env, req.cwd.as_deref(), req.user, ctx);
    if !req.env.contains_key("TERM") && !ctx.env.contains_key("TERM") {
        cmd.env("TERM", "xterm-256color");
    }
    let stdio = |fd: &OwnedFd| fd.try_clone().map(Stdio::from);
    let (i, o, e) = match (stdio(&slave), stdio(&slave), stdio(&slave)) {
        (Ok(i), Ok(o), Ok(e)) => (i, o, e),
        _ => return Err(fail(w, "cannot duplicate the pseudo-terminal".into())),
    };
    cmd.stdin(i).stdout(o).stderr(e);
    // SAFETY: the closure runs in the forked child before exec and calls only setsid(2) and
    // ioctl(2), both async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let stop = Arc::new(AtomicBool::new(false));
    let spawned = reaper::spawn(&mut cmd);
    drop(cmd);
    drop(slave);
    let (pid, mut input, output) = match spawned {
        Ok((child, exit_rx)) => {
            let pid = child.id() as i32;
            waiter(exit_rx, pid, None, session, events.clone());
            let input_half = master.try_clone().map_err(AgentError::Clone)?;
            let output = output_pump(
                master.try_clone().map_err(AgentError::Clone)?,
                FrameKind::Stdout,
                w.clone(),
                stop.clone(),
            );
            (Some(pid), Some(input_pump(input_half).0), Some(output))
        }
        Err(e) => {
            let status = spawn_failed(w, &req.argv[0], &e)?;
            send_json(w, FrameKind::Exit, &status)?;
            return Ok(());
        }
    };
    loop {
        match rx.recv() {
            Ok(Event::Frame(f)) => match f.kind {
                FrameKind::Stdin => {
                    if let Some(tx) = &input {
                        let _ = tx.send(f.body);
                    }
                }
                FrameKind::StdinEof => input = None,
                FrameKind::Resize => {
                    let size: WindowSize = parse(w, &f)?;
                    set_window_size(&master, size);
                }
                FrameKind::Signal => {
                    let body: SignalBody = parse(w, &f)?;
                    if let (Ok(sig), Some(pid)) = (Signal::try_from(body.signal), pid) {
                        let group =
                            nix::unistd::tcgetpgrp(master.as_fd()).unwrap_or(Pid::from_raw(pid));
                        let _ = killpg(group, sig);
                    }
                }
                kind => return Err(fail(w, format!("unexpected {kind:?} during pty"))),
            },
            Ok(Event::Exited { session: s, status }) if s == session => {
                if let Some(out) = &output {
                    let _ = out.recv_timeout(PTY_DRAIN_LIMIT);
                }
                stop.store(true, Ordering::SeqCst);
                drop(master);
                send_json(w, FrameKind::Exit, &status)?;
                return Ok(());
            }
            Ok(Event::Exited { .. }) => {}
            Ok(Event::Bad(e)) => {
                stop.store(true, Ordering::SeqCst);
                let _ = send_json(
                    w,
                    FrameKind::Error,
                    &ErrorBody {
                        message: e.to_string(),
                    },
                );
                return Err(AgentError::Frame(e));
            }
            Ok(Event::Eof) | Err(_) => {
                stop.store(true, Ordering::SeqCst);
                if let Some(pid) = pid {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGHUP);
                }
                return Ok(());
            }
        }
    }
}

/// A `Read` over chunks arriving on a channel (the tar stream of `cp` in).
struct ChannelReader {
    rx: Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(c) => {
                    self.chunk = c;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn copy_in(dest: &Path, w: &Writer, rx: &Receiver<Event>) -> Result<(), AgentError> {
    let (tx, chunks) = mpsc::channel();
    let dest_owned = dest.to_path_buf();
    let unpacker = thread::spawn(move || -> io::Result<()> {
        std::fs::create_dir_all(&dest_owned)?;
        let mut archive = tar::Archive::new(ChannelReader {
            rx: chunks,
            chunk: Vec::new(),
            pos: 0,
        });
        archive.set_preserve_permissions(true);
        archive.set_preserve_ownerships(true);
        archive.set_overwrite(true);
        archive.unpack(&dest_owned)
    });
    let mut tx = Some(tx);
    loop {
        match next_frame(rx, w)? {
            Some(f) if f.kind == FrameKind::TarData => {
                if let Some(t) = &tx {
                    if t.send(f.body).is_err() {
                        tx = None;
                    }
                }
            }
            Some(f) if f.kind == FrameKind::TarEof => break,
            Some(f) => return Err(fail(w, format!("unexpected {:?} during cp", f.kind))),
            None => return Ok(()),
        }
    }
    drop(tx);
    match unpacker.join() {
        Ok(Ok(())) => send_json(w, FrameKind::Done, &Response::Ok),
        Ok(Err(e)) => Err(fail(
            w,
            format!("cannot unpack into {}: {}", dest.display(), chain(&e)),
        )),
        Err(_) => Err(fail(
            w,
            format!("unpacking into {} crashed", dest.display()),
        )),
    }
}

/// A `Write` that sends what it gets as `TarData` frames.
struct FrameSink<'a> {
    w: &'a Writer,
    buf: Vec<u8>,
}

impl Write for FrameSink<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= DATA_CHUNK_LEN {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        for chunk in self.buf.chunks(DATA_CHUNK_LEN) {
            send(self.w, &Frame::new(FrameKind::TarData, chunk.to_vec()))
                .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e))?;
        }
        self.buf.clear();
        Ok(())
    }
}

fn copy_out(path: &Path, w: &Writer) -> Result<(), AgentError> {
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| fail(w, format!("cannot read {}: {e}", path.display())))?;
    let name: PathBuf = path
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut builder = tar::Builder::new(FrameSink { w, buf: Vec::new() });
    builder.follow_symlinks(false);
    let result = if meta.is_dir() {
        builder.append_dir_all(&name, path)
    } else {
        builder.append_path_with_name(path, &name)
    };
    let result = result
        .and_then(|_| builder.into_inner())
        .and_then(|mut sink| sink.flush());
    match result {
        Ok(()) => {
            send(w, &Frame::empty(FrameKind::TarEof))?;
            send_json(w, FrameKind::Done, &Response::Ok)
        }
        Err(e) => Err(fail(
            w,
            format!("cannot archive {}: {}", path.display(), chain(&e)),
        )),
    }
}

/// An error and its causes on one line, for messages that cross to the host.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A serial port seen from the guest (no real one exists on the host): reads return the
    /// queued chunks in order; an empty chunk is one end of stream (the host disconnected),
    /// after which the port reads on, as a virtio console port does when the host reconnects.
    struct SerialPort(Arc<Mutex<VecDeque<Vec<u8>>>>);

    impl Read for SerialPort {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let mut queue = self.0.lock().unwrap();
            let Some(mut chunk) = queue.pop_front() else {
                return Ok(0);
            };
            let n = chunk.len().min(buf.len());
            buf[..n].copy_from_slice(&chunk[..n]);
            if n < chunk.len() {
                chunk.drain(..n);
                queue.push_front(chunk);
            }
            Ok(n)
        }
    }

    #[test]
    fn after_the_peer_goes_away_the_next_connections_bytes_are_left_for_it() {
        let hello = Frame::new(FrameKind::Hello, b"{}".to_vec())
            .encode()
            .unwrap();
        let next = Frame::new(FrameKind::Request, b"{}".to_vec())
            .encode()
            .unwrap();
        let port = Arc::new(Mutex::new(VecDeque::from([
            hello,
            Vec::new(),
            next.clone(),
        ])));
        let (tx, rx) = mpsc::channel();

        read_events(SerialPort(port.clone()), tx);

        let events: Vec<Event> = rx.try_iter().collect();
        assert!(
            matches!(events.as_slice(), [Event::Frame(f), Event::Eof] if f.kind == FrameKind::Hello),
            "{} events",
            events.len()
        );
        assert_eq!(
            port.lock().unwrap().iter().cloned().collect::<Vec<_>>(),
            vec![next],
            "the next connection's frame was consumed"
        );
    }

    #[test]
    fn after_a_malformed_frame_the_rest_of_the_connection_is_discarded() {
        let mut garbage = Frame::new(FrameKind::Hello, b"{}".to_vec())
            .encode()
            .unwrap();
        garbage[4] = 0xff; // not our protocol version
        let port = Arc::new(Mutex::new(VecDeque::from([garbage, b"trailing".to_vec()])));
        let (tx, rx) = mpsc::channel();

        read_events(SerialPort(port.clone()), tx);

        let events: Vec<Event> = rx.try_iter().collect();
        assert!(
            matches!(events.as_slice(), [Event::Bad(_)]),
            "{} events",
            events.len()
        );
        assert!(port.lock().unwrap().is_empty());
    }
}
