//! HBONE: HTTP/2 `CONNECT` tunnels over an already-established (mutual) TLS stream, as Istio's
//! ztunnel speaks it (Istio 1.24+; see ARCHITECTURE.md, "Identity and HBONE").
//!
//! This module is only the protocol layer: certificates, peer verification, identities, policy and
//! network namespaces belong to the caller, which hands in a ready TLS stream.
//!
//! * Client side, [`HbonePool`]: pooled HTTP/2 connections keyed by [`PoolKey`]; one dial per
//!   needed connection (concurrent callers wait for a dial in progress instead of each dialing),
//!   at most [`H2Settings::max_streams_per_conn`] streams per connection (and never more than the
//!   peer allows), keepalive PINGs, idle connections closed after [`H2Settings::idle_timeout`].
//! * Server side, [`serve_connection`]: one task per `CONNECT` stream, answered through
//!   [`InboundRequest::accept`] (200 and a tunnel) or [`InboundRequest::reject`] (400/401/503…).
//! * [`H2Stream`]: one tunnel as a byte stream (`AsyncRead + AsyncWrite`), flow-controlled both
//!   ways, with half-close, ready for `tokio::io::copy_bidirectional_with_sizes`.
//!
//! Headers, as ztunnel sends and reads them (matched against ztunnel commit 62d82653, master
//! after 1.31.0-alpha.0):
//!
//! * request `:authority`: `<ip>:<port>` (`[v6]:port`); the server also takes
//!   `<service host name>:<service port>` (ztunnel sends that through an east-west gateway), see
//!   [`ConnectTarget`];
//! * request `forwarded`: `for="<ip>:<port>"` (`for="[v6]:port"`), and `;host=<service host
//!   name>` (unquoted) when the client dialed a service, e.g.
//!   `for="10.0.0.1:40000";host=web.default.svc.cluster.local`;
//! * request `baggage`: the source's names; the 200 answering it carries the destination's
//!   ([`Baggage`]);
//! * request `traceparent`: W3C trace context (generated when not given).
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Request, StatusCode};

mod baggage;
mod pool;
mod server;
mod stream;
#[cfg(test)]
mod tests;

pub use baggage::Baggage;
pub use pool::{HbonePool, PoolKey};
pub use server::{
    connect_target, forwarded_for, forwarded_host, serve_connection, serve_connection_until,
    ConnectTarget, InboundRequest,
};
pub use stream::H2Stream;

const MIB: u32 = 1024 * 1024;

/// HTTP/2 settings for both sides of HBONE.
///
/// The defaults follow ztunnel's tuning: 4 MiB stream window, 16 MiB connection
/// window, 1 MiB frames, 64 KiB header lists, no push, a keepalive PING every 10 s that must be
/// answered within 20 s, at most 100 streams per pooled connection, idle pooled connections
/// released after 5 minutes.
///
/// Measured with the `throughput` test (one tunnel, TLS 1.3 over loopback, release build, 2
/// cores shared by both ends): with h2's defaults (64 KiB windows, 16 KiB frames) a tunnel
/// manages ~800 MB/s on bare loopback but only ~15 MB/s once the path has a 2 ms RTT; with these
/// windows ~900-1800 MB/s and ~400-480 MB/s (CPU-bound, not window-bound). A 1 MiB stream window
/// halves the 2 ms RTT figure. The per-stream send buffer (400 KB, as hyper and ztunnel use)
/// measured as good as 1 MiB or 4 MiB, and bounds memory to 400 KB per stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct H2Settings {
    /// SETTINGS_INITIAL_WINDOW_SIZE: how much the peer may send on one stream before we read it.
    pub stream_window: u32,
    /// Connection-level receive window (all streams of one connection together).
    pub connection_window: u32,
    /// SETTINGS_MAX_FRAME_SIZE we accept (16 KiB ..= 16 MiB - 1).
    pub max_frame_size: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE we accept.
    pub max_header_list_size: u32,
    /// How much data one stream may queue inside h2 before a write waits for the socket.
    pub max_send_buffer_size: usize,
    /// Keepalive PING period; `None` disables keepalive.
    pub keepalive_interval: Option<Duration>,
    /// A PING not answered within this time kills the connection.
    pub keepalive_timeout: Duration,
    /// Client: streams per pooled connection before another connection is dialed.
    pub max_streams_per_conn: usize,
    /// Server: SETTINGS_MAX_CONCURRENT_STREAMS advertised to clients.
    pub max_concurrent_streams: u32,
    /// Client: a pooled connection without streams for this long is closed.
    pub idle_timeout: Duration,
    /// Server: time allowed for the client's HTTP/2 preface and SETTINGS.
    pub handshake_timeout: Duration,
    /// h2's budget (bytes) for buffered small DATA frames per connection; when a peer exceeds it
    /// the connection is closed with ENHANCE_YOUR_CALM. `None`: h2's default, half the
    /// connection window.
    pub data_frame_budget: Option<usize>,
    /// Server: streams the client reset before we accepted them (the "rapid reset" flood,
    /// CVE-2023-44487); past this many at once the connection is closed with GOAWAY
    /// ENHANCE_YOUR_CALM.
    pub max_pending_accept_reset_streams: usize,
    /// Streams reset by us kept in memory to recognise their late frames.
    pub max_concurrent_reset_streams: usize,
    /// Streams we may reset because the peer misbehaved, before the connection is closed with
    /// ENHANCE_YOUR_CALM (a peer provoking resets in a loop).
    pub max_local_error_reset_streams: usize,
    /// Callers that may wait at once for a stream to one peer (a connection being dialed or a
    /// full one); past it a new caller fails at once ([`HboneError::PoolFull`]) instead of
    /// queueing without bound behind a peer that does not answer.
    pub max_waiters_per_peer: usize,
}

impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            stream_window: 4 * MIB,
            connection_window: 16 * MIB,
            max_frame_size: MIB,
            max_header_list_size: 64 * 1024,
            max_send_buffer_size: 400 * 1024,
            keepalive_interval: Some(Duration::from_secs(10)),
            keepalive_timeout: Duration::from_secs(20),
            max_streams_per_conn: 100,
            max_concurrent_streams: 200,
            idle_timeout: Duration::from_secs(300),
            handshake_timeout: Duration::from_secs(10),
            data_frame_budget: None,
            max_pending_accept_reset_streams: 20,
            max_concurrent_reset_streams: 50,
            max_local_error_reset_streams: 1024,
            max_waiters_per_peer: 1024,
        }
    }
}

impl H2Settings {
    pub(crate) fn client_builder(&self) -> h2::client::Builder {
        let mut b = h2::client::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_header_list_size(self.max_header_list_size)
            .max_send_buffer_size(self.max_send_buffer_size)
            .max_concurrent_reset_streams(self.max_concurrent_reset_streams)
            .max_pending_accept_reset_streams(self.max_pending_accept_reset_streams)
            .max_local_error_reset_streams(Some(self.max_local_error_reset_streams))
            .enable_push(false);
        if let Some(budget) = self.data_frame_budget {
            b.data_frame_budget(budget);
        }
        b
    }

    pub(crate) fn server_builder(&self) -> h2::server::Builder {
        let mut b = h2::server::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_header_list_size(self.max_header_list_size)
            .max_send_buffer_size(self.max_send_buffer_size)
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_pending_accept_reset_streams(self.max_pending_accept_reset_streams)
            .max_concurrent_reset_streams(self.max_concurrent_reset_streams)
            .max_local_error_reset_streams(Some(self.max_local_error_reset_streams));
        if let Some(budget) = self.data_frame_budget {
            b.data_frame_budget(budget);
        }
        b
    }
}

/// What the client puts in a `CONNECT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The tunnel's target: `:authority` = `ip:port` (`[v6]:port`).
    pub authority: SocketAddr,
    /// The original client: `forwarded: for="ip:port"` (`for="[v6]:port"`).
    pub forwarded_for: SocketAddr,
    /// The host name of the service the client dialed, sent as `;host=` in `forwarded` (as
    /// ztunnel does for service traffic), so the destination can name the service in its
    /// metrics.
    pub forwarded_host: Option<String>,
    /// The source's names, sent as `baggage` when present: a header value, as
    /// [`Baggage::header_value`] writes it (kept as text, so that the request stays small in the
    /// futures that carry it).
    pub baggage: Option<String>,
    /// W3C `traceparent`; when `None` a new one is generated (`00-<32 hex>-<16 hex>-01`).
    pub traceparent: Option<String>,
}

impl ConnectRequest {
    /// The HTTP/2 request for this tunnel. `traceparent` is the value to send (already generated
    /// when the caller gave none), so retries on another connection carry the same trace.
    pub(crate) fn to_http(&self, traceparent: &str) -> Result<Request<()>, HboneError> {
        let value = |name: &'static str, v: &str| {
            HeaderValue::from_str(v).map_err(|_| HboneError::InvalidHeader {
                name,
                value: v.chars().take(200).collect(),
            })
        };
        let forwarded_value = forwarded(self.forwarded_for, self.forwarded_host.as_deref());
        let mut b = Request::builder()
            .method(Method::CONNECT)
            .uri(authority(self.authority))
            .header("forwarded", value("forwarded", &forwarded_value)?)
            .header("traceparent", value("traceparent", traceparent)?);
        if let Some(baggage) = &self.baggage {
            b = b.header("baggage", value("baggage", baggage)?);
        }
        b.body(()).map_err(|e| HboneError::InvalidHeader {
            name: ":authority",
            value: e.to_string(),
        })
    }
}

/// `ip:port`, `[v6]:port` (without a zone id, which has no place in an authority).
fn authority(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V4(ip) => format!("{ip}:{}", addr.port()),
        IpAddr::V6(ip) => format!("[{ip}]:{}", addr.port()),
    }
}

/// `for="ip:port"` (`for="[v6]:port"`: RFC 7239 quotes anything with a colon), then
/// `;host=<host>` when given: a bare token as ztunnel sends a service host name, quoted when it
/// is not a token.
fn forwarded(addr: SocketAddr, host: Option<&str>) -> String {
    let mut value = format!("for=\"{}\"", authority(addr));
    if let Some(host) = host {
        value.push_str(";host=");
        if !host.is_empty() && host.bytes().all(is_tchar) {
            value.push_str(host);
        } else {
            value.push('"');
            for c in host.chars() {
                if c == '"' || c == '\\' {
                    value.push('\\');
                }
                value.push(c);
            }
            value.push('"');
        }
    }
    value
}

/// RFC 7230 `tchar`: what a token (an unquoted `forwarded` value) may hold.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// One `name=value` pair of a `forwarded` header, in any of its elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ForwardedPair<'a> {
    pub name: &'a str,
    /// Unquoted and unescaped.
    pub value: std::borrow::Cow<'a, str>,
}

/// The pairs of a `forwarded` header in order (RFC 7239): elements (one per proxy, the client's
/// first) separated by `,`, pairs by `;`, a
/// value a token or a quoted string (in which `,` and `;` are data and `\` escapes). Lenient
/// where that is harmless (spaces around separators and after `=`); a pair without `=` is
/// skipped; an unterminated quoted string ends the header (nothing after it can be read
/// reliably), as does junk right after a closing quote up to the next separator (skipped).
pub(crate) fn forwarded_pairs(value: &str) -> Vec<ForwardedPair<'_>> {
    use std::borrow::Cow;
    let b = value.as_bytes();
    let mut pairs = Vec::new();
    let mut i = 0;
    let skip_ows = |i: &mut usize| {
        while *i < b.len() && matches!(b[*i], b' ' | b'\t') {
            *i += 1;
        }
    };
    loop {
        skip_ows(&mut i);
        match b.get(i) {
            None => break,
            Some(b';' | b',') => {
                i += 1;
                continue;
            }
            Some(_) => {}
        }
        let start = i;
        while i < b.len() && !matches!(b[i], b'=' | b';' | b',') {
            i += 1;
        }
        let name = value[start..i].trim();
        if b.get(i) != Some(&b'=') {
            continue; // no value: skipped
        }
        i += 1;
        skip_ows(&mut i);
        let pair_value = if b.get(i) == Some(&b'"') {
            i += 1;
            let start = i;
            let mut escaped = false;
            let mut closed = false;
            while i < b.len() {
                match b[i] {
                    b'\\' => {
                        escaped = true;
                        i += 2;
                    }
                    b'"' => {
                        closed = true;
                        break;
                    }
                    _ => i += 1,
                }
            }
            if !closed {
                break;
            }
            let raw = &value[start..i];
            i += 1;
            // Anything between the closing quote and the next separator is not part of a pair.
            let after = i;
            while i < b.len() && !matches!(b[i], b';' | b',') {
                i += 1;
            }
            if !value[after..i].trim().is_empty() {
                continue;
            }
            if escaped {
                let mut unescaped = String::with_capacity(raw.len());
                let mut chars = raw.chars();
                while let Some(c) = chars.next() {
                    unescaped.push(if c == '\\' {
                        chars.next().unwrap_or(c)
                    } else {
                        c
                    });
                }
                Cow::Owned(unescaped)
            } else {
                Cow::Borrowed(raw)
            }
        } else {
            let start = i;
            while i < b.len() && !matches!(b[i], b';' | b',') {
                i += 1;
            }
            Cow::Borrowed(value[start..i].trim())
        };
        if !name.is_empty() {
            pairs.push(ForwardedPair {
                name,
                value: pair_value,
            });
        }
    }
    pairs
}

/// The first `for=` of a `forwarded` header that is an address, as a socket address. Quoted or
/// not; an address without a port yields port 0.
pub(crate) fn parse_forwarded_for(value: &str) -> Option<SocketAddr> {
    forwarded_pairs(value)
        .into_iter()
        .filter(|p| p.name.eq_ignore_ascii_case("for"))
        .find_map(|p| {
            let v = p.value.as_ref();
            v.parse::<SocketAddr>().ok().or_else(|| {
                let ip = v
                    .strip_prefix('[')
                    .and_then(|v| v.strip_suffix(']'))
                    .unwrap_or(v);
                ip.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0))
            })
        })
}

/// The first non-empty `host=` of a `forwarded` header, quoted or not, when it is printable
/// ASCII without spaces (ztunnel ignores a non-ASCII one). What it names is the client's claim:
/// callers check it before believing it.
pub(crate) fn parse_forwarded_host(value: &str) -> Option<String> {
    forwarded_pairs(value)
        .into_iter()
        .find(|p| p.name.eq_ignore_ascii_case("host") && !p.value.is_empty())
        .map(|p| p.value.into_owned())
        .filter(|h| h.bytes().all(|b| b.is_ascii_graphic()))
}

/// A fresh W3C trace context: version 00, random non-zero trace and span ids, sampled.
pub fn new_traceparent() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    let trace: u128 = loop {
        let t = rng.random::<u128>();
        if t != 0 {
            break t;
        }
    };
    let span: u64 = loop {
        let s = rng.random::<u64>();
        if s != 0 {
            break s;
        }
    };
    format!("00-{trace:032x}-{span:016x}-01")
}

/// Why an HBONE tunnel could not be opened or served. Messages are meant for operators.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    /// The peer answered the `CONNECT` with something other than 200.
    #[error("peer answered {}: {}", .0.as_u16(), status_meaning(*.0))]
    Status(StatusCode),
    /// The caller's dial (TCP connect + TLS handshake) failed. Shared by every caller that was
    /// waiting for that dial.
    #[error("could not connect to the peer: {0}")]
    Dial(Arc<std::io::Error>),
    /// The HTTP/2 handshake on a fresh TLS stream failed (or timed out).
    #[error("HTTP/2 handshake with the peer failed: {0}")]
    Handshake(Arc<h2::Error>),
    /// The HTTP/2 connection or stream failed (reset, GOAWAY, connection lost).
    #[error("HTTP/2 error: {0}")]
    H2(h2::Error),
    /// An I/O error outside of h2.
    #[error("I/O error: {0}")]
    Io(std::io::Error),
    /// Too many callers already wait for a stream to this peer.
    #[error("{0} connections already wait for an HBONE stream to this peer; shed")]
    PoolFull(usize),
    /// The peer stopped answering keepalive PINGs.
    #[error("peer did not answer a keepalive PING within {0:?}; connection closed")]
    KeepaliveTimeout(Duration),
    /// A header value we were asked to send is not a valid HTTP header value.
    #[error("invalid {name} header value {value:?}")]
    InvalidHeader { name: &'static str, value: String },
}

fn status_meaning(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad CONNECT request (malformed, or a target that peer does not serve)",
        401 => "denied by the destination's authorization policy",
        403 => "forbidden by the destination",
        503 => "upstream unreachable (the destination could not connect to the application)",
        502 | 504 => "the destination's upstream failed",
        _ => status.canonical_reason().unwrap_or("unexpected status"),
    }
}

// Causes are part of the messages above and are not also exposed as `source()`, so that a chain
// printer (`{:#}`) shows each cause once.
impl From<h2::Error> for HboneError {
    fn from(e: h2::Error) -> Self {
        HboneError::H2(e)
    }
}

impl From<std::io::Error> for HboneError {
    fn from(e: std::io::Error) -> Self {
        HboneError::Io(e)
    }
}

impl HboneError {
    /// The `reason` label of a failed connection.
    pub fn reason(&self) -> &'static str {
        match self {
            HboneError::PoolFull(_) => "hbone_pool_full",
            _ => "hbone_connect",
        }
    }

    /// The HTTP status the peer answered, if that is why the tunnel failed.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            HboneError::Status(s) => Some(*s),
            _ => None,
        }
    }
}

/// h2 errors as I/O errors for the `AsyncRead`/`AsyncWrite` side of a tunnel.
pub(crate) fn h2_to_io(e: h2::Error) -> std::io::Error {
    use std::io::ErrorKind;
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| ErrorKind::Other.into());
    }
    let kind = if e.is_reset() || e.is_go_away() || e.is_remote() {
        ErrorKind::ConnectionReset
    } else {
        ErrorKind::Other
    };
    std::io::Error::new(kind, HboneIoError(e))
}

/// Wraps an h2 error so the I/O error's message says where it came from.
struct HboneIoError(h2::Error);

impl fmt::Debug for HboneIoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for HboneIoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HBONE stream: {}", self.0)
    }
}

impl std::error::Error for HboneIoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Sends a keepalive PING every `interval` and returns when one is not answered in `timeout` (or
/// the connection's PING machinery fails). Never returns when keepalive is disabled.
pub(crate) async fn keepalive(
    ping_pong: Option<h2::PingPong>,
    interval: Option<Duration>,
    timeout: Duration,
) -> HboneError {
    let (Some(mut pp), Some(interval)) = (ping_pong, interval) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, pp.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => {
                // The connection is going away anyway; let its driver report why.
                tracing::trace!(error = %e, "keepalive PING failed");
                return std::future::pending().await;
            }
            Err(_) => return HboneError::KeepaliveTimeout(timeout),
        }
    }
}
