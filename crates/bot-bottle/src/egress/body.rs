//! Copying HTTP/1.1 messages by their framing: heads read line by line with a size limit,
//! bodies by `Content-Length` or chunked coding, and nothing after them (what follows belongs
//! to the next message, or is refused).

use std::io;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::http::BodyFraming;

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

/// Copies a message body delimited by `framing`, and nothing after it; each piece is written
/// as it arrives (a streamed response reaches the agent chunk by chunk).
pub(crate) async fn forward<R, W>(
    body: &mut R,
    upstream: &mut W,
    framing: BodyFraming,
) -> io::Result<()>
where
    R: tokio::io::AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match framing {
        BodyFraming::None => Ok(()),
        BodyFraming::Length(len) => {
            let copied = tokio::io::copy_buf(&mut body.take(len), upstream).await?;
            if copied < len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "body cut short",
                ));
            }
            Ok(())
        }
        BodyFraming::Chunked => loop {
            let line = read_line(body).await?;
            upstream.write_all(&line).await?;
            let size_text = std::str::from_utf8(&line)
                .ok()
                .and_then(|l| l.trim_end().split(';').next())
                .map(str::trim)
                .unwrap_or("");
            let size = u64::from_str_radix(size_text, 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                // Trailer lines up to and including the empty line.
                loop {
                    let trailer = read_line(body).await?;
                    upstream.write_all(&trailer).await?;
                    if trailer == b"\r\n" || trailer == b"\n" {
                        return Ok(());
                    }
                }
            }
            // Chunk data plus its CRLF.
            let want = size + 2;
            let copied = tokio::io::copy_buf(&mut (&mut *body).take(want), upstream).await?;
            if copied < want {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "chunk cut short",
                ));
            }
        },
    }
}

/// One line including its `\n`, at most [`MAX_CHUNK_LINE`] bytes.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let n = (&mut *reader)
        .take(MAX_CHUNK_LINE as u64)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 || !line.ends_with(b"\n") {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "bad chunk line"));
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    #[tokio::test]
    async fn forward_body_chunked_stops_after_last_chunk() {
        let input = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-T: 1\r\n\r\nGET http://evil.test/ HTTP/1.1\r\n\r\n";
        let mut reader = BufReader::new(&input[..]);
        let mut out = Vec::new();

        forward(&mut reader, &mut out, BodyFraming::Chunked)
            .await
            .unwrap();

        assert_eq!(out, b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-T: 1\r\n\r\n");
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
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
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
