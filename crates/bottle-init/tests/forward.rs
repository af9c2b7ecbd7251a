//! Egress forwarders on the host, with a TCP upstream standing in for vsock.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::thread;

use bottle_init::net::{start_forwarders, Upstream};
use bottle_proto::config::EgressForward;

/// Dials a local TCP port in place of (CID 2, vsock_port).
struct TcpUpstream(SocketAddr);

impl Upstream for TcpUpstream {
    fn connect(&self, _forward: &EgressForward) -> std::io::Result<File> {
        Ok(File::from(OwnedFd::from(TcpStream::connect(self.0)?)))
    }
}

/// Answers each connection with "got:" + everything it sent, after the sender's half-close.
fn reply_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            let mut got = Vec::new();
            conn.read_to_end(&mut got).unwrap();
            conn.write_all(b"got:").unwrap();
            conn.write_all(&got).unwrap();
        }
    });
    addr
}

#[test]
fn forwarder_carries_bytes_both_ways_and_passes_the_half_close() {
    let upstream = reply_server();
    let forward = EgressForward {
        listen: "127.0.0.1:0".parse().unwrap(),
        vsock_port: 8080,
    };
    let bound = start_forwarders(&[forward], Arc::new(TcpUpstream(upstream))).unwrap();

    let mut client = TcpStream::connect(bound[0]).unwrap();
    client.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).unwrap();

    assert_eq!(answer, b"got:GET / HTTP/1.0\r\n\r\n");
}

#[test]
fn forwarder_on_an_address_in_use_names_it() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddrV4 = taken.local_addr().unwrap().to_string().parse().unwrap();
    let forward = EgressForward {
        listen: addr,
        vsock_port: 1,
    };

    let err = start_forwarders(&[forward], Arc::new(TcpUpstream(addr.into()))).unwrap_err();

    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}
