//! Metrics, readiness and logs.
pub mod admin;
pub mod carry;
mod metrics;

pub use admin::Readiness;
pub use metrics::{ConnLabels, DenialLabels, FailedLabels, Metrics, ReasonLabels, ResultLabels};
