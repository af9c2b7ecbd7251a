//! The approval queue. With `[egress] unknown = "ask"`, a request to a host no rule lists is
//! held here (not refused) until the human answers through the supervisor — `bot-bottle
//! approvals`, `approve`, `deny` — or the hold ends, and then it is refused with a 403 that says
//! it waits for approval. Requests to the same `host:port` share one entry (its count grows),
//! so an agent that retries does not flood the list.
//!
//! An answer applies to the requests held at that moment and, for `once`, to the next request
//! if none is held (the agent's retry after its 403); `session` also adds the rule `host:port`
//! to the live policy, so it holds until the bottle stops; `deny` refuses at once every later
//! request to that `host:port` for the rest of the session. Deny rules, the address floor and
//! the request rules are decided as before: only "no rule lists it" asks.
//!
//! With `[egress] secrets = "ask"`, a request the secret scanner flagged waits here too, as its
//! own entry (`secret` says which rules found what, never the value): `once` lets it through,
//! `session` lets every later request to that `host:port` carrying the same strings through
//! (the entry remembers their SHA-256, not the strings), `deny` refuses them all.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Most distinct hosts waiting at once; beyond it a new host is refused at once (an agent
/// cannot grow the bundle's memory without bound by naming hosts).
pub const MAX_PENDING: usize = 256;

/// The human's answer to one pending request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Answer {
    /// The held requests pass (or the next one, if none is held); later ones ask again.
    Once,
    /// Allowed until the bottle stops.
    Session,
    /// Refused, and refused at once for the rest of the session.
    Deny,
}

/// A request waiting for an answer, as `bot-bottle approvals` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub id: u64,
    pub host: String,
    pub port: u16,
    /// The last request's method (`CONNECT` for a tunnel).
    pub method: String,
    /// The last request's path, where the proxy sees it (plain HTTP).
    pub path: Option<String>,
    /// RFC 3339, UTC.
    pub first_seen: String,
    /// Requests to this `host:port` since it was first seen.
    pub count: u64,
    /// Requests held right now (derived when listed: the entry's open receivers).
    pub waiting: usize,
    /// For a request held because it carries a secret: what found it, and where
    /// (`github-token in the body`); never the value. Such an entry adds no host rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// What became of a held request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Approved(Answer),
    Denied,
    /// Nobody answered within the hold.
    TimedOut,
    /// Too many hosts wait already.
    QueueFull,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApprovalError {
    #[error(
        "no pending request {id} (answered already, or never asked): see `bot-bottle approvals`"
    )]
    Unknown { id: u64 },
}

struct Entry {
    /// Its `waiting` is filled in by [`Entry::snapshot`].
    pending: Pending,
    answer: watch::Sender<Option<Answer>>,
    /// A secret entry: the SHA-256 of each string the scanner found, over all its requests.
    digests: HashSet<[u8; 32]>,
}

/// What an entry is about: a `host:port`, and for a flagged request what was found there.
type Key = (String, u16, Option<String>);

#[derive(Default)]
struct Queue {
    next_id: u64,
    entries: BTreeMap<u64, Entry>,
    /// Answered `once` with nothing held: the next request passes.
    granted_once: HashSet<Key>,
    denied: HashSet<Key>,
    /// Strings (by SHA-256) answered `session` for a `host:port`.
    allowed_secrets: HashSet<(String, u16, [u8; 32])>,
}

impl Entry {
    /// The entry as listed, with the requests held on it now.
    fn snapshot(&self) -> Pending {
        Pending {
            waiting: self.answer.receiver_count(),
            ..self.pending.clone()
        }
    }

    /// What the entry is about (see [`Key`]).
    fn key(&self) -> Key {
        (
            self.pending.host.clone(),
            self.pending.port,
            self.pending.secret.clone(),
        )
    }
}

/// The bundle's queue, shared by the proxy (which asks) and the supervisor (which answers).
#[derive(Clone)]
pub struct Approvals {
    queue: Arc<Mutex<Queue>>,
    hold: Duration,
}

impl std::fmt::Debug for Approvals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Approvals")
            .field("hold", &self.hold)
            .finish_non_exhaustive()
    }
}

impl Approvals {
    pub fn new(hold: Duration) -> Self {
        Self {
            queue: Arc::default(),
            hold,
        }
    }

    pub fn hold(&self) -> Duration {
        self.hold
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Every change under the lock is whole: a panic elsewhere leaves a usable queue.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds a request to `host:port` until it is answered or the hold ends.
    pub async fn ask(&self, host: &str, port: u16, method: &str, path: Option<&str>) -> Outcome {
        self.hold_on((host.to_owned(), port, None), method, path, &[])
            .await
    }

    /// Holds a request to `host:port` that carries secrets — `found` says which rules found
    /// what where, `digests` are the SHA-256 of the strings — until it is answered or the hold
    /// ends. Strings all answered `session` for this `host:port` pass without asking.
    pub async fn ask_secret(
        &self,
        host: &str,
        port: u16,
        method: &str,
        path: Option<&str>,
        found: &str,
        digests: &[[u8; 32]],
    ) -> Outcome {
        let allowed = {
            let q = self.lock();
            !digests.is_empty()
                && digests
                    .iter()
                    .all(|d| q.allowed_secrets.contains(&(host.to_owned(), port, *d)))
        };
        if allowed {
            return Outcome::Approved(Answer::Session);
        }
        let key = (host.to_owned(), port, Some(found.to_owned()));
        self.hold_on(key, method, path, digests).await
    }

    async fn hold_on(
        &self,
        key: Key,
        method: &str,
        path: Option<&str>,
        digests: &[[u8; 32]],
    ) -> Outcome {
        let mut answer = {
            let mut q = self.lock();
            if q.denied.contains(&key) {
                return Outcome::Denied;
            }
            if q.granted_once.remove(&key) {
                return Outcome::Approved(Answer::Once);
            }
            let full = q.entries.len() >= MAX_PENDING;
            let existing = q.entries.values_mut().find(|e| e.key() == key);
            match existing {
                Some(entry) => {
                    entry.pending.count += 1;
                    entry.pending.method = method.to_owned();
                    entry.pending.path = path.map(str::to_owned);
                    entry.digests.extend(digests.iter().copied());
                    entry.answer.subscribe()
                }
                None if full => return Outcome::QueueFull,
                None => {
                    q.next_id += 1;
                    let id = q.next_id;
                    let (tx, rx) = watch::channel(None);
                    let (host, port, secret) = key;
                    let pending = Pending {
                        id,
                        host,
                        port,
                        method: method.to_owned(),
                        path: path.map(str::to_owned),
                        first_seen: super::events::rfc3339_utc_ms(super::events::unix_ms_now()),
                        count: 1,
                        waiting: 0,
                        secret,
                    };
                    q.entries.insert(
                        id,
                        Entry {
                            pending,
                            answer: tx,
                            digests: digests.iter().copied().collect(),
                        },
                    );
                    rx
                }
            }
        };
        let given = match tokio::time::timeout(self.hold, answer.wait_for(Option::is_some)).await {
            Ok(Ok(given)) => *given,
            // The entry went without an answer (cannot happen: entries leave only answered).
            Ok(Err(_)) | Err(_) => None,
        };
        match given {
            Some(Answer::Deny) => Outcome::Denied,
            Some(a) => Outcome::Approved(a),
            None => Outcome::TimedOut,
        }
    }

    /// The requests waiting, oldest first.
    pub fn pending(&self) -> Vec<Pending> {
        self.lock().entries.values().map(Entry::snapshot).collect()
    }

    /// Answers request `id`: the held requests are released with `answer`. The caller adds the
    /// session rule to the policy first (for [`Answer::Session`]).
    pub fn answer(&self, id: u64, answer: Answer) -> Result<Pending, ApprovalError> {
        let mut q = self.lock();
        let entry = q.entries.remove(&id).ok_or(ApprovalError::Unknown { id })?;
        let answered = entry.snapshot();
        let key = entry.key();
        let held = answered.waiting;
        match answer {
            Answer::Deny => {
                q.denied.insert(key);
            }
            Answer::Once if held == 0 => {
                q.granted_once.insert(key);
            }
            Answer::Session if answered.secret.is_some() => {
                for d in &entry.digests {
                    q.allowed_secrets
                        .insert((answered.host.clone(), answered.port, *d));
                }
            }
            Answer::Once | Answer::Session => {}
        }
        let _ = entry.answer.send(Some(answer));
        Ok(answered)
    }

    /// The request `id`, if it still waits.
    pub fn get(&self, id: u64) -> Option<Pending> {
        self.lock().entries.get(&id).map(Entry::snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn a_held_request_passes_when_approved_and_the_next_asks_again() {
        let q = Approvals::new(Duration::from_secs(10));
        let held = tokio::spawn({
            let q = q.clone();
            async move { q.ask("new.test", 443, "CONNECT", None).await }
        });
        settle().await;
        let pending = q.pending();
        assert_eq!(pending.len(), 1);
        assert_eq!(
            (pending[0].host.as_str(), pending[0].port),
            ("new.test", 443)
        );
        assert_eq!(pending[0].waiting, 1);
        q.answer(pending[0].id, Answer::Once).unwrap();
        assert_eq!(held.await.unwrap(), Outcome::Approved(Answer::Once));
        assert!(q.pending().is_empty());
        // Once: the next request waits again (and times out here).
        let short = Approvals::new(Duration::from_millis(50));
        assert_eq!(
            short.ask("new.test", 443, "GET", Some("/")).await,
            Outcome::TimedOut
        );
        assert_eq!(short.pending().len(), 1, "a timed-out request stays listed");
    }

    #[tokio::test]
    async fn repeated_requests_share_an_entry_and_one_answer_releases_them_all() {
        let q = Approvals::new(Duration::from_secs(10));
        let mut held = Vec::new();
        for _ in 0..3 {
            let q = q.clone();
            held.push(tokio::spawn(async move {
                q.ask("new.test", 80, "GET", Some("/a")).await
            }));
        }
        settle().await;
        let pending = q.pending();
        assert_eq!(pending.len(), 1);
        assert_eq!((pending[0].count, pending[0].waiting), (3, 3));
        q.answer(pending[0].id, Answer::Deny).unwrap();
        for h in held {
            assert_eq!(h.await.unwrap(), Outcome::Denied);
        }
        // A denied host is refused at once from then on, without waiting.
        let t = std::time::Instant::now();
        assert_eq!(q.ask("new.test", 80, "GET", None).await, Outcome::Denied);
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(q.pending().is_empty());
        assert_eq!(
            q.answer(pending[0].id, Answer::Once),
            Err(ApprovalError::Unknown { id: pending[0].id })
        );
    }

    #[tokio::test]
    async fn once_after_the_hold_ended_lets_the_retry_through_once() {
        let q = Approvals::new(Duration::from_millis(30));
        assert_eq!(
            q.ask("new.test", 443, "CONNECT", None).await,
            Outcome::TimedOut
        );
        let id = q.pending()[0].id;
        q.answer(id, Answer::Once).unwrap();
        assert_eq!(
            q.ask("new.test", 443, "CONNECT", None).await,
            Outcome::Approved(Answer::Once)
        );
        assert_eq!(
            q.ask("new.test", 443, "CONNECT", None).await,
            Outcome::TimedOut
        );
    }

    #[tokio::test]
    async fn the_queue_is_bounded() {
        let q = Approvals::new(Duration::from_millis(1));
        for i in 0..MAX_PENDING {
            q.ask(&format!("h{i}.test"), 443, "CONNECT", None).await;
        }
        assert_eq!(
            q.ask("one-more.test", 443, "CONNECT", None).await,
            Outcome::QueueFull
        );
        // A host already listed still counts.
        assert_eq!(
            q.ask("h0.test", 443, "CONNECT", None).await,
            Outcome::TimedOut
        );
        assert_eq!(q.pending().len(), MAX_PENDING);
    }
}
