//! The loopback alias pool: each bottle gets its own `127.0.0.N` so that its bundle's ports,
//! and the guest's /32 allowlist, are its own.
//!
//! Allocation runs under an exclusive `fs2` lock on a lock file in the state dir. An address
//! is taken when a live process holds a lease row for it, or when a Docker container with our
//! labels publishes on it (a run that was SIGKILLed and not cleaned up yet).

use std::fs::File;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use fs2::FileExt;

use crate::state::{Owner, StateDb, StateError};

/// The default pool: 127.0.0.16 ..= 127.0.0.31.
pub const DEFAULT_POOL: RangeInclusive<u8> = 16..=31;

/// Environment variable overriding the pool, as `FIRST-LAST` (last octets).
pub const POOL_ENV: &str = "BOT_BOTTLE_ALIAS_POOL";

#[derive(Debug, thiserror::Error)]
pub enum AliasError {
    #[error(
        "all loopback aliases 127.0.0.{first}..=127.0.0.{last} are in use ({}): stop a bottle, \
         run `bot-bottle cleanup`, or widen the pool with {POOL_ENV}=FIRST-LAST",
        holders.join(", ")
    )]
    Exhausted {
        first: u8,
        last: u8,
        holders: Vec<String>,
    },
    #[error("invalid alias pool `{value}` in {POOL_ENV}: write it as FIRST-LAST with 2 <= FIRST <= LAST <= 254, e.g. 16-31")]
    BadPool { value: String },
    #[error("cannot open the alias pool lock file {path}")]
    LockFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock the alias pool ({path})")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] StateError),
}

/// Parse `FIRST-LAST` into a pool range.
pub fn parse_pool(value: &str) -> Result<RangeInclusive<u8>, AliasError> {
    let bad = || AliasError::BadPool {
        value: value.to_owned(),
    };
    let (a, b) = value.split_once('-').ok_or_else(bad)?;
    let first: u8 = a.trim().parse().map_err(|_| bad())?;
    let last: u8 = b.trim().parse().map_err(|_| bad())?;
    if first < 2 || first > last || last > 254 {
        return Err(bad());
    }
    Ok(first..=last)
}

/// The pool from the environment, or the default.
pub fn pool_from_env() -> Result<RangeInclusive<u8>, AliasError> {
    match std::env::var(POOL_ENV) {
        Ok(v) if !v.trim().is_empty() => parse_pool(&v),
        _ => Ok(DEFAULT_POOL),
    }
}

/// Lowest address of the pool that is neither leased nor published. Pure.
pub fn pick_free(
    pool: &RangeInclusive<u8>,
    leased: &[(Ipv4Addr, String)],
    published: &[(Ipv4Addr, String)],
) -> Result<Ipv4Addr, AliasError> {
    pick_usable(pool, leased, published, |_| None)
}

/// Like [`pick_free`], skipping addresses `busy` describes as unusable (e.g. a port held by
/// another program); those are named in the exhaustion error.
pub fn pick_usable(
    pool: &RangeInclusive<u8>,
    leased: &[(Ipv4Addr, String)],
    published: &[(Ipv4Addr, String)],
    busy: impl Fn(Ipv4Addr) -> Option<String>,
) -> Result<Ipv4Addr, AliasError> {
    let taken = |addr: Ipv4Addr| {
        leased.iter().any(|(a, _)| *a == addr) || published.iter().any(|(a, _)| *a == addr)
    };
    let mut blocked: Vec<(Ipv4Addr, String)> = Vec::new();
    for addr in pool.clone().map(|n| Ipv4Addr::new(127, 0, 0, n)) {
        if taken(addr) {
            continue;
        }
        match busy(addr) {
            None => return Ok(addr),
            Some(why) => blocked.push((addr, why)),
        }
    }
    Err({
        {
            let mut holders: Vec<String> = leased
                .iter()
                .chain(published)
                .chain(&blocked)
                .map(|(a, b)| format!("{a} by {b}"))
                .collect();
            holders.sort();
            holders.dedup();
            AliasError::Exhausted {
                first: *pool.start(),
                last: *pool.end(),
                holders,
            }
        }
    })
}

/// Why `addr` cannot publish `ports` (another program listening there, or on 0.0.0.0).
pub fn ports_busy(addr: Ipv4Addr, ports: &[u16]) -> Option<String> {
    ports.iter().find_map(|&port| {
        std::net::TcpListener::bind((addr, port))
            .err()
            .map(|e| format!("another program on port {port} ({e})"))
    })
}

/// An exclusive lock on the pool; released when dropped.
struct PoolLock {
    file: File,
}

impl PoolLock {
    fn acquire(path: &Path) -> Result<Self, AliasError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|source| AliasError::LockFile {
                path: path.to_path_buf(),
                source,
            })?;
        file.lock_exclusive().map_err(|source| AliasError::Lock {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self { file })
    }
}

impl Drop for PoolLock {
    fn drop(&mut self) {
        if let Err(err) = FileExt::unlock(&self.file) {
            tracing::warn!(error = %err, "cannot unlock the alias pool (the lock is released when the file closes)");
        }
    }
}

/// A loopback alias held by this process for one bottle. Returned to the pool on drop.
#[derive(Debug)]
pub struct AliasLease {
    addr: Ipv4Addr,
    bottle_id: String,
    db_path: PathBuf,
    released: bool,
}

impl AliasLease {
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Return the address to the pool now, reporting failure.
    pub fn release(mut self) -> Result<(), AliasError> {
        self.released = true;
        let db = StateDb::open(&self.db_path)?;
        db.delete_lease(self.addr, &self.bottle_id)?;
        Ok(())
    }
}

impl Drop for AliasLease {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let result =
            StateDb::open(&self.db_path).and_then(|db| db.delete_lease(self.addr, &self.bottle_id));
        if let Err(err) = result {
            tracing::warn!(alias = %self.addr, bottle_id = %self.bottle_id, error = %err,
                "cannot release alias lease; `bot-bottle cleanup` will");
        }
    }
}

/// Allocate the lowest free alias for `bottle_id`.
///
/// `published` lists addresses Docker containers with our labels publish on (gathered by the
/// caller: this module does no Docker I/O).
/// `ports` must be free on the address (the bundle publishes them there): an address where
/// another program holds one is skipped.
pub fn allocate(
    db_path: &Path,
    lock_path: &Path,
    pool: &RangeInclusive<u8>,
    published: &[(Ipv4Addr, String)],
    ports: &[u16],
    bottle_id: &str,
) -> Result<AliasLease, AliasError> {
    let _lock = PoolLock::acquire(lock_path)?;
    let db = StateDb::open(db_path)?;
    db.prune_dead_leases()?;
    let leased = db.live_leases()?;
    let addr = pick_usable(pool, &leased, published, |a| ports_busy(a, ports))?;
    db.insert_lease(addr, bottle_id, Owner::current())?;
    Ok(AliasLease {
        addr,
        bottle_id: bottle_id.to_owned(),
        db_path: db_path.to_path_buf(),
        released: false,
    })
}

/// The address `allocate` would pick now, without taking it (for `bot-bottle plan`).
pub fn peek(
    db_path: &Path,
    pool: &RangeInclusive<u8>,
    published: &[(Ipv4Addr, String)],
) -> Result<Ipv4Addr, AliasError> {
    let leased = if db_path.is_file() {
        StateDb::open_existing(db_path)?.live_leases()?
    } else {
        Vec::new()
    };
    pick_free(pool, &leased, published)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, 0, n)
    }

    #[test]
    fn pick_free_returns_the_lowest_unused() {
        let leased = vec![(a(16), "x".into())];
        let published = vec![(a(17), "y".into())];
        assert_eq!(pick_free(&(16..=31), &leased, &published).unwrap(), a(18));
    }

    #[test]
    fn exhausted_pool_names_the_holders() {
        let leased = vec![(a(16), "one".into())];
        let published = vec![(a(17), "two".into())];
        let err = pick_free(&(16..=17), &leased, &published).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("127.0.0.16 by one"), "{msg}");
        assert!(msg.contains("127.0.0.17 by two"), "{msg}");
    }

    #[test]
    fn parse_pool_accepts_range_and_rejects_nonsense() {
        assert_eq!(parse_pool("16-31").unwrap(), 16..=31);
        for bad in ["", "16", "31-16", "0-4", "16-255", "a-b"] {
            assert!(parse_pool(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lease_is_returned_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("s.db");
        let lock = dir.path().join("l");
        let first = allocate(&db, &lock, &(16..=16), &[], &[], "b1").unwrap();
        assert!(allocate(&db, &lock, &(16..=16), &[], &[], "b2").is_err());
        drop(first);
        assert_eq!(
            allocate(&db, &lock, &(16..=16), &[], &[], "b3")
                .unwrap()
                .addr(),
            a(16)
        );
    }

    #[test]
    fn address_where_another_program_holds_a_port_is_skipped_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let (db, lock) = (dir.path().join("s.db"), dir.path().join("l"));
        // Another program listens on the first address of the pool.
        let squatter = std::net::TcpListener::bind((a(64), 0)).unwrap();
        let port = squatter.local_addr().unwrap().port();
        let lease = allocate(&db, &lock, &(64..=65), &[], &[port], "b1").unwrap();
        assert_eq!(lease.addr(), a(65));
        let err = allocate(&db, &lock, &(64..=65), &[], &[port], "b2").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("127.0.0.64 by another program on port {port}")),
            "{msg}"
        );
    }
}
