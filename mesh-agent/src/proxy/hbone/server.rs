//! Server side: one HTTP/2 connection over an accepted TLS stream, one task per `CONNECT`.
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    keepalive, parse_forwarded_for, parse_forwarded_host, Baggage, H2Settings, H2Stream, HboneError,
};

/// One inbound request on an HBONE connection, to be answered with [`accept`](Self::accept) or
/// [`reject`](Self::reject). Dropping it unanswered resets the stream.
pub struct InboundRequest {
    parts: http::request::Parts,
    recv: RecvStream,
    respond: SendResponse<Bytes>,
}

impl fmt::Debug for InboundRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboundRequest")
            .field("method", &self.parts.method)
            .field("uri", &self.parts.uri)
            .field("headers", &self.parts.headers)
            .finish()
    }
}

impl InboundRequest {
    pub fn method(&self) -> &Method {
        &self.parts.method
    }

    pub fn uri(&self) -> &http::Uri {
        &self.parts.uri
    }

    pub fn headers(&self) -> &http::HeaderMap {
        &self.parts.headers
    }

    /// A header as text, when present and valid.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.parts.headers.get(name)?.to_str().ok()
    }

    /// The `CONNECT` target (see [`connect_target`]).
    pub fn target(&self) -> Result<ConnectTarget, String> {
        connect_target(&self.parts)
    }

    /// The original client (see [`forwarded_for`]).
    pub fn forwarded_for(&self) -> Option<SocketAddr> {
        forwarded_for(&self.parts.headers)
    }

    /// The service host name the client says it dialed (see [`forwarded_host`]): a claim, to be
    /// checked before it is believed.
    pub fn forwarded_host(&self) -> Option<String> {
        forwarded_host(&self.parts.headers)
    }

    /// The source's names from the request's `baggage`, if it has any: a claim too.
    pub fn baggage(&self) -> Option<Baggage> {
        Baggage::from_headers(&self.parts.headers)
    }

    /// Answers with `status` (400, 401, 503…) and ends the stream.
    pub fn reject(mut self, status: StatusCode) {
        let response = Response::builder()
            .status(status)
            .body(())
            .expect("a status-only response is valid");
        if let Err(e) = self.respond.send_response(response, true) {
            tracing::debug!(error = %e, "could not send HBONE rejection; client went away");
        }
    }

    /// Answers 200 and returns the tunnel.
    pub fn accept(self) -> Result<H2Stream, HboneError> {
        self.accept_with(None)
    }

    /// Answers 200 with `baggage` describing the destination, as ztunnel does, and returns the
    /// tunnel.
    pub fn accept_with_baggage(self, baggage: &Baggage) -> Result<H2Stream, HboneError> {
        self.accept_with(Some(baggage))
    }

    fn accept_with(mut self, baggage: Option<&Baggage>) -> Result<H2Stream, HboneError> {
        let mut response = Response::builder().status(StatusCode::OK);
        // Always a valid header value: the baggage writer percent-encodes anything else.
        if let Some(value) = baggage
            .map(Baggage::header_value)
            .filter(|v| !v.is_empty())
            .and_then(|v| http::HeaderValue::from_str(&v).ok())
        {
            response = response.header("baggage", value);
        }
        let response = response.body(()).expect("a 200 with valid headers");
        let send = self.respond.send_response(response, false)?;
        Ok(H2Stream::new(send, self.recv, None))
    }
}

/// What a `CONNECT` asks for: an address (what every client sends for a workload), or a
/// service host name and service port (what ztunnel sends when it reaches a service through an
/// east-west gateway; its server then delivers to the local workload on the service's target
/// port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectTarget {
    Addr(SocketAddr),
    Host { host: String, port: u16 },
}

impl ConnectTarget {
    pub fn port(&self) -> u16 {
        match self {
            ConnectTarget::Addr(addr) => addr.port(),
            ConnectTarget::Host { port, .. } => *port,
        }
    }

    /// The address, when the target is one.
    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            ConnectTarget::Addr(addr) => Some(*addr),
            ConnectTarget::Host { .. } => None,
        }
    }
}

impl fmt::Display for ConnectTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectTarget::Addr(addr) => write!(f, "{addr}"),
            ConnectTarget::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// The `CONNECT` target of a request: `ip:port` (`[v6]:port`) or `host:port` with a host name.
/// `Err(reason)` for a non-`CONNECT` method (or an extended `CONNECT` with `:protocol`), a
/// missing authority, one without a port (or with port 0), with user information, or with an
/// address that is not a valid `ip:port`. The host name is lower-cased.
pub fn connect_target(parts: &http::request::Parts) -> Result<ConnectTarget, String> {
    if parts.method != Method::CONNECT {
        return Err(format!("method {} is not CONNECT", parts.method));
    }
    if let Some(protocol) = parts.extensions.get::<h2::ext::Protocol>() {
        return Err(format!(
            "extended CONNECT (:protocol {}) is not supported",
            protocol.as_str()
        ));
    }
    let authority = parts
        .uri
        .authority()
        .ok_or_else(|| "CONNECT without :authority".to_string())?;
    let text = authority.as_str();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(ConnectTarget::Addr(addr));
    }
    let not_target = || format!("CONNECT target {text:?} is not ip:port or host:port");
    let host = authority.host();
    let looks_like_ip = host.starts_with('[') || host.parse::<std::net::IpAddr>().is_ok();
    if text.contains('@') || looks_like_ip || host.is_empty() {
        return Err(not_target());
    }
    match authority.port_u16() {
        Some(port) if port != 0 => Ok(ConnectTarget::Host {
            host: host.to_ascii_lowercase(),
            port,
        }),
        _ => Err(not_target()),
    }
}

/// The original client from `forwarded: for="ip:port"` (port 0 when only an address was
/// given).
pub fn forwarded_for(headers: &http::HeaderMap) -> Option<SocketAddr> {
    headers
        .get_all("forwarded")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(parse_forwarded_for)
}

/// The host from `forwarded: …;host=<host>` (quoted or not), lower-cased: the service host name
/// a ztunnel client sends for service traffic. Anyone can send anything here.
pub fn forwarded_host(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all("forwarded")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(parse_forwarded_host)
        .map(|h| h.to_ascii_lowercase())
}

/// Serves one HTTP/2 connection over an accepted TLS stream: for every request calls
/// `on_request` and spawns the returned future (one task per stream). Returns when the
/// connection ends (`Ok` when the client closed it cleanly).
pub async fn serve_connection<IO, F, Fut>(
    io: IO,
    settings: &H2Settings,
    on_request: F,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut(InboundRequest) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    serve_connection_until(io, settings, on_request, std::future::pending()).await
}

/// [`serve_connection`] with a drain signal: when `shutdown` completes the server sends GOAWAY,
/// accepts no new streams, and returns once the streams in progress have finished (drop the
/// future to cut them off).
pub async fn serve_connection_until<IO, F, Fut, S>(
    io: IO,
    settings: &H2Settings,
    mut on_request: F,
    shutdown: S,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut(InboundRequest) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
    S: Future<Output = ()>,
{
    let handshake = settings.server_builder().handshake::<_, Bytes>(io);
    let mut conn = match tokio::time::timeout(settings.handshake_timeout, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(HboneError::Handshake(e.into())),
        Err(_) => {
            return Err(HboneError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "client did not complete the HTTP/2 handshake in time",
            )))
        }
    };
    let mut keepalive = pin!(keepalive(
        conn.ping_pong(),
        settings.keepalive_interval,
        settings.keepalive_timeout
    ));
    let mut shutdown = pin!(shutdown);
    let mut draining = false;
    loop {
        tokio::select! {
            request = conn.accept() => match request {
                None => return Ok(()),
                Some(Err(e)) => return Err(HboneError::H2(e)),
                Some(Ok((request, respond))) => {
                    let (parts, recv) = request.into_parts();
                    tokio::spawn(on_request(InboundRequest { parts, recv, respond }));
                }
            },
            error = &mut keepalive => {
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                // Give the GOAWAY a moment to go out; the peer is probably gone anyway.
                let closed = std::future::poll_fn(|cx| conn.poll_closed(cx));
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), closed).await;
                return Err(error);
            }
            () = &mut shutdown, if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
        }
    }
}
