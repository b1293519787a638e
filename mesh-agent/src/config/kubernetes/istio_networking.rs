//! Istio `networking.istio.io/v1` VirtualServices and DestinationRules -> the Mesh's. Pure, like
//! `convert`.
//!
//! Each is read as strictly as in file mode from the document a user wrote (what the API server
//! adds is left out first, as for HTTPRoutes). One that does not read or fails its `validate` is
//! left out of the Mesh alone, with a warning naming `Kind namespace/name` and the field.
use std::sync::Arc;

use kube::api::DynamicObject;
use serde::de::DeserializeOwned;

use super::convert::name_of;
use super::gateway_api::{parse_error, user_document_json};
use crate::model::destination_rule::DestinationRule;
use crate::model::networking::API_VERSION;
use crate::model::virtual_service::VirtualService;
use crate::model::FieldError;

/// Reads and validates one object; the error names the field (``field `spec.http[0]...`: ...``).
fn read<T: DeserializeOwned>(
    obj: &DynamicObject,
    kind: &str,
    validate: fn(&T) -> Result<(), FieldError>,
) -> Result<T, String> {
    // Through YAML text: its reader reports the path of a bad field, JSON's does not.
    let document = user_document_json(obj, API_VERSION, kind);
    let text = serde_yaml_ng::to_string(&document).map_err(|e| e.to_string())?;
    let value: T = serde_yaml_ng::from_str(&text).map_err(|e| parse_error(&e))?;
    validate(&value).map_err(|e| e.to_string())?;
    Ok(value)
}

/// The objects that read and validate, sorted by `namespace/name`; a warning for each other one.
fn read_all<T: DeserializeOwned>(
    objects: &[Arc<DynamicObject>],
    kind: &str,
    validate: fn(&T) -> Result<(), FieldError>,
    key: fn(&T) -> String,
    warnings: &mut Vec<String>,
) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for obj in objects {
        match read(obj, kind, validate) {
            Ok(value) => {
                if !out.iter().any(|v| key(v) == key(&value)) {
                    out.push(value);
                }
            }
            Err(e) => warnings.push(format!(
                "{kind} {}: {e}; it is not used",
                name_of(&obj.metadata)
            )),
        }
    }
    out.sort_by_key(key);
    out
}

pub fn virtual_services(
    objects: &[Arc<DynamicObject>],
    warnings: &mut Vec<String>,
) -> Vec<VirtualService> {
    read_all(
        objects,
        "VirtualService",
        VirtualService::validate,
        VirtualService::key,
        warnings,
    )
}

pub fn destination_rules(
    objects: &[Arc<DynamicObject>],
    warnings: &mut Vec<String>,
) -> Vec<DestinationRule> {
    read_all(
        objects,
        "DestinationRule",
        DestinationRule::validate,
        DestinationRule::key,
        warnings,
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(kind: &str, name: &str, spec: serde_json::Value) -> Arc<DynamicObject> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": API_VERSION,
                "kind": kind,
                "metadata": {
                    "name": name,
                    "namespace": "shop",
                    "uid": "u-1",
                    "resourceVersion": "7",
                    "generation": 2,
                    "creationTimestamp": "2024-05-01T12:00:00Z",
                    "annotations": {
                        "kubectl.kubernetes.io/last-applied-configuration": "{}",
                        "note": "kept",
                    },
                },
                "spec": spec,
                "status": {"validationMessages": []},
            }))
            .unwrap(),
        )
    }

    #[test]
    fn a_bad_virtual_service_is_left_out_alone_with_its_field_named() {
        let good = object(
            "VirtualService",
            "good",
            json!({"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews", "subset": "v1"}}]}]}),
        );
        let unknown = object(
            "VirtualService",
            "cors",
            json!({"hosts": ["reviews"], "http": [{"corsPolicy": {}, "route": [{"destination": {"host": "reviews"}}]}]}),
        );
        let invalid = object(
            "VirtualService",
            "weights",
            json!({"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "a", "subset": "v1"}}, {"destination": {"host": "a", "subset": "v2"}}]}]}),
        );
        let mut warnings = Vec::new();
        let read = virtual_services(&[unknown, good, invalid], &mut warnings);
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].key(), "shop/good");
        assert_eq!(
            read[0].metadata.creation_timestamp.as_deref(),
            Some("2024-05-01T12:00:00Z")
        );
        assert_eq!(
            read[0].metadata.annotations.len(),
            1,
            "kubectl's copy left out"
        );
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].starts_with(
                "VirtualService shop/cors: field `spec.http[0].corsPolicy`: `corsPolicy` is not \
                 supported"
            ),
            "{warnings:?}"
        );
        assert!(
            warnings[1].starts_with("VirtualService shop/weights: field `spec.http[0].route`:"),
            "{warnings:?}"
        );
        assert!(warnings[1].ends_with("; it is not used"), "{warnings:?}");
    }

    #[test]
    fn a_bad_destination_rule_is_left_out_alone_with_its_field_named() {
        let good = object(
            "DestinationRule",
            "good",
            json!({"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}),
        );
        let bad = object(
            "DestinationRule",
            "tls",
            json!({"host": "reviews", "trafficPolicy": {"tls": {"mode": "SIMPLE"}}}),
        );
        let mut warnings = Vec::new();
        let read = destination_rules(&[good, bad], &mut warnings);
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].key(), "shop/good");
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].starts_with(
                "DestinationRule shop/tls: field `spec.trafficPolicy.tls`: `mode: SIMPLE` is not \
                 supported"
            ),
            "{warnings:?}"
        );
    }
}
