//! Reports training progress and the last checkpoint into the TrainingJob's `status.progress`
//! and `status.lastCheckpoint` with the pod's own ServiceAccount (in-cluster config), from a
//! background thread so that a slow or absent API server never stalls training. Reports are
//! coalesced: at most one patch per interval, always the latest of each, and the final ones are
//! flushed on drop.

use anneal_crds::trainingjob::{CheckpointRecord, TrainingJob, TrainingProgress};
use kube::api::{Api, Patch, PatchParams};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Minimum time between two patches.
const INTERVAL: Duration = Duration::from_secs(10);

/// One report for the status.
enum Update {
    Progress(TrainingProgress),
    Checkpoint(CheckpointRecord),
}

/// What is still to be patched: the latest of each kind.
#[derive(Default)]
struct Pending {
    progress: Option<TrainingProgress>,
    checkpoint: Option<CheckpointRecord>,
}

impl Pending {
    fn add(&mut self, update: Update) {
        match update {
            Update::Progress(p) => self.progress = Some(p),
            Update::Checkpoint(c) => self.checkpoint = Some(c),
        }
    }

    fn is_empty(&self) -> bool {
        self.progress.is_none() && self.checkpoint.is_none()
    }

    /// The merge patch of the status subresource.
    fn patch(&self) -> serde_json::Value {
        let mut status = serde_json::Map::new();
        if let Some(p) = &self.progress {
            status.insert("progress".into(), serde_json::json!(p));
        }
        if let Some(c) = &self.checkpoint {
            status.insert("lastCheckpoint".into(), serde_json::json!(c));
        }
        serde_json::json!({ "status": status })
    }
}

/// Sends progress to the background patcher.
pub struct StatusReporter {
    tx: Option<SyncSender<Update>>,
    worker: Option<JoinHandle<()>>,
}

impl StatusReporter {
    /// Starts the patcher for TrainingJob `name` in `namespace`.
    pub fn start(name: String, namespace: String) -> Self {
        let (tx, rx) = sync_channel(64);
        let worker = std::thread::Builder::new()
            .name("status-reporter".into())
            .spawn(move || patch_loop(&name, &namespace, rx))
            .ok();
        Self {
            tx: Some(tx),
            worker,
        }
    }

    /// Queues a progress report; drops it when the queue is full (a newer one follows).
    pub fn report(&self, progress: TrainingProgress) {
        self.send(Update::Progress(progress));
    }

    /// Queues the record of a checkpoint just written.
    pub fn checkpoint(&self, record: CheckpointRecord) {
        self.send(Update::Checkpoint(record));
    }

    fn send(&self, update: Update) {
        if let Some(tx) = &self.tx
            && let Err(TrySendError::Disconnected(_)) = tx.try_send(update)
        {
            // The patcher gave up (no cluster); training goes on without it.
        }
    }
}

impl Drop for StatusReporter {
    fn drop(&mut self) {
        // Closing the channel makes the patcher flush the last report and stop.
        self.tx.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn patch_loop(name: &str, namespace: &str, rx: Receiver<Update>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return eprintln!("anneal-runtime: warning: status reporter: {e}"),
    };
    let api: Api<TrainingJob> = match rt.block_on(kube::Client::try_default()) {
        Ok(client) => Api::namespaced(client, namespace),
        Err(e) => {
            return eprintln!(
                "anneal-runtime: warning: not reporting status (no cluster access): {e}"
            );
        }
    };
    let mut last_patch: Option<Instant> = None;
    let mut pending = Pending::default();
    let mut warned = false;
    loop {
        let closed = match rx.recv_timeout(INTERVAL) {
            Ok(update) => {
                pending.add(update);
                false
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => false,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => true,
        };
        let due = last_patch.is_none_or(|t| t.elapsed() >= INTERVAL);
        if !pending.is_empty() && (due || closed) {
            let patch = pending.patch();
            let result =
                rt.block_on(api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)));
            match result {
                Ok(_) => pending = Pending::default(),
                Err(e) if !warned => {
                    warned = true;
                    eprintln!(
                        "anneal-runtime: warning: cannot patch TrainingJob {namespace}/{name} status: {e}"
                    );
                }
                Err(_) => {}
            }
            last_patch = Some(Instant::now());
        }
        if closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_of_each_kind_is_patched_together() {
        let mut pending = Pending::default();
        assert!(pending.is_empty());
        pending.add(Update::Progress(TrainingProgress::at(10, 100)));
        pending.add(Update::Checkpoint(CheckpointRecord {
            step: 10,
            attempt: 2,
            uri: "file:///checkpoints/step-00000010".into(),
            time: None,
        }));
        pending.add(Update::Progress(TrainingProgress::at(20, 100)));
        let patch = pending.patch();
        assert_eq!(patch["status"]["progress"]["step"], 20);
        assert_eq!(patch["status"]["lastCheckpoint"]["step"], 10);
        assert_eq!(patch["status"]["lastCheckpoint"]["attempt"], 2);
    }
}
