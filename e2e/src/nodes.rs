//! The node tier: real nodes of `e2e/cluster/nodes-up.sh` (containerd + kubelet, pods in real containers on this
//! machine's CPU), the operator installed by Helm into the cluster, and volumes every real node can mount.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, Node, PersistentVolumeClaim, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::OnceCell;

use crate::cluster::cluster_dir;
use crate::tools::{helm, kubectl, run, run_cleanup};
use crate::wait::wait_for;

/// Label nodes-up.sh puts on every real node.
pub const REAL_NODE_LABEL: &str = "anneal.dev/node-tier";
/// The Helm release (and its namespace) the node tier installs the operator as.
pub const RELEASE: &str = "anneal";
/// Namespace of [`RELEASE`].
pub const RELEASE_NAMESPACE: &str = "anneal-system";

/// The real nodes of the cluster (at least one); an error that says how to bring them up when there are none.
pub async fn real_nodes(client: &Client) -> Result<Vec<Node>> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{REAL_NODE_LABEL}=real")))
        .await
        .context("listing the real nodes")?;
    if nodes.items.is_empty() {
        bail!(
            "the cluster has no real nodes (label {REAL_NODE_LABEL}=real): bring them up with e2e/cluster/nodes-up.sh"
        );
    }
    Ok(nodes.items)
}

/// The names of the real nodes.
pub async fn real_node_names(client: &Client) -> Result<Vec<String>> {
    Ok(real_nodes(client)
        .await?
        .iter()
        .map(ResourceExt::name_any)
        .collect())
}

/// Enforces the Pod Security "restricted" profile on `namespace`.
pub async fn restrict(client: &Client, namespace: &str) -> Result<()> {
    let label =
        json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}});
    Api::<Namespace>::all(client.clone())
        .patch(namespace, &PatchParams::default(), &Patch::Merge(&label))
        .await
        .with_context(|| format!("labelling namespace {namespace} restricted"))?;
    Ok(())
}

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/anneal")
}

/// Creates [`RELEASE_NAMESPACE`] if it is missing, under the restricted Pod Security profile.
pub async fn release_namespace(client: &Client) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces.get_opt(RELEASE_NAMESPACE).await?.is_none() {
        let namespace = json!({"metadata": {"name": RELEASE_NAMESPACE}});
        namespaces
            .create(&PostParams::default(), &serde_json::from_value(namespace)?)
            .await?;
    }
    restrict(client, RELEASE_NAMESPACE).await
}

/// `helm upgrade --install anneal charts/anneal` into `anneal-system` (restricted Pod Security) with the chart's
/// default images, which `images/build.sh` builds and nodes-up.sh imports into every node; waits until the
/// operator's Deployment is available. Once per test binary: the tests of a binary share one operator (two
/// would both reconcile every namespace).
pub async fn install_operator() -> Result<()> {
    static INSTALLED: OnceCell<()> = OnceCell::const_new();
    INSTALLED
        .get_or_try_init(|| async {
            release_namespace(&crate::client().await?).await?;
            helm_upgrade(&[]).await
        })
        .await?;
    Ok(())
}

/// `helm upgrade --install` of [`RELEASE`] from `charts/anneal` into [`RELEASE_NAMESPACE`] with `set` values
/// (`--set`), waiting (up to 240 s) until its Deployment is available.
pub async fn helm_upgrade(set: &[String]) -> Result<()> {
    let mut command = helm()?;
    command
        .args([
            "upgrade",
            "--install",
            RELEASE,
            "--wait",
            "--timeout",
            "240s",
        ])
        .args(["-n", RELEASE_NAMESPACE]);
    for value in set {
        command.args(["--set", value]);
    }
    run(command.arg(chart())).await.context(
        "installing the chart (are the images built and imported? e2e/cluster/nodes-up.sh)",
    )?;
    Ok(())
}

/// The running operator pods of [`RELEASE`].
pub async fn operator_pods(client: &Client) -> Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let selector = "app.kubernetes.io/name=anneal,app.kubernetes.io/component=operator";
    Ok(pods
        .list(&ListParams::default().labels(selector))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect())
}

/// A hostPath PersistentVolume every real node can mount, bound in advance to claim `claim` of `namespace`
/// (`e2e/cluster/volume.sh`), and that claim, Bound. Dropping it deletes the volume and its directory.
#[derive(Debug)]
pub struct NodeVolume {
    namespace: String,
    claim: String,
    dir: PathBuf,
}

impl NodeVolume {
    /// Creates the volume and the claim, and waits until the claim is Bound.
    pub async fn create(client: &Client, namespace: &str, claim: &str) -> Result<Self> {
        let script = cluster_dir().join("volume.sh");
        let out = run(tokio::process::Command::new("bash")
            .arg(&script)
            .args([namespace, claim, "1Gi"]))
        .await?;
        let volume = Self {
            namespace: namespace.to_string(),
            claim: claim.to_string(),
            dir: PathBuf::from(out.trim()),
        };
        ensure!(
            volume.dir.is_dir(),
            "volume.sh printed {:?}, not a directory",
            volume.dir
        );
        let wanted: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": claim},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }))?;
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
        claims
            .create(&PostParams::default(), &wanted)
            .await
            .with_context(|| format!("creating claim {claim}"))?;
        wait_for(
            &claims,
            claim,
            Duration::from_secs(60),
            |c: Option<&PersistentVolumeClaim>| {
                c.and_then(|c| c.status.as_ref())
                    .and_then(|s| s.phase.as_deref())
                    == Some("Bound")
            },
        )
        .await
        .with_context(|| format!("claim {claim} never bound to its volume"))?;
        Ok(volume)
    }

    /// The volume's directory on this machine (what the pods see at `/mnt/pvc/<claim>`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for NodeVolume {
    fn drop(&mut self) {
        if std::env::var_os("ANNEAL_E2E_KEEP_NAMESPACES").is_some() {
            return;
        }
        let mut command = std::process::Command::new("bash");
        command.arg(cluster_dir().join("volume.sh")).args([
            "--delete",
            &self.namespace,
            &self.claim,
        ]);
        run_cleanup(command, "deleting the node volume");
    }
}

/// The cluster's state directory (the kubeconfig's; its real nodes' directories are in `nodes/`).
pub fn state_dir() -> Result<PathBuf> {
    Ok(crate::cluster::kubeconfig_path()?
        .parent()
        .context("the kubeconfig has no directory")?
        .to_path_buf())
}

/// The socket of real node `node`'s containerd (for `ctr --address`).
pub fn containerd_socket(node: &str) -> Result<PathBuf> {
    Ok(state_dir()?
        .join("nodes")
        .join(node)
        .join("containerd.sock"))
}

/// sha256 (hex) of a file, by `sha256sum`.
pub async fn sha256_of(path: &Path) -> Result<String> {
    let out = run(tokio::process::Command::new("sha256sum").arg(path)).await?;
    out.split_whitespace()
        .next()
        .map(str::to_string)
        .context("sha256sum printed nothing")
}

/// `kubectl apply -n namespace -f path`.
pub async fn apply_file(namespace: &str, path: &Path) -> Result<()> {
    run(kubectl()?.args(["apply", "-n", namespace, "-f"]).arg(path)).await?;
    Ok(())
}

/// What a person needs when a node-tier wait fails: the pods and events of `namespace`, and the end of the
/// in-cluster operator's log (it runs in a pod, so its log is not in the cluster's logs directory).
pub async fn diagnose(namespace: &str) -> String {
    let mut report = String::new();
    let commands: [&[&str]; 3] = [
        &["get", "pods", "-o", "wide", "-n", namespace],
        &["get", "events", "--sort-by=.lastTimestamp", "-n", namespace],
        &[
            "logs",
            "-n",
            RELEASE_NAMESPACE,
            "deploy/anneal-operator",
            "--tail",
            "30",
        ],
    ];
    for args in commands {
        let out = match kubectl() {
            Ok(mut command) => run(command.args(args))
                .await
                .unwrap_or_else(|e| e.to_string()),
            Err(e) => e.to_string(),
        };
        report.push_str(&format!("\n$ kubectl {}\n{out}", args.join(" ")));
    }
    report
}

/// Waits up to ten minutes for TrainingJob `name` of `ns` to succeed; on failure, the error carries
/// [`diagnose`]'s report of the namespace.
pub async fn succeeded(client: &Client, ns: &str, name: &str) -> Result<anneal_crds::TrainingJob> {
    use anneal_crds::trainingjob::TrainingPhase;
    let jobs: Api<anneal_crds::TrainingJob> = Api::namespaced(client.clone(), ns);
    let done = wait_for(
        &jobs,
        name,
        Duration::from_secs(600),
        |j: Option<&anneal_crds::TrainingJob>| {
            j.and_then(|j| j.status.as_ref()).and_then(|s| s.phase)
                == Some(TrainingPhase::Succeeded)
        },
    )
    .await;
    match done {
        Ok(job) => job.context("the job vanished"),
        Err(e) => Err(e.context(diagnose(ns).await)),
    }
}
