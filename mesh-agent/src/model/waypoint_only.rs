//! No bypass: a Service that uses a waypoint can be marked so that its endpoints accept traffic
//! for its target ports only from that waypoint. This is this project's label, not Istio's (Istio
//! leaves it to a hand-written L4 `AuthorizationPolicy`).
//!
//! `mesh.dev/waypoint-only: "true" | "false"` on a Service or on its namespace; the Service's own
//! label wins over its namespace's, and the namespace's over the mesh-wide default (file:
//! `waypointOnlyDefault`, Kubernetes: `mesh-agent run --waypoint-only-default`; off unless set).
use std::collections::BTreeMap;

/// On a Service or a namespace: `"true"` or `"false"`.
pub const WAYPOINT_ONLY_LABEL: &str = "mesh.dev/waypoint-only";

/// The label's value; anything but `true` or `false` is an error naming the label.
pub fn parse_waypoint_only(value: &str) -> Result<bool, String> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(format!(
            "{WAYPOINT_ONLY_LABEL}={other:?} is not supported (use \"true\" or \"false\")"
        )),
    }
}

/// An error, naming the label, when `labels` hold a bad value of [`WAYPOINT_ONLY_LABEL`].
pub fn check_waypoint_only(labels: &BTreeMap<String, String>) -> Result<(), String> {
    match labels.get(WAYPOINT_ONLY_LABEL) {
        Some(value) => parse_waypoint_only(value).map(|_| ()),
        None => Ok(()),
    }
}

/// Whether a Service with `labels` in a namespace with `namespace_labels` is marked: its own
/// label, else its namespace's, else `mesh_default`. A value that is neither `true` nor `false`
/// (validation rejects it first) counts as `true`: fail closed.
pub fn waypoint_only(
    labels: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
    mesh_default: bool,
) -> bool {
    let marked = |labels: &BTreeMap<String, String>| {
        labels
            .get(WAYPOINT_ONLY_LABEL)
            .map(|v| parse_waypoint_only(v).unwrap_or(true))
    };
    marked(labels)
        .or_else(|| namespace_labels.and_then(marked))
        .unwrap_or(mesh_default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(value: Option<&str>) -> BTreeMap<String, String> {
        value
            .map(|v| (WAYPOINT_ONLY_LABEL.to_string(), v.to_string()))
            .into_iter()
            .collect()
    }

    #[test]
    fn the_service_label_wins_then_the_namespace_then_the_mesh_default() {
        let cases = [
            // (service, namespace, mesh default, marked)
            (None, None, false, false),
            (None, None, true, true),
            (Some("true"), None, false, true),
            (Some("false"), None, true, false),
            (None, Some("true"), false, true),
            (None, Some("false"), true, false),
            (Some("false"), Some("true"), true, false),
            (Some("true"), Some("false"), false, true),
            // Not validated (cannot happen after validation): fails closed.
            (Some("yes"), Some("false"), false, true),
        ];
        for (svc, ns, default, want) in cases {
            let ns_labels = ns.map(|v| labels(Some(v)));
            assert_eq!(
                waypoint_only(&labels(svc), ns_labels.as_ref(), default),
                want,
                "{svc:?} {ns:?} {default}"
            );
        }
    }

    #[test]
    fn only_true_and_false_are_values() {
        assert_eq!(parse_waypoint_only("true"), Ok(true));
        assert_eq!(parse_waypoint_only("false"), Ok(false));
        assert_eq!(
            check_waypoint_only(&labels(Some("True"))).unwrap_err(),
            "mesh.dev/waypoint-only=\"True\" is not supported (use \"true\" or \"false\")"
        );
        assert!(check_waypoint_only(&labels(None)).is_ok());
    }
}
