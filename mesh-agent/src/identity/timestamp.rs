//! Timestamps as logs and errors show them.
use std::time::{SystemTime, UNIX_EPOCH};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::signer::floor_secs;

/// `2024-05-01T12:00:00Z`: UTC, whole seconds, for logs and errors.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let t = floor_secs(t);
    OffsetDateTime::from(t)
        .format(&Rfc3339)
        .unwrap_or_else(|_| {
            // RFC 3339 has four-digit years only.
            let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
            format!("{secs} s after the Unix epoch")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_is_utc_in_whole_seconds() {
        let t = UNIX_EPOCH + Duration::from_millis(1_714_564_800_750);
        assert_eq!(rfc3339(t), "2024-05-01T12:00:00Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }
}
