//! The API server itself enforces the CRDs' validation: every object in
//! `manifests/examples/testdata/invalid/` is refused with the message its `# expect:` lines name,
//! the examples are accepted, a started TrainingJob's model and data cannot change, and
//! `kubectl get` shows the printer columns. No nodes are involved (no kwok).
//!
//! Cluster tier: `e2e/cluster/up.sh && cargo test -p anneal-e2e -- --include-ignored`.

use std::path::{Path, PathBuf};

use anneal_crds::TrainingJob;
use anneal_crds::trainingjob::{TrainingJobStatus, TrainingPhase};
use anneal_e2e::tools::{kubectl, run};
use anneal_e2e::{TestNamespace, client, crds};
use anyhow::{Context, Result, bail, ensure};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `kubectl apply --dry-run=server` of `file`: the API server validates it fully, stores nothing.
async fn server_dry_run(namespace: &str, file: &Path) -> Result<String> {
    run(kubectl()?
        .args(["apply", "--dry-run=server", "-n", namespace, "-f"])
        .arg(file))
    .await
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn api_server_refuses_each_invalid_object_naming_the_field() -> Result<()> {
    crds::install().await?;
    let client = client().await?;
    let namespace = TestNamespace::create(&client, "crd-invalid").await?;
    let dir = repo_root().join("manifests/examples/testdata/invalid");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    ensure!(
        files.len() >= 15,
        "expected the invalid examples in {}",
        dir.display()
    );
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file)?;
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        match server_dry_run(namespace.name(), file).await {
            Ok(out) => failures.push(format!("{}: accepted: {out}", file.display())),
            Err(err) => {
                let message = format!("{err:#}");
                for want in &expected {
                    if !message.contains(want) {
                        failures.push(format!(
                            "{}: refused, but without {want:?}: {message}",
                            file.display()
                        ));
                    }
                }
            }
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of {} invalid objects:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn api_server_accepts_every_example() -> Result<()> {
    crds::install().await?;
    let client = client().await?;
    let namespace = TestNamespace::create(&client, "crd-examples").await?;
    for name in [
        "trainingjob.yaml",
        "evalgate.yaml",
        "modelserver.yaml",
        "pipeline.yaml",
        "pipeline-smollm2.yaml",
        "serve-smollm2.yaml",
    ] {
        let out = server_dry_run(
            namespace.name(),
            &repo_root().join("manifests/examples").join(name),
        )
        .await
        .with_context(|| format!("example {name}"))?;
        ensure!(out.contains("created (server dry run)"), "{name}: {out}");
    }
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn started_trainingjob_model_and_dataset_are_immutable() -> Result<()> {
    crds::install().await?;
    let client = client().await?;
    let namespace = TestNamespace::create(&client, "crd-immutable").await?;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), namespace.name());
    let text = std::fs::read_to_string(repo_root().join("manifests/examples/trainingjob.yaml"))?;
    let job: TrainingJob = serde_yaml::from_str(&text)?;
    let name = job.metadata.name.clone().context("example has a name")?;
    jobs.create(&PostParams::default(), &job).await?;
    let params = PatchParams::default();

    // Pending: the model may still change (nothing was trained from it yet).
    let layers = |n: u32| json!({"spec": {"model": {"architecture": {"layers": n}}}});
    jobs.patch(&name, &params, &Patch::Merge(layers(6)))
        .await
        .context("changing the model while Pending")?;

    let status = TrainingJobStatus {
        phase: Some(TrainingPhase::Running),
        ..TrainingJobStatus::default()
    };
    jobs.patch_status(&name, &params, &Patch::Merge(json!({ "status": status })))
        .await?;

    let refused = jobs.patch(&name, &params, &Patch::Merge(layers(8))).await;
    expect_refusal(refused, "spec.model cannot change once the job has started")?;
    let dataset = json!({"spec": {"dataset": {"uri": "file:///data/other.jsonl"}}});
    let refused = jobs.patch(&name, &params, &Patch::Merge(dataset)).await;
    expect_refusal(
        refused,
        "spec.dataset cannot change once the job has started",
    )?;

    // Other fields of a running job may change (e.g. suspend it).
    let suspend = json!({"spec": {"runPolicy": {"suspend": true}}});
    jobs.patch(&name, &params, &Patch::Merge(suspend))
        .await
        .context("suspending a running job")?;
    let stored = jobs.get(&name).await?;
    ensure!(
        stored.spec.model.architecture.map(|a| a.layers) == Some(6),
        "the refused change was not stored"
    );
    Ok(())
}

fn expect_refusal<T: std::fmt::Debug>(result: kube::Result<T>, message: &str) -> Result<()> {
    match result {
        Ok(obj) => bail!("accepted, expected {message:?}: {obj:?}"),
        Err(kube::Error::Api(status)) if status.message.contains(message) && status.code == 422 => {
            Ok(())
        }
        Err(other) => bail!("refused with {other}, expected 422 with {message:?}"),
    }
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kubectl_get_shows_state_columns() -> Result<()> {
    crds::install().await?;
    let client = client().await?;
    let namespace = TestNamespace::create(&client, "crd-columns").await?;
    let pipeline = repo_root().join("manifests/examples/pipeline.yaml");
    run(kubectl()?
        .args(["apply", "-n", namespace.name(), "-f"])
        .arg(&pipeline))
    .await?;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), namespace.name());
    let progress = json!({"status": {"phase": "Running", "restarts": 1,
        "progress": {"step": 120, "totalSteps": 600, "stepOfTotal": "120/600", "loss": 0.75}}});
    jobs.patch_status("arith", &PatchParams::default(), &Patch::Merge(progress))
        .await?;

    let table = run(kubectl()?.args(["get", "anneal", "-n", namespace.name()])).await?;
    for header in [
        "PHASE",
        "STEP",
        "LOSS",
        "GPU",
        "RESTARTS",
        "AGE",
        "CANDIDATE",
        "PROMOTED",
        "MODEL",
        "READY",
    ] {
        ensure!(table.contains(header), "no {header} column in:\n{table}");
    }
    let job_line = table
        .lines()
        .find(|l| l.starts_with("trainingjob.anneal.dev/arith"))
        .context(table.clone())?;
    let cells: Vec<&str> = job_line.split_whitespace().collect();
    ensure!(
        cells[1..6] == ["Running", "120/600", "0.75", "H100", "1"],
        "row: {job_line}"
    );
    let short =
        run(kubectl()?.args(["get", "tj,eg,ms", "-n", namespace.name(), "-o", "name"])).await?;
    ensure!(
        short.lines().count() == 3,
        "short names list the three objects: {short}"
    );
    Ok(())
}
