//! One `CONNECT` tunnel as a byte stream.
use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool::Slot;
use super::{h2_to_io, Baggage};

/// One HBONE tunnel: `AsyncRead + AsyncWrite + Unpin + Send`.
///
/// * Reads hand out DATA frames and return their flow-control capacity to the peer as the bytes
///   are consumed, so the peer can have at most one stream window in flight towards us.
/// * Writes only accept as many bytes as the stream has send capacity for (peer window, capped by
///   [`H2Settings::max_send_buffer_size`](super::H2Settings::max_send_buffer_size)); a writer
///   facing a slow reader waits instead of buffering.
/// * `poll_shutdown` sends END_STREAM (half close); reading continues until the peer's
///   END_STREAM (EOF).
/// * A peer `RST_STREAM`, a `GOAWAY` that covers the stream, or a lost connection surface as
///   `io::Error`s (`ConnectionReset` for resets, `BrokenPipe` for writes after the peer stopped
///   reading).
///
/// Dropping it before both sides finished resets the stream (`RST_STREAM(CANCEL)`).
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// The unread rest of the last DATA frame (at most one frame).
    pending: Bytes,
    recv_eof: bool,
    send_closed: bool,
    /// Client side: the pooled connection's stream slot, released on drop.
    _slot: Option<Slot>,
    /// Client side: the destination's names from the 200's `baggage`.
    peer_baggage: Option<Box<Baggage>>,
}

impl H2Stream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream, slot: Option<Slot>) -> H2Stream {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            recv_eof: false,
            send_closed: false,
            _slot: slot,
            peer_baggage: None,
        }
    }

    pub(crate) fn with_peer_baggage(mut self, baggage: Option<Baggage>) -> H2Stream {
        self.peer_baggage = baggage.map(Box::new);
        self
    }

    /// Client side: what the destination said about itself in the `baggage` of its 200 (ztunnel
    /// sends it; a peer that sends none, or a server-side stream, has `None`). The peer's claim,
    /// for logs and telemetry, not for decisions.
    pub fn peer_baggage(&self) -> Option<&Baggage> {
        self.peer_baggage.as_deref()
    }

    /// The HTTP/2 stream id (for logs).
    pub fn stream_id(&self) -> u32 {
        self.send.stream_id().as_u32()
    }

    /// The error for a write that cannot proceed: the peer's reset reason when there is one.
    fn write_error(&mut self, cx: &mut Context<'_>, err: Option<h2::Error>) -> io::Error {
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => reset_error(reason),
            Poll::Ready(Err(e)) => h2_to_io(e),
            Poll::Pending => match err {
                Some(e) => h2_to_io(e),
                None => {
                    io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed for sending")
                }
            },
        }
    }
}

fn reset_error(reason: Reason) -> io::Error {
    match reason {
        // The peer is done with the stream (it finished, or does not want more data): for a
        // writer that is a closed pipe, not a failure of the tunnel.
        Reason::NO_ERROR | Reason::CANCEL | Reason::STREAM_CLOSED => io::Error::new(
            io::ErrorKind::BrokenPipe,
            format!("HBONE stream reset by peer ({reason})"),
        ),
        reason => io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("HBONE stream reset by peer ({reason})"),
        ),
    }
}

impl fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H2Stream")
            .field("stream_id", &self.stream_id())
            .field("recv_eof", &self.recv_eof)
            .field("send_closed", &self.send_closed)
            .finish()
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                // Consumed: let the peer send that much more. h2 batches the WINDOW_UPDATEs.
                if let Err(e) = this.recv.flow_control().release_capacity(n) {
                    return Poll::Ready(Err(h2_to_io(e)));
                }
                return Poll::Ready(Ok(()));
            }
            if this.recv_eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => this.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => this.recv_eof = true,
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.send_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write on an HBONE stream after shutdown",
            )));
        }
        loop {
            let capacity = this.send.capacity();
            if capacity > 0 {
                let n = capacity.min(buf.len());
                return match this
                    .send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                {
                    Ok(()) => Poll::Ready(Ok(n)),
                    Err(e) => Poll::Ready(Err(this.write_error(cx, Some(e)))),
                };
            }
            // Ask for room for this write; h2 assigns it as the peer's windows open.
            this.send.reserve_capacity(buf.len());
            match this.send.poll_capacity(cx) {
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(this.write_error(cx, Some(e))))
                }
                Poll::Ready(None) => return Poll::Ready(Err(this.write_error(cx, None))),
                Poll::Pending => {
                    // Also wake up if the peer resets the stream while we wait for capacity.
                    if let Poll::Ready(r) = this.send.poll_reset(cx) {
                        return Poll::Ready(Err(match r {
                            Ok(reason) => reset_error(reason),
                            Err(e) => h2_to_io(e),
                        }));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Data handed to h2 is written by the connection task as soon as it can be.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.send_closed {
            return Poll::Ready(Ok(()));
        }
        this.send_closed = true;
        // Release any capacity reserved for writes that will not come.
        this.send.reserve_capacity(0);
        match this.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => {
                let err = this.write_error(cx, Some(e));
                if err.kind() == io::ErrorKind::BrokenPipe {
                    // The peer already ended or cancelled the stream: nothing left to close.
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Ready(Err(err))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// A client stream over an in-memory HTTP/2 connection, and the server's side of it.
    async fn pair() -> (H2Stream, RecvStream) {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            // The receive windows and frame size of the agent's HBONE settings.
            let mut conn = h2::server::Builder::new()
                .initial_window_size(4 << 20)
                .initial_connection_window_size(16 << 20)
                .max_frame_size(1 << 20)
                .handshake::<_, Bytes>(server_io)
                .await
                .unwrap();
            let (request, mut respond) = conn.accept().await.unwrap().unwrap();
            let response = http::Response::new(());
            let _send = respond.send_response(response, false).unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            (request.into_body(), _send)
        });
        let (mut client, conn) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(conn);
        let request = http::Request::connect("10.0.0.1:80").body(()).unwrap();
        client = client.ready().await.unwrap();
        let (response, send) = client.send_request(request, false).unwrap();
        let recv = response.await.unwrap().into_body();
        let (server_recv, server_send) = server.await.unwrap();
        std::mem::forget(server_send);
        (H2Stream::new(send, recv, None), server_recv)
    }

    #[tokio::test]
    async fn each_write_that_fits_the_windows_is_one_data_frame() {
        tokio::time::timeout(std::time::Duration::from_secs(5), one_frame_per_write())
            .await
            .expect("timed out");
    }

    async fn one_frame_per_write() {
        let (mut stream, mut server) = pair().await;
        // Writes of changing sizes, as request/response traffic makes them: room left over from
        // one must not cut the next in two.
        for len in [100usize, 1100, 5000, 300, 1100, 60_000, 1100] {
            stream.write_all(&vec![1u8; len]).await.unwrap();
            let frame = server.data().await.unwrap().unwrap();
            assert_eq!(frame.len(), len, "a write of {len} bytes arrived cut");
            server.flow_control().release_capacity(frame.len()).unwrap();
        }
    }
}
