//! Errors of Kubernetes mode, worded for the operator who has to fix them.
use kube::runtime::watcher;

use super::Resource;

/// Where the RBAC for the agent lives (named in 403 messages).
pub const RBAC_MANIFEST: &str = "deploy/agent/rbac.yaml";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// Connecting failed (DNS, TCP, TLS, timeout).
    #[error(
        "cannot reach the Kubernetes API server: {message} (in a pod: is the ServiceAccount token \
         mounted and KUBERNETES_SERVICE_HOST right, can this node reach the API server?)"
    )]
    Unreachable { message: String },
    /// 401: the token was not accepted.
    #[error(
        "the Kubernetes API server rejected the agent's credentials (401 Unauthorized): is the \
         ServiceAccount token mounted and still valid?"
    )]
    Unauthorized,
    /// 403: RBAC does not grant what a watcher needs.
    #[error(
        "the agent may not {verb} {resource} (403 Forbidden): grant verb {verb:?} on resource \
         {plural:?} in API group {group:?} to the agent's ClusterRole (see {RBAC_MANIFEST})"
    )]
    Forbidden {
        verb: &'static str,
        resource: &'static str,
        group: &'static str,
        plural: &'static str,
    },
    /// 404 on a list: the API server does not serve the resource (a CRD is not installed).
    #[error(
        "the API server does not serve {resource} (404 Not Found): are the CustomResourceDefinitions \
         installed (kubectl apply -k deploy/)?"
    )]
    NotServed { resource: &'static str },
    /// Any other answer of the API server.
    #[error("the API server answered {code} to {verb} {resource}: {message}")]
    Api {
        verb: &'static str,
        resource: &'static str,
        code: u16,
        message: String,
    },
    /// The connection broke or a response could not be read.
    #[error("{verb} {resource} failed: {message}")]
    Stream {
        verb: &'static str,
        resource: &'static str,
        message: String,
    },
    /// `KubeOptions` the agent cannot run with.
    #[error("invalid Kubernetes mode option: {0}")]
    Options(String),
}

impl KubeError {
    /// Classifies a client error of `verb` (`list`, `watch`) on `resource`.
    pub(super) fn from_client(
        err: &kube::Error,
        verb: &'static str,
        resource: Resource,
    ) -> KubeError {
        match err {
            kube::Error::Api(status) => Self::from_status(status, verb, resource),
            // Connecting (DNS, TCP, TLS, timeouts) happens in the client's tower stack.
            kube::Error::Service(e) => KubeError::Unreachable {
                message: chain(e.as_ref()),
            },
            other => KubeError::Stream {
                verb,
                resource: resource.describe(),
                message: chain(other),
            },
        }
    }

    pub(super) fn from_status(
        status: &kube::core::Status,
        verb: &'static str,
        resource: Resource,
    ) -> KubeError {
        match status.code {
            401 => KubeError::Unauthorized,
            403 => KubeError::Forbidden {
                verb,
                resource: resource.describe(),
                group: resource.group(),
                plural: resource.plural(),
            },
            404 if verb == "list" => KubeError::NotServed {
                resource: resource.describe(),
            },
            code => KubeError::Api {
                verb,
                resource: resource.describe(),
                code,
                message: if status.message.is_empty() {
                    status.reason.clone()
                } else {
                    status.message.clone()
                },
            },
        }
    }

    /// Classifies a watcher error; `None` for a 410 Gone, which is routine (the watcher re-lists).
    pub(super) fn from_watcher(err: &watcher::Error, resource: Resource) -> Option<KubeError> {
        Some(match err {
            watcher::Error::InitialListFailed(e) => Self::from_client(e, "list", resource),
            watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
                Self::from_client(e, "watch", resource)
            }
            watcher::Error::WatchError(status) if status.code == 410 => return None,
            watcher::Error::WatchError(status) => Self::from_status(status, "watch", resource),
            watcher::Error::NoResourceVersion => KubeError::Stream {
                verb: "list",
                resource: resource.describe(),
                message: "the answer carries no metadata.resourceVersion".into(),
            },
        })
    }
}

/// `err` and its sources, joined by ": " (hyper's top-level messages alone say little).
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(Box::new(
            kube::core::Status::failure(message, "").with_code(code),
        ))
    }

    #[test]
    fn messages_tell_the_operator_what_to_fix() {
        let e = KubeError::from_client(
            &status(403, "pods is forbidden"),
            "watch",
            Resource::RemotePods,
        );
        let text = e.to_string();
        assert!(
            text.contains("grant verb \"watch\" on resource \"pods\""),
            "{text}"
        );
        assert!(text.contains("API group \"\""), "{text}");
        assert!(text.contains(RBAC_MANIFEST), "{text}");

        let e = KubeError::from_client(
            &status(403, "forbidden"),
            "list",
            Resource::AuthorizationPolicies,
        );
        assert!(
            e.to_string()
                .contains("\"authorizationpolicies\" in API group \"security.istio.io\""),
            "{e}"
        );

        let e = KubeError::from_client(&status(401, "Unauthorized"), "list", Resource::Pods);
        assert!(e.to_string().contains("ServiceAccount token"), "{e}");

        let e = KubeError::from_client(
            &status(404, "not found"),
            "list",
            Resource::PeerAuthentications,
        );
        assert!(e.to_string().contains("CustomResourceDefinitions"), "{e}");

        let e = KubeError::from_client(&status(500, "etcd down"), "list", Resource::Services);
        assert!(
            e.to_string()
                .contains("answered 500 to list services: etcd down"),
            "{e}"
        );
    }

    #[test]
    fn a_410_is_routine() {
        let gone = watcher::Error::WatchError(Box::new(
            kube::core::Status::failure("too old resource version", "Expired").with_code(410),
        ));
        assert!(KubeError::from_watcher(&gone, Resource::Namespaces).is_none());
    }
}
