//! Bodies forwarded with their first frame: hyper writes a message's head as soon as it has it,
//! and its body when the body is polled. If the head goes out alone, each message crosses the
//! next hop as two HBONE DATA frames, two TLS records and two wake-ups. A body's first frame is
//! usually already there when the head is (it came in the same read), so [`prime`] takes it
//! without waiting and hands it out first: head and body then leave in one write. A first frame
//! that is not there yet is not waited for; nothing else changes (streaming, trailers, errors,
//! timeouts and the body's length are as they were).
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::FutureExt as _;
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, SizeHint};

/// A body with its first frame possibly taken ahead.
pub struct Primed<B> {
    first: Option<Result<Frame<Bytes>, hyper::Error>>,
    inner: B,
}

/// `body` with its first frame taken if it is ready now.
pub fn prime<B>(mut body: B) -> Primed<B>
where
    B: Body<Data = Bytes, Error = hyper::Error> + Unpin,
{
    let first = if body.is_end_stream() {
        None
    } else {
        // Polled once, without a waker of ours: the body's next poll registers the real one.
        body.frame().now_or_never().flatten()
    };
    Primed { first, inner: body }
}

impl<B> Body for Primed<B>
where
    B: Body<Data = Bytes, Error = hyper::Error> + Unpin,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(first));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let taken = match &self.first {
            Some(Ok(frame)) => frame.data_ref().map_or(0, |d| d.len() as u64),
            _ => 0,
        };
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + taken);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + taken);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// A body handing out its frames one per poll, `Pending` once before each when `slow`.
    struct Frames {
        frames: VecDeque<Frame<Bytes>>,
        left: u64,
        slow: bool,
        ready: bool,
    }

    impl Frames {
        fn new(chunks: &[&'static [u8]], trailers: bool, slow: bool) -> Frames {
            let mut frames: VecDeque<_> = chunks
                .iter()
                .map(|c| Frame::data(Bytes::from_static(c)))
                .collect();
            if trailers {
                let mut t = http::HeaderMap::new();
                t.insert("grpc-status", http::HeaderValue::from_static("0"));
                frames.push_back(Frame::trailers(t));
            }
            let left = chunks.iter().map(|c| c.len() as u64).sum();
            Frames {
                frames,
                left,
                slow,
                ready: false,
            }
        }
    }

    impl Body for Frames {
        type Data = Bytes;
        type Error = hyper::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
            if self.slow && !std::mem::replace(&mut self.ready, true) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.ready = false;
            let frame = self.frames.pop_front();
            if let Some(d) = frame.as_ref().and_then(Frame::data_ref) {
                self.left -= d.len() as u64;
            }
            Poll::Ready(frame.map(Ok))
        }

        fn is_end_stream(&self) -> bool {
            self.frames.is_empty()
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.left)
        }
    }

    /// Reads `body` to its end: data frames, trailers, and whether it said it ended.
    async fn drain<B: Body<Data = Bytes, Error = hyper::Error> + Unpin>(
        mut body: B,
    ) -> (Vec<Bytes>, Option<http::HeaderMap>, bool) {
        let (mut data, mut trailers) = (Vec::new(), None);
        while let Some(frame) = body.frame().await {
            match frame.unwrap().into_data() {
                Ok(d) => data.push(d),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        (data, trailers, body.is_end_stream())
    }

    #[tokio::test]
    async fn a_ready_first_frame_is_taken_ahead_and_the_rest_follows() {
        let body = prime(Frames::new(&[b"head ", b"rest"], true, false));
        assert!(body.first.is_some(), "taken ahead");
        assert_eq!(
            body.size_hint().exact(),
            Some(9),
            "the length stays the whole body's"
        );
        assert!(!body.is_end_stream());
        let (data, trailers, ended) = drain(body).await;
        assert_eq!(data, [&b"head "[..], &b"rest"[..]]);
        assert_eq!(trailers.unwrap()["grpc-status"], "0", "trailers kept");
        assert!(ended, "it says it ended after its trailers");
    }

    #[tokio::test]
    async fn a_first_frame_not_there_yet_is_not_waited_for() {
        let body = prime(Frames::new(&[b"later"], false, true));
        assert!(body.first.is_none());
        let (data, _, ended) = drain(body).await;
        assert_eq!(data, [&b"later"[..]]);
        assert!(ended);
    }

    #[tokio::test]
    async fn an_empty_body_stays_empty() {
        let body = prime(Frames::new(&[], false, false));
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
    }
}
