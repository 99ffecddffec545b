//! Whether a checkpoint may be resumed by this run. Every checkpoint records the job that wrote
//! it ([`JobIdentity`]) and the configuration of its run; a resume refuses a checkpoint of
//! another job or of a different run (see [`RunSpec`] for what makes one), and says which
//! settings changed when the run is the same.
//!
//! A checkpoint of another job is refused (exit 65), not skipped: a directory holding another
//! job's checkpoints is a misconfiguration (two local runs pointed at one directory; the
//! operator gives every TrainingJob its own `<namespace>/<name>/<uid>` directory), and both
//! starting fresh and resuming would write into, prune and fence the other job's checkpoints.
//! The refusal happens before this run claims the directory, so the other job is not touched.

use super::TrainError;
use super::config::{DatasetSpec, Stage, TrainConfig};
use super::trainer::TrainState;
use crate::checkpoint::committed;
use crate::model::ModelConfig;
use crate::tokenizer::TokenizerSpec;
use anneal_crds::contract;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;

/// The TrainingJob a run trains for, from the worker's environment (`ANNEAL_JOB_NAMESPACE`,
/// `ANNEAL_JOB_NAME`, `ANNEAL_JOB_UID`); all unset for a local run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobIdentity {
    /// The job's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The job's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The job's `metadata.uid`: a job deleted and created again under its name has another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

impl JobIdentity {
    /// The identity the operator gives a worker pod through its environment.
    pub fn from_env() -> Self {
        let var = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
        Self {
            namespace: var(contract::ENV_JOB_NAMESPACE),
            name: var(contract::ENV_JOB_NAME),
            uid: var(contract::ENV_JOB_UID),
        }
    }

    /// Whether `other` is the same job. The UID decides where both know it; a side without one
    /// (a worker of an operator that did not pass it) is compared by namespace and name.
    pub fn same_job(&self, other: &Self) -> bool {
        let uids_agree = match (&self.uid, &other.uid) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        uids_agree && self.namespace == other.namespace && self.name == other.name
    }
}

impl std::fmt::Display for JobIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.namespace, &self.name) {
            (None, None) => write!(f, "a local run (no TrainingJob)")?,
            (ns, name) => write!(
                f,
                "TrainingJob {}/{}",
                ns.as_deref().unwrap_or("?"),
                name.as_deref().unwrap_or("?")
            )?,
        }
        match &self.uid {
            Some(uid) => write!(f, " (uid {uid})"),
            None => Ok(()),
        }
    }
}

/// What makes a run this run: what the weights, the optimizer moments and the data cursor of
/// a checkpoint only mean under. A checkpoint whose `RunSpec` differs is refused.
///
/// - The architecture (as trained, vocabulary filled in), base model and tokenizer: the weights
///   are tensors of that model over those token ids.
/// - The dataset (location, format, split), the sequence length, the stage and the seed: the
///   cursor is a position in the seed's shuffled order of the samples these produce, and the
///   stage decides which tokens the loss counts.
/// - The frozen fraction: the optimizer holds moments of exactly the trainable weights.
///
/// Everything else may change and still resume, reported as a change: `steps`, the learning
/// rate and its schedule and warm-up, weight decay, AdamW betas and epsilon, gradient clip,
/// precision, threads, and the batch size and gradient accumulation. None of these gives the
/// saved state another meaning: the moments stay estimates of the same gradients, and the
/// cursor counts samples, not batches, so a new batch size continues the same data order
/// where it stopped. They are what a user tunes during a run (a lower learning rate, more
/// steps, a batch ramp), and the TrainingJob allows editing them once it has started.
///
/// The fields are named by their place in the configuration, so that a refusal names them so.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RunSpec<'a> {
    model: RunModel<'a>,
    tokenizer: &'a TokenizerSpec,
    dataset: &'a DatasetSpec,
    stage: Stage,
    hyperparameters: RunHyperparameters,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RunModel<'a> {
    /// As trained: a base model's, or the configured one with the vocabulary filled in.
    architecture: &'a ModelConfig,
    base: Option<&'a str>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RunHyperparameters {
    seq_len: usize,
    seed: u64,
    freeze_fraction: f64,
}

impl<'a> RunSpec<'a> {
    fn of(config: &'a TrainConfig, model: &'a ModelConfig) -> Self {
        let h = &config.hyperparameters;
        Self {
            model: RunModel {
                architecture: model,
                base: config.model.base.as_deref(),
            },
            tokenizer: &config.tokenizer,
            dataset: &config.dataset,
            stage: config.stage,
            hyperparameters: RunHyperparameters {
                seq_len: h.seq_len.unwrap_or(model.max_seq_len),
                seed: h.seed,
                freeze_fraction: match config.stage {
                    Stage::Sft => h.freeze_fraction,
                    Stage::Pretrain | Stage::Dpo => 0.0,
                },
            },
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// `sha256:<hex>` of the [`RunSpec`] of `config` training `model` (the architecture as
/// trained): equal digests are the same run.
pub fn spec_digest(config: &TrainConfig, model: &ModelConfig) -> String {
    let bytes = serde_json::to_vec(&RunSpec::of(config, model)).unwrap_or_default();
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A checkpoint this run may resume.
#[derive(Debug, Default, PartialEq)]
pub struct Accepted {
    /// Settings that differ from the run that wrote it (`path: old -> new`).
    pub changes: Vec<String>,
    /// The checkpoint records no job (written before identities were recorded): it is taken
    /// as this job's, with a warning.
    pub unrecorded_job: bool,
}

/// Whether `state`, read from `checkpoint`, may be resumed by `job` training `config` with the
/// architecture `model`. The run is compared on the configuration the checkpoint records in
/// full, so a runtime that digests more fields still resumes older checkpoints.
pub fn check(
    checkpoint: &Path,
    state: &TrainState,
    job: &JobIdentity,
    config: &TrainConfig,
    model: &ModelConfig,
) -> Result<Accepted, TrainError> {
    let unrecorded_job = match &state.job {
        Some(writer) if !writer.same_job(job) => {
            return Err(TrainError::Resume(format!(
                "checkpoint {} was written by {writer}, and this is {job}: not resuming or \
                 touching another job's checkpoints; give each job (or local run) its own \
                 checkpoint directory",
                checkpoint.display()
            )));
        }
        Some(_) => false,
        None => true,
    };
    let (old, new) = (
        RunSpec::of(&state.config, &state.model).json(),
        RunSpec::of(config, model).json(),
    );
    if old != new {
        let mut diffs = Vec::new();
        differences("", &old, &new, &mut diffs);
        return Err(TrainError::Resume(format!(
            "checkpoint {} is of another run of {job} ({}): its weights, optimizer state and \
             data position do not apply to this one; start it with a new checkpoint directory \
             (or as a new TrainingJob)",
            checkpoint.display(),
            diffs.join(", ")
        )));
    }
    let mut changes = Vec::new();
    let (mut old, mut new) = (json(&state.config), json(config));
    // Where the directory is mounted is not a setting of the run.
    for v in [&mut old, &mut new] {
        if let Some(c) = v.get_mut("checkpoint").and_then(|c| c.as_object_mut()) {
            c.remove("dir");
        }
    }
    differences("", &old, &new, &mut changes);
    Ok(Accepted {
        changes,
        unrecorded_job,
    })
}

/// Refuses, before this run claims `root`, a directory whose newest readable checkpoint is of
/// another job or run: claiming it would fence that job's writers and delete its unfinished
/// checkpoints. Unreadable checkpoints are left to the resume, which skips them.
pub fn check_directory(
    root: &Path,
    job: &JobIdentity,
    config: &TrainConfig,
    model: &ModelConfig,
) -> Result<(), TrainError> {
    for (_, path) in committed(root)? {
        let Ok(bytes) = std::fs::read(path.join("state.json")) else {
            continue;
        };
        if let Ok(state) = serde_json::from_slice::<TrainState>(&bytes) {
            return check(&path, &state, job, config, model).map(|_| ());
        }
    }
    Ok(())
}

fn json<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_default()
}

/// Appends `path: old -> new` for every leaf where `old` and `new` differ.
fn differences(
    path: &str,
    old: &serde_json::Value,
    new: &serde_json::Value,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let sub = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                let null = Value::Null;
                differences(
                    &sub,
                    a.get(k).unwrap_or(&null),
                    b.get(k).unwrap_or(&null),
                    out,
                );
            }
        }
        (a, b) if a != b => out.push(format!("{path} {a} -> {b}")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Cursor;
    use crate::rng::Rng;

    fn config() -> TrainConfig {
        serde_yaml::from_str(
            "model: {architecture: {hiddenSize: 32, nLayers: 2, nHeads: 4, nKvHeads: 2, \
             intermediateSize: 64, maxSeqLen: 16, vocabSize: 258}}\n\
             dataset: {uri: 'builtin:arith'}\nstage: sft\n\
             hyperparameters: {steps: 100, learningRate: 0.003, seed: 7}\n\
             checkpoint: {dir: /a}\noutput: {path: /m}\n",
        )
        .unwrap()
    }

    fn state(config: &TrainConfig, job: Option<JobIdentity>) -> TrainState {
        let model = config.model.architecture.clone().unwrap();
        TrainState {
            step: 10,
            attempt: 1,
            cursor: Cursor::default(),
            rng: Rng::new(0, 0),
            optimizer_step: 10,
            spec_digest: Some(spec_digest(config, &model)),
            model,
            config: config.clone(),
            job,
        }
    }

    fn job(name: &str, uid: Option<&str>) -> JobIdentity {
        JobIdentity {
            namespace: Some("team".into()),
            name: Some(name.into()),
            uid: uid.map(Into::into),
        }
    }

    fn check_with(
        state: &TrainState,
        job: &JobIdentity,
        config: &TrainConfig,
    ) -> Result<Accepted, String> {
        let model = config.model.architecture.clone().unwrap();
        check(Path::new("/ck/step-10"), state, job, config, &model).map_err(|e| e.to_string())
    }

    #[test]
    fn another_job_is_refused_naming_both() {
        let c = config();
        let s = state(&c, Some(job("sweep", Some("uid-1"))));
        // Deleted and created again under the same name: another UID, another job.
        let err = check_with(&s, &job("sweep", Some("uid-2")), &c).unwrap_err();
        assert!(err.contains("TrainingJob team/sweep (uid uid-1)"), "{err}");
        assert!(err.contains("TrainingJob team/sweep (uid uid-2)"), "{err}");
        assert!(check_with(&s, &job("other", Some("uid-1")), &c).is_err());
        // A local run is not the job, nor the job a local run.
        let err = check_with(&s, &JobIdentity::default(), &c).unwrap_err();
        assert!(err.contains("a local run"), "{err}");
        let local = state(&c, Some(JobIdentity::default()));
        assert!(check_with(&local, &job("sweep", Some("uid-1")), &c).is_err());
        // The same job resumes; a side without a UID is compared by name.
        assert_eq!(
            check_with(&s, &job("sweep", Some("uid-1")), &c).unwrap(),
            Accepted::default()
        );
        assert!(check_with(&s, &job("sweep", None), &c).is_ok());
        assert!(check_with(&local, &JobIdentity::default(), &c).is_ok());
    }

    #[test]
    fn a_checkpoint_without_identity_is_taken_with_a_warning() {
        let c = config();
        let mut s = state(&c, None);
        s.spec_digest = None;
        let accepted = check_with(&s, &job("sweep", Some("uid-1")), &c).unwrap();
        assert!(accepted.unrecorded_job);
        // The state.json of a runtime before identities were recorded still reads.
        let mut old = serde_json::to_value(&s).unwrap();
        let map = old.as_object_mut().unwrap();
        map.remove("job");
        map.remove("spec_digest");
        let read: TrainState = serde_json::from_value(old).unwrap();
        assert_eq!((read.job, read.spec_digest), (None, None));
    }

    #[test]
    fn a_different_run_is_refused_and_allowed_changes_are_listed() {
        let c = config();
        let me = job("sweep", Some("uid-1"));
        let s = state(&c, Some(me.clone()));
        let mut seed = c.clone();
        seed.hyperparameters.seed = 8;
        let err = check_with(&s, &me, &seed).unwrap_err();
        assert!(err.contains("hyperparameters.seed 7 -> 8"), "{err}");
        let mut data = c.clone();
        data.dataset.uri = "file:///other.jsonl".into();
        let err = check_with(&s, &me, &data).unwrap_err();
        assert!(err.contains("dataset.uri"), "{err}");
        let mut stage = c.clone();
        stage.stage = Stage::Pretrain;
        assert!(check_with(&s, &me, &stage).is_err());

        let mut tuned = c.clone();
        tuned.hyperparameters.learning_rate = 0.001;
        tuned.hyperparameters.steps = 200;
        tuned.hyperparameters.batch_size = 32;
        tuned.checkpoint.dir = Some("/mounted/elsewhere".into());
        let accepted = check_with(&s, &me, &tuned).unwrap();
        assert_eq!(
            accepted.changes,
            [
                "hyperparameters.batchSize 16 -> 32",
                "hyperparameters.learningRate 0.003 -> 0.001",
                "hyperparameters.steps 100 -> 200",
            ]
        );
        assert!(!accepted.unrecorded_job);
    }

    #[test]
    fn the_digest_follows_the_run_not_the_tuning() {
        let c = config();
        let model = c.model.architecture.clone().unwrap();
        let mut tuned = c.clone();
        tuned.hyperparameters.learning_rate = 0.5;
        tuned.output.path = "/elsewhere".into();
        assert_eq!(spec_digest(&c, &model), spec_digest(&tuned, &model));
        let mut seed = c.clone();
        seed.hyperparameters.seed = 1;
        assert_ne!(spec_digest(&c, &model), spec_digest(&seed, &model));
        assert!(spec_digest(&c, &model).starts_with("sha256:"));
    }
}
