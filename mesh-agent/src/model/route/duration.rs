//! Gateway API Durations (GEP-2257): one to four components, each one to five decimal digits and
//! a unit (`h`, `m`, `s`, `ms`), summed: `10s`, `500ms`, `1h2m`, `1h30m10s500ms`. No sign, no
//! fraction, no other unit; units may repeat (`1h2h` is three hours) and come in any order.
use std::time::Duration;

use serde::de::Deserializer;

use crate::model::policy::deserialize_parsed;

const MAX_COMPONENTS: usize = 4;
const MAX_DIGITS: usize = 5;

/// Parses a GEP-2257 duration, naming what is wrong when it is not one.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = |why: &str| {
        Err(format!(
            "{text:?} is not a Gateway API duration ({why}; write 1 to 4 parts of up to 5 digits \
             and a unit h, m, s or ms, such as \"10s\", \"500ms\" or \"1h30m\")"
        ))
    };
    if text.is_empty() {
        return bad("it is empty");
    }
    let mut total = Duration::ZERO;
    let mut rest = text.as_bytes();
    let mut components = 0;
    while !rest.is_empty() {
        components += 1;
        if components > MAX_COMPONENTS {
            return bad("more than 4 parts");
        }
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            return bad("a part must start with a number");
        }
        if digits > MAX_DIGITS {
            return bad("a number has more than 5 digits");
        }
        // At most 5 ASCII digits: always fits.
        let value = rest[..digits]
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        rest = &rest[digits..];
        let (unit, len) = match rest {
            [b'm', b's', ..] => (Duration::from_millis(1), 2),
            [b'h', ..] => (Duration::from_secs(3600), 1),
            [b'm', ..] => (Duration::from_secs(60), 1),
            [b's', ..] => (Duration::from_secs(1), 1),
            [] => return bad("a number lacks its unit"),
            _ => return bad("units are h, m, s and ms"),
        };
        rest = &rest[len..];
        // At most 4 × 99999 h: no overflow.
        total += unit * value as u32;
    }
    Ok(total)
}

/// The standard form of a duration (descending units, each at most once, `0s` for zero), as
/// GEP-2257 requires for output; sub-millisecond parts are dropped.
pub fn format_duration(duration: Duration) -> String {
    let mut millis = duration.as_millis();
    if millis == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (unit, name) in [(3_600_000, "h"), (60_000, "m"), (1000, "s"), (1, "ms")] {
        let count = millis / unit;
        if count > 0 {
            out.push_str(&format!("{count}{name}"));
            millis -= count * unit;
        }
    }
    out
}

/// For `#[serde(default, deserialize_with = ...)]` on an `Option<Duration>` field.
pub(super) fn deserialize_optional<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    deserialize_parsed(deserializer, "a Gateway API duration such as 10s", |text| {
        parse_duration(text).map(Some)
    })
}
