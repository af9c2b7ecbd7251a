//! A bottle's session: the guard stack whose undos tear everything down in reverse, and the
//! orphans a killed `start` leaves (found by `list`, removed by the reaper, `cleanup`, `stop`).

pub mod guard;
pub mod orphans;
pub mod start;
