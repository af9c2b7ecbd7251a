//! Copying HTTP/1.1 messages by their framing: heads read line by line with a size limit,
//! bodies by `Content-Length` or chunked coding, and nothing after them (what follows belongs
//! to the next message, or is refused).

use std::io;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::http::{self, BodyFraming};

/// Longest chunk-size or trailer line accepted in a chunked body.
const MAX_CHUNK_LINE: usize = 4096;

/// Reads one message head up to and including its empty line, at most `max` bytes. `Ok(None)`:
/// the stream ended cleanly before a new message began. Empty lines before the start line are
/// skipped (RFC 9112 §2.2).
pub(crate) async fn read_head<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let room = (max + 1).saturating_sub(head.len()) as u64;
        let n = (&mut *reader)
            .take(room)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        if head.len() + line.len() > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "message head too large",
            ));
        }
        if !line.ends_with(b"\n") {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let blank = line == b"\r\n" || line == b"\n";
        if blank && head.is_empty() {
            continue;
        }
        head.extend_from_slice(&line);
        if blank {
            return Ok(Some(head));
        }
    }
}

/// Why a message body could not be copied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("cannot copy the message body")]
    Io(#[source] io::Error),
    #[error("the message body ended before its framing said it would")]
    CutShort,
    /// The sender broke RFC 9112's chunked coding: the message is refused, and the connection
    /// it was being forwarded on must not be used again.
    #[error("malformed chunked body: {0} (RFC 9112 section 7.1)")]
    Chunked(&'static str),
}

impl BodyError {
    /// A framing error (not an I/O failure or an early end): answered with `400`.
    pub(crate) fn is_framing(&self) -> bool {
        matches!(self, BodyError::Chunked(_))
    }
}

impl From<BodyError> for io::Error {
    fn from(e: BodyError) -> Self {
        match e {
            BodyError::Io(e) => e,
            BodyError::CutShort => io::Error::new(io::ErrorKind::UnexpectedEof, e),
            BodyError::Chunked(_) => io::Error::new(io::ErrorKind::InvalidData, e),
        }
    }
}

/// Most hex digits a chunk size may have (16 fill a `u64`; leading zeros count).
const MAX_CHUNK_SIZE_DIGITS: usize = 16;
/// Largest chunk accepted (1 GiB): far above what clients send, far below any overflow.
const MAX_CHUNK_BYTES: u64 = 1 << 30;
/// Most trailer lines, and bytes of trailer section, after the last chunk.
const MAX_TRAILER_LINES: usize = 100;
const MAX_TRAILER_BYTES: usize = 16 * 1024;
/// Chunks up to this size are held until their closing CRLF is seen, then forwarded whole.
const CHUNK_HOLD: usize = 64 * 1024;

/// Copies a message body delimited by `framing`, and nothing after it; each piece is written
/// as it arrives (a streamed response reaches the agent chunk by chunk).
///
/// A chunked body is checked strictly (RFC 9112 §7.1) and each piece is written only once it
/// is checked: a chunk-size line (1 to 16 hex digits, at most [`MAX_CHUNK_BYTES`], extensions
/// of the RFC's grammar, CRLF) goes on as the bare size, extensions dropped; a chunk of up to
/// [`CHUNK_HOLD`] bytes once its closing CRLF is seen, a larger one as it arrives (its CRLF
/// checked before it goes on); the trailer section once all of it is read and valid. Anything else (a sign, whitespace before the size, bare LF or CR, a missing CRLF
/// after the data) is [`BodyError::Chunked`].
pub(crate) async fn forward<R, W>(
    body: &mut R,
    out: &mut W,
    framing: BodyFraming,
) -> Result<(), BodyError>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match framing {
        BodyFraming::None => Ok(()),
        BodyFraming::Length(len) => copy_exactly(body, out, len).await,
        BodyFraming::Chunked => loop {
            let line = read_line(body).await?;
            let size = chunk_size(&line)?;
            let mut piece = format!("{size:x}\r\n").into_bytes();
            if size == 0 {
                piece.extend_from_slice(&read_trailers(body).await?);
                return out.write_all(&piece).await.map_err(BodyError::Io);
            }
            match usize::try_from(size).ok().filter(|&n| n <= CHUNK_HOLD) {
                // A small chunk goes on whole, once its CRLF is seen.
                Some(n) => {
                    let start = piece.len();
                    piece.resize(start + n + 2, 0);
                    read_exactly(body, &mut piece[start..]).await?;
                    if !piece.ends_with(b"\r\n") {
                        return Err(BodyError::Chunked("chunk data not followed by CRLF"));
                    }
                    out.write_all(&piece).await.map_err(BodyError::Io)?;
                }
                // A large one streams; its CRLF is checked before it is forwarded.
                None => {
                    out.write_all(&piece).await.map_err(BodyError::Io)?;
                    copy_exactly(body, out, size).await?;
                    let mut end = [0u8; 2];
                    read_exactly(body, &mut end).await?;
                    if &end != b"\r\n" {
                        return Err(BodyError::Chunked("chunk data not followed by CRLF"));
                    }
                    out.write_all(&end).await.map_err(BodyError::Io)?;
                }
            }
        },
    }
}

/// Copies a message body's content (de-chunked, trailers dropped) delimited by `framing`,
/// checked as strictly as [`forward`] checks it: what a CGI program reads on its stdin.
pub(crate) async fn decode<R, W>(
    body: &mut R,
    out: &mut W,
    framing: BodyFraming,
) -> Result<(), BodyError>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match framing {
        BodyFraming::None => Ok(()),
        BodyFraming::Length(len) => copy_exactly(body, out, len).await,
        BodyFraming::Chunked => loop {
            let size = chunk_size(&read_line(body).await?)?;
            if size == 0 {
                read_trailers(body).await?;
                return Ok(());
            }
            copy_exactly(body, out, size).await?;
            let mut end = [0u8; 2];
            read_exactly(body, &mut end).await?;
            if &end != b"\r\n" {
                return Err(BodyError::Chunked("chunk data not followed by CRLF"));
            }
        },
    }
}

/// Fills `buf` from `body`; an early end is [`BodyError::CutShort`].
async fn read_exactly<R: AsyncBufRead + Unpin>(
    body: &mut R,
    buf: &mut [u8],
) -> Result<(), BodyError> {
    body.read_exact(buf)
        .await
        .map(|_| ())
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => BodyError::CutShort,
            _ => BodyError::Io(e),
        })
}

/// Copies exactly `len` bytes.
async fn copy_exactly<R, W>(body: &mut R, out: &mut W, len: u64) -> Result<(), BodyError>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let copied = tokio::io::copy_buf(&mut (&mut *body).take(len), out)
        .await
        .map_err(BodyError::Io)?;
    if copied < len {
        return Err(BodyError::CutShort);
    }
    Ok(())
}

/// One line including its `\n`, at most [`MAX_CHUNK_LINE`] bytes.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<Vec<u8>, BodyError> {
    let mut line = Vec::new();
    (&mut *reader)
        .take(MAX_CHUNK_LINE as u64)
        .read_until(b'\n', &mut line)
        .await
        .map_err(BodyError::Io)?;
    match line.last() {
        Some(b'\n') => Ok(line),
        _ if line.len() >= MAX_CHUNK_LINE => Err(BodyError::Chunked(
            "chunk-size or trailer line longer than 4096 bytes",
        )),
        _ => Err(BodyError::CutShort),
    }
}

/// The content of `line` before its CRLF; bare LF or CR anywhere is refused.
fn strip_crlf(line: &[u8]) -> Result<&[u8], BodyError> {
    let content = line
        .strip_suffix(b"\r\n")
        .ok_or(BodyError::Chunked("line not ended by CRLF (bare LF)"))?;
    if content.iter().any(|&b| b == b'\r' || b == b'\n') {
        return Err(BodyError::Chunked("bare CR or LF inside a line"));
    }
    Ok(content)
}

/// The size on a chunk-size line: `chunk-size [ chunk-ext ] CRLF`.
fn chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    let content = strip_crlf(line)?;
    let digits = content.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(BodyError::Chunked(
            "a chunk size must start with a hex digit (no sign, no whitespace)",
        ));
    }
    if digits > MAX_CHUNK_SIZE_DIGITS {
        return Err(BodyError::Chunked("chunk size of more than 16 hex digits"));
    }
    let size = content[..digits]
        .iter()
        .try_fold(0u64, |acc, &b| {
            let digit = char::from(b).to_digit(16).map(u64::from)?;
            acc.checked_mul(16)?.checked_add(digit)
        })
        .ok_or(BodyError::Chunked("chunk size does not fit 64 bits"))?;
    if size > MAX_CHUNK_BYTES {
        return Err(BodyError::Chunked("chunk larger than 1 GiB"));
    }
    chunk_extensions(&content[digits..])?;
    Ok(size)
}

/// `*( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] )`.
fn chunk_extensions(mut rest: &[u8]) -> Result<(), BodyError> {
    let bad = BodyError::Chunked;
    while !rest.is_empty() {
        rest = skip_bws(rest)
            .strip_prefix(b";")
            .ok_or(bad("expected `;` before a chunk extension"))?;
        rest = skip_bws(rest);
        let name = token_len(rest);
        if name == 0 {
            return Err(bad("chunk extension without a name"));
        }
        rest = &rest[name..];
        if let Some(value) = skip_bws(rest).strip_prefix(b"=") {
            let value = skip_bws(value);
            let len = if value.first() == Some(&b'"') {
                quoted_string_len(value).ok_or(bad("malformed quoted chunk extension value"))?
            } else {
                token_len(value)
            };
            if len == 0 {
                return Err(bad("chunk extension `=` without a value"));
            }
            rest = &value[len..];
        }
    }
    Ok(())
}

fn skip_bws(bytes: &[u8]) -> &[u8] {
    let n = bytes
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    &bytes[n..]
}

fn token_len(bytes: &[u8]) -> usize {
    bytes.iter().take_while(|&&b| http::is_tchar(b)).count()
}

/// Length of the quoted-string at the start of `bytes` (RFC 9110 §5.6.4), quotes included.
fn quoted_string_len(bytes: &[u8]) -> Option<usize> {
    let text = |b: u8| b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80;
    let mut i = 1;
    loop {
        match *bytes.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' if bytes.get(i + 1).is_some_and(|&b| text(b)) => i += 2,
            b if text(b) && b != b'\\' => i += 1,
            _ => return None,
        }
    }
}

/// The trailer section up to and including its empty line, each line checked as a header
/// field line (`name ":" value`, no obsolete line folding), bounded in lines and bytes.
async fn read_trailers<R: AsyncBufRead + Unpin>(body: &mut R) -> Result<Vec<u8>, BodyError> {
    let mut section = Vec::new();
    for _ in 0..=MAX_TRAILER_LINES {
        let line = read_line(body).await?;
        let content = strip_crlf(&line)?;
        section.extend_from_slice(&line);
        if content.is_empty() {
            return Ok(section);
        }
        if section.len() > MAX_TRAILER_BYTES {
            return Err(BodyError::Chunked("trailer section larger than 16 KiB"));
        }
        let name = token_len(content);
        let value = content[name..]
            .strip_prefix(b":")
            .filter(|_| name > 0)
            .ok_or(BodyError::Chunked("trailer line is not `name: value`"))?;
        let printable =
            |b: &u8| *b == b'\t' || *b == b' ' || (0x21..=0x7e).contains(b) || *b >= 0x80;
        if !value.iter().all(printable) {
            return Err(BodyError::Chunked("control character in a trailer value"));
        }
    }
    Err(BodyError::Chunked("more than 100 trailer lines"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    #[tokio::test]
    async fn forward_body_chunked_stops_after_last_chunk_and_drops_extensions() {
        let input = b"4\r\nWiki\r\n5;ext=1;q=\"a \\\"b\" ; x\r\npedia\r\n0\r\nX-T: 1\r\n\r\nGET http://evil.test/ HTTP/1.1\r\n\r\n";
        let mut reader = BufReader::new(&input[..]);
        let mut out = Vec::new();

        forward(&mut reader, &mut out, BodyFraming::Chunked)
            .await
            .unwrap();

        assert_eq!(out, b"4\r\nWiki\r\n5\r\npedia\r\n0\r\nX-T: 1\r\n\r\n");
    }

    /// Forwards `input` as a chunked body; returns the error and what was written before it.
    async fn refused(input: &[u8]) -> (BodyError, Vec<u8>) {
        let mut out = Vec::new();
        let err = forward(&mut BufReader::new(input), &mut out, BodyFraming::Chunked)
            .await
            .unwrap_err();
        (err, out)
    }

    #[tokio::test]
    async fn a_chunk_size_line_is_checked_before_anything_of_it_is_forwarded() {
        for line in [
            &b"ffffffffffffffff\r\n"[..],
            b"10000000000000000\r\n",
            b"00000000000000005\r\n",
            b"40000001\r\n",
            b"+5\r\n",
            b"-5\r\n",
            b" 5\r\n",
            b"5 \r\n",
            b"0x5\r\n",
            b"\r\n",
            b"5\n",
            b"5\r\r\n",
            b"5;\r\n",
            b"5;a=\r\n",
            b"5;a\nb\r\n",
            b"5;a=\"unterminated\r\n",
            b"5;a=b c\r\n",
            b"5,a\r\n",
        ] {
            let mut input = line.to_vec();
            input.extend_from_slice(b"hello\r\n0\r\n\r\n");

            let (err, out) = refused(&input).await;

            assert!(
                err.is_framing(),
                "{:?}: {err:?}",
                String::from_utf8_lossy(line)
            );
            assert_eq!(out, b"", "{:?}", String::from_utf8_lossy(line));
        }
    }

    #[tokio::test]
    async fn chunk_data_must_end_with_crlf() {
        let (err, out) = refused(b"3\r\nabcXY0\r\n\r\n").await;

        assert!(err.is_framing(), "{err:?}");
        assert_eq!(out, b"");
    }

    #[tokio::test]
    async fn a_malformed_trailer_section_is_refused_and_never_forwarded() {
        for trailer in [
            &b"X-T: 1\n\r\n"[..],
            b"X-T: 1\r\n\n",
            b" folded\r\n\r\n",
            b"No-colon\r\n\r\n",
            b": empty-name\r\n\r\n",
            b"X-T: a\x00b\r\n\r\n",
        ] {
            let mut input = b"0\r\n".to_vec();
            input.extend_from_slice(trailer);

            let (err, out) = refused(&input).await;

            assert!(
                err.is_framing(),
                "{:?}: {err:?}",
                String::from_utf8_lossy(trailer)
            );
            assert_eq!(out, b"");
        }
    }

    #[tokio::test]
    async fn a_body_ending_early_is_cut_short_not_a_framing_error() {
        let (err, _) = refused(b"5\r\nhel").await;

        assert!(matches!(err, BodyError::CutShort), "{err:?}");
    }

    #[tokio::test]
    async fn forward_body_length_stops_at_content_length() {
        let mut reader = BufReader::new(&b"helloGET /next"[..]);
        let mut out = Vec::new();

        forward(&mut reader, &mut out, BodyFraming::Length(5))
            .await
            .unwrap();

        assert_eq!(out, b"hello");
    }

    #[tokio::test]
    async fn forward_body_rejects_bad_chunk_size() {
        let mut reader = BufReader::new(&b"zz\r\nabc\r\n"[..]);
        let err = forward(&mut reader, &mut Vec::new(), BodyFraming::Chunked)
            .await
            .unwrap_err();
        assert!(err.is_framing(), "{err:?}");
    }

    #[tokio::test]
    async fn heads_are_read_one_at_a_time_and_a_clean_end_is_none() {
        let input = b"\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        let mut reader = BufReader::new(&input[..]);

        let a = read_head(&mut reader, 1024).await.unwrap().unwrap();
        let b = read_head(&mut reader, 1024).await.unwrap().unwrap();
        let end = read_head(&mut reader, 1024).await.unwrap();

        assert_eq!(a, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(b, b"GET /b HTTP/1.1\r\n\r\n");
        assert_eq!(end, None);
    }

    #[tokio::test]
    async fn a_head_past_its_limit_or_cut_short_is_an_error() {
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(100));
        let err = read_head(&mut BufReader::new(long.as_bytes()), 64)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let err = read_head(&mut BufReader::new(&b"GET / HTTP/1.1\r\nHost"[..]), 64)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
