//! Which protocol a stream through the waypoint speaks, by Istio's rules: a service port's
//! declared protocol (`appProtocol`, or the prefix of its name) when there is one; otherwise the
//! first bytes the client sends: an HTTP/1.x request line or the HTTP/2 connection preface make
//! it HTTP, anything else (or nothing within the detection timeout: a server-first protocol) is
//! relayed as opaque TCP.
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::model::PortProtocol;

/// What a stream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Detected {
    Http1,
    Http2,
    Opaque,
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A request line longer than this is not one we wait for.
const MAX_REQUEST_LINE: usize = 8 * 1024;
/// How long a client has to send its first bytes before the stream is taken as opaque.
pub const DETECTION_TIMEOUT: Duration = Duration::from_millis(100);

/// The protocol a declared port protocol settles without reading; `None`: detect.
pub fn declared(port: PortProtocol) -> Option<Detected> {
    match port {
        PortProtocol::Http => Some(Detected::Http1),
        PortProtocol::Http2 => Some(Detected::Http2),
        PortProtocol::Tcp => Some(Detected::Opaque),
        PortProtocol::Unspecified => None,
    }
}

/// Classifies the first bytes of a stream; `None` while they could still become either.
pub fn classify(prefix: &[u8]) -> Option<Detected> {
    if prefix.is_empty() {
        return None;
    }
    let n = prefix.len().min(H2_PREFACE.len());
    if prefix[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Detected::Http2);
    }
    request_line(prefix)
}

/// `METHOD SP request-target SP HTTP/1.x CRLF` (RFC 9112 §3), checked as far as it has come.
fn request_line(prefix: &[u8]) -> Option<Detected> {
    let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    let line_end = prefix.iter().position(|&b| b == b'\n');
    let line = &prefix[..line_end.unwrap_or(prefix.len())];
    let method_len = line.iter().take_while(|&&b| is_tchar(b)).count();
    if method_len == 0 || method_len > 32 {
        return Some(Detected::Opaque);
    }
    let rest = line.get(method_len..)?;
    if rest.is_empty() {
        return line_end.map(|_| Detected::Opaque);
    }
    if rest[0] != b' ' {
        return Some(Detected::Opaque);
    }
    let rest = &rest[1..];
    let target_len = rest.iter().take_while(|&&b| b > b' ' && b != 0x7f).count();
    let after_target = &rest[target_len..];
    let waiting = |ok: bool| (!ok || prefix.len() >= MAX_REQUEST_LINE).then_some(Detected::Opaque);
    if line_end.is_none() {
        // Still inside the line: what follows the target must be the start of ` HTTP/1.x\r`.
        return match after_target.split_first() {
            None => waiting(true),
            Some((b' ', version)) => waiting(
                [&b"HTTP/1.1\r"[..], b"HTTP/1.0\r"]
                    .iter()
                    .any(|full| full.starts_with(version)),
            ),
            Some(_) => Some(Detected::Opaque),
        };
    }
    let version = after_target
        .strip_prefix(b" ")
        .map(|v| v.strip_suffix(b"\r").unwrap_or(v));
    match version {
        Some(b"HTTP/1.1" | b"HTTP/1.0") if target_len > 0 => Some(Detected::Http1),
        _ => Some(Detected::Opaque),
    }
}

/// Reads the first bytes of `io` until they classify, the detection timeout passes or the
/// client half-closes; returns them (to be replayed) and the verdict.
pub async fn sniff<IO>(io: &mut IO, timeout: Duration) -> io::Result<(Bytes, Detected)>
where
    IO: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(verdict) = classify(&buf) {
            return Ok((buf.freeze(), verdict));
        }
        if buf.len() >= MAX_REQUEST_LINE {
            return Ok((buf.freeze(), Detected::Opaque));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => return Ok((buf.freeze(), Detected::Opaque)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// For a port declared HTTP: HTTP/2 when the client starts with the connection preface (h2c
/// with prior knowledge, as gRPC clients do), else HTTP/1.x, as Envoy's automatic codec
/// choice does on Istio's HTTP ports. A client silent for `timeout` is taken as HTTP/1.x (the
/// HTTP/1 server's own header timeout then applies).
pub async fn sniff_http_version<IO>(io: &mut IO, timeout: Duration) -> io::Result<(Bytes, Detected)>
where
    IO: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(H2_PREFACE.len());
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(verdict) = http_version(&buf) {
            return Ok((buf.freeze(), verdict));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => return Ok((buf.freeze(), Detected::Http1)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// HTTP/2 or HTTP/1.x by the preface; `None` while the bytes so far are a prefix of it.
fn http_version(prefix: &[u8]) -> Option<Detected> {
    let n = prefix.len().min(H2_PREFACE.len());
    if prefix[..n] != H2_PREFACE[..n] {
        Some(Detected::Http1)
    } else if n == H2_PREFACE.len() {
        Some(Detected::Http2)
    } else {
        None
    }
}

/// `io` with bytes already read from it put back in front.
pub struct Rewind<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO> Rewind<IO> {
    pub fn new(prefix: Bytes, io: IO) -> Self {
        Rewind { prefix, io }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
