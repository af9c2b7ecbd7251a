//! The guest's network: loopback only. Egress leaves through forwarders (TCP in the guest →
//! vsock to the host), and the control agent listens on vsock or a virtio serial port.

use std::fs::File;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use nix::sys::socket::{
    accept, bind, connect, listen, socket, AddressFamily, Backlog, Shutdown, SockFlag, SockType,
    VsockAddr,
};

use bottle_proto::config::{ControlChannel, EgressForward};

use crate::agent::{serve_connection, AgentContext};

/// vsock CID of the host, where every egress connection goes.
const HOST_CID: u32 = 2;

/// Pause before reopening the control port after the host disconnected.
const PORT_RECONNECT_PAUSE: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot bring up the loopback interface")]
    Loopback(#[source] io::Error),
    #[error("cannot listen on {what}")]
    Listen {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("no virtio serial port named {name} (looked in /sys/class/virtio-ports): start QEMU with `-device virtserialport,name={name}`")]
    NoPort { name: String },
}

/// `ip link set lo up`.
pub fn loopback_up() -> Result<(), NetError> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| NetError::Loopback(e.into()))?;
    let mut name = [0 as libc::c_char; libc::IFNAMSIZ];
    for (d, s) in name.iter_mut().zip(b"lo") {
        *d = *s as libc::c_char;
    }
    let mut ifr = libc::ifreq {
        ifr_name: name,
        ifr_ifru: libc::__c_anonymous_ifr_ifru { ifru_flags: 0 },
    };
    // SAFETY: `ifr` is a live, initialised ifreq naming "lo"; SIOCGIFFLAGS fills `ifru_flags`,
    // which is then the active union field we read and modify; SIOCSIFFLAGS only reads it.
    let rc = unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            -1
        } else {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr)
        }
    };
    if rc < 0 {
        return Err(NetError::Loopback(io::Error::last_os_error()));
    }
    Ok(())
}

/// Where egress connections go. Production: vsock to the host; tests could substitute.
pub trait Upstream: Send + Sync + 'static {
    fn connect(&self, forward: &EgressForward) -> io::Result<File>;
}

/// Connects to the host (CID 2) on the forward's vsock port; the VMM decides whether that
/// port leads anywhere.
pub struct VsockUpstream;

impl Upstream for VsockUpstream {
    fn connect(&self, forward: &EgressForward) -> io::Result<File> {
        let fd: OwnedFd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        connect(
            fd.as_raw_fd(),
            &VsockAddr::new(HOST_CID, forward.vsock_port),
        )?;
        Ok(File::from(fd))
    }
}

/// Starts one listener thread per forward; returns the addresses bound (port 0 in the config
/// gets an ephemeral port, for tests).
pub fn start_forwarders(
    forwards: &[EgressForward],
    upstream: Arc<dyn Upstream>,
) -> Result<Vec<std::net::SocketAddr>, NetError> {
    let mut bound = Vec::new();
    for fwd in forwards {
        let listen_err = |source| NetError::Listen {
            what: fwd.listen.to_string(),
            source,
        };
        let listener = TcpListener::bind(fwd.listen).map_err(listen_err)?;
        bound.push(listener.local_addr().map_err(listen_err)?);
        let fwd = fwd.clone();
        let upstream = upstream.clone();
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let fwd = fwd.clone();
                let upstream = upstream.clone();
                thread::spawn(move || match upstream.connect(&fwd) {
                    Ok(up) => splice(conn, up),
                    Err(e) => eprintln!(
                        "bottle-init: egress {} -> vsock {}: {e}",
                        fwd.listen, fwd.vsock_port
                    ),
                });
            }
        });
    }
    Ok(bound)
}

/// Copies both ways until each side has finished, passing half-closes along.
fn splice(tcp: TcpStream, up: File) {
    let (Ok(mut tcp_r), Ok(mut up_w)) = (tcp.try_clone(), up.try_clone()) else {
        return;
    };
    let to_up = thread::spawn(move || {
        let _ = io::copy(&mut tcp_r, &mut up_w);
        let _ = nix::sys::socket::shutdown(up_w.as_raw_fd(), Shutdown::Write);
    });
    let (mut up_r, mut tcp_w) = (up, tcp);
    let _ = io::copy(&mut up_r, &mut tcp_w);
    let _ = tcp_w.shutdown(std::net::Shutdown::Write);
    let _ = to_up.join();
}

/// Serves the control channel forever (on its own threads).
pub fn start_control(channel: &ControlChannel, ctx: Arc<AgentContext>) -> Result<(), NetError> {
    match channel {
        ControlChannel::Vsock { port } => {
            let fd: OwnedFd = socket(
                AddressFamily::Vsock,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .map_err(|e| NetError::Listen {
                what: format!("vsock port {port}"),
                source: e.into(),
            })?;
            bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, *port))
                .and_then(|_| listen(&fd, Backlog::new(16).unwrap_or(Backlog::MAXCONN)))
                .map_err(|e| NetError::Listen {
                    what: format!("vsock port {port}"),
                    source: e.into(),
                })?;
            thread::spawn(move || loop {
                match accept(fd.as_raw_fd()) {
                    Ok(conn) => {
                        let conn = File::from(owned(conn));
                        let ctx = ctx.clone();
                        thread::spawn(move || {
                            if let Err(e) = serve_connection(conn, &ctx) {
                                eprintln!("bottle-init: control connection: {}", crate::chain(&e));
                            }
                        });
                    }
                    Err(_) => thread::sleep(PORT_RECONNECT_PAUSE),
                }
            });
        }
        ControlChannel::VirtioPort { name } => {
            let path = find_virtio_port(name)?;
            let port = File::options()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|source| NetError::Listen {
                    what: path.display().to_string(),
                    source,
                })?;
            thread::spawn(move || loop {
                let Ok(conn) = port.try_clone() else { return };
                if let Err(e) = serve_connection(conn, &ctx) {
                    eprintln!("bottle-init: control session: {}", crate::chain(&e));
                }
                thread::sleep(PORT_RECONNECT_PAUSE);
            });
        }
    }
    Ok(())
}

fn owned(fd: std::os::fd::RawFd) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` was just returned by accept(2) and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `/dev/vportNpM` whose sysfs `name` is `name`.
fn find_virtio_port(name: &str) -> Result<PathBuf, NetError> {
    let class = Path::new("/sys/class/virtio-ports");
    let entries = std::fs::read_dir(class).map_err(|_| NetError::NoPort { name: name.into() })?;
    for entry in entries.flatten() {
        let found = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if found.trim_end() == name {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    Err(NetError::NoPort { name: name.into() })
}
