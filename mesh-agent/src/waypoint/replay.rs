//! A request body that can be sent again: the first try streams the client's body as it comes
//! and keeps a copy of what it passed on (up to a limit), so the success path never waits for
//! the whole body before the request leaves; a retry sends the copy, then whatever of the
//! client's body the previous try had not read.
//!
//! Only one try's body is alive at a time (tries are sequential): a body dropped hands the
//! client's body back for the next one.
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

use super::upstream::Body as BoxedBody;

/// What the tries share.
struct Shared {
    /// The client's body, while no try holds it (and it has not ended).
    client: Option<BoxedBody>,
    /// Every data frame passed on so far, in order.
    copy: Vec<Bytes>,
    copied: usize,
    trailers: Option<HeaderMap>,
    /// The client's body ended (its last frame is in `copy` or `trailers`).
    ended: bool,
    /// More than the limit was passed on: the copy was dropped, no other try can be made.
    overflowed: bool,
}

/// The handle a request keeps to make each try's body.
pub struct Replayable {
    shared: Arc<Mutex<Shared>>,
    limit: usize,
}

impl Replayable {
    /// `body`, copied as it is read, up to `limit` bytes.
    pub fn new(body: BoxedBody, limit: usize) -> Replayable {
        let shared = Shared {
            client: Some(body),
            copy: Vec::new(),
            copied: 0,
            trailers: None,
            ended: false,
            overflowed: false,
        };
        Replayable {
            shared: Arc::new(Mutex::new(shared)),
            limit,
        }
    }

    /// The body of the next try: what earlier tries passed on, then the rest of the client's.
    /// `None` when that cannot be had: the copy overflowed the limit, or an earlier try's body is
    /// still alive.
    pub fn body(&self) -> Option<TryBody> {
        let mut s = self.shared.lock().expect("replay lock");
        if s.overflowed || (s.client.is_none() && !s.ended) {
            return None;
        }
        let client = s.client.take();
        Some(TryBody {
            shared: self.shared.clone(),
            limit: self.limit,
            client,
            replay: s.copy.clone(),
            next: 0,
            trailers_sent: false,
        })
    }
}

/// One try's body.
pub struct TryBody {
    shared: Arc<Mutex<Shared>>,
    limit: usize,
    /// The client's body, held while this try reads it.
    client: Option<BoxedBody>,
    /// The copy as it was when this try started, sent first.
    replay: Vec<Bytes>,
    next: usize,
    trailers_sent: bool,
}

impl TryBody {
    fn replaying(&self) -> bool {
        self.next < self.replay.len()
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
        let Some(client) = this.client.as_mut() else {
            // The client's body had ended before this try: its trailers, if any, then the end.
            if this.trailers_sent {
                return Poll::Ready(None);
            }
            this.trailers_sent = true;
            let trailers = this.shared.lock().expect("replay lock").trailers.clone();
            return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
        };
        let frame = std::task::ready!(Pin::new(client).poll_frame(cx));
        let mut s = this.shared.lock().expect("replay lock");
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
                } else if let Some(trailers) = f.trailers_ref() {
                    s.trailers = Some(trailers.clone());
                }
            }
            Some(Err(_)) => {
                // A failed client body cannot be sent again.
                s.overflowed = true;
                s.copy = Vec::new();
            }
            None => {
                s.ended = true;
                this.client = None;
                this.trailers_sent = true;
            }
        }
        if matches!(frame, Some(Ok(ref f)) if f.is_trailers()) {
            s.ended = true;
            this.client = None;
            this.trailers_sent = true;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        if self.replaying() {
            return false;
        }
        match &self.client {
            Some(client) => client.is_end_stream(),
            None => {
                self.trailers_sent || self.shared.lock().expect("replay lock").trailers.is_none()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        let pending: u64 = self.replay[self.next..]
            .iter()
            .map(|b| b.len() as u64)
            .sum();
        let rest = match &self.client {
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

impl Drop for TryBody {
    fn drop(&mut self) {
        // The next try continues the client's body where this one left it.
        if let Some(client) = self.client.take() {
            if let Ok(mut s) = self.shared.lock() {
                s.client = Some(client);
            }
        }
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
    async fn only_one_try_holds_the_body() {
        let r = Replayable::new(full(b"x"), 64);
        let first = r.body().unwrap();
        assert!(r.body().is_none());
        drop(first);
        assert!(r.body().is_some());
    }
}
