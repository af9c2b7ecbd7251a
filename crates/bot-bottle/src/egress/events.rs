//! Decision events: one JSON object per line, appended to the bottle's egress log.
//!
//! Line format (fields always present unless marked optional):
//! `{"time":"2026-11-23T14:00:00.123Z","time_unix_ms":1795..., "bottle_id":"b1",
//!   "client":"127.0.0.1:5555","method":"CONNECT","host":"api.github.com","port":443,
//!   "verdict":"allow","rule":"*.github.com","reason":"allow_rule","detail":null}`
//! - `verdict`: `allow` or `deny`;
//! - `rule`: the text of the allow/deny rule that decided, or `null`;
//! - `reason`: `allow_rule`, `deny_rule`, `ip_literal`, `doh_endpoint`, `not_allowed`,
//!   `invalid_host`, `host_header_denied` (plain HTTP whose `Host` header names a denied host),
//!   `path_not_allowed` (a request inside an intercepted tunnel outside its credential's
//!   `paths`; `method` is the request's), `supervisor_rule` (the host added the allow rule in
//!   `rule`), `supervisor_unauthorized` (a supervisor request without the bottle's token) or
//!   `bad_request` (malformed request; `host` is empty and `port` 0);
//! - `detail`: free text for humans (e.g. the `Host` header value), or `null`.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use std::io::Write;
use std::sync::Mutex;

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
}

impl EgressEvent {
    /// An event stamped with the current time.
    pub fn now(bottle_id: &str, client: &str, method: &str, host: &str, port: u16) -> Self {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
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
        }
    }
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

/// Where a rotated log's previous part goes: `<log>.1`.
pub fn previous_part(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Appends event lines to a file (`O_APPEND`, one unbuffered `write` per line). When the file
/// would pass its size bound it becomes `<log>.1` (replacing the one before) and a new file
/// starts: at most twice the bound is ever on disk, the newest events always kept.
///
/// Writes are synchronous on purpose: an append of a few hundred bytes to the page cache takes
/// microseconds, less than a hand-off to tokio's blocking pool, and the caller must know the
/// line is written before it lets traffic through.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    max_bytes: u64,
    /// The open file and how many bytes it holds.
    file: Mutex<(std::fs::File, u64)>,
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
            file: Mutex::new((file, len)),
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

    /// Appends one line.
    pub async fn append(&self, event: &EgressEvent) -> Result<(), EgressError> {
        // Serialising a struct of strings and integers cannot fail.
        let mut line = serde_json::to_vec(event).unwrap_or_default();
        line.push(b'\n');
        // A poisoned lock only means another writer panicked mid-call; the file is still usable.
        let mut guard = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (file, len) = &mut *guard;
        if *len > 0 && *len + line.len() as u64 > self.max_bytes {
            std::fs::rename(&self.path, previous_part(&self.path)).map_err(|source| {
                EgressError::WriteEventLog {
                    path: self.path.clone(),
                    source,
                }
            })?;
            *file = Self::open_file(&self.path)?;
            *len = 0;
        }
        *len += line.len() as u64;
        file.write_all(&line)
            .map_err(|source| EgressError::WriteEventLog {
                path: self.path.clone(),
                source,
            })
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
}
