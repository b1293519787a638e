//! Our extension for local rate limits (Istio needs an EnvoyFilter for one): the annotation
//! [`RATE_LIMIT_ANNOTATION`] on an `HTTPRoute` limits the requests the route takes, per Service
//! it applies to, in each waypoint replica. Its value is `<requests>/<unit>` with unit `s`, `m`
//! or `h`, optionally followed by `;burst=<n>` (the most requests let through at once; default
//! `<requests>`): `100/s`, `6000/m;burst=200`.
use std::time::Duration;

/// The annotation's name.
pub const RATE_LIMIT_ANNOTATION: &str = "mesh.dev/rate-limit";

/// A token bucket's settings: `requests` tokens come back every `per`, at most `burst` kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub per: Duration,
    pub burst: u32,
}

impl RateLimit {
    /// Reads the annotation's value; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<RateLimit, String> {
        let expected = "expected `<requests>/<s|m|h>`, optionally followed by `;burst=<n>` \
                        (e.g. `100/s` or `6000/m;burst=200`)";
        let (rate, burst) = match text.split_once(';') {
            Some((rate, burst)) => (rate, Some(burst)),
            None => (text, None),
        };
        let (requests, unit) = rate
            .split_once('/')
            .ok_or_else(|| format!("{text:?}: {expected}"))?;
        let requests: u32 = requests
            .trim()
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{text:?}: the requests must be a whole number above 0"))?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => return Err(format!("{text:?}: unknown unit {other:?}: {expected}")),
        };
        let burst = match burst {
            None => requests,
            Some(b) => b
                .trim()
                .strip_prefix("burst=")
                .and_then(|n| n.parse().ok())
                .filter(|n: &u32| *n > 0)
                .ok_or_else(|| {
                    format!("{text:?}: after `;` expected `burst=<n>` with n above 0")
                })?,
        };
        Ok(RateLimit {
            requests,
            per,
            burst,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_bursts_are_read() {
        assert_eq!(
            RateLimit::parse("100/s").unwrap(),
            RateLimit {
                requests: 100,
                per: Duration::from_secs(1),
                burst: 100
            }
        );
        assert_eq!(
            RateLimit::parse("6000/m;burst=200").unwrap(),
            RateLimit {
                requests: 6000,
                per: Duration::from_secs(60),
                burst: 200
            }
        );
        assert_eq!(
            RateLimit::parse(" 5 / h ").unwrap().per,
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        for (text, part) in [
            ("100", "expected `<requests>/<s|m|h>`"),
            ("0/s", "above 0"),
            ("-1/s", "above 0"),
            ("10/d", "unknown unit \"d\""),
            ("10/s;bust=3", "burst=<n>"),
            ("10/s;burst=0", "burst=<n>"),
        ] {
            let e = RateLimit::parse(text).unwrap_err();
            assert!(e.contains(part), "{text}: {e}");
        }
    }
}
