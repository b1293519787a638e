//! Metrics, readiness and logs.
pub mod admin;
pub mod carry;
mod metrics;
pub mod ratelimit;
mod requests;

pub use admin::Readiness;
pub use metrics::{
    AcceptErrorLabels, ConnLabels, DenialLabels, EjectionLabels, FailedLabels, Metrics,
    ReasonLabels, ResultLabels,
};
pub use ratelimit::LogEvery;
pub use requests::{
    DestinationLabels, EndpointLabels, Hashed, Outcome, RequestLabels, RequestMetrics, RetryLabels,
    SourceLabels, BUCKETS,
};
