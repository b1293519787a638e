//! A request body that can be sent again: the first try streams the client's body as it comes
//! and keeps a copy of it (it is at most a limit long: the caller checks its known length), so
//! the success path never waits for the whole body before the request leaves; a retry sends the
//! copy, then whatever of the client's body has not been read yet.
//!
//! The client's body is read into the copy by whoever needs it first: the newest try, as its
//! upstream takes data, or [`Replayable::fill`], which a per-try timer uses to learn when the
//! body has come whole without waiting for the upstream (Envoy's per-try timer starts at the
//! downstream end of stream). Tries read the copy by position. An older try still held
//! somewhere (hyper's connection task after a timeout, say) is woken and ends its body where it
//! is as soon as a newer try exists, so a retry never waits for it. A client body that fails is
//! recorded: the failure is the client's, not the upstream's.
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use super::upstream::Body as BoxedBody;

/// What the tries share.
struct Shared {
    /// The client's body, until it has ended or failed.
    client: Option<BoxedBody>,
    /// Every data frame of the client's body read so far, in order.
    copy: Vec<Bytes>,
    copied: usize,
    trailers: Option<HeaderMap>,
    /// The client's body failed (or overran the limit): no try can be made, and the failure is
    /// the client's.
    failed: bool,
    /// The try that may read the client's body (the newest).
    current: u64,
    /// The newest try, when it waits for the client's body (woken by `fill`'s reads and when a
    /// newer try replaces it).
    reader: Option<Waker>,
    /// [`Replayable::fill`], when it waits for the client's body: the client's body wakes only
    /// whoever polled it last, so each side wakes the other after a read.
    filler: Option<Waker>,
    /// When the client's body had been received whole.
    received_at: Option<Instant>,
    /// The most the copy holds.
    limit: usize,
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Reads one frame of the client's body into the copy; `Ready` once something changed
    /// (data, the end, trailers or a failure), with a failure's error.
    fn pull(&mut self, cx: &mut Context<'_>) -> Poll<Option<hyper::Error>> {
        let Some(client) = self.client.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(Pin::new(client).poll_frame(cx));
        let mut error = None;
        match frame {
            Some(Ok(f)) => match f.into_data() {
                Ok(data) => {
                    self.copied += data.len();
                    if self.copied > self.limit {
                        // Longer than its length said: the client's fault.
                        self.fail();
                    } else {
                        self.copy.push(data);
                        // hyper stops polling a body that says it has ended: so must we.
                        if self.client.as_ref().is_some_and(|c| c.is_end_stream()) {
                            self.end();
                        }
                    }
                }
                Err(f) => {
                    self.trailers = f.into_trailers().ok();
                    self.end();
                }
            },
            Some(Err(e)) => {
                self.fail();
                error = Some(e);
            }
            None => self.end(),
        }
        for waiting in [self.reader.take(), self.filler.take()]
            .into_iter()
            .flatten()
        {
            waiting.wake();
        }
        Poll::Ready(error)
    }

    fn end(&mut self) {
        self.client = None;
        self.received_at = Some(Instant::now());
    }

    fn fail(&mut self) {
        self.client = None;
        self.failed = true;
    }
}

/// The handle a request keeps to make each try's body.
pub struct Replayable {
    shared: Arc<Mutex<Shared>>,
}

impl Replayable {
    /// `body`, copied as it is read; at most `limit` bytes are expected.
    pub fn new(body: BoxedBody, limit: usize) -> Replayable {
        let ended = body.is_end_stream();
        let shared = Shared {
            client: (!ended).then_some(body),
            copy: Vec::new(),
            copied: 0,
            trailers: None,
            failed: false,
            current: 0,
            reader: None,
            filler: None,
            received_at: ended.then(Instant::now),
            limit,
        };
        Replayable {
            shared: Arc::new(Mutex::new(shared)),
        }
    }

    /// The body of the next try: the client's from its start (the copy, then the rest). `None`
    /// when the client's body failed. An older try's body ends where it is.
    pub fn body(&self) -> Option<TryBody> {
        let mut s = lock(&self.shared);
        if s.failed {
            return None;
        }
        s.current += 1;
        if let Some(stale) = s.reader.take() {
            stale.wake();
        }
        Some(TryBody {
            shared: self.shared.clone(),
            generation: s.current,
            next: 0,
            trailers_sent: false,
        })
    }

    /// Whether the client's body failed.
    pub fn client_failed(&self) -> bool {
        lock(&self.shared).failed
    }

    /// When the client's body had been received whole, if it has.
    pub fn received_at(&self) -> Option<Instant> {
        lock(&self.shared).received_at
    }

    /// Reads the client's body into the copy until it has ended or failed, whether or not a try
    /// takes it upstream.
    pub async fn fill(&self) {
        std::future::poll_fn(|cx| {
            let mut s = lock(&self.shared);
            while s.client.is_some() {
                s.filler = Some(cx.waker().clone());
                std::task::ready!(s.pull(cx));
            }
            Poll::Ready(())
        })
        .await
    }
}

/// One try's body.
pub struct TryBody {
    shared: Arc<Mutex<Shared>>,
    generation: u64,
    /// The next frame of the copy to send.
    next: usize,
    trailers_sent: bool,
}

impl Body for TryBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let shared = this.shared.clone();
        let mut s = lock(&shared);
        loop {
            if s.current != this.generation {
                // A newer try reads the client's body: this one ends here.
                return Poll::Ready(None);
            }
            if let Some(data) = s.copy.get(this.next) {
                this.next += 1;
                return Poll::Ready(Some(Ok(Frame::data(data.clone()))));
            }
            if s.client.is_none() {
                // Everything sent: the trailers, if any, then the end.
                if s.failed || this.trailers_sent {
                    return Poll::Ready(None);
                }
                this.trailers_sent = true;
                return Poll::Ready(s.trailers.clone().map(|t| Ok(Frame::trailers(t))));
            }
            s.reader = Some(cx.waker().clone());
            if let Some(error) = std::task::ready!(s.pull(cx)) {
                return Poll::Ready(Some(Err(error)));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = lock(&self.shared);
        if s.current != self.generation {
            return true;
        }
        if self.next < s.copy.len() {
            return false;
        }
        match &s.client {
            Some(client) => client.is_end_stream(),
            None => s.failed || self.trailers_sent || s.trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let s = lock(&self.shared);
        if s.current != self.generation {
            return SizeHint::with_exact(0);
        }
        let pending: u64 = s.copy[self.next.min(s.copy.len())..]
            .iter()
            .map(|b| b.len() as u64)
            .sum();
        let rest = match &s.client {
            Some(client) => client.size_hint(),
            None => SizeHint::with_exact(0),
        };
        let mut hint = SizeHint::new();
        hint.set_lower(pending + rest.lower());
        if let Some(upper) = rest.upper() {
            hint.set_upper(pending + upper);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    fn full(data: &'static [u8]) -> BoxedBody {
        Full::new(Bytes::from_static(data))
            .map_err(|never| match never {})
            .boxed()
    }

    fn chunks(parts: &[&'static [u8]], trailers: Option<HeaderMap>) -> BoxedBody {
        let mut frames: Vec<Result<Frame<Bytes>, hyper::Error>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        if let Some(t) = trailers {
            frames.push(Ok(Frame::trailers(t)));
        }
        StreamBody::new(futures::stream::iter(frames)).boxed()
    }

    async fn read(body: TryBody) -> (Vec<u8>, Option<HeaderMap>) {
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes().to_vec(), trailers)
    }

    #[tokio::test]
    async fn a_retry_sends_the_same_bytes_and_trailers() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        let r = Replayable::new(chunks(&[b"ab", b"cd"], Some(t.clone())), 64);
        let first = r.body().unwrap();
        assert_eq!(first.size_hint().lower(), 0);
        assert_eq!(read(first).await, (b"abcd".to_vec(), Some(t.clone())));
        for _ in 0..2 {
            let again = r.body().unwrap();
            assert_eq!(again.size_hint().exact(), Some(4));
            assert_eq!(read(again).await, (b"abcd".to_vec(), Some(t.clone())));
        }
    }

    #[tokio::test]
    async fn a_try_that_read_nothing_or_part_hands_the_rest_on() {
        let r = Replayable::new(full(b"hello"), 64);
        // Never read (a connect failure): the next try gets the whole body, length known.
        drop(r.body().unwrap());
        let second = r.body().unwrap();
        assert_eq!(second.size_hint().exact(), Some(5));
        assert_eq!(read(second).await.0, b"hello");

        // Read in part: the copy, then the rest.
        let r = Replayable::new(chunks(&[b"ab", b"cd", b"ef"], None), 64);
        let mut first = r.body().unwrap();
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ab");
        drop(first);
        assert_eq!(read(r.body().unwrap()).await.0, b"abcdef");
        assert_eq!(read(r.body().unwrap()).await.0, b"abcdef");
    }

    #[tokio::test]
    async fn a_body_longer_than_the_limit_is_the_clients_failure() {
        // The caller wraps only bodies whose known length is within the limit: a longer one
        // broke its word.
        let r = Replayable::new(chunks(&[b"0123", b"4567"], None), 6);
        assert_eq!(read(r.body().unwrap()).await.0, b"0123");
        assert!(r.client_failed());
        assert!(r.body().is_none());
    }

    #[tokio::test]
    async fn a_newer_try_takes_the_body_from_an_older_one_still_held() {
        let r = Replayable::new(chunks(&[b"ab", b"cd"], None), 64);
        let mut stale = r.body().unwrap();
        let f = stale.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ab");
        // A retry while the first try is still held (hyper's task after a timeout).
        let retry = r.body().unwrap();
        assert!(stale.frame().await.is_none(), "the stale try ends");
        assert!(stale.is_end_stream());
        assert_eq!(read(retry).await.0, b"abcd");
    }

    #[tokio::test]
    async fn fill_receives_the_body_whatever_the_try_reads_and_a_failure_is_the_clients() {
        let r = Replayable::new(chunks(&[b"ab", b"cd", b"ef"], None), 64);
        let mut first = r.body().unwrap();
        let _ = first.frame().await;
        assert!(r.received_at().is_none(), "a third of the body");
        // The upstream takes nothing more; the timer's fill reads the rest.
        r.fill().await;
        assert!(r.received_at().is_some());
        let rest = first.collect().await.unwrap().to_bytes();
        assert_eq!(rest, "cdef");
        // An empty body is received at once.
        assert!(Replayable::new(full(b""), 64).received_at().is_some());

        let failing = futures::stream::iter(vec![
            Ok(Frame::data(Bytes::from_static(b"x"))),
            Err(hyper_error().await),
        ]);
        let r = Replayable::new(StreamBody::new(failing).boxed(), 64);
        let body = r.body().unwrap();
        assert!(body.collect().await.is_err());
        assert!(r.client_failed());
        assert!(r.body().is_none());
        r.fill().await;
        assert!(r.received_at().is_none());
    }

    #[tokio::test]
    async fn fill_and_a_try_waiting_together_are_both_woken() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, hyper::Error>>();
        let r = Arc::new(Replayable::new(StreamBody::new(rx).boxed(), 64));
        let try_body = r.body().unwrap();
        let filler = {
            let r = r.clone();
            tokio::spawn(async move { r.fill().await })
        };
        tokio::task::yield_now().await;
        // The try polls last: the client's body would wake only it.
        let reader = tokio::spawn(read(try_body));
        tokio::task::yield_now().await;
        for part in [&b"ab"[..], b"cd"] {
            tx.unbounded_send(Ok(Frame::data(Bytes::from_static(part))))
                .unwrap();
            tokio::task::yield_now().await;
        }
        drop(tx);
        let within = std::time::Duration::from_secs(5);
        tokio::time::timeout(within, filler).await.unwrap().unwrap();
        let (bytes, _) = tokio::time::timeout(within, reader).await.unwrap().unwrap();
        assert_eq!(bytes, b"abcd");
        assert!(r.received_at().is_some());
    }

    #[tokio::test]
    async fn a_stale_try_waiting_for_the_client_ends_when_a_newer_one_starts() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, hyper::Error>>();
        let r = Replayable::new(StreamBody::new(rx).boxed(), 64);
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"ab"))))
            .unwrap();
        let mut stale = r.body().unwrap();
        assert_eq!(
            stale.frame().await.unwrap().unwrap().into_data().unwrap(),
            "ab"
        );
        // The stale try now waits for the client, held by "hyper".
        let waiting = tokio::spawn(async move { stale.frame().await.is_none() });
        tokio::task::yield_now().await;
        let retry = r.body().unwrap();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the stale try is woken")
            .unwrap();
        assert!(ended);
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"cd"))))
            .unwrap();
        drop(tx);
        assert_eq!(read(retry).await.0, b"abcd");
    }

    /// A real `hyper::Error` (it has no public constructor): a body read from a connection
    /// that closes in the middle.
    async fn hyper_error() -> hyper::Error {
        let (client, mut server) = tokio::io::duplex(1024);
        let (mut tx, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(
            hyper_util::rt::TokioIo::new(client),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = [0u8; 1024];
            let _ = server.read(&mut buf).await;
            let _ = server
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nab")
                .await;
        });
        let resp = tx
            .send_request(http::Request::new(Full::new(Bytes::new())))
            .await
            .unwrap();
        resp.into_body().collect().await.unwrap_err()
    }
}
