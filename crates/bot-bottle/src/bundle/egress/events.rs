//! Decision events: one JSON object per line, appended to the bottle's egress log.
//!
//! Line format (fields always present unless marked optional):
//! `{"time":"2026-11-23T14:00:00.123Z","time_unix_ms":1795..., "bottle_id":"b1",
//!   "client":"127.0.0.1:5555","method":"CONNECT","host":"api.github.com","port":443,
//!   "verdict":"allow","rule":"*.github.com","reason":"allow_rule","detail":null}`
//! - `verdict`: `allow` or `deny` (or `log` for the log's own `log_gap` note, see [`EventLog`]);
//! - `rule`: the text of the allow/deny rule that decided, or `null`;
//! - `reason`: `allow_rule`, `deny_rule`, `ip_literal`, `doh_endpoint`, `not_allowed`,
//!   `invalid_host`, `host_header_denied` (plain HTTP whose `Host` header names a denied host),
//!   `blocked_address` (the name resolved below the address floor), inside an intercepted
//!   tunnel (`method` is the request's) `path_not_allowed` (outside its credential's `paths`),
//!   `request_not_allowed` (outside the `[egress] allow` tables for its host, named in `rule`;
//!   plain HTTP too), `rule_not_enforceable` (a `CONNECT` to a host with such tables that the
//!   proxy does not intercept),
//!   `host_mismatch` (a `Host` or absolute-form authority other than the intercepted host),
//!   `method_not_allowed` (`TRACE`, `CONNECT`), `upgrade_refused` and `credential_echo` (the
//!   upstream's response carried the injected value), `supervisor_rule` (the host added the allow rule in
//!   `rule`), `supervisor_unauthorized` (a supervisor request without the bottle's token) or
//!   `bad_request` (malformed request; `host` is empty and `port` 0);
//! - `detail`: free text for humans (e.g. the `Host` header value), or `null`;
//! - `repeated` (optional): this line stands for that many more denials like the one before
//!   it with the same method, host, port, reason and rule (see [`EventLog`]).
//!
//! What the agent cannot do to the log (it decides what is written): make a line longer than
//! a few KiB (each text field is cut at a bound and marked `…[+N bytes]`), fill it with one
//! denial repeated (repeats within [`REPEAT_WINDOW_MS`] are counted, not written), or wash the
//! start of the run out of it (the first part is never rotated away).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::EgressError;

/// One decision of the proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressEvent {
    /// RFC 3339, UTC, millisecond precision.
    pub time: String,
    pub time_unix_ms: u64,
    pub bottle_id: String,
    /// The proxy client's address (inside the bundle: the agent's forwarder).
    pub client: String,
    pub method: String,
    pub host: String,
    pub port: u16,
    /// `allow` or `deny`.
    pub verdict: String,
    pub rule: Option<String>,
    pub reason: String,
    pub detail: Option<String>,
    /// How many more denials like this one this line stands for (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeated: Option<u64>,
}

/// Now, in milliseconds since the epoch (0 before it, saturating far after).
pub(crate) fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Writes `event` to `log` (none: only traced) and mirrors it to `tracing`. `Err` only when
/// the log file fails (logged here too): callers refuse what cannot be recorded.
pub(crate) async fn record(log: Option<&EventLog>, event: &EgressEvent) -> Result<(), EgressError> {
    tracing::info!(
        host = %event.host, port = event.port, verdict = %event.verdict,
        rule = event.rule.as_deref().unwrap_or(""), reason = %event.reason, "egress decision"
    );
    match log {
        Some(log) => log.append(event).await.inspect_err(|e| {
            tracing::error!(error = %e, "cannot record egress event");
        }),
        None => Ok(()),
    }
}

impl EgressEvent {
    /// An event stamped with the current time.
    pub fn now(bottle_id: &str, client: &str, method: &str, host: &str, port: u16) -> Self {
        let unix_ms = unix_ms_now();
        EgressEvent {
            time: rfc3339_utc_ms(unix_ms),
            time_unix_ms: unix_ms,
            bottle_id: bottle_id.to_owned(),
            client: client.to_owned(),
            method: method.to_owned(),
            host: host.to_owned(),
            port,
            verdict: String::new(),
            rule: None,
            reason: String::new(),
            detail: None,
            repeated: None,
        }
    }

    /// The same event with every text field cut to its bound (see [`cut`]).
    fn bounded(mut self) -> Self {
        for (field, max) in [
            (&mut self.bottle_id, MAX_ID_BYTES),
            (&mut self.client, MAX_ID_BYTES),
            (&mut self.method, MAX_ID_BYTES),
            (&mut self.host, MAX_HOST_BYTES),
            (&mut self.verdict, MAX_ID_BYTES),
            (&mut self.reason, MAX_ID_BYTES),
        ] {
            cut(field, max);
        }
        if let Some(rule) = &mut self.rule {
            cut(rule, MAX_HOST_BYTES);
        }
        if let Some(detail) = &mut self.detail {
            cut(detail, MAX_DETAIL_BYTES);
        }
        self
    }
}

/// Longest host or rule kept in an event (a DNS name has at most 253 bytes).
pub const MAX_HOST_BYTES: usize = 256;
/// Longest `detail` kept.
pub const MAX_DETAIL_BYTES: usize = 512;
/// Longest bottle id, client, method, verdict or reason kept.
pub const MAX_ID_BYTES: usize = 128;

/// Cuts `text` to at most `max` bytes (on a character boundary) and marks how much was cut:
/// `aaaa…[+29876 bytes]`.
pub fn cut(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let cut_bytes = text.len() - end;
    text.truncate(end);
    text.push_str(&format!("…[+{cut_bytes} bytes]"));
}

impl EgressEvent {
    /// One line for a person: time of day (UTC), verdict, method, target, why, and the rule
    /// or detail when there is one. `2026-11-23T14:00:00.123Z deny CONNECT x.com:443
    /// not_allowed` becomes `14:00:00.123  deny   CONNECT  x.com:443  not_allowed`.
    pub fn human(&self) -> String {
        let clock = self
            .time
            .split_once('T')
            .map_or(self.time.as_str(), |(_, t)| t.trim_end_matches('Z'));
        let target = if self.host.is_empty() {
            "-".to_owned()
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut line = format!(
            "{clock}  {:<5}  {:<7}  {target}  {}",
            self.verdict, self.method, self.reason
        );
        if let Some(rule) = &self.rule {
            line.push_str(&format!("  rule={rule}"));
        }
        if let Some(detail) = &self.detail {
            line.push_str(&format!("  ({detail})"));
        }
        line
    }
}

/// Largest a log file grows before it is rotated (the agent decides how many events there
/// are: without a bound it could fill the host's disk through its bottle's log).
pub const DEFAULT_MAX_LOG_BYTES: u64 = 32 * 1024 * 1024;

/// Denials alike (same method, host, port, reason and rule) within this many milliseconds of
/// the first one written are counted instead of written.
pub const REPEAT_WINDOW_MS: u64 = 10_000;
/// Most kinds of denial counted at once; beyond it the oldest count is written out.
const MAX_REPEAT_KINDS: usize = 256;

/// Where the first part of a rotated log is kept for the whole run: `<log>.0`.
pub fn first_part(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".0");
    PathBuf::from(name)
}

/// Where a rotated log's previous part goes: `<log>.1`.
pub fn previous_part(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Appends event lines to a file (`O_APPEND`, one unbuffered `write` per line), so that a
/// hostile agent can neither fill the disk nor wash out what it did first:
/// - every line is bounded ([`EgressEvent::bounded`]: a few KiB at most);
/// - a denial like one written less than [`REPEAT_WINDOW_MS`] ago is counted, not written;
///   the count goes out as one event (`repeated`: N, detail `N more like this`) before the next
///   line written, when its window has passed, or when the log is dropped;
/// - when the file would pass its size bound it is rotated: the first time it becomes
///   `<log>.0` and stays for the whole run (the start of the run is always kept); later,
///   `<log>.1` (replacing the one before, so middle parts are dropped). The new file starts
///   with a `log_gap` event saying how many bytes were dropped so far. At most three times the
///   bound is ever on disk; the first and the newest events are always kept.
///
/// Writes are synchronous on purpose: an append of a few hundred bytes to the page cache takes
/// microseconds, less than a hand-off to tokio's blocking pool, and the caller must know the
/// line is written before it lets traffic through.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    max_bytes: u64,
    state: Mutex<LogState>,
}

#[derive(Debug)]
struct LogState {
    file: std::fs::File,
    /// Bytes in `file`.
    len: u64,
    /// `<log>.0` exists: the start of the run is kept, later rotations go to `<log>.1`.
    first_kept: bool,
    /// Bytes of events dropped with replaced middle parts.
    dropped_bytes: u64,
    /// Denials being counted, by kind.
    repeats: HashMap<RepeatKey, Repeat>,
}

/// What makes two denials alike.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RepeatKey {
    method: String,
    host: String,
    port: u16,
    reason: String,
    rule: Option<String>,
}

impl RepeatKey {
    fn of(event: &EgressEvent) -> Self {
        RepeatKey {
            method: event.method.clone(),
            host: event.host.clone(),
            port: event.port,
            reason: event.reason.clone(),
            rule: event.rule.clone(),
        }
    }
}

#[derive(Debug)]
struct Repeat {
    /// When the written denial of this kind was made (start of the window).
    window_start_ms: u64,
    /// Denials counted since then, and the latest of them.
    count: u64,
    latest: Option<EgressEvent>,
}

impl EventLog {
    /// Opens (creating if needed) the log for appending, bounded by [`DEFAULT_MAX_LOG_BYTES`].
    pub async fn open(path: &Path) -> Result<Self, EgressError> {
        Self::open_bounded(path, DEFAULT_MAX_LOG_BYTES)
    }

    /// [`EventLog::open`] with another bound.
    pub fn open_bounded(path: &Path, max_bytes: u64) -> Result<Self, EgressError> {
        let file = Self::open_file(path)?;
        let len = file.metadata().map_or(0, |m| m.len());
        Ok(EventLog {
            path: path.to_owned(),
            max_bytes,
            state: Mutex::new(LogState {
                file,
                len,
                first_kept: first_part(path).exists(),
                dropped_bytes: 0,
                repeats: HashMap::new(),
            }),
        })
    }

    fn open_file(path: &Path) -> Result<std::fs::File, EgressError> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| EgressError::OpenEventLog {
                path: path.to_owned(),
                source,
            })
    }

    fn write_error(&self, source: std::io::Error) -> EgressError {
        EgressError::WriteEventLog {
            path: self.path.clone(),
            source,
        }
    }

    /// Appends one event (or counts it, when it repeats a denial written just before).
    pub async fn append(&self, event: &EgressEvent) -> Result<(), EgressError> {
        let event = event.clone().bounded();
        // A poisoned lock only means another writer panicked mid-call; the file is still usable.
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = event.time_unix_ms;
        // Counts whose window has passed go out (and stop counting).
        let expired: Vec<RepeatKey> = state
            .repeats
            .iter()
            .filter(|(_, r)| now.saturating_sub(r.window_start_ms) >= REPEAT_WINDOW_MS)
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            if let Some(repeat) = state.repeats.remove(&key) {
                self.write_count(&mut state, repeat)?;
            }
        }
        if event.verdict == "deny" {
            let key = RepeatKey::of(&event);
            if let Some(repeat) = state.repeats.get_mut(&key) {
                repeat.count += 1;
                repeat.latest = Some(event);
                return Ok(());
            }
            if state.repeats.len() >= MAX_REPEAT_KINDS {
                let oldest = state
                    .repeats
                    .iter()
                    .min_by_key(|(_, r)| r.window_start_ms)
                    .map(|(k, _)| k.clone());
                if let Some(repeat) = oldest.and_then(|k| state.repeats.remove(&k)) {
                    self.write_count(&mut state, repeat)?;
                }
            }
            state.repeats.insert(
                key,
                Repeat {
                    window_start_ms: now,
                    count: 0,
                    latest: None,
                },
            );
        }
        // Counts so far go out before any other line, so the log stays in order; the kinds
        // keep being counted until their window ends.
        let pending: Vec<RepeatKey> = state
            .repeats
            .iter()
            .filter(|(_, r)| r.count > 0)
            .map(|(k, _)| k.clone())
            .collect();
        for key in pending {
            let counted = state.repeats.get_mut(&key).map(|r| Repeat {
                window_start_ms: r.window_start_ms,
                count: std::mem::take(&mut r.count),
                latest: r.latest.take(),
            });
            if let Some(repeat) = counted {
                self.write_count(&mut state, repeat)?;
            }
        }
        self.write_line(&mut state, &event)
    }

    /// Writes every count still pending (also done when the log is dropped).
    pub fn flush_counts(&self) -> Result<(), EgressError> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let all: Vec<Repeat> = state.repeats.drain().map(|(_, r)| r).collect();
        for repeat in all {
            self.write_count(&mut state, repeat)?;
        }
        Ok(())
    }

    /// The event standing for `repeat`'s counted denials, when there are any.
    fn write_count(&self, state: &mut LogState, repeat: Repeat) -> Result<(), EgressError> {
        let Some(mut event) = repeat.latest.filter(|_| repeat.count > 0) else {
            return Ok(());
        };
        event.repeated = Some(repeat.count);
        event.detail = Some(format!(
            "{} more like this since {}",
            repeat.count,
            rfc3339_utc_ms(repeat.window_start_ms)
        ));
        self.write_line(state, &event)
    }

    /// Writes one line, rotating first when it would pass the bound.
    fn write_line(&self, state: &mut LogState, event: &EgressEvent) -> Result<(), EgressError> {
        // Serialising a struct of strings and integers cannot fail.
        let mut line = serde_json::to_vec(event).unwrap_or_default();
        line.push(b'\n');
        if state.len > 0 && state.len + line.len() as u64 > self.max_bytes {
            self.rotate(state, &event.bottle_id)?;
        }
        state.len += line.len() as u64;
        state
            .file
            .write_all(&line)
            .map_err(|source| self.write_error(source))
    }

    /// The current file becomes the first part (once) or the previous part (dropping the one
    /// before); a new current file starts, with a `log_gap` event once something was dropped.
    fn rotate(&self, state: &mut LogState, bottle_id: &str) -> Result<(), EgressError> {
        let target = if state.first_kept {
            let previous = previous_part(&self.path);
            state.dropped_bytes += std::fs::metadata(&previous).map_or(0, |m| m.len());
            previous
        } else {
            first_part(&self.path)
        };
        std::fs::rename(&self.path, &target).map_err(|source| self.write_error(source))?;
        state.first_kept = true;
        state.file = Self::open_file(&self.path)?;
        state.len = 0;
        if state.dropped_bytes > 0 {
            let mut gap = EgressEvent::now(bottle_id, "", "", "", 0);
            gap.verdict = "log".into();
            gap.reason = "log_gap".into();
            gap.detail = Some(format!(
                "{} bytes of events written after the first part ({}) and before the previous \
                 part were dropped to keep the log bounded",
                state.dropped_bytes,
                first_part(&self.path)
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
            ));
            let mut line = serde_json::to_vec(&gap).unwrap_or_default();
            line.push(b'\n');
            state.len += line.len() as u64;
            state
                .file
                .write_all(&line)
                .map_err(|source| self.write_error(source))?;
        }
        Ok(())
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        if let Err(e) = self.flush_counts() {
            tracing::error!(error = %e, "cannot write the last counts of repeated denials");
        }
    }
}

/// Formats milliseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_utc_ms(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_reads_as_one_line_for_a_person() {
        let mut e = EgressEvent::now("b1", "127.0.0.1:5555", "CONNECT", "api.github.com", 443);
        e.time = "2026-11-23T14:00:00.123Z".into();
        e.verdict = "allow".into();
        e.reason = "allow_rule".into();
        e.rule = Some("*.github.com".into());
        assert_eq!(
            e.human(),
            "14:00:00.123  allow  CONNECT  api.github.com:443  allow_rule  rule=*.github.com"
        );
        let mut bad = EgressEvent::now("b1", "c", "GET", "", 0);
        bad.time = "2026-11-23T14:00:01.000Z".into();
        bad.verdict = "deny".into();
        bad.reason = "bad_request".into();
        bad.detail = Some("malformed".into());
        assert_eq!(
            bad.human(),
            "14:00:01.000  deny   GET      -  bad_request  (malformed)"
        );
    }

    #[test]
    fn rfc3339_formats_epoch() {
        assert_eq!(rfc3339_utc_ms(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn rfc3339_formats_leap_day_with_millis() {
        // 2024-02-29T12:34:56.789Z
        assert_eq!(
            rfc3339_utc_ms(1_709_210_096_789),
            "2024-02-29T12:34:56.789Z"
        );
    }

    #[test]
    fn rfc3339_formats_end_of_year() {
        // 2026-12-31T23:59:59.999Z
        assert_eq!(
            rfc3339_utc_ms(1_798_761_599_999),
            "2026-12-31T23:59:59.999Z"
        );
    }

    #[tokio::test]
    async fn appended_events_are_one_parseable_line_each() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("egress.jsonl");
        let log = EventLog::open(&path).await.unwrap();
        let mut first = EgressEvent::now("b1", "127.0.0.1:1", "CONNECT", "a.test", 443);
        first.verdict = "allow".into();
        let second = EgressEvent::now("b1", "127.0.0.1:2", "GET", "b.test", 80);

        log.append(&first).await.unwrap();
        log.append(&second).await.unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        let parsed: Vec<EgressEvent> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(parsed, vec![first, second]);
    }

    #[test]
    fn a_long_field_is_cut_on_a_character_boundary_and_marked() {
        let mut host = format!("{}é{}", "a".repeat(255), "b".repeat(100));
        let mut short = "short".to_owned();

        cut(&mut host, MAX_HOST_BYTES);
        cut(&mut short, MAX_HOST_BYTES);

        assert_eq!(host, format!("{}…[+102 bytes]", "a".repeat(255)));
        assert_eq!(short, "short");
    }

    fn denial(host: &str, at_ms: u64) -> EgressEvent {
        let mut e = EgressEvent::now("b1", "c", "CONNECT", host, 443);
        e.time_unix_ms = at_ms;
        e.verdict = "deny".into();
        e.reason = "not_allowed".into();
        e
    }

    fn lines(path: &Path) -> Vec<EgressEvent> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn repeats_are_counted_until_their_window_ends_and_allows_never_are() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("egress.jsonl");
        let log = EventLog::open(&path).await.unwrap();
        let mut allow = EgressEvent::now("b1", "c", "CONNECT", "ok.test", 443);
        allow.verdict = "allow".into();
        allow.time_unix_ms = 1_500;

        for i in 0..5 {
            log.append(&denial("x.test", 1_000 + i)).await.unwrap();
        }
        log.append(&allow).await.unwrap();
        log.append(&allow).await.unwrap();
        log.append(&denial("x.test", 2_000)).await.unwrap();
        log.append(&denial("x.test", 1_000 + REPEAT_WINDOW_MS))
            .await
            .unwrap();
        drop(log);

        let got: Vec<(String, Option<u64>)> = lines(&path)
            .into_iter()
            .map(|e| (format!("{} {}", e.verdict, e.host), e.repeated))
            .collect();
        assert_eq!(
            got,
            vec![
                ("deny x.test".into(), None),
                ("deny x.test".into(), Some(4)),
                ("allow ok.test".into(), None),
                ("allow ok.test".into(), None),
                ("deny x.test".into(), Some(1)),
                ("deny x.test".into(), None),
            ]
        );
    }

    #[tokio::test]
    async fn rotation_keeps_the_first_part_and_notes_what_it_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("egress.jsonl");
        let log = EventLog::open_bounded(&path, 4096).unwrap();

        for i in 0..200 {
            log.append(&denial(&format!("h{i}.test"), i)).await.unwrap();
        }

        let first = lines(&first_part(&path));
        let current = lines(&path);
        assert_eq!(first[0].host, "h0.test");
        assert_eq!(current[0].reason, "log_gap");
        assert_eq!(current.last().unwrap().host, "h199.test");
        let parts = std::fs::read_dir(dir.path()).unwrap().count();
        let bytes: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(parts, 3);
        assert!(bytes <= 3 * 4096, "{bytes}");
    }
}
