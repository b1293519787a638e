//! The eBPF programs' debug log (aya-log): records of their decisions, in the agent's log.
//!
//! The programs log only while the pinned `EBPF_LOG` switch is on (`mesh-agent ebpf-log on`; off
//! at every agent start); when off, the check is one array lookup per program run. Records go
//! through a ring buffer that [`forward`] drains into the agent's log (target `mesh_ebpf`, each
//! line starting `ebpf DEBUG:`), at info level: switching the programs' log on is what asks for
//! them.
use std::path::Path;

use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;

use super::maps::{map_error, EbpfLogMap, EBPF_LOG};
use super::pinned::open_map;
use super::DatapathError;

/// Hands each record to `tracing`.
pub struct Forward;

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        tracing::info!(target: "mesh_ebpf", "ebpf {}: {}", record.level(), record.args());
    }

    fn flush(&self) {}
}

/// The programs' log, read by [`forward`].
pub struct EbpfLog(EbpfLogger<Forward>);

impl EbpfLog {
    pub(super) fn new(logger: EbpfLogger<Forward>) -> EbpfLog {
        EbpfLog(logger)
    }
}

/// Forwards the programs' records as they come, until the task is aborted.
pub async fn forward(log: EbpfLog) {
    // SAFETY: the logger owns the ring buffer's descriptor and the AsyncFd owns the logger, so
    // the descriptor stays open for as long as it is registered.
    let mut fd = match unsafe { AsyncFd::register(log.0) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the eBPF log ring buffer; eBPF debug log unavailable");
            return;
        }
    };
    loop {
        let Ok(mut ready) = fd.readable_mut().await else {
            return;
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

fn switch(pin_dir: &Path) -> Result<EbpfLogMap, DatapathError> {
    EbpfLogMap::try_from(open_map(pin_dir, &EBPF_LOG)?).map_err(|e| map_error(&EBPF_LOG, e))
}

/// Switches the programs' debug log on or off through the pin (works while an agent runs).
pub fn set_enabled(pin_dir: &Path, on: bool) -> Result<(), DatapathError> {
    switch(pin_dir)?
        .set(0, u32::from(on), 0)
        .map_err(|e| map_error(&EBPF_LOG, e))
}

/// Whether the programs' debug log is on.
pub fn enabled(pin_dir: &Path) -> Result<bool, DatapathError> {
    switch(pin_dir)?
        .get(&0, 0)
        .map(|v| v != 0)
        .map_err(|e| map_error(&EBPF_LOG, e))
}
