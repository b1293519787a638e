//! Bidirectional byte relay with half-close, counting bytes as they move.
//!
//! When one side finishes sending (EOF), the relay shuts down the write half towards the other
//! side and keeps copying the opposite direction until it finishes too, so request/response
//! protocols that half-close (`shutdown(SHUT_WR)`) work through the proxy.
//!
//! Each direction's buffer starts at 1 KiB and doubles whenever a read fills it, up to 64 KiB: an
//! idle or chatty connection stays small, a bulk transfer reaches the large buffer after a few
//! reads. Every write is added to the connection's [`Meter`] at once, so a connection that fails
//! or is cut still reports what it moved, and a long-lived one shows its bytes while open.
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The first buffer of each direction.
pub const INITIAL_BUF: usize = 1024;
/// Buffers grow no larger: big enough for bulk transfer without a copy per small segment.
pub const MAX_BUF: usize = 64 * 1024;

/// Bytes moved so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// From the downstream client to the upstream server.
    pub client_to_server: u64,
    /// From the upstream server back to the client.
    pub server_to_client: u64,
}

/// Where one connection's bytes are counted while they move: its Prometheus counters (shared
/// with every connection of the same labels) and its own totals.
#[derive(Debug, Default)]
pub struct Meter {
    client_to_server: Counter,
    server_to_client: Counter,
    up: AtomicU64,
    down: AtomicU64,
}

impl Meter {
    pub fn new(client_to_server: Counter, server_to_client: Counter) -> Meter {
        Meter {
            client_to_server,
            server_to_client,
            ..Meter::default()
        }
    }

    pub(super) fn add(&self, up: bool, n: u64) {
        if up {
            self.client_to_server.inc_by(n);
            self.up.fetch_add(n, Ordering::Relaxed);
        } else {
            self.server_to_client.inc_by(n);
            self.down.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// This connection's bytes so far.
    pub fn transferred(&self) -> Transferred {
        Transferred {
            client_to_server: self.up.load(Ordering::Relaxed),
            server_to_client: self.down.load(Ordering::Relaxed),
        }
    }
}

/// One direction of the relay.
struct Copy {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes of the last read that returned data.
    last_read: usize,
    read_done: bool,
    /// A read error met while reading on after a full read, returned once that data is written.
    read_error: Option<io::Error>,
    need_flush: bool,
    done: bool,
}

impl Copy {
    fn new() -> Copy {
        Copy {
            buf: Vec::new(),
            start: 0,
            end: 0,
            last_read: 0,
            read_done: false,
            read_error: None,
            need_flush: false,
            done: false,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        count: impl Fn(u64),
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.start == self.end && !self.read_done {
                if let Some(e) = self.read_error.take() {
                    return Poll::Ready(Err(e));
                }
                if self.buf.is_empty() {
                    // Allocated on first use: a connection that never sends holds no buffer.
                    // (It grows while a read fills it, below.)
                    self.buf = vec![0; INITIAL_BUF];
                }
                let mut read = ReadBuf::new(&mut self.buf);
                match reader.as_mut().poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {
                        let n = read.filled().len();
                        if n == 0 {
                            self.read_done = true;
                        } else {
                            self.start = 0;
                            self.end = n;
                            // A read that filled the buffer may have left the rest of the same
                            // message unread: grow now and read on before writing, so a message
                            // a little over the buffer goes out in one write (one HBONE frame,
                            // one TLS record), not two.
                            while self.end == self.buf.len() && self.buf.len() < MAX_BUF {
                                self.buf.resize((self.buf.len() * 2).min(MAX_BUF), 0);
                                let mut more = ReadBuf::new(&mut self.buf[self.end..]);
                                match reader.as_mut().poll_read(cx, &mut more) {
                                    Poll::Ready(Ok(())) if !more.filled().is_empty() => {
                                        self.end += more.filled().len();
                                    }
                                    Poll::Ready(Ok(())) => {
                                        self.read_done = true;
                                        break;
                                    }
                                    // What was read is written first, then the error is
                                    // returned (a socket reports a reset only once).
                                    Poll::Ready(Err(e)) => {
                                        self.read_error = Some(e);
                                        break;
                                    }
                                    Poll::Pending => break,
                                }
                            }
                            self.last_read = self.end;
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing to read now and nothing buffered. A buffer grown for a burst
                        // whose last read used under a quarter of it is freed: the connection
                        // went quiet, and an idle connection holds no large buffer. (A bulk
                        // transfer, whose reads fill the buffer, keeps it.)
                        if self.buf.len() > INITIAL_BUF && self.last_read < self.buf.len() / 4 {
                            self.buf = Vec::new();
                        }
                        // Push out what was written.
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.start < self.end {
                let n = ready!(writer
                    .as_mut()
                    .poll_write(cx, &self.buf[self.start..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the receiving side accepts no more bytes",
                    )));
                }
                self.start += n;
                self.need_flush = true;
                count(n as u64);
            }
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx))?;
                ready!(writer.as_mut().poll_shutdown(cx))?;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Copies both ways until both sides have sent EOF (each forwarded as a write shutdown) or one
/// fails; the bytes go to `meter` as they are written.
pub async fn relay<C, S>(client: &mut C, server: &mut S, meter: &Meter) -> io::Result<Transferred>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = Copy::new();
    let mut down = Copy::new();
    poll_fn(|cx| {
        if !up.done {
            if let Poll::Ready(result) =
                up.poll_copy(cx, Pin::new(&mut *client), Pin::new(&mut *server), |n| {
                    meter.add(true, n)
                })
            {
                result?;
                up.done = true;
            }
        }
        if !down.done {
            if let Poll::Ready(result) =
                down.poll_copy(cx, Pin::new(&mut *server), Pin::new(&mut *client), |n| {
                    meter.add(false, n)
                })
            {
                result?;
                down.done = true;
            }
        }
        if up.done && down.done {
            Poll::Ready(Ok::<(), io::Error>(()))
        } else {
            Poll::Pending
        }
    })
    .await?;
    Ok(meter.transferred())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn half_close_is_forwarded_and_the_other_direction_keeps_flowing() {
        let (mut app, mut proxy_client) = tokio::io::duplex(1024);
        let (mut proxy_server, mut upstream) = tokio::io::duplex(1024);
        let relay = tokio::spawn(async move {
            let meter = Meter::default();
            relay(&mut proxy_client, &mut proxy_server, &meter).await
        });

        app.write_all(b"request").await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request", "upstream sees the request and then EOF");
        upstream.write_all(b"response after EOF").await.unwrap();
        upstream.shutdown().await.unwrap();
        let mut back = Vec::new();
        app.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"response after EOF");
        let t = relay.await.unwrap().unwrap();
        assert_eq!(
            t,
            Transferred {
                client_to_server: 7,
                server_to_client: 18
            }
        );
    }

    #[tokio::test]
    async fn bytes_are_counted_while_the_connection_is_open_and_kept_when_it_fails() {
        let (mut app, mut proxy_client) = tokio::io::duplex(64);
        let (mut proxy_server, upstream) = tokio::io::duplex(64);
        let counted = Counter::default();
        let meter = std::sync::Arc::new(Meter::new(counted.clone(), Counter::default()));
        let m = meter.clone();
        let relay =
            tokio::spawn(async move { relay(&mut proxy_client, &mut proxy_server, &m).await });
        let mut upstream = upstream;
        app.write_all(b"hello").await.unwrap();
        let mut got = [0; 5];
        upstream.read_exact(&mut got).await.unwrap();
        // Still open: the counter already has the bytes.
        assert_eq!(counted.get(), 5);
        assert_eq!(meter.transferred().client_to_server, 5);
        // The upstream goes away mid-stream: the relay fails, the bytes stay counted.
        drop(upstream);
        let _ = app.write_all(&[7; 4096]).await;
        assert!(relay.await.unwrap().is_err());
        assert_eq!(counted.get(), 5);
    }

    #[tokio::test]
    async fn buffers_start_small_and_grow_for_bulk_transfer() {
        let (mut app, mut proxy_client) = tokio::io::duplex(256 * 1024);
        let (mut proxy_server, mut upstream) = tokio::io::duplex(256 * 1024);
        let relay = tokio::spawn(async move {
            let meter = Meter::default();
            relay(&mut proxy_client, &mut proxy_server, &meter).await
        });
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            app.write_all(&sent).await.unwrap();
            app.shutdown().await.unwrap();
            app
        });
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
        upstream.shutdown().await.unwrap();
        drop(writer.await.unwrap());
        assert_eq!(relay.await.unwrap().unwrap().client_to_server, 1_000_000);
    }

    #[test]
    fn the_relay_future_is_small() {
        // Buffers live on the heap and grow on demand; the future holds only their handles.
        let (mut a, mut b) = tokio::io::duplex(8);
        let meter = Meter::default();
        let future = relay(&mut a, &mut b, &meter);
        assert!(
            std::mem::size_of_val(&future) <= 256,
            "{}",
            std::mem::size_of_val(&future)
        );
    }

    #[test]
    fn a_buffer_doubles_only_when_a_read_fills_it() {
        let mut c = Copy::new();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut reader: &[u8] = &[1; 5000];
        let mut sink = Vec::new();
        let poll = c.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut sink), |_| {});
        assert!(matches!(poll, Poll::Ready(Ok(()))));
        assert_eq!(sink.len(), 5000);
        // 1, 2, 4 KiB full, read on into 8 KiB (the rest of the 5000): no growth past 8 KiB.
        assert_eq!(c.buf.len(), 8192);
        let mut small = Copy::new();
        let mut reader: &[u8] = &[1; 10];
        let _ = small.poll_copy(
            &mut cx,
            Pin::new(&mut reader),
            Pin::new(&mut Vec::new()),
            |_| {},
        );
        assert_eq!(small.buf.len(), INITIAL_BUF);
    }

    /// Hands out the given chunks, then reports Pending (nothing more yet).
    struct Chunks(std::collections::VecDeque<Vec<u8>>);

    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            match self.0.pop_front() {
                Some(mut chunk) => {
                    // What does not fit stays first in line, as in a socket.
                    if chunk.len() > buf.remaining() {
                        let rest = chunk.split_off(buf.remaining());
                        self.0.push_front(rest);
                    }
                    buf.put_slice(&chunk);
                    Poll::Ready(Ok(()))
                }
                None => Poll::Pending,
            }
        }
    }

    #[test]
    fn a_grown_buffer_is_freed_when_the_connection_goes_quiet_but_kept_for_bulk() {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let burst = |then: usize| {
            let mut chunks: std::collections::VecDeque<Vec<u8>> = [1024, 2048, 4096, 8192]
                .iter()
                .map(|n| vec![1u8; *n])
                .collect();
            chunks.push_back(vec![2u8; then]);
            Chunks(chunks)
        };
        // A burst (every read fills the buffer), then a small read, then nothing: freed.
        let (mut c, mut sink) = (Copy::new(), Vec::new());
        let mut reader = burst(100);
        assert!(c
            .poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut sink), |_| {})
            .is_pending());
        assert_eq!(sink.len(), 1024 + 2048 + 4096 + 8192 + 100);
        assert!(c.buf.is_empty(), "{} bytes kept while idle", c.buf.len());
        // A bulk transfer that pauses with its last read full keeps its buffer.
        let (mut c, mut sink) = (Copy::new(), Vec::new());
        let mut reader = burst(16384);
        assert!(c
            .poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut sink), |_| {})
            .is_pending());
        assert_eq!(c.buf.len(), 32768);
    }

    /// Counts the writes it takes.
    #[derive(Default)]
    struct Writes(Vec<usize>);

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.push(buf.len());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_message_a_little_over_the_buffer_goes_out_in_one_write() {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let (mut c, mut sink) = (Copy::new(), Writes::default());
        // A 1 KiB request with its head, twice, as a keep-alive client sends them.
        for _ in 0..2 {
            let mut reader = Chunks([vec![1u8; 1100]].into());
            assert!(c
                .poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut sink), |_| {})
                .is_pending());
        }
        assert_eq!(sink.0, [1100, 1100]);
        // The grown buffer is kept between such messages: it was used by more than a quarter.
        assert_eq!(c.buf.len(), 2 * INITIAL_BUF);
    }

    /// Hands out its chunks, then fails the way a reset socket does: once.
    struct ThenReset(Chunks, bool);

    impl AsyncRead for ThenReset {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if !self.0 .0.is_empty() {
                return Pin::new(&mut self.0).poll_read(cx, buf);
            }
            if std::mem::replace(&mut self.1, true) {
                Poll::Ready(Ok(())) // after the reset: EOF
            } else {
                Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
            }
        }
    }

    #[test]
    fn a_reset_met_while_reading_on_is_reported_after_the_data_not_turned_into_eof() {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let (mut c, mut sink) = (Copy::new(), Writes::default());
        let mut reader = ThenReset(Chunks([vec![1u8; INITIAL_BUF]].into()), false);
        let poll = c.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut sink), |_| {});
        match poll {
            Poll::Ready(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            other => panic!("expected the reset, got {other:?}"),
        }
        assert_eq!(
            sink.0,
            [INITIAL_BUF],
            "the data before the reset is written"
        );
    }
}
