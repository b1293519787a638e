//! W3C Trace Context Level 1 (Recommendation, 23 November 2021) at the waypoint: the request's
//! `traceparent` is read strictly, and the upstream gets a `traceparent` for the waypoint's own
//! hop: the same trace id and flags, a fresh span id. `tracestate` goes along unchanged when the
//! `traceparent` was valid and is dropped otherwise (a vendor that cannot read `traceparent`
//! must not use `tracestate`). A request without a valid `traceparent` starts a new trace
//! (random trace id, flags `00`). Other tracing headers (B3, `x-request-id`) are not touched.
use std::fmt;

use http::header::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// A 16-byte trace id, never all zeros; shown as 32 lower-case hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceId(pub u128);

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = [0u8; 32];
        put_hex(&mut text, self.0);
        f.write_str(std::str::from_utf8(&text).expect("hex digits"))
    }
}

/// Writes `v` into `out` as lower-case hex digits, zero-padded to the length of `out` (the
/// lowest digits of `v` when it is longer).
fn put_hex(out: &mut [u8], mut v: u128) {
    for c in out.iter_mut().rev() {
        *c = b"0123456789abcdef"[(v & 0xf) as usize];
        v >>= 4;
    }
}

/// A version-00 `traceparent`: `00-<trace id>-<parent id>-<flags>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub parent_id: u64,
    pub flags: u8,
}

/// `n` lower-case hex digits (upper case is invalid in `traceparent`).
fn hex(s: &[u8]) -> Option<u128> {
    s.iter().try_fold(0u128, |acc, &c| {
        let digit = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        Some(acc << 4 | u128::from(digit))
    })
}

impl TraceParent {
    /// Parses a `traceparent` value: version `00`, exactly 55 characters, a 32-digit trace id
    /// and a 16-digit parent id that are not all zeros, 2-digit flags, all lower-case hex.
    /// Anything else is `None` (the header counts as absent).
    pub fn parse(value: &[u8]) -> Option<TraceParent> {
        if value.len() != 55 || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        if &value[..2] != b"00" {
            return None;
        }
        let trace_id = hex(&value[3..35])?;
        let parent_id = hex(&value[36..52])? as u64;
        let flags = hex(&value[53..55])? as u8;
        if trace_id == 0 || parent_id == 0 {
            return None;
        }
        Some(TraceParent {
            trace_id: TraceId(trace_id),
            parent_id,
            flags,
        })
    }

    /// A new trace: random trace id and parent id, flags `00` (not sampled).
    pub fn start() -> TraceParent {
        TraceParent {
            trace_id: TraceId(nonzero(rand::random)),
            parent_id: nonzero(rand::random),
            flags: 0,
        }
    }

    /// The same trace, as the next hop sees it: a fresh random span id as its parent.
    pub fn child(&self) -> TraceParent {
        TraceParent {
            parent_id: nonzero(rand::random),
            ..*self
        }
    }

    pub fn header_value(&self) -> HeaderValue {
        let mut text = *b"00-________________________________-________________-__";
        put_hex(&mut text[3..35], self.trace_id.0);
        put_hex(&mut text[36..52], self.parent_id.into());
        put_hex(&mut text[53..55], self.flags.into());
        HeaderValue::from_bytes(&text).expect("hex digits and dashes are a valid header value")
    }
}

fn nonzero<T: Default + PartialEq>(mut random: impl FnMut() -> T) -> T {
    loop {
        let v = random();
        if v != T::default() {
            return v;
        }
    }
}

/// The waypoint's span of one request: a child of the client's context (exactly one
/// `traceparent`, valid), or the first span of a new trace. Decided when the request arrives;
/// the request's headers change only when it is forwarded ([`inject`](Self::inject)), so
/// authorization and routing see the client's own trace headers, as Envoy's do.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    next: TraceParent,
    /// A new trace: the client's `tracestate` (if any) belongs to no trace we continue.
    started: bool,
}

impl Span {
    /// The span for a request that arrived with `headers`.
    pub fn for_request(headers: &HeaderMap) -> Span {
        let mut values = headers.get_all(&TRACEPARENT).iter();
        let received = match (values.next(), values.next()) {
            (Some(v), None) => TraceParent::parse(v.as_bytes()),
            // More than one traceparent is invalid.
            _ => None,
        };
        match received {
            Some(parent) => Span {
                next: parent.child(),
                started: false,
            },
            None => Span {
                next: TraceParent::start(),
                started: true,
            },
        }
    }

    pub fn trace_id(&self) -> TraceId {
        self.next.trace_id
    }

    /// Rewrites `headers` (the request's, on its way upstream) for this span: its
    /// `traceparent`, and no `tracestate` when the trace is new.
    pub fn inject(&self, headers: &mut HeaderMap) {
        if self.started {
            headers.remove(&TRACESTATE);
        }
        headers.insert(TRACEPARENT, self.next.header_value());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the waypoint does to a forwarded request's headers; the trace id.
    fn propagate(headers: &mut HeaderMap) -> TraceId {
        let span = Span::for_request(headers);
        span.inject(headers);
        span.trace_id()
    }

    #[test]
    fn the_headers_change_only_when_the_span_is_injected() {
        let h = headers(&[("traceparent", SPEC), ("tracestate", "congo=1")]);
        let before = h.clone();
        let span = Span::for_request(&h);
        assert_eq!(h, before);
        assert_eq!(
            span.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    const SPEC: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specs_example_parses() {
        let p = TraceParent::parse(SPEC.as_bytes()).unwrap();
        assert_eq!(p.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.parent_id, 0x00f0_67aa_0ba9_02b7);
        assert_eq!(p.flags, 1);
        assert_eq!(p.header_value(), SPEC);
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert_eq!(TraceParent::parse(unsampled.as_bytes()).unwrap().flags, 0);
    }

    #[test]
    fn written_values_parse_back_to_themselves() {
        assert_eq!(TraceId(1).to_string(), format!("{:032x}", 1));
        assert_eq!(TraceId(u128::MAX).to_string(), "f".repeat(32));
        for _ in 0..1000 {
            let p = TraceParent {
                flags: rand::random(),
                ..TraceParent::start()
            };
            let value = p.header_value();
            let expected = format!(
                "00-{:032x}-{:016x}-{:02x}",
                p.trace_id.0, p.parent_id, p.flags
            );
            assert_eq!(value, expected.as_str());
            assert_eq!(TraceParent::parse(value.as_bytes()), Some(p));
        }
    }

    #[test]
    fn invalid_values_are_rejected() {
        for bad in [
            // all-zero trace id, all-zero parent id
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // upper-case hex
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            // version ff, another version, a version-00 value with more after it
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            // short fields, wrong separators, non-hex, empty
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "",
        ] {
            assert_eq!(TraceParent::parse(bad.as_bytes()), None, "{bad:?}");
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn a_valid_context_continues_with_a_new_span_id() {
        let mut h = headers(&[
            ("traceparent", SPEC),
            ("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
            ("tracestate", "other=1"),
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-request-id", "abc"),
        ]);
        let id = propagate(&mut h);
        assert_eq!(id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let sent = TraceParent::parse(h[&TRACEPARENT].as_bytes()).unwrap();
        assert_eq!((sent.trace_id, sent.flags), (id, 1));
        assert_ne!(sent.parent_id, 0x00f0_67aa_0ba9_02b7);
        let states: Vec<_> = h.get_all(&TRACESTATE).iter().collect();
        assert_eq!(
            states,
            ["congo=t61rcWkgMzE,rojo=00f067aa0ba902b7", "other=1"]
        );
        assert_eq!(h["x-b3-traceid"], "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(h["x-request-id"], "abc");
    }

    #[test]
    fn without_a_valid_context_a_new_trace_starts_and_tracestate_goes() {
        for given in [
            &[("tracestate", "congo=t61rcWkgMzE")][..],
            &[
                (
                    "traceparent",
                    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                ),
                ("tracestate", "congo=t61rcWkgMzE"),
            ][..],
            // Two traceparent headers are invalid even when each is well formed.
            &[("traceparent", SPEC), ("traceparent", SPEC)][..],
        ] {
            let mut h = headers(given);
            let id = propagate(&mut h);
            assert_ne!(id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(h.get_all(&TRACEPARENT).iter().count(), 1);
            let sent = TraceParent::parse(h[&TRACEPARENT].as_bytes()).unwrap();
            assert_eq!((sent.trace_id, sent.flags), (id, 0));
            assert!(h.get(&TRACESTATE).is_none(), "{given:?}");
        }
        // Two new traces do not share an id.
        let (mut a, mut b) = (HeaderMap::new(), HeaderMap::new());
        assert_ne!(propagate(&mut a), propagate(&mut b));
    }
}
