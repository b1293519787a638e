//! The request path as policy, routing and the backend all see it, after Istio's default path
//! normalization (`meshConfig.pathNormalization: BASE`, Envoy's `normalize_path`): RFC 3986
//! §2.3 percent-encoded unreserved characters decoded (`%61` is `a`), §5.2.4 dot segments
//! removed (`/a/./b/../c` is `/a/c`). Encoded `/` and `\` (`%2F`, `%5C`) stay as they are, as
//! in Istio's default. Without it `/public/../admin` or `/%61dmin` would pass a rule on
//! `/admin*` that the backend then serves.
use http::uri::{PathAndQuery, Uri};

/// The request's URI with its path normalized; `None` when the normalized form is not a valid
/// URI (answered 400).
pub fn normalize_uri(uri: &Uri) -> Option<Uri> {
    let Some(pq) = uri.path_and_query() else {
        return Some(uri.clone());
    };
    let path = pq.path();
    if !needs_work(path) {
        return Some(uri.clone());
    }
    let normalized = remove_dot_segments(&decode_unreserved(path));
    let with_query = match pq.query() {
        Some(query) => format!("{normalized}?{query}"),
        None => normalized,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(with_query).ok()?);
    Uri::from_parts(parts).ok()
}

/// Whether the path has anything to normalize (the common case has not: no allocation).
fn needs_work(path: &str) -> bool {
    path.contains('%')
        || path
            .split('/')
            .any(|segment| segment == "." || segment == "..")
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decodes `%XX` escapes of unreserved characters; every other escape is kept, with its hex
/// digits upper-cased (RFC 3986 §6.2.2.1). Works on bytes: only ASCII is ever changed.
fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && bytes[i + 1].is_ascii_hexdigit()
            && bytes[i + 2].is_ascii_hexdigit()
        {
            let hex = |b: u8| (b as char).to_digit(16).unwrap_or(0) as u8;
            let decoded = hex(bytes[i + 1]) << 4 | hex(bytes[i + 2]);
            if is_unreserved(decoded) {
                out.push(decoded);
            } else {
                out.extend_from_slice(&[
                    b'%',
                    bytes[i + 1].to_ascii_uppercase(),
                    bytes[i + 2].to_ascii_uppercase(),
                ]);
            }
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    // Only ASCII bytes were replaced by ASCII bytes: still the text it was.
    String::from_utf8(out).unwrap_or_else(|_| path.to_string())
}

/// RFC 3986 §5.2.4 for an absolute path: `.` segments go, `..` removes the segment before it
/// (never above the root).
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." => trailing_slash = i == last,
            ".." => {
                kept.pop();
                trailing_slash = i == last;
            }
            s => {
                kept.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(uri: &str) -> String {
        normalize_uri(&uri.parse().unwrap()).unwrap().to_string()
    }

    #[test]
    fn dot_segments_and_unreserved_escapes_are_normalized() {
        for (given, expected) in [
            ("/public/../admin", "/admin"),
            ("/./admin", "/admin"),
            ("/a/b/./c/../d", "/a/b/d"),
            ("/../../etc", "/etc"),
            ("/a/..", "/"),
            ("/a/.", "/a/"),
            ("/%61dmin", "/admin"),
            ("/%7euser/%2e%2e/admin", "/admin"),
            ("/a%2Fb", "/a%2Fb"),
            ("/a%2fb%5c", "/a%2Fb%5C"),
            ("/%zz", "/%zz"),
            ("/x%", "/x%"),
            ("/a/../b?q=/../c", "/b?q=/../c"),
            ("/plain/path?x=1", "/plain/path?x=1"),
            ("/a//b", "/a//b"),
            ("/", "/"),
        ] {
            assert_eq!(norm(given), expected, "{given}");
        }
        // Absolute-form (HTTP/2 :authority or a proxy request) keeps scheme and authority.
        assert_eq!(
            norm("http://web.shop:80/x/../admin"),
            "http://web.shop:80/admin"
        );
    }
}
