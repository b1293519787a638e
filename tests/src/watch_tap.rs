//! A client-side tap on Kubernetes API responses that tells a test when the client has *consumed*
//! the `BOOKMARK` events it was sent, so a test can act on the server (drop the watch, say) only
//! after the watcher has taken the bookmark's resourceVersion, never racing it.
//!
//! How it knows: kube's watch stream decodes the response body line by line and asks the body
//! for more bytes only once every complete line it holds has been handed up and processed (the
//! watcher takes a bookmark's resourceVersion and polls for the next event). So when the body
//! is polled again after a chunk that held bookmarks, those bookmarks have been consumed.
//!
//! ```ignore
//! let tap = BookmarkTap::default();
//! let client = kube::client::ClientBuilder::try_from(config)?.with_layer(&tap).build();
//! server.bookmark();
//! // wait until tap.consumed() has grown by the number of watches
//! ```
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// What a bookmark looks like on the wire (the fake API server writes compact JSON).
const NEEDLE: &[u8] = br#""type":"BOOKMARK""#;

/// A `tower` layer counting the bookmarks the client has consumed; cheap to clone (shared count).
#[derive(Clone, Default)]
pub struct BookmarkTap {
    consumed: Arc<AtomicUsize>,
}

impl BookmarkTap {
    /// Bookmarks consumed so far, over every response of every client built with this tap.
    pub fn consumed(&self) -> usize {
        self.consumed.load(Ordering::SeqCst)
    }
}

impl<S> tower_layer::Layer<S> for BookmarkTap {
    type Service = TapService<S>;

    fn layer(&self, inner: S) -> TapService<S> {
        TapService {
            inner,
            consumed: self.consumed.clone(),
        }
    }
}

#[derive(Clone)]
pub struct TapService<S> {
    inner: S,
    consumed: Arc<AtomicUsize>,
}

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for TapService<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<TapBody<ResBody>>;
    type Error = S::Error;
    type Future = TapFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        TapFuture {
            inner: Box::pin(self.inner.call(req)),
            consumed: self.consumed.clone(),
        }
    }
}

pub struct TapFuture<F> {
    inner: Pin<Box<F>>,
    consumed: Arc<AtomicUsize>,
}

impl<F, ResBody, E> Future for TapFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<TapBody<ResBody>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let consumed = self.consumed.clone();
        self.inner.as_mut().poll(cx).map(|r| {
            r.map(|resp| {
                resp.map(|body| TapBody {
                    inner: Box::pin(body),
                    scanner: Scanner::default(),
                    pending: None,
                    consumed,
                })
            })
        })
    }
}

/// Counts the complete lines (ended by `\n`) holding [`NEEDLE`], across chunk boundaries. A
/// line counts only once its end has arrived: kube decodes a line only then, so a chunk that
/// ends mid-line makes it read on without having seen the bookmark.
#[derive(Default)]
struct Scanner {
    /// The last `NEEDLE.len() - 1` bytes of the current line, in case a needle spans two chunks.
    tail: Vec<u8>,
    /// The current (unfinished) line holds a needle.
    hit: bool,
}

impl Scanner {
    fn count(&mut self, chunk: &[u8]) -> usize {
        let mut lines = 0;
        let mut pieces = chunk.split(|b| *b == b'\n').peekable();
        while let Some(piece) = pieces.next() {
            let mut joined = std::mem::take(&mut self.tail);
            joined.extend_from_slice(piece);
            self.hit |= joined.windows(NEEDLE.len()).any(|w| w == NEEDLE);
            if pieces.peek().is_some() {
                // A newline followed this piece: the line is complete.
                lines += usize::from(std::mem::take(&mut self.hit));
            } else {
                let keep = joined.len().min(NEEDLE.len() - 1);
                self.tail = joined[joined.len() - keep..].to_vec();
            }
        }
        lines
    }
}

pub struct TapBody<B> {
    inner: Pin<Box<B>>,
    scanner: Scanner,
    /// Bookmarks in the chunk handed out last, not yet known to be consumed.
    pending: Option<usize>,
    consumed: Arc<AtomicUsize>,
}

impl<B> TapBody<B> {
    /// Bookmarks in chunks already handed out count as consumed once the reader comes back.
    fn settle(&mut self) {
        if let Some(n) = self.pending.take() {
            self.consumed.fetch_add(n, Ordering::SeqCst);
        }
    }
}

impl<B: Body<Data = Bytes>> Body for TapBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        this.settle();
        let polled = this.inner.as_mut().poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let n = this.scanner.count(data);
                if n > 0 {
                    this.pending = Some(n);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bookmark_lines_count_once_complete() {
        let mut s = Scanner::default();
        let line = br#"{"type":"BOOKMARK","object":{}}"#;
        assert_eq!(s.count(&[&line[..], b"\n"].concat()), 1);
        // Split inside the needle, and the newline in a later chunk.
        let (a, b) = line.split_at(9);
        assert_eq!(s.count(a), 0);
        assert_eq!(s.count(b), 0, "not complete yet");
        assert_eq!(s.count(b"\n"), 1);
        assert_eq!(s.count(b"{\"type\":\"ADDED\"}\n"), 0);
        let two = [&line[..], b"\n", &line[..], b"\n{\"type\":"].concat();
        assert_eq!(s.count(&two), 2);
        assert_eq!(s.count(b"\"ADDED\"}\n"), 0);
    }
}
