//! Client side: pooled HTTP/2 connections and `CONNECT` tunnels on them.
//!
//! All bookkeeping lives under one mutex (held only for short, non-async sections):
//!
//! * per key, the live connections with their count of streams in use (`active`);
//! * per key, `dialing` (dials in progress) and `waiting` (callers without a stream slot yet,
//!   dialers included). A caller without a free slot dials only when the dials in progress cannot
//!   cover everybody waiting (`waiting > dialing * streams per connection`); otherwise it waits
//!   for a dial to finish or a slot to free up. So 100 concurrent callers with 100 streams per
//!   connection make one dial, with 10 per connection ten dials, in parallel.
//! * A failed dial fails every caller that was waiting on that key (they share the error instead
//!   of each retrying a dead destination one after another).
//!
//! Each connection has a driver task: it polls the h2 connection, sends keepalive PINGs and
//! closes the connection when it has had no streams for `idle_timeout`. A connection that ends
//! for any reason leaves the pool; a request that fails on a pooled connection because that
//! connection died (I/O error, GOAWAY) or the peer refused the stream is retried on another one.
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::Reason;
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{
    keepalive, new_traceparent, Baggage, ConnectRequest, H2Settings, H2Stream, HboneError,
};

/// How often a request is retried on another connection after its pooled connection turned out
/// to be dead.
const MAX_RETRIES: usize = 3;

/// Pooled connections are shared only between requests with the same key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Source identity (SPIFFE id) the connection authenticates as.
    pub src: String,
    /// Source address the connection leaves from: two pods with one service account never share
    /// a connection (it was dialed from one pod's network namespace, with that pod's IP).
    pub src_ip: std::net::IpAddr,
    /// Destination identity the connection's peer was verified as.
    pub dst: String,
    /// Where the connection goes (`<pod ip>:15008`).
    pub dst_addr: SocketAddr,
}

/// Pooled HBONE client connections. Cheap to clone (shared state), `Send + Sync`.
#[derive(Clone)]
pub struct HbonePool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    settings: H2Settings,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    keys: HashMap<PoolKey, KeyState>,
    next_id: u64,
}

struct KeyState {
    conns: Vec<ConnEntry>,
    /// Dials in progress.
    dialing: usize,
    /// Callers of `connect` that have no stream slot yet (dialers included).
    waiting: usize,
    /// Woken when a dial finishes or a slot frees up.
    changed: Arc<Notify>,
    /// Count of failed dials and the last failure, handed to callers that waited for it.
    failures: u64,
    last_failure: Option<DialFailure>,
    /// The peer's SETTINGS_MAX_CONCURRENT_STREAMS as last seen (for planning dials).
    peer_limit: usize,
}

impl KeyState {
    fn new() -> KeyState {
        KeyState {
            conns: Vec::new(),
            dialing: 0,
            waiting: 0,
            changed: Arc::new(Notify::new()),
            failures: 0,
            last_failure: None,
            peer_limit: usize::MAX,
        }
    }

    fn is_unused(&self) -> bool {
        self.conns.is_empty() && self.dialing == 0 && self.waiting == 0
    }

    /// Takes a stream slot on the oldest connection that has one (packing streams onto few
    /// connections lets the others go idle and close).
    fn take_slot(&mut self, cap: usize) -> Option<(SendRequest<Bytes>, u64)> {
        for conn in &mut self.conns {
            let peer_limit = conn.send.current_max_send_streams();
            self.peer_limit = peer_limit;
            if conn.active < cap.min(peer_limit) {
                conn.active += 1;
                return Some((conn.send.clone(), conn.id));
            }
        }
        None
    }
}

struct ConnEntry {
    id: u64,
    send: SendRequest<Bytes>,
    /// Streams in use (slots handed out and not yet released).
    active: usize,
    /// When `active` last dropped to 0.
    idle_since: Instant,
    /// Wakes the driver's idle watch when `active` drops to 0.
    idle: Arc<Notify>,
}

#[derive(Clone)]
enum DialFailure {
    Dial(Arc<io::Error>),
    Handshake(Arc<h2::Error>),
}

impl From<DialFailure> for HboneError {
    fn from(f: DialFailure) -> HboneError {
        match f {
            DialFailure::Dial(e) => HboneError::Dial(e),
            DialFailure::Handshake(e) => HboneError::Handshake(e),
        }
    }
}

fn lock(state: &Mutex<PoolState>) -> MutexGuard<'_, PoolState> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl PoolInner {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        lock(&self.state)
    }

    /// Returns a stream slot to its connection.
    fn release(&self, key: &PoolKey, id: u64) {
        let mut st = self.lock();
        let Some(ks) = st.keys.get_mut(key) else {
            return;
        };
        if let Some(conn) = ks.conns.iter_mut().find(|c| c.id == id) {
            conn.active -= 1;
            if conn.active == 0 {
                conn.idle_since = Instant::now();
                conn.idle.notify_one();
            }
        }
        if ks.waiting > 0 {
            ks.changed.notify_waiters();
        }
    }

    /// Takes a connection out of the pool (it died or expired). Returns whether it was there.
    fn remove(&self, key: &PoolKey, id: u64) -> bool {
        let mut st = self.lock();
        let Some(ks) = st.keys.get_mut(key) else {
            return false;
        };
        let before = ks.conns.len();
        ks.conns.retain(|c| c.id != id);
        let removed = ks.conns.len() != before;
        if ks.is_unused() {
            st.keys.remove(key);
        }
        removed
    }

    /// Takes the connection out of the pool if it still has no streams and has been idle for
    /// `timeout`. Decided under the lock, so a concurrent `connect` cannot pick it meanwhile.
    fn remove_if_idle(&self, key: &PoolKey, id: u64, timeout: Duration) -> bool {
        let mut st = self.lock();
        let Some(ks) = st.keys.get_mut(key) else {
            return true;
        };
        let Some(pos) = ks.conns.iter().position(|c| c.id == id) else {
            return true;
        };
        let conn = &ks.conns[pos];
        if conn.active > 0 || conn.idle_since.elapsed() < timeout {
            return false;
        }
        ks.conns.remove(pos);
        if ks.is_unused() {
            st.keys.remove(key);
        }
        true
    }

    /// When the connection should be checked for idleness next: `None` while it has streams,
    /// `Err(())` when it is no longer in the pool.
    fn idle_deadline(
        &self,
        key: &PoolKey,
        id: u64,
        timeout: Duration,
    ) -> Result<Option<Instant>, ()> {
        let st = self.lock();
        let conn = st
            .keys
            .get(key)
            .and_then(|ks| ks.conns.iter().find(|c| c.id == id))
            .ok_or(())?;
        Ok((conn.active == 0).then(|| conn.idle_since + timeout))
    }
}

/// A stream slot on a pooled connection; released when the tunnel is dropped.
pub(crate) struct Slot {
    pool: Weak<PoolInner>,
    key: PoolKey,
    id: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.release(&self.key, self.id);
        }
    }
}

/// A caller counted in `waiting`; uncounts itself if the caller goes away (future dropped).
struct Waiting<'a> {
    pool: &'a PoolInner,
    key: &'a PoolKey,
    counted: bool,
}

impl Waiting<'_> {
    /// Uncounts under a lock the caller already holds.
    fn done(&mut self, ks: &mut KeyState) {
        if self.counted {
            ks.waiting -= 1;
            self.counted = false;
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.counted {
            return;
        }
        let mut st = self.pool.lock();
        if let Some(ks) = st.keys.get_mut(self.key) {
            ks.waiting -= 1;
            if ks.is_unused() {
                st.keys.remove(self.key);
            }
        }
    }
}

/// A dial in progress counted in `dialing`; if the caller goes away mid-dial, uncounts itself and
/// wakes the waiters so one of them dials instead.
struct Dialing<'a> {
    pool: &'a PoolInner,
    key: &'a PoolKey,
    counted: bool,
}

impl Drop for Dialing<'_> {
    fn drop(&mut self) {
        if !self.counted {
            return;
        }
        let mut st = self.pool.lock();
        if let Some(ks) = st.keys.get_mut(self.key) {
            ks.dialing -= 1;
            ks.changed.notify_waiters();
        }
    }
}

impl std::fmt::Debug for HbonePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HbonePool")
            .field("connections", &self.connections())
            .finish()
    }
}

impl HbonePool {
    pub fn new(settings: H2Settings) -> HbonePool {
        HbonePool {
            inner: Arc::new(PoolInner {
                settings,
                state: Mutex::new(PoolState::default()),
            }),
        }
    }

    pub fn settings(&self) -> &H2Settings {
        &self.inner.settings
    }

    /// Opens a tunnel for `req` on a pooled connection for `key` with a free stream slot, or on
    /// a new connection over the TLS stream `dial` returns (called at most once, and only when
    /// no pooled connection or dial in progress can take this request).
    ///
    /// A non-200 answer becomes [`HboneError::Status`]. A request that fails because its pooled
    /// connection turned out to be dead is retried on another connection.
    pub async fn connect<F, Fut, IO>(
        &self,
        key: PoolKey,
        req: ConnectRequest,
        dial: F,
    ) -> Result<H2Stream, HboneError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = io::Result<IO>>,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let traceparent = req.traceparent.clone().unwrap_or_else(new_traceparent);
        let mut dial = Some(dial);
        let mut retries = 0;
        loop {
            let request = req.to_http(&traceparent)?;
            let (send, slot, fresh) = self.acquire(&key, &mut dial).await?;
            let id = slot.id;
            match send_connect(send, request).await {
                Ok((send, response)) => {
                    let status = response.status();
                    if status != StatusCode::OK {
                        return Err(HboneError::Status(status));
                    }
                    let baggage = Baggage::from_headers(response.headers());
                    return Ok(H2Stream::new(send, response.into_body(), Some(slot))
                        .with_peer_baggage(baggage));
                }
                Err(e) => {
                    let conn_dead = e.is_io() || e.is_go_away();
                    if conn_dead {
                        self.inner.remove(&key, id);
                    }
                    drop(slot);
                    let retry = conn_dead || e.reason() == Some(Reason::REFUSED_STREAM);
                    if !fresh && retry && retries < MAX_RETRIES {
                        tracing::debug!(peer = %key.dst_addr, error = %e, "pooled HBONE connection failed; retrying");
                        retries += 1;
                        continue;
                    }
                    return Err(HboneError::H2(e));
                }
            }
        }
    }

    /// Live HTTP/2 connections, all keys.
    pub fn connections(&self) -> usize {
        self.inner
            .lock()
            .keys
            .values()
            .map(|ks| ks.conns.len())
            .sum()
    }

    /// Callers waiting for a stream to one key.
    pub fn waiting_for(&self, key: &PoolKey) -> usize {
        self.inner.lock().keys.get(key).map_or(0, |ks| ks.waiting)
    }

    /// Live HTTP/2 connections for one key.
    pub fn connections_for(&self, key: &PoolKey) -> usize {
        self.inner
            .lock()
            .keys
            .get(key)
            .map_or(0, |ks| ks.conns.len())
    }

    /// Streams in use on pooled connections, all keys.
    pub fn streams(&self) -> usize {
        let st = self.inner.lock();
        st.keys
            .values()
            .flat_map(|ks| ks.conns.iter())
            .map(|c| c.active)
            .sum()
    }

    /// A stream slot for `key`: on a pooled connection, or on a connection this call dials.
    /// The bool says whether the connection is fresh (dialed by this call).
    async fn acquire<F, Fut, IO>(
        &self,
        key: &PoolKey,
        dial: &mut Option<F>,
    ) -> Result<(SendRequest<Bytes>, Slot, bool), HboneError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = io::Result<IO>>,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let inner = &*self.inner;
        let cap = inner.settings.max_streams_per_conn.max(1);
        let slot = |id| Slot {
            pool: Arc::downgrade(&self.inner),
            key: key.clone(),
            id,
        };
        let mut waiting = Waiting {
            pool: inner,
            key,
            counted: true,
        };
        let seen_failures = {
            let mut st = inner.lock();
            let ks = st.keys.entry(key.clone()).or_insert_with(KeyState::new);
            if ks.waiting >= inner.settings.max_waiters_per_peer {
                waiting.counted = false;
                return Err(HboneError::PoolFull(ks.waiting));
            }
            ks.waiting += 1;
            ks.failures
        };
        loop {
            let notified = {
                let mut st = inner.lock();
                let ks = st.keys.get_mut(key).expect("a key with waiters stays");
                if let Some((send, id)) = ks.take_slot(cap) {
                    waiting.done(ks);
                    return Ok((send, slot(id), false));
                }
                if ks.failures != seen_failures {
                    waiting.done(ks);
                    let failure = ks.last_failure.clone().expect("failure recorded");
                    return Err(failure.into());
                }
                let per_conn = cap.min(ks.peer_limit).max(1);
                if ks.dialing == 0 || (dial.is_some() && ks.waiting > ks.dialing * per_conn) {
                    if dial.is_none() {
                        // Cannot happen today: a request that dialed is never retried.
                        waiting.done(ks);
                        return Err(HboneError::Io(io::Error::other(
                            "no HTTP/2 connection available and this request already dialed",
                        )));
                    }
                    ks.dialing += 1;
                    break;
                }
                // Created under the lock: a dial that finishes after we unlock still wakes us.
                ks.changed.clone().notified_owned()
            };
            notified.await;
        }

        let mut dialing = Dialing {
            pool: inner,
            key,
            counted: true,
        };
        let dial = dial.take().expect("checked before counting as a dialer");
        let result = self.dial(dial, key).await;

        let mut st = inner.lock();
        let id = st.next_id;
        st.next_id += 1;
        let ks = st.keys.get_mut(key).expect("a key with waiters stays");
        ks.dialing -= 1;
        dialing.counted = false;
        waiting.done(ks);
        ks.changed.notify_waiters();
        match result {
            Ok((send, conn)) => {
                let idle = Arc::new(Notify::new());
                ks.conns.push(ConnEntry {
                    id,
                    send: send.clone(),
                    active: 1,
                    idle_since: Instant::now(),
                    idle: idle.clone(),
                });
                drop(st);
                tokio::spawn(drive(
                    conn,
                    Arc::downgrade(&self.inner),
                    key.clone(),
                    id,
                    idle,
                ));
                Ok((send, slot(id), true))
            }
            Err(failure) => {
                ks.failures += 1;
                ks.last_failure = Some(failure.clone());
                Err(failure.into())
            }
        }
    }

    /// Dials and does the HTTP/2 handshake. Returns the request handle and the connection (not
    /// yet driven).
    async fn dial<F, Fut, IO>(
        &self,
        dial: F,
        key: &PoolKey,
    ) -> Result<(SendRequest<Bytes>, ClientConn<IO>), DialFailure>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = io::Result<IO>>,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let settings = &self.inner.settings;
        let io = dial().await.map_err(|e| {
            tracing::debug!(peer = %key.dst_addr, error = %e, "HBONE dial failed");
            DialFailure::Dial(Arc::new(e))
        })?;
        let handshake = settings.client_builder().handshake::<_, Bytes>(io);
        let (send, mut conn) =
            match tokio::time::timeout(settings.handshake_timeout, handshake).await {
                Ok(Ok(pair)) => pair,
                Ok(Err(e)) => return Err(DialFailure::Handshake(Arc::new(e))),
                Err(_) => {
                    return Err(DialFailure::Dial(Arc::new(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "HTTP/2 handshake timed out",
                    ))))
                }
            };
        let ping = conn.ping_pong();
        tracing::debug!(peer = %key.dst_addr, src = %key.src, dst = %key.dst, "new HBONE connection");
        Ok((
            send,
            ClientConn {
                conn,
                ping,
                settings: settings.clone(),
            },
        ))
    }
}

struct ClientConn<IO> {
    conn: h2::client::Connection<IO, Bytes>,
    ping: Option<h2::PingPong>,
    settings: H2Settings,
}

/// Sends the `CONNECT` and waits for the answer.
async fn send_connect(
    send: SendRequest<Bytes>,
    request: http::Request<()>,
) -> Result<(h2::SendStream<Bytes>, http::Response<h2::RecvStream>), h2::Error> {
    let mut send = send.ready().await?;
    let (response, stream) = send.send_request(request, false)?;
    let response = response.await?;
    Ok((stream, response))
}

/// Drives one pooled connection until it ends: polls h2, keeps it alive with PINGs, and closes
/// it after `idle_timeout` without streams. Takes it out of the pool when it ends.
async fn drive<IO>(
    c: ClientConn<IO>,
    pool: Weak<PoolInner>,
    key: PoolKey,
    id: u64,
    idle: Arc<Notify>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ClientConn {
        conn,
        ping,
        settings,
    } = c;
    let mut conn = pin!(conn);
    let mut keepalive = pin!(keepalive(
        ping,
        settings.keepalive_interval,
        settings.keepalive_timeout
    ));
    let mut idle_watch = pin!(idle_watch(
        pool.clone(),
        key.clone(),
        id,
        idle,
        settings.idle_timeout
    ));
    let mut watching = true;
    loop {
        tokio::select! {
            result = &mut conn => {
                match result {
                    Ok(()) => tracing::debug!(peer = %key.dst_addr, "HBONE connection closed"),
                    Err(e) => tracing::debug!(peer = %key.dst_addr, error = %e, "HBONE connection ended"),
                }
                break;
            }
            error = &mut keepalive => {
                tracing::warn!(peer = %key.dst_addr, src = %key.src, dst = %key.dst, %error, "closing HBONE connection");
                break;
            }
            // Out of the pool (idle, or the pool is gone): once its streams are done, h2 sends
            // GOAWAY and the connection completes above.
            () = &mut idle_watch, if watching => watching = false,
        }
    }
    if let Some(pool) = pool.upgrade() {
        pool.remove(&key, id);
    }
}

/// Returns once the connection has been idle for `timeout` and was taken out of the pool (or is
/// no longer in it, or the pool is gone).
async fn idle_watch(
    pool: Weak<PoolInner>,
    key: PoolKey,
    id: u64,
    idle: Arc<Notify>,
    timeout: Duration,
) {
    loop {
        let deadline = match pool.upgrade() {
            Some(pool) => match pool.idle_deadline(&key, id, timeout) {
                Ok(deadline) => deadline,
                Err(()) => return,
            },
            None => return,
        };
        match deadline {
            None => idle.notified().await,
            Some(at) if Instant::now() >= at => {
                let Some(pool) = pool.upgrade() else { return };
                if pool.remove_if_idle(&key, id, timeout) {
                    tracing::debug!(peer = %key.dst_addr, ?timeout, "closing idle HBONE connection");
                    return;
                }
            }
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = idle.notified() => {}
                }
            }
        }
    }
}
