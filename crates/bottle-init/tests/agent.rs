//! The control agent on the host, over a Unix socket pair: the protocol end to end without a VM.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use bottle_init::agent::{serve_connection, AgentContext};
use bottle_proto::{Client, ClientError, ExecRequest, FrameKind, PtyRequest, UserIds, WindowSize};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn me() -> UserIds {
    UserIds {
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
    }
}

fn start_agent(shutdown: mpsc::Sender<()>) -> UnixStream {
    let (host, guest) = UnixStream::pair().unwrap();
    thread::spawn(move || {
        let ctx = AgentContext {
            token: TOKEN.into(),
            env: BTreeMap::from([("BOTTLE".to_string(), "yes".to_string())]),
            user: me(),
            home: "/".into(),
            on_shutdown: Box::new(move || {
                let _ = shutdown.send(());
            }),
        };
        let _ = serve_connection(File::from(OwnedFd::from(guest)), &ctx);
    });
    host
}

fn client() -> Client<UnixStream> {
    Client::new(start_agent(mpsc::channel().0), TOKEN)
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["/bin/sh", "-c", script])
}

#[test]
fn exec_reports_exit_code_and_separate_streams() {
    let mut c = client();

    let r = c.exec(&sh("echo out; echo err >&2; exit 3"), b"").unwrap();

    assert_eq!(
        (r.status.code, r.stdout, r.stderr),
        (Some(3), b"out\n".to_vec(), b"err\n".to_vec())
    );
}

#[test]
fn exec_sees_request_env_over_bottle_env_and_cwd() {
    let mut c = client();
    let mut req = sh("echo $BOTTLE $EXTRA; pwd");
    req.env.insert("EXTRA".into(), "x y".into());
    req.cwd = Some("/tmp".into());

    let r = c.exec(&req, b"").unwrap();

    assert_eq!(String::from_utf8(r.stdout).unwrap(), "yes x y\n/tmp\n");
}

#[test]
fn exec_feeds_stdin_to_the_command() {
    let mut c = client();
    let input = vec![b'z'; 300_000];

    let r = c.exec(&ExecRequest::new(["/bin/cat"]), &input).unwrap();

    assert_eq!(r.stdout, input);
}

#[test]
fn exec_past_its_timeout_is_killed_and_says_so() {
    let mut c = client();
    let mut req = sh("sleep 30");
    req.timeout_ms = Some(300);
    let start = Instant::now();

    let r = c.exec(&req, b"").unwrap();

    assert_eq!((r.status.timed_out, r.status.signal), (true, Some(9)));
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn exec_large_output_arrives_whole() {
    let mut c = client();

    let r = c.exec(&sh("head -c 5000000 /dev/zero"), b"").unwrap();

    assert_eq!(r.stdout.len(), 5_000_000);
}

#[test]
fn exec_of_missing_program_exits_127() {
    let mut c = client();

    let r = c
        .exec(&ExecRequest::new(["/no/such/program"]), b"")
        .unwrap();

    assert_eq!(r.status.code, Some(127));
}

#[test]
fn sessions_follow_each_other_on_one_connection() {
    let mut c = client();

    let first = c.exec(&sh("echo 1"), b"").unwrap();
    let health = c.health().unwrap();
    let second = c.exec(&sh("echo 2"), b"").unwrap();

    assert_eq!(
        (first.stdout, second.stdout),
        (b"1\n".to_vec(), b"2\n".to_vec())
    );
    assert_eq!(health.agent_version, env!("CARGO_PKG_VERSION"));
}

#[test]
fn wrong_token_is_refused() {
    let mut c = Client::new(start_agent(mpsc::channel().0), "not-the-token");

    let err = c.health().unwrap_err();

    assert!(matches!(err, ClientError::Refused { ref message } if message.contains("token")));
}

#[test]
fn oversized_frame_gets_an_error_frame_then_the_connection_closes() {
    let mut c = client();
    c.send_raw(&[0xff, 0xff, 0xff, 0xff, 1, 1]).unwrap();

    let err = c.recv_raw(Some(Duration::from_secs(5))).unwrap_err();
    let mut stream = c.into_inner();
    // Closed: end of stream, or a reset because our garbage was left unread.
    let after = bottle_proto::read_frame(&mut stream);

    assert!(matches!(err, ClientError::Refused { ref message } if message.contains("exceeds")));
    assert!(!matches!(after, Ok(Some(_))), "{after:?}");
}

#[test]
fn shutdown_request_is_answered_then_powers_off() {
    let (tx, rx) = mpsc::channel();
    let mut c = Client::new(start_agent(tx), TOKEN);

    c.shutdown().unwrap();

    assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(()));
}

#[test]
fn copy_in_then_copy_out_round_trips_files_modes_and_symlinks() {
    let mut c = client();
    let dir = tempfile::tempdir().unwrap();
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_mode(0o750);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_uid(me().uid.into());
    h.set_gid(me().gid.into());
    h.set_mtime(1_700_000_000);
    tar.append_data(&mut h, "data/run.sh", &b"hello"[..])
        .unwrap();
    let mut l = tar::Header::new_gnu();
    l.set_entry_type(tar::EntryType::Symlink);
    l.set_size(0);
    l.set_uid(me().uid.into());
    l.set_gid(me().gid.into());
    l.set_mtime(1_700_000_000);
    tar.append_link(&mut l, "data/link", "run.sh").unwrap();
    let archive = tar.into_inner().unwrap();
    let dest = dir.path().join("in");

    c.copy_in(dest.to_str().unwrap(), archive.as_slice())
        .unwrap();
    let mut out = Vec::new();
    c.copy_out(dest.join("data").to_str().unwrap(), &mut out)
        .unwrap();

    let mut entries: Vec<(String, u32, Option<String>)> = tar::Archive::new(out.as_slice())
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let link = e.link_name().unwrap().map(|p| p.display().to_string());
            (
                e.path().unwrap().display().to_string(),
                e.header().mode().unwrap() & 0o7777,
                link,
            )
        })
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        vec![
            ("data/".to_string(), 0o755, None),
            ("data/link".to_string(), 0o777, Some("run.sh".to_string())),
            ("data/run.sh".to_string(), 0o750, None),
        ]
    );
}

#[test]
fn copy_out_of_a_missing_path_is_refused_with_its_name() {
    let mut c = client();

    let err = c.copy_out("/no/such/path", &mut Vec::new()).unwrap_err();

    assert!(
        matches!(err, ClientError::Refused { ref message } if message.contains("/no/such/path"))
    );
}

#[test]
fn pty_session_has_a_terminal_of_the_requested_size_and_takes_input() {
    let c = client();
    let req = PtyRequest {
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            "stty size; read x; echo got:$x; stty size".into(),
        ],
        size: WindowSize {
            rows: 30,
            cols: 100,
        },
        ..PtyRequest::default()
    };
    let session = c.pty(&req).unwrap();
    let input = session.input();
    thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        input
            .resize(WindowSize {
                rows: 40,
                cols: 120,
            })
            .unwrap();
        input.write(b"hello\n").unwrap();
    });

    let mut out = Vec::new();
    let (status, _client) = session.run(&mut out).unwrap();

    let text = String::from_utf8_lossy(&out).replace('\r', "");
    assert_eq!(status.code, Some(0));
    assert!(text.contains("30 100\n"), "{text:?}");
    assert!(text.contains("got:hello\n40 120\n"), "{text:?}");
}

#[test]
fn pty_signal_reaches_the_foreground_process() {
    let c = client();
    let req = PtyRequest {
        argv: vec!["/bin/sleep".into(), "30".into()],
        ..PtyRequest::default()
    };
    let session = c.pty(&req).unwrap();
    let input = session.input();
    thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        input.signal(libc::SIGTERM).unwrap();
    });

    let (status, _client) = session.run(&mut Vec::new()).unwrap();

    assert_eq!(status.signal, Some(libc::SIGTERM));
}

#[test]
fn stray_frame_kind_where_hello_belongs_is_refused() {
    let mut c = client();
    c.send_raw(
        &bottle_proto::Frame::new(FrameKind::Stdout, b"x".to_vec())
            .encode()
            .unwrap(),
    )
    .unwrap();

    let err = c.recv_raw(Some(Duration::from_secs(5))).unwrap_err();

    assert!(matches!(err, ClientError::Refused { .. }));
}
