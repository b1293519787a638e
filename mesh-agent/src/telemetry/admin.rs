//! Small HTTP endpoints: Prometheus metrics (15020) and readiness (15021).
use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::Metrics;

/// Ready once the first reconcile ran and every enrolled workload of this node is wired.
#[derive(Default)]
pub struct Readiness {
    synced: AtomicBool,
    /// Workloads that should be wired but are not (with the reason).
    pending: Mutex<BTreeSet<String>>,
}

impl Readiness {
    pub fn set(&self, synced: bool, pending: BTreeSet<String>) {
        *self.pending.lock().expect("readiness lock") = pending;
        self.synced.store(synced, Ordering::SeqCst);
    }

    /// `Ok(())` when ready, otherwise what is still missing.
    pub fn check(&self) -> Result<(), String> {
        if !self.synced.load(Ordering::SeqCst) {
            return Err("initial configuration not applied yet".into());
        }
        let pending = self.pending.lock().expect("readiness lock");
        if pending.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "not wired yet: {}",
                pending.iter().cloned().collect::<Vec<_>>().join(", ")
            ))
        }
    }
}

type Reply = (StatusCode, &'static str, String);
/// A router: path to reply.
pub type Routes = Arc<dyn Fn(&str) -> Reply + Send + Sync>;

/// Serves `route(path)` on `listener` until the task is aborted; aborting it also ends its
/// open connections (a keep-alive scraper then reconnects to whoever holds the port next, the
/// new agent after a handover).
pub async fn serve(listener: TcpListener, route: Routes) {
    let addr = listener
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string());
    tracing::info!(%addr, "admin endpoint listening");
    let logged = super::LogEvery::new(std::time::Duration::from_secs(10));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors, say: this repeats until some close.
                if logged.ready() {
                    tracing::warn!(%addr, error = %e, "admin accept failed (logged at most every 10 s)");
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let route = route.clone();
        conns.spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (status, content_type, body) = if req.method() == hyper::Method::GET {
                    route(req.uri().path())
                } else {
                    (
                        StatusCode::METHOD_NOT_ALLOWED,
                        "text/plain",
                        "only GET\n".into(),
                    )
                };
                let resp = Response::builder()
                    .status(status)
                    .header("content-type", content_type)
                    .body(Full::new(Bytes::from(body)))
                    .expect("static response parts are valid");
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Routes of the metrics port.
pub fn metrics_routes(metrics: Arc<Metrics>) -> Routes {
    Arc::new(move |path| match path {
        "/metrics" | "/stats/prometheus" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        _ => (StatusCode::NOT_FOUND, "text/plain", "try /metrics\n".into()),
    })
}

/// Reads, as JSON, the service endpoints out of the load balancing now (the proxy's).
pub type EjectedSource = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Routes of the localhost admin port: `/certs` lists the workload certificates in use,
/// `/endpoints/ejected` the service endpoints ejected from the load balancing now.
pub fn admin_routes(
    certs: Arc<crate::identity::CertManager>,
    readiness: Arc<Readiness>,
    ejected: EjectedSource,
) -> Routes {
    Arc::new(move |path| match path {
        "/endpoints/ejected" => {
            let body = serde_json::to_string_pretty(&ejected()).unwrap_or_default();
            (StatusCode::OK, "application/json", body + "\n")
        }
        "/certs" => {
            let list: Vec<serde_json::Value> = certs
                .certificates()
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "identity": c.identity.to_string(),
                        "serial": c.serial,
                        "not_before": unix(c.not_before),
                        "not_after": unix(c.not_after),
                        "chain_pem": c.chain_pem(),
                    })
                })
                .collect();
            let body = serde_json::to_string_pretty(&list).unwrap_or_default();
            (StatusCode::OK, "application/json", body + "\n")
        }
        "/healthz/ready" => readiness_routes(readiness.clone())(path),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /certs, /endpoints/ejected or /healthz/ready\n".into(),
        ),
    })
}

fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Routes of the readiness port: `/healthz/ready` (every local workload wired; in Kubernetes mode
/// also the first full sync done) and `/healthz/live` (the agent's runtime answers; for a liveness
/// probe, which must not restart the agent because one pod cannot be wired).
pub fn readiness_routes(readiness: Arc<Readiness>) -> Routes {
    Arc::new(move |path| match path {
        "/healthz/live" => (StatusCode::OK, "text/plain", "alive\n".into()),
        "/healthz/ready" => match readiness.check() {
            Ok(()) => (StatusCode::OK, "text/plain", "ready\n".into()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{why}\n"),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /healthz/ready or /healthz/live\n".into(),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_sync_and_no_pending_workloads() {
        let r = Readiness::default();
        assert!(r.check().unwrap_err().contains("initial"));
        r.set(true, ["default/a".to_string()].into());
        assert_eq!(r.check().unwrap_err(), "not wired yet: default/a");
        r.set(true, BTreeSet::new());
        assert!(r.check().is_ok());
    }
}
