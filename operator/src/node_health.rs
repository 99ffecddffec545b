//! Whether a GPU node can still run a worker: pure judgement over the Node and its Lease.

use anneal_crds::trainingjob::FailoverReason;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::config::{GPU_HEALTH_TAINT_KEY, GPU_RESOURCE};

/// What is known of a node besides its own object.
pub struct NodeView<'a> {
    /// The node's Lease in `kube-node-lease`.
    pub lease: Option<&'a Lease>,
    /// GPUs requested by the other live pods on the node, when they were counted (they are
    /// counted only when the node reports fewer allocatable GPUs than it has: see
    /// [`gpus_lost`]).
    pub gpus_held_by_others: Option<u32>,
    /// Node condition types that mean "the GPUs are unhealthy" when True.
    pub gpu_health_conditions: &'a [String],
}

/// A GPU quantity of a node's capacity or allocatable list.
fn gpu_quantity(
    list: Option<
        &std::collections::BTreeMap<
            String,
            k8s_openapi::apimachinery::pkg::api::resource::Quantity,
        >,
    >,
) -> Option<u32> {
    list?.get(GPU_RESOURCE)?.0.parse().ok()
}

/// True when the node reports fewer allocatable GPUs than its capacity: a device was lost (the
/// device plugin withdraws an unhealthy GPU from allocatable), so the GPUs its pods hold must be
/// counted to know whose was lost.
pub fn gpus_lost(node: &Node) -> bool {
    let status = node.status.as_ref();
    let capacity = gpu_quantity(status.and_then(|s| s.capacity.as_ref()));
    let allocatable = gpu_quantity(status.and_then(|s| s.allocatable.as_ref()));
    matches!((capacity, allocatable), (Some(c), a) if a.unwrap_or(0) < c)
}

/// GPUs a live pod requests (limits, which extended resources require to equal requests).
pub fn pod_gpus(pod: &Pod) -> u32 {
    let done = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    if done {
        return 0;
    }
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .filter_map(|c| {
            let resources = c.resources.as_ref()?;
            let list = resources.limits.as_ref().or(resources.requests.as_ref());
            gpu_quantity(list)
        })
        .sum()
}

/// Why `node` cannot keep running a worker holding `gpus` GPUs, if it cannot; `lease_timeout`
/// is how old the node's Lease may be.
pub fn node_failure(
    node: &Node,
    view: &NodeView<'_>,
    gpus: u32,
    lease_timeout: SignedDuration,
    now: Timestamp,
) -> Option<FailoverReason> {
    let lease = view.lease;
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
    // GPU health tooling (NVIDIA's NVSentinel, node-problem-detector plugins) reports problems
    // as node conditions that are True while the problem lasts.
    let conditions = status.and_then(|s| s.conditions.as_ref());
    if gpus > 0
        && conditions.is_some_and(|c| {
            c.iter()
                .any(|c| c.status == "True" && view.gpu_health_conditions.contains(&c.type_))
        })
    {
        return Some(FailoverReason::GpuUnhealthy);
    }
    if gpus > 0 {
        let allocatable = gpu_quantity(status.and_then(|s| s.allocatable.as_ref())).unwrap_or(0);
        // What is left for this worker: the node's allocatable GPUs minus those the other pods
        // hold. A 1-GPU worker on an 8-GPU node notices one lost GPU only this way.
        let left = allocatable.saturating_sub(view.gpus_held_by_others.unwrap_or(0));
        if left < gpus {
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

    fn view(lease: &Lease) -> NodeView<'_> {
        NodeView {
            lease: Some(lease),
            gpus_held_by_others: None,
            gpu_health_conditions: &[],
        }
    }

    fn now(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn healthy_node_with_fresh_lease_is_fine() {
        assert_eq!(
            node_failure(&node("True", "8", None), &view(&lease(100)), 1, T, now(110)),
            None
        );
        assert_eq!(lease_deadline(Some(&lease(100)), T), Some(now(115)));
    }

    #[test]
    fn each_failure_kind_is_named() {
        let fresh = lease(100);
        assert_eq!(
            node_failure(&node("Unknown", "8", None), &view(&fresh), 1, T, now(101)),
            Some(FailoverReason::NodeNotReady)
        );
        assert_eq!(
            node_failure(&node("True", "8", None), &view(&fresh), 1, T, now(116)),
            Some(FailoverReason::NodeLeaseExpired)
        );
        let tainted = node("True", "8", Some(GPU_HEALTH_TAINT_KEY));
        assert_eq!(
            node_failure(&tainted, &view(&fresh), 1, T, now(101)),
            Some(FailoverReason::GpuUnhealthy)
        );
        assert_eq!(
            node_failure(&node("True", "1", None), &view(&fresh), 2, T, now(101)),
            Some(FailoverReason::GpuCapacityLost)
        );
    }

    #[test]
    fn cpu_workers_ignore_gpu_capacity_and_unrelated_taints() {
        let fresh = lease(100);
        assert_eq!(
            node_failure(&node("True", "0", None), &view(&fresh), 0, T, now(101)),
            None
        );
        let other = node("True", "8", Some("example.com/maintenance"));
        assert_eq!(node_failure(&other, &view(&fresh), 1, T, now(101)), None);
    }
}

#[cfg(test)]
mod capacity_tests {
    use super::*;
    use serde_json::json;

    fn node(capacity: u32, allocatable: u32, conditions: serde_json::Value) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "gpu-0"},
            "status": {
                "conditions": conditions,
                "capacity": {"nvidia.com/gpu": capacity.to_string()},
                "allocatable": {"nvidia.com/gpu": allocatable.to_string()},
            },
        }))
        .unwrap()
    }

    fn ready() -> serde_json::Value {
        json!([{"type": "Ready", "status": "True"}])
    }

    const T: SignedDuration = SignedDuration::from_secs(15);

    #[test]
    fn one_lost_gpu_of_eight_is_noticed_by_a_one_gpu_worker_when_the_others_hold_the_rest() {
        let node = node(8, 7, ready());
        assert!(gpus_lost(&node));
        let now = Timestamp::from_second(100).unwrap();
        // Seven other workers hold seven GPUs: nothing is left for this one.
        let crowded = NodeView {
            lease: None,
            gpus_held_by_others: Some(7),
            gpu_health_conditions: &[],
        };
        assert_eq!(
            node_failure(&node, &crowded, 1, T, now),
            Some(FailoverReason::GpuCapacityLost)
        );
        // Only five others: the lost GPU was a free one.
        let roomy = NodeView {
            gpus_held_by_others: Some(5),
            ..crowded
        };
        assert_eq!(node_failure(&node, &roomy, 1, T, now), None);
        assert!(!gpus_lost(&super::capacity_tests::node(8, 8, ready())));
    }

    #[test]
    fn a_gpu_health_node_condition_fails_gpu_workers_only() {
        let node = node(
            8,
            8,
            json!([{"type": "Ready", "status": "True"}, {"type": "SysLogsXIDError", "status": "True"}]),
        );
        let names = ["SysLogsXIDError".to_string()];
        let view = NodeView {
            lease: None,
            gpus_held_by_others: None,
            gpu_health_conditions: &names,
        };
        let now = Timestamp::from_second(100).unwrap();
        assert_eq!(
            node_failure(&node, &view, 1, T, now),
            Some(FailoverReason::GpuUnhealthy)
        );
        assert_eq!(node_failure(&node, &view, 0, T, now), None);
    }

    #[test]
    fn finished_pods_hold_no_gpus() {
        let pod = |phase: &str| -> Pod {
            serde_json::from_value(json!({
                "spec": {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "2"}}}]},
                "status": {"phase": phase},
            }))
            .unwrap()
        };
        assert_eq!(pod_gpus(&pod("Running")), 2);
        assert_eq!(pod_gpus(&pod("Pending")), 2);
        assert_eq!(pod_gpus(&pod("Succeeded")), 0);
    }
}
