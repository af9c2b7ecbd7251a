//! Byte relays for the stand-in VMMs: join two connections both ways, passing half-closes on.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::thread;

/// A connection that can be split into its two directions and half-closed.
pub trait Duplex: Read + Write + Send + Sized + 'static {
    fn split(&self) -> io::Result<Self>;
    fn close_write(&self);
}

impl Duplex for TcpStream {
    fn split(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn close_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

impl Duplex for UnixStream {
    fn split(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn close_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

/// Copies `a` to `b` and `b` to `a` until both directions end.
pub fn join<A: Duplex, B: Duplex>(a: A, b: B) {
    let (Ok(a_read), Ok(b_write)) = (a.split(), b.split()) else {
        return;
    };
    let forward = thread::spawn(move || pipe(a_read, b_write));
    pipe(b, a);
    let _ = forward.join();
}

/// Copies until `from` ends, then half-closes `to`.
fn pipe<R: Duplex, W: Duplex>(mut from: R, mut to: W) {
    let _ = io::copy(&mut from, &mut to);
    to.close_write();
}

/// Every accepted connection joined to a new one made by `dial`, each pair on its own thread
/// (a failed dial closes the accepted connection).
pub fn serve<C: Duplex, U: Duplex>(
    incoming: impl Iterator<Item = io::Result<C>>,
    dial: impl Fn() -> io::Result<U>,
) {
    for conn in incoming {
        let Ok(conn) = conn else { continue };
        if let Ok(up) = dial() {
            thread::spawn(move || join(conn, up));
        }
    }
}

/// Every connection on `listener` joined to a new TCP connection to `target`.
pub fn tcp_to_tcp(listener: TcpListener, target: SocketAddr) {
    serve(listener.incoming(), move || TcpStream::connect(target));
}
