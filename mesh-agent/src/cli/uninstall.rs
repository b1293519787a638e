//! `mesh-agent uninstall`: removes the mesh from a node. The agent never does this by itself
//! (it leaves its programs attached when it stops, so enrolled pods fail closed); this is the
//! explicit act that returns the node to how it was before install.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Context;

use super::UninstallArgs;
use crate::datapath::{pinned, uninstall_pinned};
use crate::inpod::{remove_in_pod_setup, NetnsFinder};

pub fn uninstall(args: &UninstallArgs) -> anyhow::Result<()> {
    let dir = &args.pin_dir;
    if !dir.exists() {
        println!("nothing to do: {} does not exist", dir.display());
        return Ok(());
    }
    // Who was enrolled, read before the maps go: their in-pod setup is removed afterwards
    // (once nothing redirects their connections any more).
    let enrolled = pinned::read_enrolled(dir).unwrap_or_else(|e| {
        eprintln!("warning: cannot read the enrollment map ({e}); in-pod routes stay");
        Vec::new()
    });
    let removed =
        uninstall_pinned(dir).with_context(|| format!("uninstalling from {}", dir.display()))?;
    for what in &removed {
        println!("removed {what}");
    }
    let mut finder = NetnsFinder::new(args.pods.netns_dir.clone(), args.pods.proc_dir.clone());
    let mut failed = 0;
    for (cookie, entry) in &enrolled {
        let name = String::from_utf8_lossy(entry.name_bytes()).into_owned();
        let mut ips = Vec::new();
        if entry.ip4 != [0; 4] {
            ips.push(IpAddr::V4(Ipv4Addr::from(entry.ip4)));
        }
        if entry.ip6 != [0; 16] {
            ips.push(IpAddr::V6(Ipv6Addr::from(entry.ip6)));
        }
        match remove_in_pod_setup(&mut finder, &args.pods.sysctl_dir, *cookie, &ips) {
            Ok(path) => println!("removed the in-pod routes of {name} ({})", path.display()),
            // A pod that is gone took its routes with it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                println!("{name}: its network namespace is gone ({e})");
            }
            Err(e) => {
                failed += 1;
                eprintln!("error: cannot remove the in-pod routes of {name}: {e}");
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} pod(s) kept in-pod routes (see above); run uninstall again");
    }
    println!("the mesh is removed from this node");
    Ok(())
}
