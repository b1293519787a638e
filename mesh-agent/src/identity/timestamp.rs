//! Timestamps as logs and errors show them.
use std::time::SystemTime;

use time::OffsetDateTime;

use super::signer::floor_secs;

/// `2024-05-01T12:00:00Z`, for logs.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let dt = OffsetDateTime::from(floor_secs(t));
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    )
}
