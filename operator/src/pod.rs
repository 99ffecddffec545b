//! Pieces of every pod the operator makes (training workers, evaluation pods, model servers):
//! GPU placement, resources, the Pod Security "restricted" contexts and the claims named by
//! `pvc://` URIs. Pure functions of the spec; no client here.

use std::collections::BTreeMap;

use anneal_crds::ComputeResources;
use anneal_crds::contract;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use crate::config::{GPU_PRODUCT_LABEL, GPU_RESOURCE, OperatorConfig};

/// Uid and gid the runtime runs as (non-root, as the restricted profile asks).
pub const RUNTIME_UID: i64 = 65532;

/// Node affinity to the requested GPU type, away from `excluded_nodes`.
pub fn affinity(
    res: &ComputeResources,
    excluded_nodes: &[String],
    config: &OperatorConfig,
) -> Value {
    let mut match_expressions = Vec::new();
    if res.gpus > 0 {
        match config.products(res.gpu_type) {
            Some(products) => match_expressions
                .push(json!({"key": GPU_PRODUCT_LABEL, "operator": "In", "values": products})),
            None => match_expressions.push(json!({"key": GPU_PRODUCT_LABEL, "operator": "Exists"})),
        }
    }
    if match_expressions.is_empty() && excluded_nodes.is_empty() {
        // An empty node selector term matches no node: a CPU pod anywhere has no affinity.
        return Value::Null;
    }
    let mut term = json!({"matchExpressions": match_expressions});
    if !excluded_nodes.is_empty() {
        term["matchFields"] =
            json!([{"key": "metadata.name", "operator": "NotIn", "values": excluded_nodes}]);
    }
    json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}})
}

/// Tolerations: a dead node only briefly (the operator acts first), the GPU taint when GPUs are
/// asked for, and the user's own.
pub fn tolerations(res: &ComputeResources, config: &OperatorConfig) -> Vec<Value> {
    let grace = config.node_toleration_seconds;
    let mut tolerations = vec![
        json!({"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": grace}),
        json!({"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": grace}),
    ];
    if res.gpus > 0 {
        tolerations
            .push(json!({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}));
    }
    tolerations.extend(res.tolerations.iter().map(|t| json!(t)));
    tolerations
}

/// Container resources: GPUs as a limit, CPU and memory as request = limit.
pub fn resources(res: &ComputeResources) -> Value {
    let mut limits = serde_json::Map::new();
    let mut requests = serde_json::Map::new();
    if res.gpus > 0 {
        limits.insert(GPU_RESOURCE.into(), json!(res.gpus.to_string()));
    }
    for (key, value) in [("cpu", &res.cpu), ("memory", &res.memory)] {
        if let Some(q) = value {
            limits.insert(key.into(), json!(q));
            requests.insert(key.into(), json!(q));
        }
    }
    json!({"limits": limits, "requests": requests})
}

/// The pod-level security context of the restricted profile.
pub fn pod_security_context() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": RUNTIME_UID,
        "runAsGroup": RUNTIME_UID,
        "fsGroup": RUNTIME_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

/// The container-level security context of the restricted profile.
pub fn container_security_context() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
    })
}

/// The claim of a `pvc://CLAIM/PATH` URI.
pub fn claim_of(uri: &str) -> Option<&str> {
    let claim = uri.strip_prefix("pvc://")?.split('/').next()?;
    (!claim.is_empty()).then_some(claim)
}

/// Volumes and mounts of the claims that `read` and `write` URIs name, mounted where the
/// runtime looks for them (`PVC_ROOT/CLAIM`); only claims written to are writable.
pub fn claim_volumes<'a>(
    read: impl IntoIterator<Item = &'a str>,
    write: impl IntoIterator<Item = &'a str>,
) -> (Vec<Value>, Vec<Value>) {
    let mut claims: BTreeMap<&str, bool> = BTreeMap::new();
    for uri in read {
        if let Some(claim) = claim_of(uri) {
            claims.entry(claim).or_insert(false);
        }
    }
    for uri in write {
        if let Some(claim) = claim_of(uri) {
            claims.insert(claim, true);
        }
    }
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    for (i, (claim, writable)) in claims.iter().enumerate() {
        let volume = format!("data-{i}");
        volumes.push(json!({"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": !writable}}));
        mounts.push(json!({"name": volume, "mountPath": format!("{}/{claim}", contract::PVC_ROOT), "readOnly": !writable}));
    }
    (volumes, mounts)
}

/// The pod's phase (`Pending` when not reported yet).
pub fn phase_of(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// How a container ended: exit code, termination message and when it finished.
pub struct Exit {
    /// Exit code.
    pub code: i32,
    /// Termination message (the runtime's result JSON, or the log tail on error).
    pub message: String,
    /// When it finished.
    pub finished_at: Option<Timestamp>,
}

/// How `container` of `pod` ended, once it did.
pub fn exit_of(pod: &Pod, container: &str) -> Option<Exit> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let status = statuses.iter().find(|s| s.name == container)?;
    let terminated = status.state.as_ref()?.terminated.as_ref()?;
    Some(Exit {
        code: terminated.exit_code,
        message: terminated.message.clone().unwrap_or_default(),
        finished_at: terminated.finished_at.as_ref().map(|t| t.0),
    })
}

/// Why a pod that failed without `container` ever ending failed (kubelet admission, eviction
/// before start): `"Reason: message"`.
pub fn failed_before_start(pod: &Pod, container: &str) -> Option<String> {
    if phase_of(pod) != "Failed" || exit_of(pod, container).is_some() {
        return None;
    }
    let status = pod.status.as_ref();
    let reason = status.and_then(|s| s.reason.as_deref()).unwrap_or("Failed");
    let message = status.and_then(|s| s.message.as_deref()).unwrap_or("");
    Some(
        format!("{reason}: {message}")
            .trim_end_matches(": ")
            .to_string(),
    )
}

/// Waiting reasons of a container that will not start without a change by its author.
const CANNOT_START: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// Why `container` cannot start (a bad image, a missing Secret), when that is so:
/// `"Reason: message"`.
pub fn cannot_start(pod: &Pod, container: &str) -> Option<String> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let status = statuses.iter().find(|s| s.name == container)?;
    let waiting = status.state.as_ref()?.waiting.as_ref()?;
    let reason = waiting.reason.as_deref()?;
    CANNOT_START.contains(&reason).then(|| {
        format!("{reason}: {}", waiting.message.as_deref().unwrap_or(""))
            .trim_end_matches(": ")
            .to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_pod_may_run_on_any_node() {
        let cpu = ComputeResources::default();
        assert_eq!(affinity(&cpu, &[], &OperatorConfig::default()), Value::Null);
        let away = affinity(&cpu, &["n1".into()], &OperatorConfig::default());
        let term = &away["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            [0];
        assert_eq!(term["matchFields"][0]["values"], json!(["n1"]));
    }

    #[test]
    fn claims_are_mounted_once_and_writable_only_when_written() {
        let (volumes, mounts) = claim_volumes(
            ["pvc://models/a", "pvc://corpus/x.jsonl", "builtin:arith"],
            ["pvc://models/b"],
        );
        assert_eq!(volumes.len(), 2);
        let mount = |path: &str| mounts.iter().find(|m| m["mountPath"] == path).cloned();
        assert_eq!(mount("/mnt/pvc/corpus").unwrap()["readOnly"], true);
        assert_eq!(mount("/mnt/pvc/models").unwrap()["readOnly"], false);
        assert_eq!(claim_of("pvc:///x"), None);
        assert_eq!(claim_of("builtin:arith"), None);
    }
}
