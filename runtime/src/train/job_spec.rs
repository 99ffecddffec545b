//! The TrainingJob spec as the operator mounts it into worker pods
//! (`anneal-runtime train --job-spec /etc/anneal/trainingjob.json`), turned into a
//! [`TrainConfig`]. The spec's own types (`anneal_crds`) are parsed, so that a field the CRD has
//! is never silently dropped between the API server and the trainer.

use super::config::{
    CheckpointSpec, DatasetSpec, DpoSettings, Hyperparameters, ModelSpec, OutputSpec, Stage,
    TrainConfig,
};
use crate::data::SplitRatios;
use crate::model::ModelConfig;
use crate::tokenizer::TokenizerSpec;
use anneal_crds::TrainingJobSpec;
use anneal_crds::trainingjob;
use std::path::Path;

/// Reads a TrainingJob spec (JSON or YAML) and converts it.
pub fn from_file(path: &Path) -> Result<TrainConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read TrainingJob spec {}: {e}", path.display()))?;
    let de = serde_yaml::Deserializer::from_str(&text);
    let spec: TrainingJobSpec = serde_path_to_error::deserialize(de)
        .map_err(|e| format!("invalid TrainingJob spec {}: {e}", path.display()))?;
    let config = from_spec(&spec)?;
    config.validate()?;
    Ok(config)
}

/// The training run a TrainingJob spec asks for. Checkpoints go to `$ANNEAL_CHECKPOINT_DIR`
/// (the volume the operator mounts); the thread count follows the pod's CPU limit.
pub fn from_spec(spec: &TrainingJobSpec) -> Result<TrainConfig, String> {
    let architecture = spec.model.architecture.as_ref().map(architecture);
    let base = spec.model.base_model.as_ref().map(|u| u.0.clone());
    if architecture.is_none() && base.is_none() {
        return Err("spec.model needs architecture or baseModel".into());
    }
    let h = &spec.hyperparameters;
    let defaults = Hyperparameters::default();
    let split = &spec.dataset.split;
    Ok(TrainConfig {
        model: ModelSpec { architecture, base },
        tokenizer: TokenizerSpec::Byte,
        dataset: DatasetSpec {
            uri: spec.dataset.uri.0.clone(),
            format: spec.dataset.format,
            split: SplitRatios {
                train: f64::from(split.train),
                validation: f64::from(split.validation),
                test: f64::from(split.test),
            },
        },
        stage: match spec.stage {
            trainingjob::Stage::Pretrain => Stage::Pretrain,
            trainingjob::Stage::Sft => Stage::Sft,
            trainingjob::Stage::Dpo => Stage::Dpo,
        },
        dpo: DpoSettings {
            beta: spec.dpo.as_ref().map_or(0.1, |d| d.beta),
        },
        lora: spec
            .lora
            .as_ref()
            .map(|l| crate::train::lora::LoraSettings {
                rank: l.rank as usize,
                alpha: l.alpha,
                targets: l.targets.iter().map(|t| t.as_str().to_string()).collect(),
            }),
        hyperparameters: Hyperparameters {
            steps: h.steps,
            batch_size: h.batch_size as usize,
            gradient_accumulation: (h.gradient_accumulation as usize).max(1),
            learning_rate: h.learning_rate,
            warmup_steps: h.warmup_steps,
            schedule: h.schedule,
            precision: h.precision,
            weight_decay: h.weight_decay,
            grad_clip: h.gradient_clip,
            freeze_fraction: h.frozen_layer_fraction.unwrap_or(0.0),
            seed: h.seed,
            ..defaults
        },
        checkpoint: CheckpointSpec {
            dir: None,
            every_steps: spec.checkpoint.every_steps,
            keep: spec.checkpoint.keep as usize,
        },
        output: OutputSpec {
            path: spec.output.uri.0.clone(),
            gguf: spec.output.gguf,
        },
    })
}

fn byte_vocab() -> usize {
    use crate::tokenizer::Tokenizer;
    crate::tokenizer::ByteTokenizer.vocab_size()
}

/// The spec's architecture. `vocabSize` is a lower bound: the byte-level tokenizer of a model
/// trained from scratch needs 258 ids (256 bytes, BOS, EOS), so the spec's default of 256 grows
/// to that; a larger value is kept.
fn architecture(a: &trainingjob::Architecture) -> ModelConfig {
    ModelConfig {
        vocab_size: (a.vocab_size as usize).max(byte_vocab()),
        hidden_size: a.hidden_size as usize,
        n_layers: a.layers as usize,
        n_heads: a.heads as usize,
        n_kv_heads: a.kv_heads.unwrap_or(a.heads) as usize,
        intermediate_size: a.intermediate_size as usize,
        max_seq_len: a.context_length as usize,
        rope_theta: a.rope_theta,
        rms_norm_eps: 1e-5,
        tie_embeddings: a.tie_embeddings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anneal_crds::TrainingJob;

    fn example() -> TrainingJob {
        serde_yaml::from_str(include_str!("../../../manifests/examples/trainingjob.yaml")).unwrap()
    }

    #[test]
    fn the_example_becomes_the_run_it_describes() {
        let job = example();
        let config = from_spec(&job.spec).unwrap();
        config.validate().unwrap();
        let arch = config.model.architecture.as_ref().unwrap();
        assert_eq!(
            (
                arch.hidden_size,
                arch.n_layers,
                arch.n_heads,
                arch.n_kv_heads
            ),
            (128, 4, 4, 2)
        );
        assert_eq!((arch.intermediate_size, arch.max_seq_len), (384, 64));
        assert!(arch.tie_embeddings);
        assert_eq!(arch.vocab_size, 258);
        assert_eq!(config.dataset.uri, "builtin:arith");
        assert_eq!(config.stage, Stage::Sft);
        let h = &config.hyperparameters;
        assert_eq!(
            (h.steps, h.batch_size, h.warmup_steps, h.seed),
            (600, 32, 30, 7)
        );
        assert_eq!(
            (h.learning_rate, h.weight_decay, h.grad_clip),
            (0.003, 0.01, 1.0)
        );
        assert_eq!(config.checkpoint.every_steps, 50);
        assert_eq!(config.checkpoint.keep, 3);
        assert_eq!(config.output.path, "pvc://anneal-models/arith");
    }

    #[test]
    fn the_file_the_operator_mounts_is_read() {
        // What the operator writes into the ConfigMap: the spec, as JSON.
        let job = example();
        let dir = std::env::temp_dir().join(format!(
            "anneal-jobspec-{}",
            crate::checkpoint::atomic::writer_tag()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("trainingjob.json");
        std::fs::write(&path, serde_json::to_string_pretty(&job.spec).unwrap()).unwrap();
        let config = from_file(&path).unwrap();
        assert_eq!(config, from_spec(&job.spec).unwrap());

        std::fs::write(
            &path,
            r#"{"model": {"architecture": {"hiddenSize": "wide"}}}"#,
        )
        .unwrap();
        let err = from_file(&path).unwrap_err();
        assert!(err.contains("model.architecture.hiddenSize"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
