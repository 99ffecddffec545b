//! Smoke test of the local cluster (`e2e/cluster/`): GPU pods land on the right simulated nodes and run,
//! kubectl and helm work against the cluster, and a failed node goes NotReady the way a dead one does.
//!
//! Cluster tier: `e2e/cluster/up.sh && cargo test -p anneal-e2e -- --include-ignored`.

use std::time::{Duration, Instant};

use anneal_e2e::cluster::cluster_dir;
use anneal_e2e::faults::{self, GPU_HEALTH_TAINT_KEY, RestoreOnDrop};
use anneal_e2e::tools::{helm, kubectl, run};
use anneal_e2e::wait::conditions::{node_not_ready, node_ready, pod_containers_exited, pod_phase};
use anneal_e2e::wait::{last_termination, wait_for, wait_for_matching};
use anneal_e2e::{TestNamespace, client};
use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::Api;
use kube::api::PostParams;
use kube::runtime::wait::Condition;
use kube::runtime::watcher;
use serde_json::json;

const H100: &str = "NVIDIA-H100-80GB-HBM3";
const PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
/// The simulated nodes `up.sh` creates (`e2e/cluster/kwok/nodes.yaml`).
const NODES: [&str; 5] = [
    "gpu-a100-0",
    "gpu-a100-1",
    "gpu-h100-0",
    "gpu-h100-1",
    "cpu-0",
];

/// A pod asking for one GPU of the given product, the way the operator's workers will.
fn gpu_pod(name: &str, product: &str, restart_policy: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": restart_policy,
            "nodeSelector": {PRODUCT_LABEL: product},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{
                "name": "worker",
                "image": "registry.invalid/anneal/runtime:0",
                "resources": {"limits": {"nvidia.com/gpu": "1"}},
            }],
        },
    }))?)
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_gpu_pod_runs_on_h100_node_and_exits_on_demand() -> Result<()> {
    let client = client().await?;
    let namespace = TestNamespace::create(&client, "gpu-pod").await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace.name());
    let nodes: Api<Node> = Api::all(client.clone());

    pods.create(&PostParams::default(), &gpu_pod("trainer", H100, "Never")?)
        .await?;
    let running = wait_for(
        &pods,
        "trainer",
        Duration::from_secs(60),
        pod_phase("Running"),
    )
    .await?
    .context("pod vanished")?;
    let node_name = running
        .spec
        .and_then(|s| s.node_name)
        .context("running pod has no node")?;
    let node = nodes.get(&node_name).await?;
    let product = node
        .metadata
        .labels
        .unwrap_or_default()
        .remove(PRODUCT_LABEL);
    assert_eq!(product.as_deref(), Some(H100), "pod ran on {node_name}");

    // A worker that hits a GPU fault: exit code and termination message, as the runtime will report them.
    let message = r#"{"error":"CUDA error: uncorrectable ECC error","step":120}"#;
    faults::exit_pod(&client, namespace.name(), "trainer", 42, message).await?;
    let failed = wait_for(
        &pods,
        "trainer",
        Duration::from_secs(30),
        pod_phase("Failed"),
    )
    .await?
    .context("pod vanished")?;
    let statuses = failed
        .status
        .and_then(|s| s.container_statuses)
        .unwrap_or_default();
    let terminated = statuses
        .first()
        .and_then(last_termination)
        .context("no terminated state")?;
    assert_eq!(terminated.exit_code, 42);
    assert_eq!(terminated.message.as_deref(), Some(message));

    // A restarting pod (a Deployment's) stays Running, with the exit in lastState, like a crash-looping one.
    pods.create(&PostParams::default(), &gpu_pod("server", H100, "Always")?)
        .await?;
    wait_for(
        &pods,
        "server",
        Duration::from_secs(60),
        pod_phase("Running"),
    )
    .await?;
    faults::exit_pod(&client, namespace.name(), "server", 1, "oom").await?;
    let crashed = wait_for(
        &pods,
        "server",
        Duration::from_secs(30),
        pod_containers_exited(),
    )
    .await?
    .context("pod vanished")?;
    let status = crashed.status.context("no status")?;
    assert_eq!(status.phase.as_deref(), Some("Running"));
    let container = &status.container_statuses.context("no container statuses")?[0];
    assert_eq!(container.restart_count, 1);
    assert_eq!(last_termination(container).map(|t| t.exit_code), Some(1));
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_kubectl_and_helm_work_against_the_cluster() -> Result<()> {
    let nodes = run(kubectl()?.args(["get", "nodes", "--output", "name"])).await?;
    for node in NODES {
        assert!(
            nodes.contains(&format!("node/{node}")),
            "{node} missing from:\n{nodes}"
        );
    }
    // The binaries are the pinned ones, and so is the API server.
    let version: serde_json::Value =
        serde_json::from_str(&run(kubectl()?.args(["version", "--output", "json"])).await?)?;
    let pinned = pinned_version("KUBERNETES_VERSION")?;
    assert_eq!(version["clientVersion"]["gitVersion"], pinned.as_str());
    assert_eq!(version["serverVersion"]["gitVersion"], pinned.as_str());
    let helm_version = run(helm()?.args(["version", "--short"])).await?;
    assert!(
        helm_version.starts_with(&pinned_version("HELM_VERSION")?),
        "{helm_version}"
    );

    let client = client().await?;
    let namespace = TestNamespace::create(&client, "helm").await?;
    let chart = cluster_dir().join("testdata/smoke-chart");
    run(helm()?.args(["install", "smoke"]).arg(&chart).args([
        "--namespace",
        namespace.name(),
        "--wait",
        "--timeout",
        "60s",
    ]))
    .await?;
    // The chart's Deployment runs its pod on the CPU node (it has no GPU toleration).
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace.name());
    let selector = watcher::Config::default().labels("app.kubernetes.io/instance=smoke");
    let running = |pod: &Pod| pod_phase("Running").matches_object(Some(pod));
    let pod = wait_for_matching(
        &pods,
        selector,
        "the chart's pod",
        Duration::from_secs(30),
        running,
    )
    .await?;
    assert_eq!(pod.spec.and_then(|s| s.node_name).as_deref(), Some("cpu-0"));

    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace.name());
    let installed = config_maps.get("smoke-smoke").await?;
    assert_eq!(
        installed.data.unwrap_or_default()["greeting"],
        "hello from helm"
    );

    run(helm()?.args([
        "uninstall",
        "smoke",
        "--namespace",
        namespace.name(),
        "--wait",
    ]))
    .await?;
    let gone = |cm: Option<&ConfigMap>| cm.is_none();
    wait_for(&config_maps, "smoke-smoke", Duration::from_secs(30), gone).await?;
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_failed_node_goes_not_ready_and_recovers() -> Result<()> {
    const NODE: &str = "gpu-a100-1";
    let client = client().await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let _restore = RestoreOnDrop::new(NODE);
    wait_for(&nodes, NODE, Duration::from_secs(30), node_ready()).await?;

    let failed_at = Instant::now();
    faults::fail_node(&client, NODE).await?;
    wait_for(&nodes, NODE, Duration::from_secs(60), node_not_ready()).await?;
    let detected_after = failed_at.elapsed();
    eprintln!("{NODE} NotReady {detected_after:.1?} after it failed");
    let lease = leases.get(NODE).await?;
    let renewed = lease
        .spec
        .and_then(|s| s.renew_time)
        .context("lease never renewed")?;
    let stale_for = k8s_openapi::jiff::Timestamp::now().duration_since(renewed.0);
    assert!(
        stale_for.as_secs() >= 5,
        "lease renewed {stale_for:?} ago: kwok still renews it"
    );

    // GPU health faults on top; restore undoes all of them.
    faults::mark_gpus_unhealthy(&client, NODE).await?;
    faults::set_allocatable_gpus(&client, NODE, 6).await?;
    let node = nodes.get(NODE).await?;
    let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
    assert!(
        taints.iter().any(|t| t.key == GPU_HEALTH_TAINT_KEY),
        "{taints:?}"
    );
    let allocatable = node.status.and_then(|s| s.allocatable).unwrap_or_default();
    assert_eq!(allocatable["nvidia.com/gpu"].0, "6");

    faults::restore_node(&client, NODE).await?;
    wait_for(&nodes, NODE, Duration::from_secs(30), node_ready()).await?;
    let node = nodes.get(NODE).await?;
    let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
    assert!(
        !taints.iter().any(|t| t.key == GPU_HEALTH_TAINT_KEY),
        "{taints:?}"
    );
    let allocatable = node.status.and_then(|s| s.allocatable).unwrap_or_default();
    assert_eq!(allocatable["nvidia.com/gpu"].0, "8");
    Ok(())
}

/// A version pinned in `e2e/cluster/versions.env`.
fn pinned_version(key: &str) -> Result<String> {
    let versions = std::fs::read_to_string(cluster_dir().join("versions.env"))?;
    versions
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .with_context(|| format!("{key} not in versions.env"))
}
