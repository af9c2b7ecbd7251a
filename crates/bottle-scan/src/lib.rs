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
//! host); the egress proxy scans the requests it sees inside (plain HTTP and intercepted hosts)
//! before they go up (`[egress] secrets`).
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
/// length, the hex SHA-256 of the value and a 32-bit rolling-hash hint.
///
/// The hint lets the scanner skip the SHA-256 of every window whose rolling hash differs (one
/// multiply-add per byte instead of a digest per byte, so a 1 MiB request body costs about a
/// millisecond per credential length). It tells an offline guesser no more than the SHA-256
/// already lets them check.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fingerprint {
    /// The credential's name, e.g. `ANTHROPIC_API_KEY`; used in the rule name.
    pub name: String,
    /// Length of the value in bytes.
    pub len: usize,
    /// SHA-256 of the value, hex (64 digits).
    pub sha256: String,
    /// The top 32 bits of the value's [`rolling_hash`]; absent (older fingerprints): every
    /// window of this length is digested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<u32>,
}

/// Base of the polynomial rolling hash (odd, so multiplication by it is invertible mod 2^64).
const ROLLING_BASE: u64 = 0x0000_0100_0000_01b3;

/// The polynomial hash `sum(b[i] * BASE^(n-1-i)) mod 2^64` of `bytes`.
pub fn rolling_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0u64, |h, &b| {
        h.wrapping_mul(ROLLING_BASE).wrapping_add(u64::from(b))
    })
}

fn hint_of(hash: u64) -> u32 {
    (hash >> 32) as u32
}

impl Fingerprint {
    /// The fingerprint of `value` under `name`. The value itself is not kept.
    pub fn of(name: &str, value: &str) -> Fingerprint {
        Fingerprint {
            name: name.to_owned(),
            len: value.len(),
            sha256: hex::encode(Sha256::digest(value.as_bytes())),
            hint: Some(hint_of(rolling_hash(value.as_bytes()))),
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
    /// The rolling-hash hints of the group; `None` when a fingerprint has none (then every
    /// window is digested).
    hints: Option<Vec<u32>>,
    /// `BASE^len mod 2^64`: what the byte leaving the window weighs.
    base_pow: u64,
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
    /// Longest run the `high-entropy` rule judges (longer ones are data, not tokens).
    max_entropy_run: usize,
    /// Credentials searched by value (see [`Scanner::with_values`]): each name with a
    /// substring finder for its value.
    values: Vec<(String, memchr::memmem::Finder<'static>)>,
}

impl fmt::Debug for Scanner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names and lengths only; digests are left out too, to keep logs short.
        let mut creds: Vec<(&str, usize)> = self
            .fingerprints
            .iter()
            .map(|fp| (fp.name.as_str(), fp.len))
            .collect();
        creds.extend(
            self.values
                .iter()
                .map(|(name, finder)| (name.as_str(), finder.needle().len())),
        );
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
        type Group = (HashMap<[u8; 32], Vec<usize>>, Option<Vec<u32>>);
        let mut by_len: HashMap<usize, Group> = HashMap::new();
        for (i, fp) in fingerprints.iter().enumerate() {
            let digest = fp.digest()?;
            let (digests, hints) = by_len
                .entry(fp.len)
                .or_insert_with(|| (HashMap::new(), Some(Vec::new())));
            digests.entry(digest).or_default().push(i);
            match (fp.hint, hints.as_mut()) {
                (Some(hint), Some(hints)) => hints.push(hint),
                _ => *hints = None,
            }
        }
        let mut groups: Vec<LengthGroup> = by_len
            .into_iter()
            .map(|(len, (digests, hints))| LengthGroup {
                len,
                digests,
                hints,
                base_pow: (0..len).fold(1u64, |p, _| p.wrapping_mul(ROLLING_BASE)),
            })
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
            max_entropy_run: usize::MAX,
            values: Vec::new(),
        })
    }

    /// Also finds these credentials by value (rule `credential <NAME>`), at the speed of a
    /// substring search rather than a rolling hash: for a process that holds the values
    /// anyway (the egress proxy, which injects them). The scanner keeps them in its finders
    /// and never prints them (its `Debug` shows names only). Empty values are ignored. Where
    /// two values overlap (`Bearer <token>` and `<token>`), the longer one found first wins.
    ///
    /// One SIMD substring search per value (a bottle has a few): a multi-pattern automaton
    /// reads random data (a base64 upload) a hundred times slower.
    pub fn with_values(mut self, values: &[(&str, &str)]) -> Scanner {
        self.values = values
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(n, v)| {
                (
                    (*n).to_owned(),
                    memchr::memmem::Finder::new(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        self
    }

    /// Judges only runs of at most `max` bytes by the `high-entropy` rule (default: any
    /// length). The egress proxy sets it: a request body may carry a base64 image or archive,
    /// which is data, not a token; credentials and token formats are found at any length.
    pub fn with_max_entropy_run(mut self, max: usize) -> Scanner {
        self.max_entropy_run = max;
        self
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

        // One pass of the union over the line; each match is then named by the first rule (in
        // priority order) that matches there. A rule before it cannot match at that start
        // (the union is leftmost-first, so it would have been chosen), and the rule chosen
        // ends where the union's match ends, so the search for the name is bounded by the
        // match itself: the line is read once however many rules there are.
        for m in self.any_rule.find_iter(line) {
            if covered.overlaps(m.start(), m.end()) {
                continue;
            }
            let upto = &line[..m.end()];
            let named = self.rules.iter().find(|(_, regex)| {
                regex
                    .find_at(upto, m.start())
                    .is_some_and(|r| r.start() == m.start())
            });
            if let Some((name, _)) = named {
                covered.insert(m.start(), m.end());
                findings.push(Finding {
                    rule: (*name).to_owned(),
                    start: m.start(),
                    end: m.end(),
                });
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
        for (i, line) in lines(text).enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            out.extend(self.scan_line(line).into_iter().map(|f| (i + 1, f)));
        }
        out
    }

    /// Findings in a whole text (lines end at `\n`), with byte ranges in the text rather than
    /// in a line: what a caller needs to overwrite them in place.
    pub fn scan_spans(&self, text: &[u8]) -> Vec<Finding> {
        let mut out = Vec::new();
        let mut at = 0;
        for line in lines(text) {
            let next = at + line.len() + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            out.extend(self.scan_line(line).into_iter().map(|f| Finding {
                start: f.start + at,
                end: f.end + at,
                ..f
            }));
            at = next;
        }
        out
    }

    fn scan_credentials(&self, line: &[u8], findings: &mut Vec<Finding>) {
        if !self.values.is_empty() {
            let mut found: Vec<(usize, usize, &str)> = Vec::new();
            for (name, finder) in &self.values {
                let len = finder.needle().len();
                found.extend(
                    finder
                        .find_iter(line)
                        .map(|at| (at, at + len, name.as_str())),
                );
            }
            // Leftmost, then longest; what overlaps an earlier one is the same secret.
            found.sort_by_key(|&(start, end, _)| (start, std::cmp::Reverse(end)));
            let mut reached = 0;
            for (start, end, name) in found {
                if start < reached {
                    continue;
                }
                reached = end;
                findings.push(Finding {
                    rule: format!("{CREDENTIAL_RULE_PREFIX}{name}"),
                    start,
                    end,
                });
            }
        }
        for group in &self.groups {
            if line.len() < group.len {
                // Groups are sorted by length: no longer one fits either.
                break;
            }
            let mut hash = rolling_hash(&line[..group.len]);
            for start in 0..=line.len() - group.len {
                if start > 0 {
                    // Slide by one: drop line[start - 1], take line[start + len - 1].
                    hash = hash
                        .wrapping_mul(ROLLING_BASE)
                        .wrapping_add(u64::from(line[start + group.len - 1]))
                        .wrapping_sub(group.base_pow.wrapping_mul(u64::from(line[start - 1])));
                }
                if let Some(hints) = &group.hints {
                    if !hints.contains(&hint_of(hash)) {
                        continue;
                    }
                }
                let window = &line[start..start + group.len];
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
                && piece.len() <= self.max_entropy_run
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

/// [`is_entropy_byte`] of every byte value, looked up rather than computed in the hot loops.
static ENTROPY_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=' | b'_' | b'-');
        b += 1;
    }
    table
};

/// The lines of `text` split at `\n` (found by SIMD search, not byte by byte), as
/// `text.split(|&b| b == b'\n')` gives them.
fn lines(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    let mut ends = memchr::memchr_iter(b'\n', text);
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        match ends.next() {
            Some(end) => {
                let line = &text[start..end];
                start = end + 1;
                Some(line)
            }
            None => {
                done = true;
                Some(&text[start..])
            }
        }
    })
}

fn is_entropy_byte(b: u8) -> bool {
    ENTROPY_BYTES[usize::from(b)]
}

/// The candidate ranges of the entropy rule: maximal runs of [`is_entropy_byte`] of at least
/// [`MIN_ENTROPY_RUN`] bytes, split at any `=` that is not trailing padding (`KEY=value` is two
/// pieces, `abc==` one). Pieces of shorter runs could never be reported, so they are not made.
fn entropy_pieces(line: &[u8]) -> Vec<(usize, usize)> {
    let mut pieces = Vec::new();
    for (i, run_end) in long_runs(line, MIN_ENTROPY_RUN) {
        // Trailing padding belongs to the last piece.
        let padding = line[i..run_end]
            .iter()
            .rev()
            .take_while(|&&b| b == b'=')
            .count();
        let body_end = run_end - padding;
        let mut start = i;
        for j in memchr::memchr_iter(b'=', &line[i..body_end]).map(|j| i + j) {
            if start < j {
                pieces.push((start, j));
            }
            start = j + 1;
        }
        if start < body_end {
            pieces.push((start, run_end));
        }
    }
    pieces
}

/// The end of the run of [`is_entropy_byte`] through `from`: whole 16-byte blocks are tested
/// without a branch per byte (a base64 blob is one long run), then the rest byte by byte.
fn run_end(line: &[u8], from: usize) -> usize {
    let mut i = from;
    while let Some(block) = line.get(i..i + 16) {
        if !block.iter().fold(true, |all, &b| all & is_entropy_byte(b)) {
            break;
        }
        i += 16;
    }
    line[i..]
        .iter()
        .position(|&b| !is_entropy_byte(b))
        .map_or(line.len(), |n| i + n)
}

/// The maximal runs of [`is_entropy_byte`] of at least `min` bytes, found by looking at every
/// `min`-th byte only: a run that long contains one of them, and a byte outside every run rules
/// out all runs through it. Ordinary text (words, identifiers, short numbers) is skipped at
/// about a fifth of a byte test per byte.
fn long_runs(line: &[u8], min: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    let min = min.max(1);
    let mut probe = min - 1;
    // Where the previous run ended: a run found now cannot start before it.
    let mut floor = 0;
    std::iter::from_fn(move || {
        while probe < line.len() {
            if !is_entropy_byte(line[probe]) {
                probe += min;
                continue;
            }
            let mut start = probe;
            while start > floor && is_entropy_byte(line[start - 1]) {
                start -= 1;
            }
            let end = run_end(line, probe);
            // line[end] is outside every run: the next run starts after it, and contains the
            // first probe of `end`'s residue after it.
            floor = end;
            probe = end + min;
            if end - start >= min {
                return Some((start, end));
            }
        }
        None
    })
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
