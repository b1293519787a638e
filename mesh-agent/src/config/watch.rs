//! Hot reload of the config file by polling its contents.
//!
//! Polling the bytes (not inotify) follows editors that replace the file by rename and Kubernetes
//! ConfigMap mounts that swap a symlink; the file is small, so reading it twice a second is cheap.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::ConfigError;
use crate::model::Mesh;

/// Polls `path` every `interval`; each changed, valid version is published on `tx`. An invalid
/// version is reported to `on_reject` and the last good config stays in force. Returns when every
/// receiver of `tx` is gone.
pub async fn watch_file(
    path: PathBuf,
    interval: Duration,
    mut last: Vec<u8>,
    tx: watch::Sender<Arc<Mesh>>,
    mut on_result: impl FnMut(Result<&Mesh, &ConfigError>),
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tx.closed() => return,
        }
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(source) => {
                // A file that vanished for a moment (an editor's rename) is not a new config.
                if last != b"<unreadable>" {
                    on_result(Err(&ConfigError::Read {
                        path: path.clone(),
                        error: source,
                    }));
                    last = b"<unreadable>".to_vec();
                }
                continue;
            }
        };
        if bytes == last {
            continue;
        }
        last = bytes;
        let parsed = std::str::from_utf8(&last)
            .map_err(|e| ConfigError::Parse {
                path: path.clone(),
                message: format!("not UTF-8: {e}"),
            })
            .and_then(|text| super::parse(&path, text));
        match parsed {
            Ok(config) => {
                on_result(Ok(&config));
                if tx.send(Arc::new(config)).is_err() {
                    return;
                }
            }
            Err(e) => on_result(Err(&e)),
        }
    }
}
