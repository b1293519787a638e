//! The waypoint's access log: one line per request on standard output, as Envoy (and so Istio's
//! waypoint) writes it, in a fixed text format or as one JSON object per line
//! (`mesh-agent waypoint --access-log text|json|off`). Field names follow Envoy's access-log
//! command operators (Envoy 1.32): `%START_TIME%`, `%REQ(:METHOD)%`, `%REQ(:AUTHORITY)%`,
//! `%REQ(:PATH)%`, `%PROTOCOL%`, `%RESPONSE_CODE%`, `%RESPONSE_FLAGS%`, `%DURATION%`,
//! `%BYTES_RECEIVED%`, `%BYTES_SENT%`, `%UPSTREAM_HOST%`, `%DOWNSTREAM_REMOTE_ADDRESS%`,
//! `%TRACE_ID%`, `%DOWNSTREAM_PEER_URI_SAN%`, `%UPSTREAM_PEER_URI_SAN%`, `%ROUTE_NAME%`. A value
//! that is not known is `-` in text and `null` in JSON, as in Envoy.
//!
//! Text:
//! `[START] "METHOD PATH PROTOCOL" CODE FLAGS RECEIVED SENT DURATION "AUTHORITY" "UPSTREAM_HOST"
//! DOWNSTREAM_REMOTE TRACE_ID DOWNSTREAM_PRINCIPAL UPSTREAM_PRINCIPAL ROUTE`
use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use http::Version;
use serde_json::json;

use super::trace::TraceId;

/// Lines gathered since the last write: a write to standard output per request would cost a
/// system call and wake the reader (the log collector) each time. [`flush_periodically`] writes
/// them every [`FLUSH_INTERVAL`], or sooner once [`FLUSH_AT`] bytes have gathered.
static PENDING: Mutex<Batch> = Mutex::new(Batch::new());
static FULL: Notify = Notify::const_new();

/// How often gathered lines are written (Envoy's access-log flush interval).
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Gathered lines are written without waiting for the interval once they reach this size.
const FLUSH_AT: usize = 64 * 1024;
/// The most that waits while standard output does not keep up; lines beyond it are dropped and
/// counted (a blocked log must not grow the waypoint without bound or stall requests).
const MAX_PENDING: usize = 1 << 20;

/// Access-log lines not yet written.
struct Batch {
    buf: Vec<u8>,
    dropped: u64,
}

impl Batch {
    const fn new() -> Batch {
        Batch {
            buf: Vec::new(),
            dropped: 0,
        }
    }

    /// Adds `line`; `false` when there was no room and it was dropped.
    fn push(&mut self, line: &[u8]) -> bool {
        if self.buf.len() + line.len() > MAX_PENDING {
            self.dropped += 1;
            return false;
        }
        self.buf.extend_from_slice(line);
        true
    }

    /// What gathered, and how many lines were dropped, since the last call.
    fn take(&mut self) -> (Vec<u8>, u64) {
        (
            std::mem::take(&mut self.buf),
            std::mem::take(&mut self.dropped),
        )
    }
}

/// The lines gathered since the last call, saying how many were dropped meanwhile.
fn take_pending() -> Vec<u8> {
    let (bytes, dropped) = PENDING.lock().unwrap_or_else(|e| e.into_inner()).take();
    if dropped > 0 {
        tracing::warn!(
            lines = dropped,
            "access log lines dropped: standard output did not keep up"
        );
    }
    bytes
}

/// Writes what gathered to standard output (off the async workers).
async fn flush() {
    let bytes = take_pending();
    if !bytes.is_empty() {
        // A closed stdout loses the log, not the requests.
        let _ =
            tokio::task::spawn_blocking(move || std::io::stdout().lock().write_all(&bytes)).await;
    }
}

/// Writes what gathered, from outside the runtime: the last call, once the runtime has shut down
/// (requests cut at the end of the drain log their lines as their tasks are dropped).
pub fn flush_blocking() {
    let _ = std::io::stdout().lock().write_all(&take_pending());
}

/// Runs for the life of the waypoint: writes gathered lines every [`FLUSH_INTERVAL`], and
/// at once when [`FLUSH_AT`] bytes wait. [`flush_blocking`] writes the rest at exit.
pub async fn flush_periodically() {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FLUSH_INTERVAL) => {}
            _ = FULL.notified() => {}
        }
        flush().await;
    }
}

/// How requests are logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    Off,
}

/// One request, as logged.
#[derive(Debug)]
pub struct Entry<'a> {
    pub start: SystemTime,
    pub method: &'a str,
    /// The `:authority` (HTTP/2) or `Host` (HTTP/1.1).
    pub authority: Option<&'a str>,
    /// Path and query.
    pub path: &'a str,
    pub protocol: Version,
    /// 0: no response was sent.
    pub status: u16,
    pub flags: &'a str,
    pub duration_ms: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub upstream_host: Option<SocketAddr>,
    pub downstream_remote: SocketAddr,
    pub trace_id: TraceId,
    pub downstream_principal: &'a str,
    pub upstream_principal: Option<&'a str>,
    pub route_name: Option<&'a str>,
}

pub fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "-",
    }
}

/// RFC 3339 in UTC with milliseconds: `2026-12-06T13:12:09.123Z`.
pub fn rfc3339_ms(t: SystemTime) -> String {
    let mut out = String::with_capacity(24);
    write_time(&mut out, t);
    out
}

fn write_time(out: &mut String, t: SystemTime) {
    thread_local! {
        /// The last second formatted, and its text up to the seconds: lines of one second share
        /// it, and only the milliseconds are formatted for each.
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let Ok(since_epoch) = t.duration_since(UNIX_EPOCH) else {
        return write_time_slow(out, t);
    };
    let secs = since_epoch.as_secs();
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != secs {
            text.clear();
            write_time_slow(text, UNIX_EPOCH + Duration::from_secs(secs));
            text.truncate("2026-12-06T13:12:09".len());
            *second = secs;
        }
        out.push_str(text);
    });
    let millis = since_epoch.subsec_millis();
    let digit = |n: u32| char::from(b'0' + (n % 10) as u8);
    out.extend([
        '.',
        digit(millis / 100),
        digit(millis / 10),
        digit(millis),
        'Z',
    ]);
}

fn write_time_slow(out: &mut String, t: SystemTime) {
    let t = time::OffsetDateTime::from(t);
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    );
}

/// `s`, with `"`, `\` and control characters escaped, so that a client cannot break a line or a
/// quoted field; `-` when empty.
fn push_escaped(out: &mut String, s: &str) {
    if s.is_empty() {
        out.push('-');
        return;
    }
    // Most values are printable ASCII with nothing to escape.
    if s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.push_str(s);
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
}

fn push_or_dash(out: &mut String, v: Option<impl std::fmt::Display>) {
    match v {
        Some(v) => {
            let _ = write!(out, "{v}");
        }
        None => out.push('-'),
    }
}

impl Entry<'_> {
    /// The text line (without the newline).
    pub fn text(&self, out: &mut String) {
        out.push('[');
        write_time(out, self.start);
        out.push_str("] \"");
        push_escaped(out, self.method);
        out.push(' ');
        push_escaped(out, self.path);
        let _ = write!(
            out,
            " {}\" {} {} {} {} {} \"",
            protocol(self.protocol),
            self.status,
            self.flags,
            self.bytes_received,
            self.bytes_sent,
            self.duration_ms
        );
        push_escaped(out, self.authority.unwrap_or_default());
        out.push_str("\" \"");
        push_or_dash(out, self.upstream_host);
        let _ = write!(out, "\" {} {} ", self.downstream_remote, self.trace_id);
        push_escaped(out, self.downstream_principal);
        out.push(' ');
        push_escaped(out, self.upstream_principal.unwrap_or_default());
        out.push(' ');
        push_escaped(out, self.route_name.unwrap_or_default());
    }

    /// The JSON object (without the newline).
    pub fn json(&self, out: &mut String) {
        let v = json!({
            "start_time": rfc3339_ms(self.start),
            "method": self.method,
            "authority": self.authority,
            "path": self.path,
            "protocol": protocol(self.protocol),
            "response_code": self.status,
            "response_flags": self.flags,
            "duration": self.duration_ms,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "upstream_host": self.upstream_host.map(|a| a.to_string()),
            "downstream_remote_address": self.downstream_remote.to_string(),
            "trace_id": self.trace_id.to_string(),
            "downstream_peer_uri_san": self.downstream_principal,
            "upstream_peer_uri_san": self.upstream_principal,
            "route_name": self.route_name,
        });
        let _ = write!(out, "{v}");
    }

    /// Logs the entry in `format`, as one line: built in a per-thread buffer, then added whole
    /// to the lines [`flush_periodically`] writes to standard output.
    pub fn write(&self, format: Format) {
        thread_local! {
            static LINE: RefCell<String> = const { RefCell::new(String::new()) };
        }
        if format == Format::Off {
            return;
        }
        LINE.with_borrow_mut(|line| {
            line.clear();
            match format {
                Format::Text => self.text(line),
                Format::Json => self.json(line),
                Format::Off => return,
            }
            line.push('\n');
            let full = {
                let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
                pending.push(line.as_bytes()) && pending.buf.len() >= FLUSH_AT
            };
            if full {
                FULL.notify_one();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_gather_whole_and_past_the_limit_are_dropped_and_counted() {
        let mut batch = Batch::new();
        assert!(batch.push(b"one\n"));
        assert!(batch.push(b"two\n"));
        let big = vec![b'x'; MAX_PENDING];
        assert!(!batch.push(&big), "no room: dropped whole, not cut");
        assert_eq!(batch.take(), (b"one\ntwo\n".to_vec(), 1));
        assert_eq!(batch.take(), (Vec::new(), 0), "taken once");
        assert!(batch.push(&big), "room again once written");
    }

    #[test]
    fn times_of_one_second_share_its_text_and_the_next_second_is_its_own() {
        let at = |ms: u64| rfc3339_ms(UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(at(1_796_562_729_123), "2026-12-06T13:12:09.123Z");
        assert_eq!(at(1_796_562_729_007), "2026-12-06T13:12:09.007Z");
        assert_eq!(at(1_796_562_729_999), "2026-12-06T13:12:09.999Z");
        assert_eq!(at(1_796_562_730_040), "2026-12-06T13:12:10.040Z");
        // Back to an earlier second (clocks step), and across a day.
        assert_eq!(at(1_796_562_729_500), "2026-12-06T13:12:09.500Z");
        assert_eq!(at(1_796_601_599_000), "2026-12-06T23:59:59.000Z");
        assert_eq!(at(1_796_601_600_001), "2026-12-07T00:00:00.001Z");
        // Before 1970 (a clock gone wrong): still a time, never a panic.
        let before = rfc3339_ms(UNIX_EPOCH - Duration::from_millis(1_500));
        assert_eq!(before, "1969-12-31T23:59:58.500Z");
    }

    fn entry() -> Entry<'static> {
        Entry {
            // 2026-12-06T13:12:09.123Z
            start: UNIX_EPOCH + Duration::from_millis(1_796_562_729_123),
            method: "GET",
            authority: Some("api.default.svc.cluster.local"),
            path: "/hello?x=1",
            protocol: Version::HTTP_11,
            status: 200,
            flags: "-",
            duration_ms: 3,
            bytes_received: 0,
            bytes_sent: 157,
            upstream_host: Some("10.0.2.2:8080".parse().unwrap()),
            downstream_remote: "10.0.1.2:43210".parse().unwrap(),
            trace_id: TraceId(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
            downstream_principal: "spiffe://cluster.local/ns/default/sa/client",
            upstream_principal: Some("spiffe://cluster.local/ns/default/sa/server"),
            route_name: None,
        }
    }

    #[test]
    fn a_text_line() {
        let mut line = String::new();
        entry().text(&mut line);
        assert_eq!(
            line,
            "[2026-12-06T13:12:09.123Z] \"GET /hello?x=1 HTTP/1.1\" 200 - 0 157 3 \
             \"api.default.svc.cluster.local\" \"10.0.2.2:8080\" 10.0.1.2:43210 \
             4bf92f3577b34da6a3ce929d0e0e4736 spiffe://cluster.local/ns/default/sa/client \
             spiffe://cluster.local/ns/default/sa/server -"
        );
    }

    #[test]
    fn a_local_reply_and_hostile_values_in_text() {
        let mut line = String::new();
        Entry {
            authority: Some("evil\"host\n[x]"),
            status: 403,
            upstream_host: None,
            upstream_principal: None,
            route_name: Some("default/api.0"),
            protocol: Version::HTTP_2,
            ..entry()
        }
        .text(&mut line);
        assert_eq!(
            line,
            "[2026-12-06T13:12:09.123Z] \"GET /hello?x=1 HTTP/2\" 403 - 0 157 3 \
             \"evil\\\"host\\x0a[x]\" \"-\" 10.0.1.2:43210 \
             4bf92f3577b34da6a3ce929d0e0e4736 spiffe://cluster.local/ns/default/sa/client \
             - default/api.0"
        );
    }

    #[test]
    fn escaping_keeps_printable_text_and_escapes_the_rest() {
        let escaped = |s: &str| {
            let mut out = String::new();
            push_escaped(&mut out, s);
            out
        };
        assert_eq!(escaped("/plain/path?q=1&x=~"), "/plain/path?q=1&x=~");
        assert_eq!(escaped(""), "-");
        assert_eq!(escaped("a\\b"), "a\\\\b");
        assert_eq!(escaped("del\x7f"), "del\\x7f");
        assert_eq!(escaped("tab\tend"), "tab\\x09end");
        // Non-ASCII letters stay; C1 controls are escaped like C0 ones.
        assert_eq!(escaped("caf\u{e9}"), "caf\u{e9}");
        assert_eq!(escaped("nel\u{85}"), "nel\\x85");
    }

    #[test]
    fn a_json_line() {
        let mut line = String::new();
        Entry {
            upstream_principal: None,
            upstream_host: None,
            status: 503,
            flags: "UF",
            ..entry()
        }
        .json(&mut line);
        assert_eq!(
            line,
            r#"{"start_time":"2026-12-06T13:12:09.123Z","method":"GET","authority":"api.default.svc.cluster.local","path":"/hello?x=1","protocol":"HTTP/1.1","response_code":503,"response_flags":"UF","duration":3,"bytes_received":0,"bytes_sent":157,"upstream_host":null,"downstream_remote_address":"10.0.1.2:43210","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","downstream_peer_uri_san":"spiffe://cluster.local/ns/default/sa/client","upstream_peer_uri_san":null,"route_name":null}"#
        );
    }
}
