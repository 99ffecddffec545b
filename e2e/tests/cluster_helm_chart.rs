//! The Helm chart lints, installs with real Helm, and its user roles aggregate into the built-in
//! `edit` and `view` roles: a user bound to `edit` in a namespace may create TrainingJobs there, one
//! bound to `view` may only read them. Two releases of the chart live side by side (their cluster-scoped
//! objects carry the release name), and uninstalling one leaves the other working. No nodes are involved
//! (no kwok).
//!
//! Cluster tier: `e2e/cluster/up.sh && cargo test -p anneal-e2e -- --include-ignored`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anneal_e2e::tools::{helm, kubectl, run};
use anneal_e2e::wait::wait_for;
use anneal_e2e::{TestNamespace, client};
use anyhow::{Result, ensure};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Api;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/anneal")
}

/// `kubectl auth can-i VERB RESOURCE [--subresource S] --as USER -n NS`.
async fn can_i(
    ns: &str,
    user: &str,
    verb: &str,
    resource: &str,
    sub: Option<&str>,
) -> Result<bool> {
    let mut command = kubectl()?;
    command.args(["auth", "can-i", verb, resource, "-n", ns, "--as", user]);
    if let Some(sub) = sub {
        command.arg(format!("--subresource={sub}"));
    }
    let output = command.output().await?;
    let answer = String::from_utf8_lossy(&output.stdout).trim().to_string();
    ensure!(
        answer == "yes" || answer == "no",
        "can-i answered {answer:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(answer == "yes")
}

/// Deletes the cluster-scoped objects that an earlier run, stopped half-way, left behind for `release`
/// (its namespace is gone, so `helm uninstall` cannot): Helm refuses to install over objects it does
/// not own. Only this release's objects, found by their instance label: other releases stay.
async fn delete_leftovers(release: &str) -> Result<()> {
    let selector = format!("app.kubernetes.io/instance={release}");
    let kinds = "clusterrole,clusterrolebinding";
    run(kubectl()?.args(["delete", kinds, "-l", &selector, "--ignore-not-found"])).await?;
    Ok(())
}

/// Whether `role` has received a rule for the anneal.dev API group.
fn has_anneal_rules(role: Option<&ClusterRole>) -> bool {
    let rules = role.and_then(|r| r.rules.as_ref());
    rules.is_some_and(|rules| {
        rules
            .iter()
            .any(|rule| rule.api_groups.iter().flatten().any(|g| g == "anneal.dev"))
    })
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn chart_installs_and_user_roles_aggregate_into_edit_and_view() -> Result<()> {
    run(helm()?.arg("lint").arg("--strict").arg(chart())).await?;
    let client = client().await?;
    let namespace = TestNamespace::create(&client, "chart").await?;
    let ns = namespace.name();
    delete_leftovers("anneal-e2e").await?;
    let install = ["upgrade", "--install", "anneal-e2e", "--wait", "-n", ns];
    run(helm()?.args(install).arg(chart())).await?;
    let crds = run(kubectl()?.args(["get", "crd", "-o", "name"])).await?;
    for crd in ["trainingjobs", "evalgates", "modelservers"] {
        ensure!(
            crds.contains(&format!("{crd}.anneal.dev")),
            "{crd} CRD missing: {crds}"
        );
    }
    for (user, role) in [("alice", "edit"), ("bob", "view")] {
        let binding = format!("{user}-{role}");
        let role = format!("--clusterrole={role}");
        let user = format!("--user={user}");
        run(kubectl()?.args(["create", "rolebinding", &binding, &role, &user, "-n", ns])).await?;
    }
    // kube-controller-manager's clusterrole-aggregation controller copies the rules: wait for it.
    let roles: Api<ClusterRole> = Api::all(client.clone());
    for role in ["edit", "view"] {
        wait_for(&roles, role, Duration::from_secs(30), has_anneal_rules).await?;
    }
    let tj = "trainingjobs.anneal.dev";
    ensure!(
        can_i(ns, "alice", "create", tj, None).await?,
        "editor creates TrainingJobs"
    );
    let ms = "modelservers.anneal.dev";
    ensure!(
        can_i(ns, "alice", "patch", ms, Some("scale")).await?,
        "editor scales ModelServers"
    );
    ensure!(
        !can_i(ns, "alice", "patch", tj, Some("status")).await?,
        "only the operator writes status"
    );
    ensure!(
        can_i(ns, "bob", "list", "evalgates.anneal.dev", None).await?,
        "viewer lists EvalGates"
    );
    ensure!(
        !can_i(ns, "bob", "create", tj, None).await?,
        "viewer must not create"
    );
    run(helm()?.args(["uninstall", "anneal-e2e", "--wait", "-n", ns])).await?;
    Ok(())
}

/// A release of the chart for a test: its name, its namespace, and the prefix its cluster-scoped
/// objects are named with.
#[derive(Clone, Copy)]
struct Release<'a> {
    name: &'a str,
    ns: &'a str,
    prefix: &'a str,
}

impl Release<'_> {
    /// The cluster-scoped objects the chart makes for this release, as `kubectl get -o name` prints them.
    fn expected_cluster_objects(&self) -> Vec<String> {
        let role = "clusterrole.rbac.authorization.k8s.io";
        let binding = "clusterrolebinding.rbac.authorization.k8s.io";
        let mut names: Vec<String> = ["editor", "operator", "viewer"]
            .iter()
            .map(|suffix| format!("{role}/{}-{suffix}", self.prefix))
            .collect();
        names.push(format!("{binding}/{}-operator", self.prefix));
        names.sort();
        names
    }

    /// The cluster-scoped objects labelled as this release's, sorted.
    async fn cluster_objects(&self) -> Result<Vec<String>> {
        let selector = format!("app.kubernetes.io/instance={}", self.name);
        let kinds = "clusterrole,clusterrolebinding";
        let listed = run(kubectl()?.args(["get", kinds, "-l", &selector, "-o", "name"])).await?;
        let mut names: Vec<String> = listed.lines().map(str::to_owned).collect();
        names.sort();
        Ok(names)
    }

    /// Whether this release's operator ServiceAccount may list TrainingJobs in its namespace.
    async fn operator_lists_trainingjobs(&self) -> Result<bool> {
        let account = format!("system:serviceaccount:{}:anneal-operator", self.ns);
        can_i(self.ns, &account, "list", "trainingjobs.anneal.dev", None).await
    }
}

/// Two releases in two namespaces: both install (the second is not refused for the first's
/// ClusterRoles), each gets its own cluster-scoped objects, its binding names its own
/// ServiceAccount, and uninstalling one removes exactly its objects while the other keeps working.
/// The release names cover both cases of the chart's prefix: `anneal-e2e-a` contains the chart's
/// name and is used as is, `e2e-chart-b` gets `-anneal` appended.
#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn two_releases_coexist_and_uninstalling_one_keeps_the_other() -> Result<()> {
    let client = client().await?;
    let first_ns = TestNamespace::create(&client, "chart-a").await?;
    let second_ns = TestNamespace::create(&client, "chart-b").await?;
    let first = Release {
        name: "anneal-e2e-a",
        ns: first_ns.name(),
        prefix: "anneal-e2e-a",
    };
    let second = Release {
        name: "e2e-chart-b",
        ns: second_ns.name(),
        prefix: "e2e-chart-b-anneal",
    };
    for release in [first, second] {
        delete_leftovers(release.name).await?;
        let install = ["install", release.name, "--wait", "-n", release.ns];
        run(helm()?.args(install).arg(chart())).await?;
    }
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    for release in [first, second] {
        let objects = release.cluster_objects().await?;
        ensure!(
            objects == release.expected_cluster_objects(),
            "cluster-scoped objects of {}: {objects:?}",
            release.name
        );
        let name = format!("{}-operator", release.prefix);
        let binding = bindings.get(&name).await?;
        let subjects = binding.subjects.unwrap_or_default();
        ensure!(
            !subjects.is_empty()
                && subjects
                    .iter()
                    .all(|s| s.namespace.as_deref() == Some(release.ns)),
            "{name} binds {subjects:?}, not the ServiceAccount in {}",
            release.ns
        );
        ensure!(
            release.operator_lists_trainingjobs().await?,
            "the operator of {} lists TrainingJobs",
            release.name
        );
    }

    let uninstall = ["uninstall", first.name, "--wait", "-n", first.ns];
    run(helm()?.args(uninstall)).await?;
    let left = first.cluster_objects().await?;
    ensure!(left.is_empty(), "outlived {}: {left:?}", first.name);
    ensure!(
        !first.operator_lists_trainingjobs().await?,
        "the uninstalled release's operator keeps no rights"
    );
    let status = run(helm()?.args(["status", second.name, "-n", second.ns])).await?;
    ensure!(
        status.contains("STATUS: deployed"),
        "{} after the other release's uninstall: {status}",
        second.name
    );
    let objects = second.cluster_objects().await?;
    ensure!(
        objects == second.expected_cluster_objects(),
        "{} after the other release's uninstall: {objects:?}",
        second.name
    );
    ensure!(
        second.operator_lists_trainingjobs().await?,
        "the remaining release's operator still lists TrainingJobs"
    );
    let crds = run(kubectl()?.args(["get", "crd", "-o", "name"])).await?;
    ensure!(
        crds.contains("trainingjobs.anneal.dev"),
        "the CRDs outlive an uninstall (Helm never deletes crds/): {crds}"
    );
    let uninstall = ["uninstall", second.name, "--wait", "-n", second.ns];
    run(helm()?.args(uninstall)).await?;
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/build-tools.sh (helm)"]
async fn install_yaml_is_rendered_from_the_chart() -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/render-install.sh");
    let helm = anneal_e2e::cluster::tools_bin()?.join("helm");
    let rendered = tokio::process::Command::new("bash")
        .arg(&script)
        .arg("--stdout")
        .env("HELM", helm)
        .output()
        .await?;
    ensure!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let committed = std::fs::read_to_string(script.with_file_name("install.yaml"))?;
    ensure!(
        committed.as_bytes() == rendered.stdout.as_slice(),
        "manifests/install.yaml is out of date: run manifests/render-install.sh"
    );
    Ok(())
}
