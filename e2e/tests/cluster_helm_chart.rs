//! The Helm chart lints, installs with real Helm, and its user roles aggregate into the built-in
//! `edit` and `view` roles: a user bound to `edit` in a namespace may create TrainingJobs there, one
//! bound to `view` may only read them. No nodes are involved (no kwok).
//!
//! Cluster tier: `e2e/cluster/up.sh && cargo test -p anneal-e2e -- --include-ignored`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anneal_e2e::tools::{helm, kubectl, run};
use anneal_e2e::wait::wait_for;
use anneal_e2e::{TestNamespace, client};
use anyhow::{Result, ensure};
use k8s_openapi::api::rbac::v1::ClusterRole;
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
    // Cluster-scoped roles left by an earlier run that failed half-way would block the install.
    let leftovers = ["anneal-editor", "anneal-viewer", "--ignore-not-found"];
    run(kubectl()?.args(["delete", "clusterrole"]).args(leftovers)).await?;
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
