//! The control protocol between `bot-bottle` (host) and `bottle-init` (guest).
//!
//! Length-prefixed [`frame`]s over any byte stream (vsock in production, a serial port under
//! QEMU tests). Every session starts with a [`Hello`] carrying the per-boot token, then one
//! [`Request`]; see `prds/0005-guest.md` for the session flows.

pub mod client;
pub mod config;
pub mod frame;
pub mod message;

pub use client::{
    connect_vsock, io_timeout_for, Client, ClientError, DuplexTransport, ExecResult, PtyInput,
    PtySession, Transport,
};
pub use config::{ConfigError, ConfigSource, GuestConfig};
pub use frame::{
    read_frame, Frame, FrameDecoder, FrameError, FrameKind, MAX_BODY_LEN, MAX_FRAME_LEN,
    PROTOCOL_VERSION,
};
pub use message::{
    ErrorBody, ExecRequest, ExitStatus, HealthInfo, Hello, PtyRequest, Request, Response,
    SignalBody, UserIds, WindowSize,
};
