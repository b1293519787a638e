//! What the HBONE server reads from a client's request: method, `:authority` (the CONNECT
//! target), the `forwarded` header (`for=` and `host=`) and `baggage`. Input: the method on the
//! first line, the authority on the second, then `name: value` header lines.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_agent::proxy::hbone::{connect_target, forwarded_for, forwarded_host, Baggage};

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|b| *b == b'\n');
    let (Some(method), Some(authority)) = (lines.next(), lines.next()) else {
        return;
    };
    let Ok(method) = http::Method::from_bytes(method) else {
        return;
    };
    let Ok(uri) = http::Uri::builder()
        .authority(authority)
        .build()
        .or_else(|_| http::Uri::try_from(authority))
    else {
        return;
    };
    let mut request = http::Request::builder().method(method).uri(uri);
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii_start());
        request = request.header(name, value);
    }
    let Ok(request) = request.body(()) else {
        return;
    };
    let (parts, ()) = request.into_parts();
    let _ = connect_target(&parts);
    let _ = forwarded_for(&parts.headers);
    let _ = forwarded_host(&parts.headers);
    if let Some(baggage) = Baggage::from_headers(&parts.headers) {
        let _ = baggage.header_value();
    }
});
