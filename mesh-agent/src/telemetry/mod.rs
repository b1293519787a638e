//! Metrics, readiness and logs.
pub mod admin;
mod metrics;

pub use admin::Readiness;
pub use metrics::{ConnLabels, DenialLabels, FailedLabels, Metrics, ResultLabels};
