//! Reports training progress into the TrainingJob's `status.progress` with the pod's own
//! ServiceAccount (in-cluster config), from a background thread so that a slow or absent API
//! server never stalls training. Reports are coalesced: at most one patch per interval, always
//! the latest progress, and the final one is flushed on drop.

use anneal_crds::trainingjob::{TrainingJob, TrainingProgress};
use kube::api::{Api, Patch, PatchParams};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Minimum time between two patches.
const INTERVAL: Duration = Duration::from_secs(10);

/// Sends progress to the background patcher.
pub struct StatusReporter {
    tx: Option<SyncSender<TrainingProgress>>,
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

    /// Queues a report; drops it when the queue is full (a newer one follows).
    pub fn report(&self, progress: TrainingProgress) {
        if let Some(tx) = &self.tx
            && let Err(TrySendError::Disconnected(_)) = tx.try_send(progress)
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

fn patch_loop(name: &str, namespace: &str, rx: Receiver<TrainingProgress>) {
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
    let mut pending: Option<TrainingProgress> = None;
    let mut warned = false;
    loop {
        let closed = match rx.recv_timeout(INTERVAL) {
            Ok(p) => {
                pending = Some(p);
                false
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => false,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => true,
        };
        let due = last_patch.is_none_or(|t| t.elapsed() >= INTERVAL);
        if let Some(progress) = pending.as_ref().filter(|_| due || closed) {
            let patch = serde_json::json!({ "status": { "progress": progress } });
            let result =
                rt.block_on(api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)));
            match result {
                Ok(_) => pending = None,
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
