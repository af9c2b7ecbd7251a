//! The secret scanner of bot-bottle.
//!
//! A [`Scanner`] looks for three kinds of secrets in text, line by line:
//!
//! 1. **The bottle's own credentials**, exactly (rule `credential <NAME>`). The scanner is given
//!    [`Fingerprint`]s — a name, a byte length and the SHA-256 of each value — and compares the
//!    SHA-256 of every window of that length in a line. It never holds, logs or prints a
//!    credential value: a [`Finding`] carries only the rule name and a byte range, and neither
//!    the [`Scanner`] nor a [`Fingerprint`] contains the value (their `Debug` output shows
//!    names, lengths and, for a fingerprint, the digest).
//! 2. **Well-known token formats** (GitHub, Anthropic, OpenAI, AWS access key ids, Slack,
//!    private-key blocks), by regular expression; see [`BUILTIN_RULES`]. Of a private key the
//!    `-----BEGIN … PRIVATE KEY-----` line is the `private-key` finding; its base64 body lines
//!    are usually `high-entropy` findings.
//! 3. **High-entropy strings** (rule `high-entropy`): maximal runs of `[A-Za-z0-9+/=_-]`
//!    (split at a `=` that is not trailing padding, so `KEY=value` is judged by `value`) of at
//!    least [`MIN_ENTROPY_RUN`] bytes whose Shannon entropy exceeds a threshold (default
//!    [`DEFAULT_ENTROPY_THRESHOLD`] bits per byte) and that look random rather than like an
//!    identifier, an alphabet or a path (see `looks_random`). Hex digests (git hashes,
//!    checksums, UUIDs) have at most 4 bits per byte and stay below the default; so does any
//!    run shorter than 23 bytes (at most `log2(len)` bits).
//!
//! A range found by an earlier rule is not reported again by a later one (a credential that is
//! also a GitHub token is reported once, as the credential).
//!
//! Users: the git gate's pre-receive check scans the added lines of every pushed commit (on the
//! host); later the egress proxy will scan outbound requests.
//!
//! Scanning is per line: a credential value that contains a newline is never found, and the
//! scanner looks for values as they are, not for encoded forms (base64, URL-encoding).

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use regex::bytes::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Default threshold of the `high-entropy` rule, in bits per byte.
pub const DEFAULT_ENTROPY_THRESHOLD: f64 = 4.5;

/// Shortest run the `high-entropy` rule considers, in bytes.
pub const MIN_ENTROPY_RUN: usize = 20;

/// Name of the entropy rule.
pub const HIGH_ENTROPY_RULE: &str = "high-entropy";

/// Prefix of the rule name of a credential fingerprint (`credential <NAME>`).
pub const CREDENTIAL_RULE_PREFIX: &str = "credential ";

/// The built-in token-format rules, `(name, regex)`, in priority order: where two overlap, the
/// earlier one is reported. Regexes are byte-oriented and ASCII-only (Unicode mode off).
pub const BUILTIN_RULES: &[(&str, &str)] = &[
    (
        "github-token",
        r"gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{82}",
    ),
    ("anthropic-api-key", r"sk-ant-[A-Za-z0-9_-]{20,}"),
    // The leading word boundary keeps `task-…`, `disk-…`, `risk-…` identifiers out.
    ("openai-api-key", r"\bsk-(?:proj-)?[A-Za-z0-9_-]{20,}"),
    ("aws-access-key-id", r"(?:AKIA|ASIA)[0-9A-Z]{16}"),
    ("slack-token", r"xox[baprs]-[A-Za-z0-9-]{10,}"),
    (
        "private-key",
        r"-----BEGIN[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----",
    ),
];

/// A credential the scanner must find without holding its value: its name, the value's byte
/// length and the hex SHA-256 of the value.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fingerprint {
    /// The credential's name, e.g. `ANTHROPIC_API_KEY`; used in the rule name.
    pub name: String,
    /// Length of the value in bytes.
    pub len: usize,
    /// SHA-256 of the value, hex (64 digits).
    pub sha256: String,
}

impl Fingerprint {
    /// The fingerprint of `value` under `name`. The value itself is not kept.
    pub fn of(name: &str, value: &str) -> Fingerprint {
        Fingerprint {
            name: name.to_owned(),
            len: value.len(),
            sha256: hex::encode(Sha256::digest(value.as_bytes())),
        }
    }

    /// The rule name of findings of this fingerprint: `credential <NAME>`.
    pub fn rule(&self) -> String {
        format!("{CREDENTIAL_RULE_PREFIX}{}", self.name)
    }

    fn digest(&self) -> Result<[u8; 32], FingerprintError> {
        if self.len == 0 {
            return Err(FingerprintError::EmptyValue {
                name: self.name.clone(),
            });
        }
        let mut digest = [0u8; 32];
        hex::decode_to_slice(&self.sha256, &mut digest).map_err(|_| {
            FingerprintError::BadDigest {
                name: self.name.clone(),
            }
        })?;
        Ok(digest)
    }
}

/// A malformed [`Fingerprint`]. Carries the credential's name only.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FingerprintError {
    /// `sha256` is not 64 hex digits.
    #[error("fingerprint {name}: sha256 is not 64 hex digits")]
    BadDigest { name: String },
    /// `len` is 0: an empty value would match everywhere.
    #[error("fingerprint {name}: the value is empty")]
    EmptyValue { name: String },
}

/// One secret found in a line: the rule that found it and its byte range in the line
/// (`start..end`). Never the value itself.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Finding {
    /// `credential <NAME>`, one of the [`BUILTIN_RULES`] names, or `high-entropy`.
    pub rule: String,
    /// Byte offset of the first byte, within the line.
    pub start: usize,
    /// Byte offset one past the last byte, within the line.
    pub end: usize,
}

/// The byte ranges already reported in a line, as disjoint merged intervals `start → end`, so
/// that overlap checks stay logarithmic on long lines (a request body may be one line).
#[derive(Default)]
struct Covered(BTreeMap<usize, usize>);

impl Covered {
    fn overlaps(&self, start: usize, end: usize) -> bool {
        // Intervals are disjoint, so only the last one starting before `end` can reach `start`.
        self.0
            .range(..end)
            .next_back()
            .is_some_and(|(_, &e)| e > start)
    }

    fn insert(&mut self, mut start: usize, mut end: usize) {
        while let Some((&s, &e)) = self.0.range(..=end).next_back() {
            if e < start {
                break;
            }
            self.0.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }
}

/// Fingerprints of one value length.
struct LengthGroup {
    len: usize,
    /// Digest → indices into `Scanner::fingerprints` (several names may share a value).
    digests: HashMap<[u8; 32], Vec<usize>>,
}

/// The secret scanner: credential fingerprints plus the built-in rules. Cheap to share
/// (`Send + Sync`); scanning takes `&self`.
pub struct Scanner {
    fingerprints: Vec<Fingerprint>,
    groups: Vec<LengthGroup>,
    rules: Vec<(&'static str, Regex)>,
    /// The union of `rules`: one search tells whether any of them can match a line.
    any_rule: Regex,
    entropy_threshold: f64,
}

impl fmt::Debug for Scanner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names and lengths only; digests are left out too, to keep logs short.
        let creds: Vec<(&str, usize)> = self
            .fingerprints
            .iter()
            .map(|fp| (fp.name.as_str(), fp.len))
            .collect();
        let rules: Vec<&str> = self.rules.iter().map(|(name, _)| *name).collect();
        f.debug_struct("Scanner")
            .field("credentials", &creds)
            .field("rules", &rules)
            .field("entropy_threshold", &self.entropy_threshold)
            .finish()
    }
}

impl Scanner {
    /// A scanner for `fingerprints` plus the built-in rules, with the default entropy threshold.
    ///
    /// # Panics
    ///
    /// If a fingerprint is malformed (see [`Scanner::try_new`], which reports it instead).
    pub fn new(fingerprints: Vec<Fingerprint>) -> Scanner {
        match Scanner::try_new(fingerprints) {
            Ok(scanner) => scanner,
            Err(err) => panic!("{err}"),
        }
    }

    /// Like [`Scanner::new`], but a malformed fingerprint (digest not 64 hex digits, length 0)
    /// is an error rather than a panic.
    pub fn try_new(fingerprints: Vec<Fingerprint>) -> Result<Scanner, FingerprintError> {
        let mut by_len: HashMap<usize, HashMap<[u8; 32], Vec<usize>>> = HashMap::new();
        for (i, fp) in fingerprints.iter().enumerate() {
            let digest = fp.digest()?;
            by_len
                .entry(fp.len)
                .or_default()
                .entry(digest)
                .or_default()
                .push(i);
        }
        let mut groups: Vec<LengthGroup> = by_len
            .into_iter()
            .map(|(len, digests)| LengthGroup { len, digests })
            .collect();
        groups.sort_by_key(|g| g.len);

        let build = |pattern: &str| {
            RegexBuilder::new(pattern)
                .unicode(false)
                .build()
                .expect("built-in rule regexes compile")
        };
        let rules = BUILTIN_RULES
            .iter()
            .map(|&(name, pattern)| (name, build(pattern)))
            .collect();
        let union: Vec<String> = BUILTIN_RULES
            .iter()
            .map(|(_, pattern)| format!("(?:{pattern})"))
            .collect();
        let any_rule = build(&union.join("|"));

        Ok(Scanner {
            fingerprints,
            groups,
            rules,
            any_rule,
            entropy_threshold: DEFAULT_ENTROPY_THRESHOLD,
        })
    }

    /// Sets the `high-entropy` threshold in bits per byte (at most 8 is reachable; a run of
    /// `n` bytes has at most `log2(n)` bits). `f64::INFINITY` turns the rule off.
    pub fn with_entropy_threshold(mut self, bits_per_char: f64) -> Scanner {
        self.entropy_threshold = bits_per_char;
        self
    }

    /// The entropy threshold in use, in bits per byte.
    pub fn entropy_threshold(&self) -> f64 {
        self.entropy_threshold
    }

    /// Findings in one line of text (without its newline), ordered by position: rule name and
    /// byte range, never the value.
    pub fn scan_line(&self, line: &[u8]) -> Vec<Finding> {
        let mut findings = Vec::new();
        self.scan_credentials(line, &mut findings);
        let mut covered = Covered::default();
        for f in &findings {
            covered.insert(f.start, f.end);
        }

        let rules: &[(&str, Regex)] = if self.any_rule.is_match(line) {
            &self.rules
        } else {
            &[]
        };
        for (name, regex) in rules {
            for m in regex.find_iter(line) {
                if !covered.overlaps(m.start(), m.end()) {
                    covered.insert(m.start(), m.end());
                    findings.push(Finding {
                        rule: (*name).to_owned(),
                        start: m.start(),
                        end: m.end(),
                    });
                }
            }
        }

        self.scan_entropy(line, &covered, &mut findings);
        findings.sort_by(|a, b| (a.start, a.end, &a.rule).cmp(&(b.start, b.end, &b.rule)));
        findings
    }

    /// Findings in a text, each with its 1-based line number. Lines end at `\n`; a `\r` before
    /// it is not part of the line.
    pub fn scan_text(&self, text: &[u8]) -> Vec<(usize, Finding)> {
        let mut out = Vec::new();
        for (i, line) in text.split(|&b| b == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            out.extend(self.scan_line(line).into_iter().map(|f| (i + 1, f)));
        }
        out
    }

    fn scan_credentials(&self, line: &[u8], findings: &mut Vec<Finding>) {
        for group in &self.groups {
            if line.len() < group.len {
                // Groups are sorted by length: no longer one fits either.
                break;
            }
            for (start, window) in line.windows(group.len).enumerate() {
                let digest: [u8; 32] = Sha256::digest(window).into();
                if let Some(indices) = group.digests.get(&digest) {
                    for &i in indices {
                        findings.push(Finding {
                            rule: self.fingerprints[i].rule(),
                            start,
                            end: start + group.len,
                        });
                    }
                }
            }
        }
    }

    fn scan_entropy(&self, line: &[u8], covered: &Covered, findings: &mut Vec<Finding>) {
        for (start, end) in entropy_pieces(line) {
            let piece = &line[start..end];
            if piece.len() >= MIN_ENTROPY_RUN
                && shannon_entropy(piece) > self.entropy_threshold
                && looks_random(piece)
                && !covered.overlaps(start, end)
            {
                findings.push(Finding {
                    rule: HIGH_ENTROPY_RULE.to_owned(),
                    start,
                    end,
                });
            }
        }
    }
}

fn is_entropy_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'_' | b'-')
}

/// The candidate ranges of the entropy rule: maximal runs of [`is_entropy_byte`], split at any
/// `=` that is not trailing padding (`KEY=value` is two pieces, `abc==` one).
fn entropy_pieces(line: &[u8]) -> Vec<(usize, usize)> {
    let mut pieces = Vec::new();
    let mut i = 0;
    while i < line.len() {
        if !is_entropy_byte(line[i]) {
            i += 1;
            continue;
        }
        let run_end = line[i..]
            .iter()
            .position(|&b| !is_entropy_byte(b))
            .map_or(line.len(), |n| i + n);
        // Trailing padding belongs to the last piece.
        let padding = line[i..run_end]
            .iter()
            .rev()
            .take_while(|&&b| b == b'=')
            .count();
        let body_end = run_end - padding;
        let mut start = i;
        for (j, &b) in line.iter().enumerate().take(body_end).skip(i) {
            if b == b'=' {
                if start < j {
                    pieces.push((start, j));
                }
                start = j + 1;
            }
        }
        if start < body_end {
            pieces.push((start, run_end));
        }
        i = run_end;
    }
    pieces
}

/// The false-positive filters of the entropy rule, for text that has many distinct bytes but
/// is not random:
///
/// - Random base64 switches between lower case, upper case and digits at ~40% of its adjacent
///   pairs; identifiers (`NID_pbe_WithSHA1And3_Key`, `CARGO_CFG_USE_LIBC`) and alphabets
///   (`abc…xyzABC…`) rarely do. A switch is any change among the three classes except upper to
///   lower (a camel-case word start); at least a fifth of the adjacent pairs must be switches
///   (a random 40-byte base64 token falls below that about once in a thousand).
/// - A path (`com/torvalds/linux/blob/<sha1>/arch`) mixes words and digests: a piece with a `/`
///   whose `/`-separated segments are each plain (see `is_plain_segment`) is not reported.
fn looks_random(piece: &[u8]) -> bool {
    if switches(piece) * 5 < piece.len() - 1 {
        return false;
    }
    !(piece.contains(&b'/') && piece.split(|&b| b == b'/').all(is_plain_segment))
}

/// Adjacent pairs that switch among lower case, upper case and digits, other than upper to
/// lower.
fn switches(bytes: &[u8]) -> usize {
    bytes
        .windows(2)
        .filter(|pair| match (class(pair[0]), class(pair[1])) {
            (Some(a), Some(b)) => a != b && !(a == Class::Upper && b == Class::Lower),
            _ => false,
        })
        .count()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Lower,
    Upper,
    Digit,
}

fn class(b: u8) -> Option<Class> {
    match b {
        b'a'..=b'z' => Some(Class::Lower),
        b'A'..=b'Z' => Some(Class::Upper),
        b'0'..=b'9' => Some(Class::Digit),
        _ => None,
    }
}

/// A path segment that is not random: without both cases (a word, an upper-case constant, a
/// hex digest) or with few class switches (`CMakeDetermineCompilerId`, `bzImage`).
fn is_plain_segment(segment: &[u8]) -> bool {
    let has_lower = segment.iter().any(u8::is_ascii_lowercase);
    let has_upper = segment.iter().any(u8::is_ascii_uppercase);
    !(has_lower && has_upper) || switches(segment) * 5 < segment.len() - 1
}

/// Shannon entropy of `bytes` in bits per byte (0 for an empty slice).
pub fn shannon_entropy(bytes: &[u8]) -> f64 {
    if bytes.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &b in bytes {
        counts[usize::from(b)] += 1;
    }
    let n = bytes.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests;
