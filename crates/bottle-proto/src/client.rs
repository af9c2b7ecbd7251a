//! The host side: one [`Client`] per control connection, any number of sessions on it.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::frame::{read_frame, Frame, FrameError, FrameKind, DATA_CHUNK_LEN};
use crate::message::{
    ErrorBody, ExecRequest, ExitStatus, HealthInfo, Hello, PtyRequest, Request, Response,
    SignalBody, WindowSize,
};

/// How much longer than the command's own timeout the host waits for the guest: the guest
/// kills the command at its timeout, then needs a moment to reap it and send `Exit`.
pub const IO_TIMEOUT_GRACE: Duration = Duration::from_secs(30);

/// How long the host waits for an answer to `health` or `shutdown`.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// The byte stream the protocol runs over: vsock (through the VMM's Unix socket) in
/// production, a serial port under QEMU tests.
pub trait Transport: Read + Write + Send {
    /// Bounds how long one read may block; `None` waits forever.
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
}

/// A transport that can be split into a reader and a writer (needed for `pty`).
pub trait DuplexTransport: Transport + Sized + 'static {
    fn try_clone(&self) -> io::Result<Self>;
}

impl Transport for UnixStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

impl DuplexTransport for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
}

impl Transport for TcpStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
}

impl DuplexTransport for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
}

/// Opens a host → guest vsock stream through the VMM's Unix socket (PRD 0004: `CONNECT
/// <port>\n`, answered `OK <port>\n`); the result is ready for [`Client::new`].
pub fn connect_vsock(uds_path: &std::path::Path, port: u32) -> Result<UnixStream, ClientError> {
    let stream =
        UnixStream::connect(uds_path).map_err(|e| ClientError::Frame(FrameError::Io(e)))?;
    vsock_handshake(stream, port)
}

/// The `CONNECT <port>` exchange on a stream connected to the VMM's vsock socket.
fn vsock_handshake(mut stream: UnixStream, port: u32) -> Result<UnixStream, ClientError> {
    let io = |e| ClientError::Frame(FrameError::Io(e));
    stream.set_read_timeout(Some(CONTROL_TIMEOUT)).map_err(io)?;
    // A VMM that refuses may answer and hang up before reading the request: then the write
    // fails, and its answer is still there to read and report.
    if let Err(e) = stream.write_all(format!("CONNECT {port}\n").as_bytes()) {
        if !matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ) {
            return Err(io(e));
        }
    }
    // Read the answer byte by byte: nothing after its newline may be consumed.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 && byte[0] != b'\n' {
        match stream.read(&mut byte) {
            Ok(0) => return Err(ClientError::Closed),
            Ok(_) => line.push(byte[0]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ClientError::Timeout(CONTROL_TIMEOUT))
            }
            Err(e) => return Err(io(e)),
        }
    }
    // `OK <n>\n`: our VMM echoes the guest port, Firecracker-style backends (such as
    // rust-vmm's vhost-device-vsock) name the host-side port they assigned.
    let ok = line
        .strip_prefix(b"OK ")
        .and_then(|rest| rest.strip_suffix(b"\n"))
        .is_some_and(|n| !n.is_empty() && n.iter().all(u8::is_ascii_digit));
    if !ok {
        return Err(ClientError::Refused {
            message: format!(
                "VMM answered {:?} to CONNECT {port}: is the guest agent listening?",
                String::from_utf8_lossy(&line)
            ),
        });
    }
    Ok(stream)
}

/// The host's read timeout for a command with this timeout: always longer than the command's
/// own, and unbounded only when the command is.
pub fn io_timeout_for(command_timeout: Option<Duration>) -> Option<Duration> {
    command_timeout.map(|t| t.saturating_add(IO_TIMEOUT_GRACE))
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("control channel failed")]
    Frame(#[source] FrameError),
    #[error("guest agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("guest agent closed the control channel")]
    Closed,
    #[error("guest agent refused the request: {message}")]
    Refused { message: String },
    #[error("guest agent sent a {kind:?} frame where it should not")]
    Unexpected { kind: FrameKind },
    #[error("guest agent sent a {kind:?} frame with an invalid body")]
    BadBody {
        kind: FrameKind,
        #[source]
        source: serde_json::Error,
    },
    #[error("this connection was closed after an earlier error: open a new one")]
    Poisoned,
    #[error("writing command output failed")]
    Output(#[source] io::Error),
    #[error("reading input to send failed")]
    Input(#[source] io::Error),
}

/// The output of a finished `exec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A control connection to one guest.
pub struct Client<S: Transport> {
    stream: S,
    token: String,
    poisoned: bool,
}

impl<S: Transport> Client<S> {
    pub fn new(stream: S, token: impl Into<String>) -> Client<S> {
        Client {
            stream,
            token: token.into(),
            poisoned: false,
        }
    }

    /// Gives the stream back (to close it, or to reuse it elsewhere).
    pub fn into_inner(self) -> S {
        self.stream
    }

    /// Asks whether the agent is up.
    pub fn health(&mut self) -> Result<HealthInfo, ClientError> {
        match self.simple(Request::Health)? {
            Response::Health(h) => Ok(h),
            Response::Ok => Err(ClientError::Unexpected {
                kind: FrameKind::Done,
            }),
        }
    }

    /// Asks the guest to power off.
    pub fn shutdown(&mut self) -> Result<(), ClientError> {
        self.simple(Request::Shutdown).map(|_| ())
    }

    /// Runs a command, collecting its output.
    pub fn exec(&mut self, req: &ExecRequest, stdin: &[u8]) -> Result<ExecResult, ClientError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let status = self.exec_streaming(req, stdin, &mut stdout, &mut stderr)?;
        Ok(ExecResult {
            status,
            stdout,
            stderr,
        })
    }

    /// Runs a command, streaming its output into `stdout`/`stderr` as it arrives.
    ///
    /// `stdin` is sent whole before output is read; the agent buffers it, so a command that
    /// never reads its stdin cannot block the channel.
    pub fn exec_streaming(
        &mut self,
        req: &ExecRequest,
        mut stdin: impl Read,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<ExitStatus, ClientError> {
        let timeout = io_timeout_for(req.timeout());
        self.begin(&Request::Exec(req.clone()), timeout)?;
        let mut buf = vec![0u8; DATA_CHUNK_LEN];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.poison(ClientError::Input(e))),
            };
            if n == 0 {
                break;
            }
            self.send(&Frame::new(FrameKind::Stdin, buf[..n].to_vec()))?;
        }
        self.send(&Frame::empty(FrameKind::StdinEof))?;
        loop {
            let frame = self.recv(timeout)?;
            match frame.kind {
                FrameKind::Stdout => stdout.write_all(&frame.body).map_err(ClientError::Output)?,
                FrameKind::Stderr => stderr.write_all(&frame.body).map_err(ClientError::Output)?,
                FrameKind::Exit => return self.json(&frame),
                kind => return Err(self.poison(ClientError::Unexpected { kind })),
            }
        }
    }

    /// Unpacks the tar stream `tar` into the guest directory `dest`.
    pub fn copy_in(&mut self, dest: &str, mut tar: impl Read) -> Result<(), ClientError> {
        self.begin(
            &Request::CopyIn {
                dest: dest.to_string(),
            },
            Some(CONTROL_TIMEOUT),
        )?;
        let mut buf = vec![0u8; DATA_CHUNK_LEN];
        loop {
            let n = match tar.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.poison(ClientError::Input(e))),
            };
            if n == 0 {
                break;
            }
            self.send(&Frame::new(FrameKind::TarData, buf[..n].to_vec()))?;
        }
        self.send(&Frame::empty(FrameKind::TarEof))?;
        self.finish(None).map(|_| ())
    }

    /// Writes the guest path `path` (file or directory) as a tar stream into `out`.
    pub fn copy_out(&mut self, path: &str, out: &mut dyn Write) -> Result<(), ClientError> {
        self.begin(
            &Request::CopyOut {
                path: path.to_string(),
            },
            Some(CONTROL_TIMEOUT),
        )?;
        loop {
            let frame = self.recv(None)?;
            match frame.kind {
                FrameKind::TarData => out.write_all(&frame.body).map_err(ClientError::Output)?,
                FrameKind::TarEof => break,
                kind => return Err(self.poison(ClientError::Unexpected { kind })),
            }
        }
        self.finish(None).map(|_| ())
    }

    /// Sends raw bytes as they are, for tests of the agent's handling of garbage.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream
            .write_all(bytes)
            .and_then(|_| self.stream.flush())
            .map_err(|e| self.poison(ClientError::Frame(FrameError::Io(e))))
    }

    /// Reads the next frame as it comes (tests, diagnostics).
    pub fn recv_raw(&mut self, timeout: Option<Duration>) -> Result<Frame, ClientError> {
        self.recv(timeout)
    }

    fn simple(&mut self, req: Request) -> Result<Response, ClientError> {
        self.begin(&req, Some(CONTROL_TIMEOUT))?;
        self.finish(Some(CONTROL_TIMEOUT))
    }

    fn begin(&mut self, req: &Request, timeout: Option<Duration>) -> Result<(), ClientError> {
        if self.poisoned {
            return Err(ClientError::Poisoned);
        }
        self.stream
            .set_read_timeout(timeout)
            .map_err(|e| self.poison(ClientError::Frame(FrameError::Io(e))))?;
        let hello = Hello {
            token: self.token.clone(),
        };
        self.send(&Frame::new(FrameKind::Hello, to_json(&hello)))?;
        self.send(&Frame::new(FrameKind::Request, to_json(req)))
    }

    fn finish(&mut self, timeout: Option<Duration>) -> Result<Response, ClientError> {
        let frame = self.recv(timeout)?;
        match frame.kind {
            FrameKind::Done => self.json(&frame),
            kind => Err(self.poison(ClientError::Unexpected { kind })),
        }
    }

    fn send(&mut self, frame: &Frame) -> Result<(), ClientError> {
        frame
            .write_to(&mut self.stream)
            .map_err(|e| self.poison(ClientError::Frame(e)))
    }

    fn recv(&mut self, timeout: Option<Duration>) -> Result<Frame, ClientError> {
        match read_frame(&mut self.stream) {
            Ok(Some(frame)) if frame.kind == FrameKind::Error => {
                let message = serde_json::from_slice::<ErrorBody>(&frame.body)
                    .map(|b| b.message)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&frame.body).into_owned());
                Err(self.poison(ClientError::Refused { message }))
            }
            Ok(Some(frame)) => Ok(frame),
            Ok(None) => Err(self.poison(ClientError::Closed)),
            Err(FrameError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(self.poison(ClientError::Timeout(timeout.unwrap_or_default())))
            }
            Err(e) => Err(self.poison(ClientError::Frame(e))),
        }
    }

    fn json<T: serde::de::DeserializeOwned>(&mut self, frame: &Frame) -> Result<T, ClientError> {
        serde_json::from_slice(&frame.body).map_err(|source| {
            self.poison(ClientError::BadBody {
                kind: frame.kind,
                source,
            })
        })
    }

    fn poison(&mut self, e: ClientError) -> ClientError {
        self.poisoned = true;
        e
    }
}

impl<S: DuplexTransport> Client<S> {
    /// Starts an interactive session. Send input, resizes and signals through
    /// [`PtySession::input`] (from any thread); read output with [`PtySession::run`].
    pub fn pty(mut self, req: &PtyRequest) -> Result<PtySession<S>, ClientError> {
        self.begin(&Request::Pty(req.clone()), None)?;
        let writer = self
            .stream
            .try_clone()
            .map_err(|e| ClientError::Frame(FrameError::Io(e)))?;
        Ok(PtySession {
            client: self,
            input: PtyInput {
                stream: Arc::new(Mutex::new(writer)),
            },
        })
    }
}

/// A running `pty` session.
pub struct PtySession<S: DuplexTransport> {
    client: Client<S>,
    input: PtyInput<S>,
}

/// The sending half of a PTY session; cheap to clone, usable from other threads.
pub struct PtyInput<S> {
    stream: Arc<Mutex<S>>,
}

impl<S> Clone for PtyInput<S> {
    fn clone(&self) -> Self {
        PtyInput {
            stream: Arc::clone(&self.stream),
        }
    }
}

impl<S: DuplexTransport> PtyInput<S> {
    pub fn write(&self, bytes: &[u8]) -> Result<(), ClientError> {
        for chunk in bytes.chunks(DATA_CHUNK_LEN) {
            self.send(&Frame::new(FrameKind::Stdin, chunk.to_vec()))?;
        }
        Ok(())
    }

    pub fn resize(&self, size: WindowSize) -> Result<(), ClientError> {
        self.send(&Frame::new(FrameKind::Resize, to_json(&size)))
    }

    /// Delivers `signal` to the session's foreground process group.
    pub fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.send(&Frame::new(
            FrameKind::Signal,
            to_json(&SignalBody { signal }),
        ))
    }

    fn send(&self, frame: &Frame) -> Result<(), ClientError> {
        let mut stream = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        frame.write_to(&mut *stream).map_err(ClientError::Frame)
    }
}

impl<S: DuplexTransport> PtySession<S> {
    pub fn input(&self) -> PtyInput<S> {
        self.input.clone()
    }

    /// Copies the terminal's output into `out` until the command exits; gives the client back
    /// for further sessions on the same connection.
    pub fn run(mut self, out: &mut dyn Write) -> Result<(ExitStatus, Client<S>), ClientError> {
        loop {
            let frame = self.client.recv(None)?;
            match frame.kind {
                FrameKind::Stdout => {
                    out.write_all(&frame.body).map_err(ClientError::Output)?;
                    out.flush().map_err(ClientError::Output)?;
                }
                FrameKind::Exit => {
                    let status = self.client.json(&frame)?;
                    return Ok((status, self.client));
                }
                kind => return Err(self.client.poison(ClientError::Unexpected { kind })),
            }
        }
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail: no maps with non-string keys, no floats.
    serde_json::to_vec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_io_timeout_exceeds_the_command_timeout() {
        let cmd = Duration::from_secs(5);

        let io = io_timeout_for(Some(cmd)).unwrap();

        assert!(io > cmd);
    }

    #[test]
    fn host_io_timeout_of_a_huge_command_timeout_saturates() {
        assert_eq!(io_timeout_for(Some(Duration::MAX)), Some(Duration::MAX));
    }

    #[test]
    fn vsock_handshake_passes_the_stream_on_after_ok() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let vmm = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = [0u8; 13];
            s.read_exact(&mut req).unwrap();
            s.write_all(b"OK 1024\nrest").unwrap();
            req
        });

        let mut stream = connect_vsock(&path, 1024).unwrap();
        let mut rest = [0u8; 4];
        stream.read_exact(&mut rest).unwrap();

        assert_eq!((&vmm.join().unwrap(), &rest), (b"CONNECT 1024\n", b"rest"));
    }

    #[test]
    fn vsock_handshake_accepts_the_host_side_port_firecracker_style() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = [0u8; 13];
            s.read_exact(&mut req).unwrap();
            s.write_all(b"OK 40321\n").unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });

        assert!(connect_vsock(&path, 1024).is_ok());
    }

    #[test]
    fn vsock_handshake_with_garbage_after_ok_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"OK 10x24\n").unwrap();
        });

        let err = connect_vsock(&path, 1024).unwrap_err();

        assert!(matches!(err, ClientError::Refused { .. }), "{err:?}");
    }

    #[test]
    fn vsock_handshake_refused_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"ERR\n").unwrap();
        });

        let err = connect_vsock(&path, 1024).unwrap_err();

        assert!(matches!(err, ClientError::Refused { .. }), "{err:?}");
    }

    /// The race CI met: the VMM answers and hangs up before the client has written its
    /// request. Its answer must still be what is reported, not the broken pipe.
    #[test]
    fn a_refusal_sent_before_the_request_was_read_is_still_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (gone_tx, gone_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"ERR\n").unwrap();
            drop(s);
            gone_tx.send(()).unwrap();
        });
        let stream = UnixStream::connect(&path).unwrap();
        gone_rx.recv().unwrap();

        let err = vsock_handshake(stream, 1024).unwrap_err();

        assert!(matches!(err, ClientError::Refused { .. }), "{err:?}");
    }

    #[test]
    fn command_without_timeout_has_no_io_timeout() {
        assert_eq!(io_timeout_for(None), None);
    }
}
