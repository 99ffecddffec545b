//! Fault controls for tests: the same faults as `e2e/cluster/fault.sh`, through the API.
//!
//! | fault | mechanism | what the cluster then shows |
//! | --- | --- | --- |
//! | [`fail_node`] | removes the label [`KWOK_MANAGED_LABEL`]: kwok stops simulating the node | its Lease in `kube-node-lease` is no longer renewed; ~10 s later node-lifecycle-controller sets Ready=Unknown and the `node.kubernetes.io/unreachable` taints; its pods are left as they are |
//! | [`mark_gpus_unhealthy`] | taint [`GPU_HEALTH_TAINT_KEY`]`=unhealthy:NoSchedule` | the taint |
//! | [`set_allocatable_gpus`] | patches `status.allocatable["nvidia.com/gpu"]` | fewer allocatable GPUs than capacity |
//! | [`exit_pod`] | annotations [`EXIT_CODE_ANNOTATION`], [`EXIT_MESSAGE_ANNOTATION`] | kwok's `anneal-pod-exit` stage ends the containers with that exit code and termination message |
//!
//! [`restore_node`] undoes the node faults; [`RestoreOnDrop`] does it when a test ends, even by a panic.

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use crate::cluster::{cluster_dir, kubeconfig_path, tools_bin};
use crate::tools::run_cleanup;

/// kwok simulates exactly the nodes with this label (`up.sh` passes it to `--manage-nodes-with-label-selector`).
pub const KWOK_MANAGED_LABEL: (&str, &str) = ("kwok.x-k8s.io/node", "fake");
/// The taint key GPU health tooling puts on a node whose GPUs failed; value `unhealthy`, effect `NoSchedule`.
pub const GPU_HEALTH_TAINT_KEY: &str = "nvidia.com/gpu.health";
/// The extended resource of NVIDIA GPUs.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Pod annotation: the exit code its containers end with (kwok stage `anneal-pod-exit`).
pub const EXIT_CODE_ANNOTATION: &str = "anneal.dev/kwok-exit-code";
/// Pod annotation: the termination message its containers end with.
pub const EXIT_MESSAGE_ANNOTATION: &str = "anneal.dev/kwok-exit-message";

const FIELD_MANAGER: &str = "anneal-e2e-faults";

/// The node dies: kwok stops renewing its Lease and reporting its status.
pub async fn fail_node(client: &Client, node: &str) -> Result<()> {
    let patch = json!({"metadata": {"labels": {KWOK_MANAGED_LABEL.0: null}}});
    patch_node(client, node, &patch).await
}

/// The node's GPUs go bad: taint `nvidia.com/gpu.health=unhealthy:NoSchedule`.
pub async fn mark_gpus_unhealthy(client: &Client, node: &str) -> Result<()> {
    edit_taints(client, node, |taints| {
        taints.retain(|t| t.key != GPU_HEALTH_TAINT_KEY);
        taints.push(Taint {
            key: GPU_HEALTH_TAINT_KEY.to_owned(),
            value: Some("unhealthy".to_owned()),
            effect: "NoSchedule".to_owned(),
            time_added: None,
        });
    })
    .await
}

/// The device plugin reports only `count` healthy GPUs on the node (capacity stays).
pub async fn set_allocatable_gpus(client: &Client, node: &str, count: u32) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let patch = json!({"status": {"allocatable": {GPU_RESOURCE: count.to_string()}}});
    nodes
        .patch_status(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("setting allocatable GPUs of node {node} to {count}"))?;
    Ok(())
}

/// Undoes every node fault: kwok manages the node again (it is Ready within seconds), the GPU health taint
/// goes, allocatable GPUs equal capacity again.
pub async fn restore_node(client: &Client, node: &str) -> Result<()> {
    let patch = json!({"metadata": {"labels": {KWOK_MANAGED_LABEL.0: KWOK_MANAGED_LABEL.1}}});
    patch_node(client, node, &patch).await?;
    edit_taints(client, node, |taints| {
        taints.retain(|t| t.key != GPU_HEALTH_TAINT_KEY)
    })
    .await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let capacity = nodes
        .get(node)
        .await?
        .status
        .and_then(|s| s.capacity)
        .and_then(|c| c.get(GPU_RESOURCE).map(|q| q.0.clone()));
    if let Some(capacity) = capacity {
        let patch = json!({"status": {"allocatable": {GPU_RESOURCE: capacity}}});
        nodes
            .patch_status(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("restoring allocatable GPUs of node {node}"))?;
    }
    Ok(())
}

/// The pod's containers exit with `code` and termination `message`. A `restartPolicy: Never` pod then ends
/// `Failed` (or `Succeeded` for code 0) with `state.terminated`; a restarting pod stays `Running`, not Ready,
/// with the exit in `lastState.terminated` (see `e2e/cluster/kwok/pod-stages.yaml`).
pub async fn exit_pod(
    client: &Client,
    namespace: &str,
    pod: &str,
    code: i32,
    message: &str,
) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let patch = json!({"metadata": {"annotations": {
        EXIT_CODE_ANNOTATION: code.to_string(),
        EXIT_MESSAGE_ANNOTATION: message,
    }}});
    pods.patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("annotating pod {namespace}/{pod} to exit with {code}"))?;
    Ok(())
}

/// Restores a node when dropped, so a failing test does not leave a dead node behind for the next one.
/// Runs `fault.sh restore-node` synchronously (a drop may happen while a panic unwinds).
#[derive(Debug)]
pub struct RestoreOnDrop {
    node: String,
}

impl RestoreOnDrop {
    /// Guards `node`; take it before injecting a fault.
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
        }
    }
}

impl Drop for RestoreOnDrop {
    fn drop(&mut self) {
        let mut command = std::process::Command::new(cluster_dir().join("fault.sh"));
        command.args(["restore-node", &self.node]);
        if let (Ok(kubeconfig), Ok(bin)) = (kubeconfig_path(), tools_bin()) {
            command
                .env("ANNEAL_KUBECONFIG", kubeconfig)
                .env("ANNEAL_TOOLS_BIN", bin);
        }
        run_cleanup(command, &format!("restoring node {}", self.node));
    }
}

async fn patch_node(client: &Client, node: &str, patch: &serde_json::Value) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .with_context(|| format!("patching node {node}"))?;
    Ok(())
}

/// Read-modify-write of the node's taints (a list the API replaces whole), guarded by resourceVersion and
/// retried on conflict, so concurrent writers (node-lifecycle-controller adds taints too) are not overwritten.
async fn edit_taints(client: &Client, node: &str, edit: impl Fn(&mut Vec<Taint>)) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    for _ in 0..5 {
        let current = nodes
            .get(node)
            .await
            .with_context(|| format!("reading node {node}"))?;
        let mut taints = current
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let before = taints.clone();
        edit(&mut taints);
        if taints == before {
            return Ok(());
        }
        let patch = json!({
            "metadata": {"resourceVersion": current.metadata.resource_version},
            "spec": {"taints": taints},
        });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        match nodes.patch(node, &params, &Patch::Merge(&patch)).await {
            Ok(_) => return Ok(()),
            // Someone else changed the node since it was read: read it again and retry.
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(e) => return Err(e).with_context(|| format!("editing taints of node {node}")),
        }
    }
    bail!("editing taints of node {node}: still conflicting after 5 tries")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// fault.sh, the kwok stages and up.sh must use the names these constants give.
    #[test]
    fn scripts_and_stages_agree_with_the_constants() {
        let read = |path: &str| std::fs::read_to_string(cluster_dir().join(path)).unwrap();
        let fault_sh = read("fault.sh");
        let stages = read("kwok/pod-stages.yaml");
        let lib = read("lib.sh");
        assert!(fault_sh.contains(&format!("GPU_HEALTH_TAINT_KEY=\"{GPU_HEALTH_TAINT_KEY}\"")));
        for annotation in [EXIT_CODE_ANNOTATION, EXIT_MESSAGE_ANNOTATION] {
            assert!(fault_sh.contains(annotation), "fault.sh lacks {annotation}");
            assert!(
                stages.contains(annotation),
                "pod-stages.yaml lacks {annotation}"
            );
        }
        assert!(lib.contains(&format!(
            "KWOK_MANAGED_LABEL_KEY=\"{}\"",
            KWOK_MANAGED_LABEL.0
        )));
        assert!(lib.contains(&format!(
            "KWOK_MANAGED_LABEL_VALUE=\"{}\"",
            KWOK_MANAGED_LABEL.1
        )));
        let nodes = read("kwok/nodes.yaml");
        assert!(nodes.contains(&format!(
            "{}: {}",
            KWOK_MANAGED_LABEL.0, KWOK_MANAGED_LABEL.1
        )));
    }
}
