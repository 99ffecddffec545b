//! Reports training progress and the last checkpoint into the TrainingJob's `status.progress`
//! and `status.lastCheckpoint` with the pod's own ServiceAccount (in-cluster config), from a
//! background thread so that a slow or absent API server never stalls training. Reports are
//! coalesced: at most one patch per interval, always the latest of each, and the final ones are
//! flushed on drop.
//!
//! Every patch is fenced by the API server: a JSON patch (RFC 6902) whose `test` operations
//! require `status.attempt` to be this worker's attempt (and `metadata.uid` the job's), so that
//! a stale attempt (a worker on a partitioned node that still runs) cannot overwrite what the
//! newer attempt reports. A refused test is final: the worker stops reporting and trains on,
//! its checkpoints are fenced separately ([`crate::checkpoint::fence`]).

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

    /// The fenced patch of what is pending.
    fn patch(&self, target: &StatusTarget) -> serde_json::Value {
        status_patch(
            target.attempt,
            target.uid.as_deref(),
            self.progress.as_ref(),
            self.checkpoint.as_ref(),
        )
    }
}

/// The JSON patch (RFC 6902) of the status subresource that reports `progress` and
/// `checkpoint`, applied only while `status.attempt` is `attempt` and, when `job_uid` is given,
/// `metadata.uid` is `job_uid` (a job deleted and created again under the same name counts its
/// attempts from 1 again). `add` sets a member whether or not it exists yet.
pub fn status_patch(
    attempt: u64,
    job_uid: Option<&str>,
    progress: Option<&TrainingProgress>,
    checkpoint: Option<&CheckpointRecord>,
) -> serde_json::Value {
    let mut ops = Vec::new();
    if let Some(uid) = job_uid {
        ops.push(serde_json::json!({"op": "test", "path": "/metadata/uid", "value": uid}));
    }
    ops.push(serde_json::json!({"op": "test", "path": "/status/attempt", "value": attempt}));
    if let Some(p) = progress {
        ops.push(serde_json::json!({"op": "add", "path": "/status/progress", "value": p}));
    }
    if let Some(c) = checkpoint {
        ops.push(serde_json::json!({"op": "add", "path": "/status/lastCheckpoint", "value": c}));
    }
    serde_json::Value::Array(ops)
}

/// What the API server did with a status patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatchOutcome {
    /// Applied.
    Applied,
    /// A `test` failed (or the object changed under it): another attempt, or another job of
    /// the same name, owns the status now. The API server's message.
    Fenced(String),
}

/// Sends `patch` (from [`status_patch`]) to the status of TrainingJob `name` in `namespace`.
/// A failed `test` is `Ok(Fenced)` (the API server answers 422 Unprocessable Entity; 409
/// Conflict is taken the same way); other failures are errors, worth retrying.
pub async fn send_status_patch(
    client: kube::Client,
    namespace: &str,
    name: &str,
    patch: &serde_json::Value,
) -> Result<PatchOutcome, kube::Error> {
    let api: Api<TrainingJob> = Api::namespaced(client, namespace);
    let ops = serde_json::from_value(patch.clone()).map_err(kube::Error::SerdeError)?;
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Json::<()>(ops))
        .await
    {
        Ok(_) => Ok(PatchOutcome::Applied),
        Err(kube::Error::Api(e)) if e.code == 422 || e.code == 409 => {
            Ok(PatchOutcome::Fenced(e.message))
        }
        Err(e) => Err(e),
    }
}

/// The TrainingJob a worker reports to, and the attempt it reports as.
#[derive(Debug, Clone)]
pub struct StatusTarget {
    /// The job's name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its `metadata.uid`, when the operator passed it.
    pub uid: Option<String>,
    /// This worker's attempt (`ANNEAL_ATTEMPT`).
    pub attempt: u64,
}

/// Sends progress to the background patcher.
pub struct StatusReporter {
    tx: Option<SyncSender<Update>>,
    worker: Option<JoinHandle<()>>,
}

impl StatusReporter {
    /// Starts the patcher for `target`.
    pub fn start(target: StatusTarget) -> Self {
        let (tx, rx) = sync_channel(64);
        let worker = std::thread::Builder::new()
            .name("status-reporter".into())
            .spawn(move || patch_loop(&target, rx))
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
            // The patcher gave up (no cluster, or fenced); training goes on without it.
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

fn patch_loop(target: &StatusTarget, rx: Receiver<Update>) {
    let StatusTarget {
        name, namespace, ..
    } = target;
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return eprintln!("anneal-runtime: warning: status reporter: {e}"),
    };
    let client = match rt.block_on(kube::Client::try_default()) {
        Ok(client) => client,
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
            let patch = pending.patch(target);
            let result = rt.block_on(send_status_patch(client.clone(), namespace, name, &patch));
            match result {
                Ok(PatchOutcome::Applied) => pending = Pending::default(),
                Ok(PatchOutcome::Fenced(message)) => {
                    // Dropping the receiver makes later reports no-ops.
                    return eprintln!(
                        "anneal-runtime: warning: fenced: TrainingJob {namespace}/{name} status is \
                         no longer attempt {}'s ({message}); not reporting status any more",
                        target.attempt
                    );
                }
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
        let target = StatusTarget {
            name: "arith".into(),
            namespace: "team".into(),
            uid: None,
            attempt: 2,
        };
        let patch = pending.patch(&target);
        assert_eq!(patch[1]["value"]["step"], 20);
        assert_eq!(patch[2]["value"]["step"], 10);
        assert_eq!(patch[2]["value"]["attempt"], 2);
    }

    /// The patch is fenced: it tests the attempt (and the job's UID) before it adds anything,
    /// so the API server refuses it from a stale attempt. The old merge patch had no
    /// precondition at all.
    #[test]
    fn the_status_patch_tests_the_attempt_before_writing() {
        let progress = TrainingProgress::at(30, 100);
        let checkpoint = CheckpointRecord {
            step: 30,
            attempt: 4,
            uri: "file:///checkpoints/step-00000030".into(),
            time: None,
        };
        let patch = status_patch(4, Some("0d5c-uid"), Some(&progress), Some(&checkpoint));
        assert_eq!(
            patch,
            serde_json::json!([
                {"op": "test", "path": "/metadata/uid", "value": "0d5c-uid"},
                {"op": "test", "path": "/status/attempt", "value": 4},
                {"op": "add", "path": "/status/progress",
                 "value": {"step": 30, "totalSteps": 100, "stepOfTotal": "30/100"}},
                {"op": "add", "path": "/status/lastCheckpoint",
                 "value": {"step": 30, "attempt": 4, "uri": "file:///checkpoints/step-00000030"}},
            ])
        );
        // Without a UID (an operator that does not pass it) the attempt alone fences; a
        // report of progress alone leaves lastCheckpoint alone.
        let patch = status_patch(1, None, Some(&progress), None);
        assert_eq!(patch.as_array().unwrap().len(), 2);
        assert_eq!(patch[0]["op"], "test");
        assert_eq!(patch[0]["path"], "/status/attempt");
        assert_eq!(patch[1]["path"], "/status/progress");
        // It is a well-formed RFC 6902 document for the client.
        let ops: kube::core::params::Patch<()> =
            Patch::Json(serde_json::from_value(patch).unwrap());
        assert!(matches!(ops, Patch::Json(_)));
    }

    /// What the API server does with the patch, emulated on the stored object: the newer
    /// attempt's status is kept, the stale attempt's report is not applied.
    #[test]
    fn a_stale_attempts_patch_does_not_apply() {
        let stored = serde_json::json!({
            "metadata": {"name": "arith", "uid": "0d5c-uid"},
            "status": {"attempt": 3, "progress": {"step": 50, "totalSteps": 100}},
        });
        let stale = status_patch(
            2,
            Some("0d5c-uid"),
            Some(&TrainingProgress::at(40, 100)),
            None,
        );
        assert!(apply(&stored, &stale).is_none());
        let recreated = status_patch(
            3,
            Some("other-uid"),
            Some(&TrainingProgress::at(40, 100)),
            None,
        );
        assert!(apply(&stored, &recreated).is_none());
        let current = status_patch(
            3,
            Some("0d5c-uid"),
            Some(&TrainingProgress::at(60, 100)),
            None,
        );
        let after = apply(&stored, &current).unwrap();
        assert_eq!(after["status"]["progress"]["step"], 60);
        // `add` creates a member that does not exist yet.
        let first = status_patch(3, None, None, Some(&CheckpointRecord::default()));
        assert!(apply(&stored, &first).unwrap()["status"]["lastCheckpoint"].is_object());
    }

    /// RFC 6902 `test` and `add` on object members: enough to check the patches above.
    fn apply(doc: &serde_json::Value, patch: &serde_json::Value) -> Option<serde_json::Value> {
        let mut doc = doc.clone();
        for op in patch.as_array()? {
            let path = op["path"].as_str()?;
            match op["op"].as_str()? {
                "test" => {
                    if doc.pointer(path)? != &op["value"] {
                        return None;
                    }
                }
                "add" => {
                    let (parent, key) = path.rsplit_once('/')?;
                    doc.pointer_mut(parent)?
                        .as_object_mut()?
                        .insert(key.to_string(), op["value"].clone());
                }
                _ => return None,
            }
        }
        Some(doc)
    }
}
