//! `mesh-agent inspect maps`: reads the pinned maps directly from bpffs, so it works while the
//! agent runs, after it stopped, and after it crashed.
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::bail;
use mesh_common::{
    Enrolled, OrigDst, AF_INET, ALL_MAPS, MAP_ENROLLED, MAP_EXCL_PORTS, MAP_ORIG_DST, MAP_SOCK_DST,
};
use serde_json::{json, Value};

use super::{MapsArgs, Output};
use crate::datapath::pinned;

pub fn maps(args: &MapsArgs) -> anyhow::Result<()> {
    let wanted: Vec<&str> = match &args.name {
        Some(name) => match ALL_MAPS.iter().find(|m| m.eq_ignore_ascii_case(name)) {
            Some(m) => vec![*m],
            None => bail!(
                "unknown map {name:?}; the agent pins {}",
                ALL_MAPS.join(", ")
            ),
        },
        None => ALL_MAPS.to_vec(),
    };
    let dir = &args.pin_dir;
    if !dir.is_dir() {
        bail!(
            "{} does not exist: no agent has pinned maps there (see --pin-dir)",
            dir.display()
        );
    }
    // Workload names come from ENROLLED, so every map can show who a netns cookie belongs to.
    let enrolled = pinned::read_enrolled(dir)?;
    let names: HashMap<u64, String> = enrolled.iter().map(|(c, e)| (*c, name(e))).collect();
    let who = |cookie: u64| {
        names
            .get(&cookie)
            .cloned()
            .unwrap_or_else(|| format!("netns:{cookie}"))
    };

    let mut doc = serde_json::Map::new();
    for map in wanted {
        let rows: Vec<Value> = match map {
            MAP_ENROLLED => enrolled
                .iter()
                .map(|(cookie, e)| {
                    json!({
                        "netns_cookie": cookie,
                        "workload": name(e),
                        "ipv4": (e.ip4 != [0; 4]).then(|| Ipv4Addr::from(e.ip4).to_string()),
                        "ipv6": (e.ip6 != [0; 16]).then(|| Ipv6Addr::from(e.ip6).to_string()),
                    })
                })
                .collect(),
            MAP_SOCK_DST => pinned::read_sock_dst(dir)?
                .iter()
                .map(|(cookie, d)| json!({"socket_cookie": cookie, "workload": who(d.netns), "original_dst": dst(d)}))
                .collect(),
            MAP_ORIG_DST => pinned::read_orig_dst(dir)?
                .iter()
                .map(|(k, d)| {
                    json!({
                        "workload": who(k.netns),
                        "client_port": k.port,
                        "family": if k.family == AF_INET { "ipv4" } else { "ipv6" },
                        "original_dst": dst(d),
                    })
                })
                .collect(),
            MAP_EXCL_PORTS => pinned::read_excluded_ports(dir)?.iter().map(|p| json!({"port": p})).collect(),
            _ => unreachable!("ALL_MAPS lists only known maps"),
        };
        doc.insert(map.to_string(), Value::Array(rows));
    }
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&Value::Object(doc))?),
        Output::Table => print_tables(&doc, &args.pin_dir),
    }
    Ok(())
}

fn name(e: &Enrolled) -> String {
    String::from_utf8_lossy(e.name_bytes()).into_owned()
}

fn dst(d: &OrigDst) -> String {
    let ip = IpAddr::V6(Ipv6Addr::from(d.addr)).to_canonical();
    std::net::SocketAddr::new(ip, d.port).to_string()
}

fn print_tables(doc: &serde_json::Map<String, Value>, dir: &std::path::Path) {
    for (map, rows) in doc {
        let rows = rows.as_array().map(Vec::as_slice).unwrap_or_default();
        println!(
            "{map} ({}/{map}): {} entr{}",
            dir.display(),
            rows.len(),
            if rows.len() == 1 { "y" } else { "ies" }
        );
        let Some(first) = rows.first().and_then(Value::as_object) else {
            println!();
            continue;
        };
        let columns: Vec<&String> = first.keys().collect();
        let cell = |row: &Value, col: &str| match &row[col] {
            Value::Null => "-".to_string(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let widths: Vec<usize> = columns
            .iter()
            .map(|c| {
                rows.iter()
                    .map(|r| cell(r, c).len())
                    .chain([c.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: Vec<String>| {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            println!("  {}", padded.join("  ").trim_end());
        };
        line(columns.iter().map(|c| c.to_uppercase()).collect());
        for row in rows {
            line(columns.iter().map(|c| cell(row, c)).collect());
        }
        println!();
    }
}
