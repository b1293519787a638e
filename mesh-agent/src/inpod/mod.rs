//! Per-pod lifecycle: open the pod's listeners inside its network namespace, then enroll the
//! namespace in the eBPF map; unenroll first, then close the listeners.
//!
//! The order matters both ways: a pod is never redirected to a listener that is not there yet, and
//! connections already relayed keep running when their pod leaves the mesh.
//!
//! A workload without a configured namespace path (always so in Kubernetes mode) is found by its
//! IP ([`NetnsFinder`]). Every reconcile checks, with one `stat`, that the path each wired pod was
//! opened from still names the same namespace; when it does not (the pod sandbox was recreated,
//! the process behind a `/proc/<pid>/ns/net` path exited) the pod is unwired and wired again in
//! whatever namespace then holds its address, or waits as pending until one does.
mod discover;
mod routing;

pub use discover::{
    DiscoverError, FinderStats, FoundNetns, NetnsFinder, DEFAULT_NETNS_DIR, DEFAULT_PROC_DIR,
    MIN_SCAN_INTERVAL,
};

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use mesh_common::{Enrolled, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::datapath::Datapath;
use crate::identity::Identity;
use crate::model::Workload;
use crate::net::{socket_netns_cookie, Netns, NsId};
use crate::proxy::{serve_inbound, serve_outbound, serve_plaintext, Local, Proxy};
use crate::state::State;

/// Certificates asked for at once when many pods are wired together (agent start, a big
/// rollout).
const MAX_CONCURRENT_SIGNINGS: usize = 32;

/// How long an unwired pod's listeners keep accepting after its enrollment entry went: far
/// longer than the few instructions between the connect hook's map lookup and the SYN.
const UNWIRE_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// A wired pod: its namespace, its listener tasks.
struct WiredPod {
    workload: Arc<Workload>,
    identity: Identity,
    netns: Arc<Netns>,
    /// Where the namespace was opened from: configured, or found by IP.
    origin: NetnsOrigin,
    listeners: Vec<JoinHandle<()>>,
    /// Duplicates of the listening sockets, to hand to a successor agent.
    sockets: Vec<OwnedFd>,
}

/// The path a pod's namespace was opened from. The open handle keeps the namespace alive after
/// the pod is gone, so whether the pod still exists is asked of the path, not of the handle.
#[derive(Debug, Clone)]
struct NetnsOrigin {
    path: PathBuf,
    discovered: bool,
}

pub struct InpodManager {
    datapath: Arc<Datapath>,
    proxy: Arc<Proxy>,
    finder: NetnsFinder,
    /// Where the node's `/proc/sys` is visible, for the in-pod sysctls.
    sysctl_dir: PathBuf,
    pods: BTreeMap<String, WiredPod>,
    /// Listening sockets a previous agent handed over, by namespace cookie and local address;
    /// wiring a pod takes its own from here instead of opening new ones.
    handed: Mutex<BTreeMap<(u64, SocketAddr), Vec<std::net::TcpListener>>>,
    /// Each pod's connection count for the per-pod cap, shared by its successive wirings (a
    /// re-wired pod's old listeners still accept during the unwire grace).
    conns: BTreeMap<String, std::sync::Weak<crate::proxy::admission::LocalConns>>,
    /// Workloads the last reconcile could not wire: retried one by one, without the prefetch
    /// (a pod whose namespace is not there yet must not cost a signing every retry).
    failed: BTreeSet<String>,
}

impl InpodManager {
    /// `finder` locates the namespace of workloads that do not name one.
    pub fn new(datapath: Arc<Datapath>, proxy: Arc<Proxy>, finder: NetnsFinder) -> Self {
        InpodManager {
            datapath,
            proxy,
            finder,
            sysctl_dir: PathBuf::from("/proc/sys"),
            pods: BTreeMap::new(),
            conns: BTreeMap::new(),
            failed: BTreeSet::new(),
            handed: Mutex::default(),
        }
    }

    /// Pod listening sockets handed over by the agent this one replaces (a hitless upgrade).
    /// Each is recognised by its network namespace and address; one that cannot be is closed.
    pub fn with_handed(self, sockets: Vec<OwnedFd>) -> Self {
        let mut handed = BTreeMap::new();
        for fd in sockets {
            let key = socket_netns_cookie(&fd).and_then(|cookie| {
                let listener = std::net::TcpListener::from(fd);
                Ok(((cookie, listener.local_addr()?), listener))
            });
            match key {
                Ok((key, listener)) => handed.entry(key).or_insert_with(Vec::new).push(listener),
                Err(e) => {
                    tracing::warn!(error = %e, "closing a handed socket that is not a TCP listener")
                }
            }
        }
        *lock(&self.handed) = handed;
        self
    }

    /// Closes the handed sockets no wired pod claimed (their pods are gone or no longer enrolled).
    /// Call it once the state is complete and reconciled.
    pub fn close_unclaimed_handed(&self) {
        let left: usize = std::mem::take(&mut *lock(&self.handed))
            .values()
            .map(Vec::len)
            .sum();
        if left > 0 {
            tracing::info!(
                sockets = left,
                "closing handed listening sockets of pods no longer wired here"
            );
        }
    }

    /// Every pod listening socket, for a successor agent.
    pub fn listening_sockets(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.pods
            .values()
            .flat_map(|p| p.sockets.iter().map(AsFd::as_fd))
    }

    /// The pod's listener on `addr`: one a previous agent handed over, else a new one. A
    /// duplicate goes to `sockets`, for the next agent.
    fn listener(
        &self,
        netns: &Netns,
        addr: SocketAddr,
        sockets: &mut Vec<OwnedFd>,
    ) -> io::Result<TcpListener> {
        let handed = lock(&self.handed)
            .get_mut(&(netns.cookie(), addr))
            .and_then(Vec::pop);
        let listener = match handed {
            Some(listener) => {
                listener.set_nonblocking(true)?;
                TcpListener::from_std(listener)?
            }
            None => crate::net::listen(Some(netns), addr)?,
        };
        sockets.push(listener.as_fd().try_clone_to_owned()?);
        Ok(listener)
    }

    /// Where the node's `/proc/sys` is visible (`--sysctl-dir`; default `/proc/sys`).
    pub fn with_sysctl_dir(mut self, dir: PathBuf) -> Self {
        self.sysctl_dir = dir;
        self
    }

    /// Brings the wired pods in line with `state`. Returns the workloads that should be wired but
    /// could not be, each with the reason (they are retried on the next call). Wiring a pod awaits
    /// its identity's first certificate.
    pub async fn reconcile(&mut self, state: &State) -> BTreeSet<String> {
        let desired: BTreeMap<String, Arc<Workload>> = state
            .local_enrolled()
            .map(|w| (w.key(), w.clone()))
            .collect();

        let stale: Vec<String> = self
            .pods
            .iter()
            .filter(|(key, pod)| {
                desired
                    .get(*key)
                    .is_none_or(|w| needs_rewire(&pod.workload, w))
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            self.unwire(&key, false);
        }
        self.prune_vanished();
        // Counts no listener holds any more (their pods gone, the unwire grace over).
        self.conns.retain(|_, c| c.strong_count() > 0);

        let to_wire: Vec<(String, Arc<Workload>)> = desired
            .into_iter()
            .filter(|(key, _)| !self.pods.contains_key(key))
            .collect();
        let fresh: Vec<(String, Arc<Workload>)> = to_wire
            .iter()
            .filter(|(key, _)| !self.failed.contains(key))
            .cloned()
            .collect();
        let prefetched = self.prefetch_certificates(&fresh).await;
        self.failed.clear();
        let mut pending = BTreeSet::new();
        for (key, workload) in to_wire {
            match self.wire(&workload).await {
                Ok(pod) => {
                    tracing::info!(
                        workload = %key,
                        netns = %pod.netns.path().display(),
                        found_by_ip = pod.origin.discovered,
                        id = %pod.netns.id(),
                        cookie = pod.netns.cookie(),
                        "enrolled"
                    );
                    self.pods.insert(key, pod);
                }
                Err(e) => {
                    tracing::warn!(workload = %key, error = %e, "cannot enroll workload; will retry on the next change");
                    pending.insert(format!("{key} ({e})"));
                    self.failed.insert(key);
                }
            }
        }
        for id in prefetched {
            self.proxy.certs.release(&id);
        }
        pending
    }

    /// Asks for the first certificate of every identity among `pods` at once, so a signer that
    /// answers slowly (a remote CA) delays start-up by one round trip, not one per pod. Returns
    /// the identities acquired; the caller releases them once the pods hold their own references.
    /// A failure is left for `wire` to report, pod by pod.
    async fn prefetch_certificates(&self, pods: &[(String, Arc<Workload>)]) -> Vec<Identity> {
        use futures::StreamExt;
        let ids: BTreeSet<Identity> = pods
            .iter()
            .map(|(_, w)| self.proxy.identity_of(w))
            .collect();
        let certs = &self.proxy.certs;
        futures::stream::iter(ids)
            .map(|id| async move { certs.acquire(&id).await.ok().map(|()| id) })
            .buffer_unordered(MAX_CONCURRENT_SIGNINGS)
            .filter_map(std::future::ready)
            .collect()
            .await
    }

    /// Removes what a previous agent left in the datapath for pods that `state` no longer
    /// enrolls on this node (or that are gone): enrollment entries and pinned `mesh_sklookup`
    /// links not of a pod wired now. A pod still enrolled but not wired yet keeps its entries,
    /// so it stays captured (its connections fail closed) until it is wired. Call it once the
    /// state is complete (in Kubernetes mode: after the first sync) and reconciled.
    pub fn prune_adopted(
        &self,
        state: &State,
    ) -> Result<Vec<String>, crate::datapath::DatapathError> {
        let wired: BTreeSet<u64> = self.pods.values().map(|p| p.netns.cookie()).collect();
        // Names as the enrollment map stores them (cut to its field's length).
        let stored = |key: &str| Enrolled::new([0; 4], [0; 16], key).name_bytes().to_vec();
        let wired_names: BTreeSet<Vec<u8>> = self.pods.keys().map(|k| stored(k)).collect();
        let pending: BTreeSet<Vec<u8>> = state
            .local_enrolled()
            .map(|w| stored(&w.key()))
            .filter(|name| !wired_names.contains(name))
            .collect();
        // Kept: what this agent wired, and a pod that should be enrolled but is not wired yet
        // (it stays failing closed). Not kept: pods no longer enrolled, gone, or wired again in
        // a new namespace (the old cookie's entry is stale).
        self.datapath
            .prune(|cookie, entry| wired.contains(&cookie) || pending.contains(entry.name_bytes()))
    }

    pub fn wired(&self) -> usize {
        self.pods.len()
    }

    /// Unwires every pod whose namespace path no longer names the namespace it was wired in (one
    /// `stat` per pod, no `setns`); returns how many. [`Self::reconcile`] calls it first and
    /// wires them again where their address is now, so calling this alone only matters between
    /// reconciles: when it returns non-zero, reconcile.
    pub fn prune_vanished(&mut self) -> usize {
        let vanished: Vec<(String, String)> = self
            .pods
            .iter()
            .filter_map(|(key, pod)| {
                let was = pod.netns.id();
                let reason = match NsId::of_path(&pod.origin.path) {
                    Ok(now) if now == was => return None,
                    Ok(now) => format!("its path names {now} now, not {was}"),
                    Err(e) if is_gone(&e) => format!("its path no longer exists ({e})"),
                    Err(e) => {
                        tracing::warn!(workload = %key, path = %pod.origin.path.display(), error = %e, "cannot check the pod's network namespace path; keeping the pod wired");
                        return None;
                    }
                };
                Some((key.clone(), reason))
            })
            .collect();
        let mut unwired = 0;
        for (key, reason) in &vanished {
            // A path from /proc dies with its process, while the namespace may live on in the
            // pod's other processes: look again before unwiring (no uncaptured gap then).
            if self.pods[key].origin.discovered {
                let (ips, was) = (
                    self.pods[key].workload.ips.clone(),
                    self.pods[key].netns.id(),
                );
                if let Ok(found) = self.finder.find(&ips) {
                    if found.id == was {
                        let pod = self.pods.get_mut(key).expect("listed above");
                        tracing::info!(workload = %key, old = %pod.origin.path.display(), new = %found.path.display(), id = %was, "the pod's namespace is still there under another path; keeping it wired");
                        pod.origin.path = found.path;
                        continue;
                    }
                }
            }
            unwired += 1;
            let pod = &self.pods[key];
            let next = if pod.origin.discovered {
                "it is wired again once a namespace holding its address appears"
            } else {
                "it is wired again once its configured path names a namespace"
            };
            tracing::warn!(
                workload = %key,
                path = %pod.origin.path.display(),
                id = %pod.netns.id(),
                "the pod's network namespace is gone: {reason}; unenrolling it ({next})"
            );
            self.unwire(key, false);
        }
        unwired
    }

    /// The finder's counters: scans made, namespaces entered (for logs and tests).
    pub fn finder_stats(&self) -> &FinderStats {
        self.finder.stats()
    }

    /// Closes live connections the current policy denies.
    pub fn reevaluate_policy(&self) {
        self.proxy.reevaluate();
    }

    /// The workload's namespace: the configured path, or the one found by its IP.
    fn open_netns(&mut self, workload: &Workload) -> io::Result<(Netns, NetnsOrigin)> {
        if let Some(path) = &workload.netns {
            let origin = NetnsOrigin {
                path: path.clone(),
                discovered: false,
            };
            return Ok((Netns::open(path)?, origin));
        }
        let found = self
            .finder
            .find(&workload.ips)
            .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e.to_string()))?;
        let netns = Netns::open(&found.path)?;
        if netns.id() != found.id {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} named {} when found and {} when opened (the process exited?)",
                    found.path.display(),
                    found.id,
                    netns.id()
                ),
            ));
        }
        let origin = NetnsOrigin {
            path: found.path,
            discovered: true,
        };
        Ok((netns, origin))
    }

    async fn wire(&mut self, workload: &Arc<Workload>) -> io::Result<WiredPod> {
        let (netns, origin) = self.open_netns(workload)?;
        let netns = Arc::new(netns);
        let sysctl_dir = self.sysctl_dir.clone();
        netns
            .run(move || routing::install(&sysctl_dir))
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot set up source-preserving routes: {e}"),
                )
            })?;
        let identity = self.proxy.identity_of(workload);
        self.proxy
            .certs
            .acquire(&identity)
            .await
            .map_err(|e| io::Error::other(format!("no certificate for {identity}: {e}")))?;
        let key = workload.key();
        let conns = match self.conns.get(&key).and_then(std::sync::Weak::upgrade) {
            Some(conns) => conns,
            None => {
                let conns = Arc::default();
                self.conns.insert(key.clone(), Arc::downgrade(&conns));
                conns
            }
        };
        let ctx = Arc::new(Local {
            workload: workload.clone(),
            identity: identity.clone(),
            netns: Some(netns.clone()),
            conns,
        });
        let (mut listeners, mut sockets) = (Vec::new(), Vec::new());
        // A pod that cannot be wired stays failing closed: its sk_lookup link (this agent's, or
        // one a previous agent left) stays and refuses inbound TCP with no listener; the next
        // attempt, or unenrolling the pod, settles it.
        let abort = |listeners: &[JoinHandle<()>], e: io::Error| {
            listeners.iter().for_each(JoinHandle::abort);
            for ip in &workload.ips {
                let _ = self.datapath.remove_inbound_listener(*ip);
            }
            self.proxy.certs.release(&identity);
            e
        };
        // Inbound HBONE first, so the pod is reachable before its own traffic is captured.
        for ip in [
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ] {
            match self.listener(&netns, SocketAddr::new(ip, HBONE_PORT), &mut sockets) {
                Ok(l) => listeners.push(tokio::spawn(serve_inbound(
                    l,
                    ctx.clone(),
                    self.proxy.clone(),
                ))),
                Err(e) if ip.is_ipv6() && e.kind() == io::ErrorKind::AddrNotAvailable => {}
                Err(e) => return Err(abort(&listeners, e)),
            }
        }
        // Inbound plaintext: the listener sk_lookup hands every other inbound TCP connection to.
        for ip in workload.ips.iter().copied() {
            let any = if ip.is_ipv4() {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            };
            let addr = SocketAddr::new(any, INBOUND_PLAINTEXT_PORT);
            let listener = match self.listener(&netns, addr, &mut sockets) {
                Ok(l) => l,
                Err(e) => return Err(abort(&listeners, e)),
            };
            if let Err(e) = self.datapath.set_inbound_listener(ip, listener.as_fd()) {
                return Err(abort(&listeners, io::Error::other(e.to_string())));
            }
            listeners.push(tokio::spawn(serve_plaintext(
                listener,
                ctx.clone(),
                self.proxy.clone(),
            )));
        }
        if let Err(e) = self.datapath.attach_inbound(netns.cookie(), netns.file()) {
            return Err(abort(&listeners, io::Error::other(e.to_string())));
        }
        for ip in [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ] {
            match self.listener(&netns, SocketAddr::new(ip, OUTBOUND_PORT), &mut sockets) {
                Ok(l) => listeners.push(tokio::spawn(serve_outbound(
                    l,
                    ctx.clone(),
                    self.proxy.clone(),
                ))),
                // IPv6 disabled in the pod: IPv4 capture still works.
                Err(e) if ip.is_ipv6() && e.kind() == io::ErrorKind::AddrNotAvailable => {
                    tracing::info!(workload = %workload.key(), "no IPv6 loopback in the pod; capturing IPv4 only");
                }
                Err(e) => return Err(abort(&listeners, e)),
            }
        }
        let value = Enrolled::new(
            workload.ip4().map_or([0; 4], |ip| ip.octets()),
            workload.ip6().map_or([0; 16], |ip| ip.octets()),
            &workload.key(),
        );
        if let Err(e) = self.datapath.enroll(netns.cookie(), &value) {
            return Err(abort(&listeners, io::Error::other(e.to_string())));
        }
        Ok(WiredPod {
            workload: workload.clone(),
            identity,
            netns,
            origin,
            listeners,
            sockets,
        })
    }

    /// Stops inbound capture of the pod: sk_lookup detached, its listeners unregistered.
    fn release_inbound(&self, netns: &Netns, workload: &Workload) {
        if let Err(e) = self.datapath.detach_inbound(netns.cookie()) {
            tracing::error!(workload = %workload.key(), error = %e, "cannot detach inbound capture");
        }
        for ip in &workload.ips {
            if let Err(e) = self.datapath.remove_inbound_listener(*ip) {
                tracing::error!(workload = %workload.key(), %ip, error = %e, "cannot unregister the inbound listener");
            }
        }
    }

    fn unwire(&mut self, key: &str, remove_routes: bool) {
        let Some(pod) = self.pods.remove(key) else {
            return;
        };
        if let Err(e) = self.datapath.unenroll(pod.netns.cookie()) {
            tracing::error!(workload = %key, error = %e, "cannot remove the pod from the enrollment map");
        }
        self.release_inbound(&pod.netns, &pod.workload);
        // A connect() that read the enrollment map just before the entry went is still on its
        // way to the pod's 15001 listener; closing it now would reset that connection. So the
        // listeners (and the certificate their handshakes need) stay for a short grace. At
        // shutdown (`remove_routes`) they are already stopped.
        let (listeners, proxy, identity) = (pod.listeners, self.proxy.clone(), pod.identity);
        let close = move || {
            listeners.iter().for_each(JoinHandle::abort);
            proxy.certs.release(&identity);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if !remove_routes => {
                rt.spawn(async move {
                    tokio::time::sleep(UNWIRE_GRACE).await;
                    close();
                });
            }
            _ => close(),
        }
        // The source-preserving rule stays while relayed connections may still use it (it only
        // matches the proxy's own mark); it goes at shutdown, after the drain.
        if remove_routes {
            let sysctl_dir = self.sysctl_dir.clone();
            if let Err(e) = pod.netns.run(move || routing::remove(&sysctl_dir)) {
                tracing::warn!(workload = %key, error = %e, "cannot remove the source-preserving routes");
            }
        }
        tracing::info!(workload = %key, "unenrolled");
    }

    /// Stops accepting new connections on every pod (the eBPF redirect stays, so new connections
    /// fail closed instead of bypassing the mesh). Connections in flight keep running.
    pub fn stop_accepting(&mut self) {
        for pod in self.pods.values_mut() {
            pod.listeners.iter().for_each(JoinHandle::abort);
            // Our duplicates too: with no agent behind them, connects are refused at once
            // instead of waiting in a backlog nobody accepts from.
            pod.sockets.clear();
        }
    }

    /// Unenrolls every pod and removes everything the agent set up inside them (at shutdown).
    pub fn unwire_all(&mut self) {
        let keys: Vec<String> = self.pods.keys().cloned().collect();
        for key in keys {
            self.unwire(&key, true);
        }
    }
}

/// A new network namespace, new addresses or a new identity need new listeners, certificates and
/// map entry; other changes (labels) are read from the current state on each connection. (A
/// namespace that changes under an unchanged path is caught by [`InpodManager::prune_vanished`].)
fn needs_rewire(old: &Workload, new: &Workload) -> bool {
    old.netns != new.netns || old.ips != new.ips || old.service_account != new.service_account
}

/// The path no longer exists: bind mount removed, process exited (`ENOENT`, or `ESRCH` from
/// procfs for a task being torn down).
fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

#[cfg(test)]
mod tests;

/// Removes the in-pod routes and sysctls the agent set up, in the network namespace (found by
/// address among `finder`'s) that holds `ips` and has the cookie `netns_cookie` (what the
/// enrollment map recorded). For `mesh-agent uninstall`, with no agent running.
pub fn remove_in_pod_setup(
    finder: &mut NetnsFinder,
    sysctl_dir: &std::path::Path,
    netns_cookie: u64,
    ips: &[IpAddr],
) -> io::Result<std::path::PathBuf> {
    let found = finder.find(ips).map_err(|e| {
        let kind = match e {
            DiscoverError::NotFound { .. } | DiscoverError::NoAddress => io::ErrorKind::NotFound,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e.to_string())
    })?;
    let netns = Netns::open(&found.path)?;
    if netns.cookie() != netns_cookie {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} holds the address but is another network namespace (the pod was recreated)",
                found.path.display()
            ),
        ));
    }
    let dir = sysctl_dir.to_path_buf();
    netns.run(move || routing::remove(&dir))?;
    Ok(found.path)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
