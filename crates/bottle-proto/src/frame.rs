//! Length-prefixed frames: the only thing that crosses the control channel.
//!
//! Wire format of one frame (all integers big-endian):
//!
//! ```text
//! +-----------+---------+------+----------------+
//! | len: u32  | version | kind | body (len - 2) |
//! +-----------+---------+------+----------------+
//! ```
//!
//! `len` counts the version byte, the kind byte and the body; it is checked against
//! [`MAX_FRAME_LEN`] *before* anything is allocated, so a hostile peer cannot make the reader
//! allocate more than one maximum-size frame.

use std::io::{self, Read, Write};

/// Protocol version carried in every frame. A peer speaking another version is refused.
pub const PROTOCOL_VERSION: u8 = 1;

/// Largest body a frame may carry (256 KiB): big enough for any request, small enough that a
/// reader may allocate it up front.
pub const MAX_BODY_LEN: usize = 256 * 1024;

/// Largest value of the length prefix: version + kind + the largest body.
pub const MAX_FRAME_LEN: u32 = MAX_BODY_LEN as u32 + 2;

/// Size of the chunks that streamed data (stdout, stdin, tar) is cut into (64 KiB).
pub const DATA_CHUNK_LEN: usize = 64 * 1024;

/// What a frame carries. Control frames have a JSON body, data frames raw bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Client → agent, first frame of every session: JSON [`crate::Hello`].
    Hello = 1,
    /// Client → agent: JSON [`crate::Request`].
    Request = 2,
    /// Client → agent: bytes for the command's stdin (or the PTY).
    Stdin = 3,
    /// Client → agent: no more stdin.
    StdinEof = 4,
    /// Agent → client: bytes the command wrote to stdout (or the PTY output).
    Stdout = 5,
    /// Agent → client: bytes the command wrote to stderr.
    Stderr = 6,
    /// Agent → client: JSON [`crate::ExitStatus`]; ends an `exec` or `pty` session.
    Exit = 7,
    /// Either way: JSON [`crate::ErrorBody`]; the sender closes the session after it.
    Error = 8,
    /// Client → agent: JSON [`crate::WindowSize`] for a PTY session.
    Resize = 9,
    /// Client → agent: JSON [`crate::SignalBody`], delivered to the command's process group.
    Signal = 10,
    /// Either way: a piece of a tar stream (`cp`).
    TarData = 11,
    /// Either way: the tar stream is complete.
    TarEof = 12,
    /// Agent → client: JSON [`crate::Response`]; ends a session that is not `exec`/`pty`.
    Done = 13,
}

impl FrameKind {
    /// Every kind, for tests and exhaustive matching.
    pub const ALL: [FrameKind; 13] = [
        FrameKind::Hello,
        FrameKind::Request,
        FrameKind::Stdin,
        FrameKind::StdinEof,
        FrameKind::Stdout,
        FrameKind::Stderr,
        FrameKind::Exit,
        FrameKind::Error,
        FrameKind::Resize,
        FrameKind::Signal,
        FrameKind::TarData,
        FrameKind::TarEof,
        FrameKind::Done,
    ];

    /// The kind for a wire byte, if it names one.
    pub fn from_byte(byte: u8) -> Option<FrameKind> {
        FrameKind::ALL.into_iter().find(|k| *k as u8 == byte)
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub body: Vec<u8>,
}

/// Everything that can go wrong reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_LEN} bytes")]
    TooLarge { len: u32 },
    #[error("frame length {len} is too short to hold a version and a kind")]
    TooShort { len: u32 },
    #[error("peer speaks protocol version {version}, this side speaks {PROTOCOL_VERSION}: use matching bot-bottle and bottle-init builds")]
    Version { version: u8 },
    #[error("unknown frame kind {kind}")]
    UnknownKind { kind: u8 },
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("body of {len} bytes exceeds the limit of {MAX_BODY_LEN} bytes")]
    BodyTooLarge { len: usize },
    #[error("frame I/O failed")]
    Io(#[source] io::Error),
}

impl Frame {
    pub fn new(kind: FrameKind, body: Vec<u8>) -> Frame {
        Frame { kind, body }
    }

    /// A frame without a body (`StdinEof`, `TarEof`).
    pub fn empty(kind: FrameKind) -> Frame {
        Frame {
            kind,
            body: Vec::new(),
        }
    }

    /// The frame as bytes on the wire.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        if self.body.len() > MAX_BODY_LEN {
            return Err(FrameError::BodyTooLarge {
                len: self.body.len(),
            });
        }
        let len = (self.body.len() + 2) as u32;
        let mut out = Vec::with_capacity(4 + len as usize);
        out.extend_from_slice(&len.to_be_bytes());
        out.push(PROTOCOL_VERSION);
        out.push(self.kind as u8);
        out.extend_from_slice(&self.body);
        Ok(out)
    }

    /// Writes the frame and flushes, so that a frame is never left half in a buffer.
    pub fn write_to<W: Write + ?Sized>(&self, w: &mut W) -> Result<(), FrameError> {
        let bytes = self.encode()?;
        w.write_all(&bytes).map_err(FrameError::Io)?;
        w.flush().map_err(FrameError::Io)
    }
}

/// Checks a length prefix and the two header bytes; shared by the blocking reader and the
/// incremental decoder so they accept exactly the same frames.
fn check_header(len: u32) -> Result<(), FrameError> {
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len });
    }
    if len < 2 {
        return Err(FrameError::TooShort { len });
    }
    Ok(())
}

fn check_version_kind(version: u8, kind: u8) -> Result<FrameKind, FrameError> {
    if version != PROTOCOL_VERSION {
        return Err(FrameError::Version { version });
    }
    FrameKind::from_byte(kind).ok_or(FrameError::UnknownKind { kind })
}

/// Reads one frame. `Ok(None)` means the stream ended cleanly between frames.
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<Option<Frame>, FrameError> {
    let mut len_buf = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len_buf[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let len = u32::from_be_bytes(len_buf);
    check_header(len)?;
    let mut head = [0u8; 2];
    read_exact(r, &mut head)?;
    let kind = check_version_kind(head[0], head[1])?;
    let mut body = vec![0u8; len as usize - 2];
    read_exact(r, &mut body)?;
    Ok(Some(Frame { kind, body }))
}

fn read_exact<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> Result<(), FrameError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })
}

/// An incremental decoder: feed it bytes as they arrive, take frames out.
///
/// After an error the decoder is poisoned: the stream has lost its framing and the only safe
/// thing is to close the connection.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    poisoned: bool,
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Appends bytes received from the peer.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.poisoned {
            return Err(FrameError::Truncated);
        }
        let result = self.try_next();
        if result.is_err() {
            self.poisoned = true;
            self.buf.clear();
        }
        result
    }

    fn try_next(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        check_header(len)?;
        if self.buf.len() < 6 {
            return Ok(None);
        }
        let kind = check_version_kind(self.buf[4], self.buf[5])?;
        let total = 4 + len as usize;
        if self.buf.len() < total {
            return Ok(None);
        }
        let body = self.buf[6..total].to_vec();
        self.buf.drain(..total);
        Ok(Some(Frame { kind, body }))
    }

    /// Bytes held that do not yet form a frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_kind() -> impl Strategy<Value = FrameKind> {
        proptest::sample::select(FrameKind::ALL.to_vec())
    }

    fn any_frame() -> impl Strategy<Value = Frame> {
        (any_kind(), proptest::collection::vec(any::<u8>(), 0..2048))
            .prop_map(|(kind, body)| Frame { kind, body })
    }

    #[test]
    fn length_prefix_over_limit_is_rejected_before_reading_the_body() {
        let mut wire = (MAX_FRAME_LEN + 1).to_be_bytes().to_vec();
        wire.extend_from_slice(&[PROTOCOL_VERSION, FrameKind::Stdout as u8]);

        let err = read_frame(&mut wire.as_slice()).unwrap_err();

        assert!(matches!(err, FrameError::TooLarge { len } if len == MAX_FRAME_LEN + 1));
    }

    #[test]
    fn other_protocol_version_is_rejected() {
        let wire = [0, 0, 0, 2, PROTOCOL_VERSION + 1, FrameKind::Hello as u8];

        let err = read_frame(&mut wire.as_slice()).unwrap_err();

        assert!(matches!(err, FrameError::Version { .. }));
    }

    #[test]
    fn body_over_limit_cannot_be_encoded() {
        let frame = Frame::new(FrameKind::Stdout, vec![0; MAX_BODY_LEN + 1]);

        assert!(matches!(
            frame.encode(),
            Err(FrameError::BodyTooLarge { .. })
        ));
    }

    #[test]
    fn largest_body_round_trips() {
        let frame = Frame::new(FrameKind::TarData, vec![7; MAX_BODY_LEN]);
        let wire = frame.encode().unwrap();

        let back = read_frame(&mut wire.as_slice()).unwrap();

        assert_eq!(back, Some(frame));
    }

    #[test]
    fn stream_ending_inside_a_frame_is_truncated() {
        let wire = Frame::new(FrameKind::Stdout, b"hello".to_vec())
            .encode()
            .unwrap();

        let err = read_frame(&mut &wire[..wire.len() - 1]).unwrap_err();

        assert!(matches!(err, FrameError::Truncated));
    }

    #[test]
    fn empty_stream_is_a_clean_end() {
        assert!(read_frame(&mut &[][..]).unwrap().is_none());
    }

    proptest! {
        #[test]
        fn encoded_frames_decode_to_themselves(frames in proptest::collection::vec(any_frame(), 0..8)) {
            let mut wire = Vec::new();
            for f in &frames {
                wire.extend(f.encode().unwrap());
            }
            let mut reader = wire.as_slice();
            let mut back = Vec::new();
            while let Some(f) = read_frame(&mut reader).unwrap() {
                back.push(f);
            }
            prop_assert_eq!(back, frames);
        }

        #[test]
        fn decoder_fed_in_pieces_yields_the_same_frames(
            frames in proptest::collection::vec(any_frame(), 1..6),
            cuts in proptest::collection::vec(1usize..300, 1..40),
        ) {
            let wire: Vec<u8> = frames.iter().flat_map(|f| f.encode().unwrap()).collect();
            let mut dec = FrameDecoder::new();
            let mut back = Vec::new();
            let mut rest = wire.as_slice();
            let mut cut = cuts.iter().cycle();
            while !rest.is_empty() {
                let n = (*cut.next().unwrap()).min(rest.len());
                dec.feed(&rest[..n]);
                rest = &rest[n..];
                while let Some(f) = dec.next_frame().unwrap() {
                    back.push(f);
                }
            }
            prop_assert_eq!(back, frames);
            prop_assert_eq!(dec.pending(), 0);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_agree_with_the_incremental_decoder(
            wire in proptest::collection::vec(any::<u8>(), 0..4096),
        ) {
            let mut reader = wire.as_slice();
            let mut blocking = Vec::new();
            let blocking_err = loop {
                match read_frame(&mut reader) {
                    Ok(Some(f)) => blocking.push(f),
                    Ok(None) => break false,
                    Err(_) => break true,
                }
            };
            let mut dec = FrameDecoder::new();
            dec.feed(&wire);
            let mut incremental = Vec::new();
            let incremental_err = loop {
                match dec.next_frame() {
                    Ok(Some(f)) => incremental.push(f),
                    Ok(None) => break false,
                    Err(_) => break true,
                }
            };
            prop_assert_eq!(&blocking, &incremental);
            // A clean end for the blocking reader is "waiting for more" for the decoder, or an
            // error for both; a truncated tail is an error for the reader only.
            prop_assert!(blocking_err || !incremental_err);
        }

        #[test]
        fn any_length_prefix_over_limit_is_rejected(len in (MAX_FRAME_LEN + 1)..=u32::MAX, tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut wire = len.to_be_bytes().to_vec();
            wire.extend(tail);
            let mut dec = FrameDecoder::new();
            dec.feed(&wire);
            let from_decoder = matches!(dec.next_frame(), Err(FrameError::TooLarge { .. }));
            let from_reader = matches!(read_frame(&mut wire.as_slice()), Err(FrameError::TooLarge { .. }));
            prop_assert!(from_decoder);
            prop_assert!(from_reader);
        }
    }
}
