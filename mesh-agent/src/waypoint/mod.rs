//! The waypoint: an L7 proxy in its own pod, in front of the services and workloads that use it
//! (`istio.io/use-waypoint`). Its HBONE listener and its L4 path are the proxy's
//! (`proxy::serve_waypoint`); what it does with HTTP lives here: `http` serves it, `routing`
//! decides where each request goes after Gateway API's HTTPRoute (pure: matching, precedence,
//! weighted backends, filters); `telemetry` reports each request (Istio's request metrics,
//! the `access_log`, the W3C `trace` context); `primed` bodies leave with their head; `replay`
//! bodies are streamed once and sent again by a retry.
pub mod access_log;
pub mod balance;
pub mod cluster;
pub mod fault;
pub mod http;
pub mod normalize;
pub mod primed;
pub mod rate_limit;
pub mod replay;
pub mod retry;
pub mod routes;
pub mod routing;
pub mod telemetry;
pub mod trace;
pub mod upstream;
