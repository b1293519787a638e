//! A request body that can be sent again: the first try streams the client's body as it comes
//! and keeps a copy of what it passed on (up to a limit), so the success path never waits for
//! the whole body before the request leaves; a retry sends the copy, then whatever of the
//! client's body no try has read yet.
//!
//! The newest try reads the client's body: an older one that is still held somewhere (hyper's
//! connection task after a timeout, say) ends its body where it is as soon as a newer try
//! exists, so a retry never waits for it. The shared state also says when the client's body
//! has been received whole (a per-try timeout starts then, as Envoy's does) and whether it
//! failed (the client's fault, not the upstream's).
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::watch;

use super::upstream::Body as BoxedBody;

/// What the tries share.
struct Shared {
    /// The client's body, until it has ended or failed.
    client: Option<BoxedBody>,
    /// Every data frame passed on so far, in order.
    copy: Vec<Bytes>,
    copied: usize,
    trailers: Option<HeaderMap>,
    /// More than the limit was passed on: the copy was dropped, no other try can be made.
    overflowed: bool,
    /// The client's body failed: no try can be made, and the failure is the client's.
    failed: bool,
    /// The try that reads the client's body (the newest).
    current: u64,
    /// When the client's body had been received whole.
    received_at: Option<Instant>,
    /// Set at the same time.
    received: watch::Sender<bool>,
}

impl Shared {
    fn end(&mut self) {
        self.client = None;
        self.received_at = Some(Instant::now());
        self.received.send_replace(true);
    }
}

/// The handle a request keeps to make each try's body.
pub struct Replayable {
    shared: Arc<Mutex<Shared>>,
    received: watch::Receiver<bool>,
    limit: usize,
}

impl Replayable {
    /// `body`, copied as it is read, up to `limit` bytes.
    pub fn new(body: BoxedBody, limit: usize) -> Replayable {
        let ended = body.is_end_stream();
        let (tx, received) = watch::channel(ended);
        let shared = Shared {
            client: (!ended).then_some(body),
            copy: Vec::new(),
            copied: 0,
            trailers: None,
            overflowed: false,
            failed: false,
            current: 0,
            received_at: ended.then(Instant::now),
            received: tx,
        };
        Replayable {
            shared: Arc::new(Mutex::new(shared)),
            received,
            limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The body of the next try: what earlier tries passed on, then the rest of the client's.
    /// `None` when the copy overflowed the limit or the client's body failed.
    pub fn body(&self) -> Option<TryBody> {
        let mut s = self.lock();
        if s.overflowed || s.failed {
            return None;
        }
        s.current += 1;
        Some(TryBody {
            shared: self.shared.clone(),
            limit: self.limit,
            generation: s.current,
            replay: s.copy.clone(),
            next: 0,
            trailers_sent: false,
        })
    }

    /// Whether the client's body failed while a try read it.
    pub fn client_failed(&self) -> bool {
        self.lock().failed
    }

    /// When the client's body had been received whole, if it has.
    pub fn received_at(&self) -> Option<Instant> {
        self.lock().received_at
    }

    /// Resolves once the client's body has been received whole (never, if it fails).
    pub async fn received(&self) {
        let mut rx = self.received.clone();
        if rx.wait_for(|done| *done).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// One try's body.
pub struct TryBody {
    shared: Arc<Mutex<Shared>>,
    limit: usize,
    generation: u64,
    /// The copy as it was when this try started, sent first.
    replay: Vec<Bytes>,
    next: usize,
    trailers_sent: bool,
}

impl TryBody {
    fn replaying(&self) -> bool {
        self.next < self.replay.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Body for TryBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if this.replaying() {
            let data = this.replay[this.next].clone();
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let shared = this.shared.clone();
        let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
        if s.current != this.generation || s.failed {
            // A newer try reads the client's body: this one ends here.
            return Poll::Ready(None);
        }
        let Some(client) = s.client.as_mut() else {
            // The client's body had ended before: its trailers, if any, then the end.
            if this.trailers_sent {
                return Poll::Ready(None);
            }
            this.trailers_sent = true;
            return Poll::Ready(s.trailers.clone().map(|t| Ok(Frame::trailers(t))));
        };
        let frame = std::task::ready!(Pin::new(client).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    if !s.overflowed {
                        s.copied += data.len();
                        if s.copied > this.limit {
                            s.overflowed = true;
                            s.copy = Vec::new();
                        } else {
                            s.copy.push(data.clone());
                        }
                    }
                    // hyper stops polling a body that says it has ended: so must we.
                    if s.client.as_ref().is_some_and(|c| c.is_end_stream()) {
                        this.trailers_sent = true;
                        s.end();
                    }
                } else if let Some(trailers) = f.trailers_ref() {
                    s.trailers = Some(trailers.clone());
                    this.trailers_sent = true;
                    s.end();
                }
            }
            Some(Err(_)) => {
                s.failed = true;
                s.client = None;
                s.copy = Vec::new();
            }
            None => {
                this.trailers_sent = true;
                s.end();
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        if self.replaying() {
            return false;
        }
        let s = self.lock();
        if s.current != self.generation || s.failed {
            return true;
        }
        match &s.client {
            Some(client) => client.is_end_stream(),
            None => self.trailers_sent || s.trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let pending: u64 = self.replay[self.next..]
            .iter()
            .map(|b| b.len() as u64)
            .sum();
        let s = self.lock();
        let rest = match &s.client {
            Some(client) if s.current == self.generation => client.size_hint(),
            _ => SizeHint::with_exact(0),
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
    async fn past_the_limit_the_body_streams_once_and_no_retry_is_possible() {
        let r = Replayable::new(chunks(&[b"0123", b"4567"], None), 6);
        assert_eq!(read(r.body().unwrap()).await.0, b"01234567");
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
    async fn received_resolves_when_the_body_has_come_whole_and_a_failure_is_the_clients() {
        let r = Replayable::new(chunks(&[b"ab", b"cd"], None), 64);
        let mut first = r.body().unwrap();
        let _ = first.frame().await;
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), r.received())
                .await
                .is_err(),
            "half the body"
        );
        let _ = read(first).await;
        r.received().await;
        // An empty body is received at once.
        Replayable::new(full(b""), 64).received().await;

        let failing = futures::stream::iter(vec![
            Ok(Frame::data(Bytes::from_static(b"x"))),
            Err(hyper_error().await),
        ]);
        let r = Replayable::new(StreamBody::new(failing).boxed(), 64);
        let body = r.body().unwrap();
        assert!(body.collect().await.is_err());
        assert!(r.client_failed());
        assert!(r.body().is_none());
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
