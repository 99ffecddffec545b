//! Whether a GPU node can still run a worker: pure judgement over the Node and its Lease.

use anneal_crds::trainingjob::FailoverReason;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::config::{GPU_HEALTH_TAINT_KEY, GPU_RESOURCE};

/// Why `node` cannot keep running a worker holding `gpus` GPUs, if it cannot. `lease` is the
/// node's Lease in `kube-node-lease`; `lease_timeout` is how old it may be.
pub fn node_failure(
    node: &Node,
    lease: Option<&Lease>,
    gpus: u32,
    lease_timeout: SignedDuration,
    now: Timestamp,
) -> Option<FailoverReason> {
    let status = node.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.as_str());
    if ready != Some("True") {
        return Some(FailoverReason::NodeNotReady);
    }
    let renewed = lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.renew_time.as_ref());
    if let Some(renewed) = renewed
        && now.duration_since(renewed.0) > lease_timeout
    {
        return Some(FailoverReason::NodeLeaseExpired);
    }
    let taints = node.spec.as_ref().and_then(|s| s.taints.as_ref());
    if taints.is_some_and(|t| t.iter().any(|t| t.key == GPU_HEALTH_TAINT_KEY)) {
        return Some(FailoverReason::GpuUnhealthy);
    }
    if gpus > 0 {
        let allocatable = status
            .and_then(|s| s.allocatable.as_ref())
            .and_then(|a| a.get(GPU_RESOURCE))
            .and_then(|q| q.0.parse::<u32>().ok())
            .unwrap_or(0);
        if allocatable < gpus {
            return Some(FailoverReason::GpuCapacityLost);
        }
    }
    None
}

/// When the lease of a healthy node will be stale if it is not renewed: the time to look again.
pub fn lease_deadline(lease: Option<&Lease>, lease_timeout: SignedDuration) -> Option<Timestamp> {
    let renewed = lease?.spec.as_ref()?.renew_time.as_ref()?;
    renewed.0.checked_add(lease_timeout).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(ready: &str, gpus: &str, taint: Option<&str>) -> Node {
        let taints: Vec<_> = taint
            .iter()
            .map(|k| json!({"key": k, "value": "unhealthy", "effect": "NoSchedule"}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": "gpu-0"},
            "spec": {"taints": taints},
            "status": {
                "conditions": [{"type": "Ready", "status": ready}],
                "allocatable": {"nvidia.com/gpu": gpus},
            },
        }))
        .unwrap()
    }

    fn lease(renewed_at: i64) -> Lease {
        let at = Timestamp::from_second(renewed_at).unwrap();
        serde_json::from_value(
            json!({"metadata": {"name": "gpu-0"}, "spec": {"renewTime": at.to_string()}}),
        )
        .unwrap()
    }

    const T: SignedDuration = SignedDuration::from_secs(15);

    fn now(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn healthy_node_with_fresh_lease_is_fine() {
        assert_eq!(
            node_failure(&node("True", "8", None), Some(&lease(100)), 1, T, now(110)),
            None
        );
        assert_eq!(lease_deadline(Some(&lease(100)), T), Some(now(115)));
    }

    #[test]
    fn each_failure_kind_is_named() {
        let fresh = lease(100);
        assert_eq!(
            node_failure(&node("Unknown", "8", None), Some(&fresh), 1, T, now(101)),
            Some(FailoverReason::NodeNotReady)
        );
        assert_eq!(
            node_failure(&node("True", "8", None), Some(&fresh), 1, T, now(116)),
            Some(FailoverReason::NodeLeaseExpired)
        );
        let tainted = node("True", "8", Some(GPU_HEALTH_TAINT_KEY));
        assert_eq!(
            node_failure(&tainted, Some(&fresh), 1, T, now(101)),
            Some(FailoverReason::GpuUnhealthy)
        );
        assert_eq!(
            node_failure(&node("True", "1", None), Some(&fresh), 2, T, now(101)),
            Some(FailoverReason::GpuCapacityLost)
        );
    }

    #[test]
    fn cpu_workers_ignore_gpu_capacity_and_unrelated_taints() {
        let fresh = lease(100);
        assert_eq!(
            node_failure(&node("True", "0", None), Some(&fresh), 0, T, now(101)),
            None
        );
        let other = node("True", "8", Some("example.com/maintenance"));
        assert_eq!(node_failure(&other, Some(&fresh), 1, T, now(101)), None);
    }
}
