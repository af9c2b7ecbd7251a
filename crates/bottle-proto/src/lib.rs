//! Control protocol (stub, see issue 5).
