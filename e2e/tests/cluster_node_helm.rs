//! The chart's life cycle on real nodes: `helm upgrade --install` with two operator replicas (leader election)
//! into a namespace under the restricted Pod Security profile; `helm upgrade` to a new image tag completes, the
//! kubelets' real readiness probes gating the roll-out, and the new pods lead; `helm uninstall` leaves nothing
//! of the release in the cluster (every object of its manifest gone, nothing anywhere annotated with the
//! release, no release record) but the CRDs, as Helm does: the operator's leader Lease, which the replicas write
//! at run time, is the chart's own (`templates/operator-lease.yaml`), so it goes with the release.
//!
//! The new tag is the same image tagged again in each node's containerd (`ctr images tag`): no registry is
//! reachable, and what the test checks is the roll-out to another image reference, not new code.
//!
//! Node tier: `e2e/test-nodes.sh`, or `e2e/cluster/nodes-up.sh && cargo test -p anneal-e2e --test
//! cluster_node_helm -- --include-ignored`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anneal_e2e::client;
use anneal_e2e::nodes::{
    RELEASE, RELEASE_NAMESPACE, containerd_socket, helm_upgrade, operator_pods, real_node_names,
    release_namespace,
};
use anneal_e2e::tools::{helm, kubectl, run};
use anneal_e2e::wait::{poll_until, wait_for};
use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, ResourceExt};
use serde_json::Value;

fn image_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.containers.first()?.image.as_deref()
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until the operator runs as `replicas` Ready pods of `image`, none other, and one of them leads.
async fn settled(client: &Client, image: &str, replicas: usize) -> Result<Vec<String>> {
    let pods = poll_until(
        &format!("{replicas} Ready operator pods of {image}, no other"),
        Duration::from_secs(120),
        Duration::from_millis(500),
        || async {
            let pods = operator_pods(client).await?;
            let all = pods.len() == replicas
                && pods.iter().all(|p| ready(p) && image_of(p) == Some(image));
            Ok(all.then(|| pods.iter().map(ResourceExt::name_any).collect::<Vec<_>>()))
        },
    )
    .await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let holders = pods.clone();
    wait_for(
        &leases,
        "anneal-operator",
        Duration::from_secs(90),
        move |l: Option<&Lease>| {
            l.and_then(|l| l.spec.as_ref())
                .and_then(|s| s.holder_identity.as_ref())
                .is_some_and(|h| holders.contains(h))
        },
    )
    .await
    .with_context(|| format!("one of {pods:?} leads"))?;
    Ok(pods)
}

/// Every object of every listable resource, cluster-wide, as JSON items (events left out).
async fn everything() -> Result<Vec<Value>> {
    let resources = run(kubectl()?.args(["api-resources", "--verbs=list", "-o", "name"])).await?;
    let resources: Vec<&str> = resources
        .lines()
        .filter(|r| !r.is_empty() && *r != "events" && *r != "events.events.k8s.io")
        .collect();
    let out = run(kubectl()?
        .args(["get", "-A", "-o", "json"])
        .arg(resources.join(",")))
    .await?;
    let list: Value = serde_json::from_str(&out)?;
    Ok(list["items"].as_array().cloned().unwrap_or_default())
}

/// `kind/namespace/name` of each object of the release's manifest (`helm get manifest`).
async fn manifest_objects() -> Result<Vec<(String, String, String)>> {
    let manifest = run(helm()?.args(["get", "manifest", RELEASE, "-n", RELEASE_NAMESPACE])).await?;
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&manifest) {
        let value: Value = serde_json::to_value(
            <serde_yaml::Value as serde::Deserialize>::deserialize(document)?,
        )?;
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().context("kind")?.to_string();
        let name = value["metadata"]["name"]
            .as_str()
            .context("name")?
            .to_string();
        let namespace = value["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        objects.push((kind, namespace, name));
    }
    Ok(objects)
}

#[tokio::test]
#[ignore = "node tier: needs e2e/cluster/nodes-up.sh"]
async fn real_node_helm_upgrade_to_a_new_tag_with_two_replicas_and_uninstall_leaves_only_the_crds()
-> Result<()> {
    let begin = Instant::now();
    let client = client().await?;
    let nodes = real_node_names(&client).await?;
    release_namespace(&client).await?;

    // Two replicas of the chart's default image, one leading.
    helm_upgrade(&["operator.replicas=2".into()]).await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let deployment = deployments.get("anneal-operator").await?;
    let container = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|s| s.containers[0].clone())
        .context("operator container")?;
    ensure!(
        container.readiness_probe.is_some() && container.liveness_probe.is_some(),
        "the operator has real probes"
    );
    let image = container.image.context("image")?;
    let before = settled(&client, &image, 2).await?;
    let installed = begin.elapsed();

    // A new tag of the operator's image in every real node's containerd.
    let (repository, tag) = image.rsplit_once(':').context("image tag")?;
    let new_tag = format!("{tag}-upgrade");
    let new_image = format!("{repository}:{new_tag}");
    for node in &nodes {
        let socket = containerd_socket(node)?;
        run(tokio::process::Command::new("ctr")
            .arg("--address")
            .arg(&socket)
            .args([
                "-n", "k8s.io", "images", "tag", "--force", &image, &new_image,
            ]))
        .await
        .with_context(|| format!("tagging {new_image} in {node}"))?;
    }

    let upgrade = Instant::now();
    helm_upgrade(&[
        "operator.replicas=2".into(),
        format!("operator.image.tag={new_tag}"),
    ])
    .await?;
    let upgraded = upgrade.elapsed();
    let after = settled(&client, &new_image, 2).await?;
    ensure!(
        after.iter().all(|p| !before.contains(p)),
        "the upgrade replaced both pods: {before:?} -> {after:?}"
    );
    let deployment = deployments.get("anneal-operator").await?;
    let status = deployment.status.context("deployment status")?;
    ensure!(
        status.updated_replicas == Some(2) && status.ready_replicas == Some(2),
        "the roll-out completed: {status:?}"
    );
    let objects = manifest_objects().await?;
    ensure!(
        objects
            .iter()
            .any(|(k, _, n)| k == "Deployment" && n == "anneal-operator"),
        "the manifest has the operator: {objects:?}"
    );

    // Uninstall: nothing of the release is left but the CRDs.
    let uninstall = Instant::now();
    run(helm()?.args([
        "uninstall",
        RELEASE,
        "-n",
        RELEASE_NAMESPACE,
        "--wait",
        "--timeout",
        "120s",
    ]))
    .await?;
    let uninstalled = uninstall.elapsed();
    poll_until(
        "the operator pods to be gone",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async {
            let pods: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
            let left = pods
                .list(&kube::api::ListParams::default().labels("app.kubernetes.io/name=anneal"))
                .await?;
            Ok(left.items.is_empty().then_some(()))
        },
    )
    .await?;
    let items = everything().await?;
    let key = |item: &Value| {
        (
            item["kind"].as_str().unwrap_or_default().to_string(),
            item["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            item["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    };
    let present: BTreeSet<(String, String, String)> = items.iter().map(key).collect();
    let survivors: Vec<_> = objects.iter().filter(|o| present.contains(*o)).collect();
    ensure!(
        survivors.is_empty(),
        "objects of the release's manifest left after uninstall: {survivors:?}"
    );
    let of_release: Vec<_> = items
        .iter()
        .filter(|item| {
            let annotations = &item["metadata"]["annotations"];
            let labels = &item["metadata"]["labels"];
            annotations["meta.helm.sh/release-name"] == RELEASE
                || (labels["owner"] == "helm" && labels["name"] == RELEASE)
                || labels["app.kubernetes.io/instance"] == RELEASE
        })
        .map(key)
        .collect();
    ensure!(
        of_release.is_empty(),
        "objects annotated or labelled with the release (or its release record) left: {of_release:?}"
    );
    // The leader Lease is the chart's, and the replicas held it: it was in the manifest and is gone with it.
    ensure!(
        objects
            .iter()
            .any(|(k, ns, n)| k == "Lease" && ns == RELEASE_NAMESPACE && n == "anneal-operator"),
        "the chart owns the leader Lease: {objects:?}"
    );
    // What is left in the release's namespace, besides what every namespace has: nothing.
    let in_namespace: Vec<_> = present
        .iter()
        .filter(|(kind, ns, name)| {
            ns == RELEASE_NAMESPACE
                && !(kind == "ConfigMap" && name == "kube-root-ca.crt")
                && !(kind == "ServiceAccount" && name == "default")
        })
        .collect();
    let crds: Vec<_> = present
        .iter()
        .filter(|(kind, _, name)| {
            kind == "CustomResourceDefinition" && name.ends_with(".anneal.dev")
        })
        .map(|(_, _, name)| name.clone())
        .collect();
    ensure!(crds.len() == 3, "the three CRDs stay: {crds:?}");
    ensure!(
        in_namespace.is_empty(),
        "nothing left in {RELEASE_NAMESPACE}: {in_namespace:?}"
    );
    eprintln!(
        "helm install (2 replicas) {installed:?}, upgrade to {new_tag} {upgraded:?}, uninstall {uninstalled:?}; \
         {} objects of the manifest all gone, CRDs kept: {crds:?}",
        objects.len()
    );
    Ok(())
}
