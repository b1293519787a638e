//! Counters carried over a handover: the new agent adds what the old one counted, so the
//! counters an operator scrapes keep growing instead of dropping back (which Prometheus would read
//! as a reset, and then count the old agent's figures twice).
//!
//! The old agent sends its Prometheus text twice: when it hands over, and when its drain ends.
//! The new agent adds the first at once and the difference later. Only counters (`*_total`) are
//! carried; gauges describe the agent that reports them.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use super::Metrics;

/// Label names and values, in exposition order.
pub type Labels = Vec<(String, String)>;
/// What identifies a counter sample: family name (with `_total`) and labels.
pub type Key = (String, Labels);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("metrics text line {line}: {problem}")]
pub struct ParseError {
    pub line: usize,
    pub problem: String,
}

/// The `*_total` samples of a Prometheus text exposition.
pub fn parse_counters(text: &str) -> Result<BTreeMap<Key, u64>, ParseError> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let err = |problem: &str| ParseError {
            line: i + 1,
            problem: problem.to_string(),
        };
        let (name, rest) = match line.find(['{', ' ']) {
            Some(at) => line.split_at(at),
            None => return Err(err("no value")),
        };
        if !name.ends_with("_total") {
            continue;
        }
        let (labels, rest) = if let Some(rest) = rest.strip_prefix('{') {
            parse_labels(rest).map_err(|p| err(&p))?
        } else {
            (Vec::new(), rest)
        };
        let value = rest.trim().split(' ').next().unwrap_or_default();
        let value: f64 = value
            .parse()
            .map_err(|_| err(&format!("value {value:?} is not a number")))?;
        if !(value >= 0.0 && value.fract() == 0.0) {
            return Err(err(&format!("counter value {value} is not a whole number")));
        }
        out.insert((name.to_string(), labels), value as u64);
    }
    Ok(out)
}

/// `k="v",...}` and what follows the closing brace.
fn parse_labels(mut s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    loop {
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let (key, rest) = s.split_once("=\"").ok_or("a label without =\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err("a label value ends in a backslash".into()),
                },
                Some((_, c)) => value.push(c),
                None => return Err(format!("label {key} is not closed")),
            }
        };
        labels.push((key.trim_start_matches(',').to_string(), value));
        s = rest[end + 1..].trim_start_matches(',');
    }
}

/// `later - earlier` for every sample (a sample that went down counts as 0).
pub fn difference(earlier: &BTreeMap<Key, u64>, later: &BTreeMap<Key, u64>) -> BTreeMap<Key, u64> {
    later
        .iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(*earlier.get(k).unwrap_or(&0))))
        .filter(|(_, v)| *v > 0)
        .collect()
}

impl Metrics {
    /// Adds `samples` to this agent's counters; returns how many samples were added. A sample
    /// of a family this agent does not know, or with labels it does not have, is skipped (and
    /// named in the log).
    pub fn add_counters(&self, samples: &BTreeMap<Key, u64>) -> usize {
        let mut added = 0;
        for ((name, labels), value) in samples {
            let object: Map<String, Value> = labels
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            let object = Value::Object(object);
            let done = match name.as_str() {
                "istio_tcp_connections_opened_total" => {
                    add(&self.connections_opened, object, *value)
                }
                "istio_tcp_connections_closed_total" => {
                    add(&self.connections_closed, object, *value)
                }
                "istio_tcp_sent_bytes_total" => add(&self.sent_bytes, object, *value),
                "istio_tcp_received_bytes_total" => add(&self.received_bytes, object, *value),
                "istio_tcp_connections_failed_total" => {
                    add(&self.connections_failed, object, *value)
                }
                "mesh_policy_denials_total" => add(&self.policy_denials, object, *value),
                "mesh_config_reloads_total" => add(&self.config_reloads, object, *value),
                "mesh_inbound_handshakes_rejected_total" => {
                    add(&self.handshakes_rejected, object, *value)
                }
                "mesh_accept_errors_total" => add(&self.accept_errors, object, *value),
                "mesh_connections_shed_total" => add(&self.connections_shed, object, *value),
                "mesh_endpoint_ejections_total" => add(&self.endpoint_ejections, object, *value),
                // Kept by the kernel in a pinned map that the new agent reads itself.
                "mesh_datapath_events_total" => continue,
                _ => Err(format!("unknown counter {name}")),
            };
            match done {
                Ok(()) => added += 1,
                Err(e) => tracing::warn!(counter = %name, error = %e, "not carried over"),
            }
        }
        added
    }
}

fn add<L>(
    family: &prometheus_client::metrics::family::Family<
        L,
        prometheus_client::metrics::counter::Counter,
    >,
    labels: Value,
    value: u64,
) -> Result<(), String>
where
    L: Clone + std::hash::Hash + Eq + Deserialize<'static>,
{
    // Value is an owned deserializer: it lends nothing, any lifetime does.
    let labels = L::deserialize(labels).map_err(|e| e.to_string())?;
    family.get_or_create(&labels).inc_by(value);
    Ok(())
}

/// A label value kept for the life of the process (the `&'static str` labels take a handful of
/// distinct values).
pub(super) fn interned<'de, D: Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
    static SEEN: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let s = String::deserialize(d)?;
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(known) = seen.get(s.as_str()) {
        return Ok(known);
    }
    let leaked: &'static str = Box::leak(s.into_boxed_str());
    seen.insert(leaked);
    Ok(leaked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{ConnLabels, FailedLabels};

    fn labels(reporter: &'static str) -> ConnLabels {
        ConnLabels {
            // A quote, escaped in the text and read back.
            source_workload: "c\"1".into(),
            connection_security_policy: "mutual_tls",
            ..ConnLabels::sample(reporter)
        }
    }

    #[test]
    fn the_new_agent_continues_the_old_ones_counters() {
        let old = Metrics::new();
        old.connections_opened
            .get_or_create(&labels("source"))
            .inc_by(7);
        old.sent_bytes
            .get_or_create(&labels("destination"))
            .inc_by(1 << 40);
        old.connections_failed
            .get_or_create(&FailedLabels {
                conn: labels("source"),
                reason: "upstream_connect",
            })
            .inc();
        let ejection = crate::telemetry::EjectionLabels {
            service: "default/web".into(),
            endpoint: "default/web-0".into(),
        };
        old.endpoint_ejections.get_or_create(&ejection).inc_by(2);
        let at_handover = parse_counters(&old.encode()).unwrap();

        let new = Metrics::new();
        new.connections_opened
            .get_or_create(&labels("source"))
            .inc_by(2);
        assert_eq!(new.add_counters(&at_handover), 4);
        assert_eq!(new.endpoint_ejections.get_or_create(&ejection).get(), 2);
        // The old agent's drain adds more; the new one takes only the difference.
        old.connections_opened
            .get_or_create(&labels("source"))
            .inc_by(1);
        let at_end = parse_counters(&old.encode()).unwrap();
        assert_eq!(new.add_counters(&difference(&at_handover, &at_end)), 1);

        assert_eq!(
            new.connections_opened
                .get_or_create(&labels("source"))
                .get(),
            2 + 7 + 1
        );
        assert_eq!(
            new.sent_bytes.get_or_create(&labels("destination")).get(),
            1 << 40
        );
        let failed = new
            .connections_failed
            .get_or_create(&FailedLabels {
                conn: labels("source"),
                reason: "upstream_connect",
            })
            .get();
        assert_eq!(failed, 1);
    }

    #[test]
    fn unknown_counters_and_bad_lines_are_named() {
        let text = "# HELP x\nmesh_future_total{a=\"b\"} 3\nistio_build{component=\"x\"} 1\n";
        let samples = parse_counters(text).unwrap();
        assert_eq!(samples.len(), 1, "gauges are not carried");
        assert_eq!(Metrics::new().add_counters(&samples), 0);
        assert_eq!(
            parse_counters("a_total{x=\"1\"} one").unwrap_err(),
            ParseError {
                line: 1,
                problem: "value \"one\" is not a number".into()
            }
        );
        assert!(parse_counters("a_total{x=\"1} 2")
            .unwrap_err()
            .problem
            .contains("not closed"));
        assert!(parse_counters("a_total 1.5").is_err());
    }
}
