//! What is allocated on this host and by whom: the state database (bottle rows, machine rows,
//! leases), the loopback alias pool taken under its file lock, and the retention of ended runs'
//! directories. Everything `list`, `cleanup` and the reaper read to know what exists.

pub mod alias;
mod db;
pub mod retention;

pub use db::{BottleRow, Owner, StateDb, StateError, Status};
