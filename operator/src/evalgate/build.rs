//! Pure builders of what an EvalGate owns: its evaluation pods and their ServiceAccount.

use anneal_crds::EvalGate;
use anneal_crds::common::{DatasetFormat, SplitPart};
use anneal_crds::contract;
use anneal_crds::evalgate::ResolvedModel;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::config::OperatorConfig;
use crate::labels::{ROUND, TRY, evalgate_labels};
use crate::pod;
use crate::reconcile::Error;

/// Name of the evaluation container.
pub const CONTAINER: &str = "eval";

/// Name of the ServiceAccount of gate `gate`'s pods (no API rights; no token mounted).
pub fn eval_account(gate: &str) -> String {
    format!("{gate}-eval")
}

/// Name of try `try_` of round `round`: a crash between deciding and creating makes the same pod.
pub fn eval_pod_name(gate: &str, round: &str, try_: u32) -> String {
    format!("{gate}-eval-{round}-t{try_}")
}

fn owned_meta(gate: &EvalGate, name: String) -> Result<ObjectMeta, Error> {
    let owner = gate
        .controller_owner_ref(&())
        .ok_or_else(|| Error::Build("EvalGate has no uid".into()))?;
    Ok(ObjectMeta {
        name: Some(name),
        namespace: gate.namespace(),
        labels: Some(evalgate_labels(&gate.name_any())),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    })
}

/// The evaluation pods' ServiceAccount: it exists so that they do not run as the namespace's
/// default account, and it mounts no token (the evaluation calls no API).
pub fn service_account(gate: &EvalGate) -> Result<ServiceAccount, Error> {
    Ok(ServiceAccount {
        metadata: owned_meta(gate, eval_account(&gate.name_any()))?,
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    })
}

fn split_name(part: SplitPart) -> &'static str {
    match part {
        SplitPart::Train => "train",
        SplitPart::Validation => "validation",
        SplitPart::Test => "test",
    }
}

fn format_name(format: DatasetFormat) -> &'static str {
    match format {
        DatasetFormat::Auto => "auto",
        DatasetFormat::Text => "text",
        DatasetFormat::Jsonl => "jsonl",
    }
}

/// Try `try_` of round `round`: `anneal-runtime eval` of `candidate` (and of `baseline` in the
/// same process, on the same examples), placed like a training worker, under the restricted
/// profile. Its report is its termination message.
pub fn eval_pod(
    gate: &EvalGate,
    round: &str,
    try_: u32,
    candidate: &ResolvedModel,
    baseline: Option<&ResolvedModel>,
    config: &OperatorConfig,
) -> Result<Pod, Error> {
    let name = gate.name_any();
    let spec = &gate.spec;
    let res = &spec.resources;
    let mut meta = owned_meta(gate, eval_pod_name(&name, round, try_))?;
    let labels = meta.labels.get_or_insert_with(Default::default);
    labels.insert(ROUND.into(), round.to_string());
    labels.insert(TRY.into(), try_.to_string());
    let split = &spec.dataset.split;
    let mut args = vec![
        "eval".to_string(),
        "--model".into(),
        candidate.uri.clone(),
        "--data".into(),
        spec.dataset.uri.0.clone(),
        "--format".into(),
        format_name(spec.dataset.format).into(),
        "--split".into(),
        split_name(spec.split).into(),
        "--split-ratios".into(),
        format!("{}:{}:{}", split.train, split.validation, split.test),
        "--device".into(),
        "auto".into(),
    ];
    if let Some(n) = spec.max_examples {
        args.extend(["--max-examples".into(), n.to_string()]);
    }
    if let Some(base) = baseline {
        args.extend(["--baseline".into(), base.uri.clone()]);
    }
    if let Some(reference) = &candidate.reference {
        args.extend(["--reference".into(), reference.clone()]);
    }
    let reads = [
        Some(candidate.uri.as_str()),
        Some(spec.dataset.uri.as_str()),
        baseline.map(|b| b.uri.as_str()),
        candidate.reference.as_deref(),
    ];
    let (claim_volumes, claim_mounts) = pod::claim_volumes(reads.into_iter().flatten(), []);
    let mut volumes = vec![json!({"name": "tmp", "emptyDir": {}})];
    volumes.extend(claim_volumes);
    let mut mounts = vec![json!({"name": "tmp", "mountPath": "/tmp"})];
    mounts.extend(claim_mounts);
    let pod = json!({
        "metadata": meta,
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": eval_account(&name),
            "automountServiceAccountToken": false,
            "affinity": pod::affinity(res, &[], config),
            "nodeSelector": res.node_selector,
            "tolerations": pod::tolerations(res, config),
            "securityContext": pod::pod_security_context(),
            "containers": [{
                "name": CONTAINER,
                "image": spec.image.clone().unwrap_or_else(|| config.runtime_image.clone()),
                "args": args,
                "resources": pod::resources(res),
                "terminationMessagePath": contract::TERMINATION_LOG,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": pod::container_security_context(),
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        },
    });
    Ok(serde_json::from_value(pod)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> EvalGate {
        let text = include_str!("../../../manifests/examples/evalgate.yaml");
        let mut gate: EvalGate = serde_yaml::from_str(text).expect("example parses");
        gate.metadata.namespace = Some("ml".into());
        gate.metadata.uid = Some("uid-1".into());
        gate
    }

    #[test]
    fn eval_pod_reads_the_candidate_and_baseline_and_runs_restricted_without_a_token() {
        let candidate = ResolvedModel {
            source: "trainingjob/arith".into(),
            uri: "pvc://anneal-models/arith".into(),
            sha256: Some("ab".repeat(32)),
            gate: None,
            reference: None,
        };
        let baseline = ResolvedModel {
            uri: "pvc://served/v1".into(),
            ..candidate.clone()
        };
        let pod = eval_pod(
            &gate(),
            "0123456789",
            2,
            &candidate,
            Some(&baseline),
            &OperatorConfig::default(),
        )
        .unwrap();
        let v = serde_json::to_value(&pod).unwrap();
        assert_eq!(v["metadata"]["name"], "arith-eval-0123456789-t2");
        assert_eq!(v["spec"]["automountServiceAccountToken"], false);
        assert_eq!(v["spec"]["securityContext"]["runAsNonRoot"], true);
        let args: Vec<String> =
            serde_json::from_value(v["spec"]["containers"][0]["args"].clone()).unwrap();
        let after = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .map(|i| args[i + 1].clone())
        };
        assert_eq!(
            after("--model").as_deref(),
            Some("pvc://anneal-models/arith")
        );
        assert_eq!(after("--baseline").as_deref(), Some("pvc://served/v1"));
        let mounts = v["spec"]["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap();
        for claim in ["anneal-models", "served"] {
            let m = mounts
                .iter()
                .find(|m| m["mountPath"] == format!("/mnt/pvc/{claim}"))
                .unwrap_or_else(|| panic!("{claim} mounted"));
            assert_eq!(m["readOnly"], true);
        }
    }
}
