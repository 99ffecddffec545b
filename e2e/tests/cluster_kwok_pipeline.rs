//! The train -> gate -> serve pipeline against the real API server, the real kube-controller-manager
//! (Deployments, ReplicaSets, garbage collection) and the real operator binary; nodes and pod
//! execution simulated by kwok. The tests play the runtime's part: a worker's artifact and an
//! evaluation's report reach the operator as the containers' termination messages, as on a real
//! node. Server pods of `pvc://anneal-models/kwok-never-ready` never become Ready (a kwok stage).
//!
//! Cluster tier: `e2e/cluster/up.sh && cargo test -p anneal-e2e -- --include-ignored`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::runtime::{WatchStreamExt, watcher};
use support::chaos::{Chaos, Rng};

use anneal_crds::evalgate::GatePhase;
use anneal_crds::modelserver::ServerPhase;
use anneal_crds::{EvalGate, ModelServer, TrainingJob};
use anneal_e2e::client;
use anneal_e2e::faults::exit_pod;
use anneal_e2e::operator::OperatorProcess;
use anneal_e2e::tools::{kubectl, run};
use anneal_e2e::trainingjob::{TIMEOUT, event_seen, restricted_namespace, running_worker, worker};
use anneal_e2e::wait::wait_for;
use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

const NEVER_READY: &str = "pvc://anneal-models/kwok-never-ready";

fn sha(n: u8) -> String {
    format!("{n:x}").repeat(64)
}

/// Applies `yaml` to `ns` with server-side apply as field manager `gitops` (what Argo CD or Flux
/// would do).
async fn apply(ns: &str, yaml: &str) -> Result<()> {
    let path = std::env::temp_dir().join(format!(
        "anneal-{ns}-{}.yaml",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    ));
    std::fs::write(&path, yaml)?;
    let result = run(kubectl()?.args([
        "apply",
        "--server-side",
        "--field-manager",
        "gitops",
        "-n",
        ns,
        "-f",
        path.to_str().context("path")?,
    ]))
    .await;
    let _ = std::fs::remove_file(&path);
    result.map(|_| ())
}

/// `kubectl diff --server-side` of `yaml` against the cluster: the diff, empty when in sync.
async fn diff(ns: &str, yaml: &str) -> Result<String> {
    let path = std::env::temp_dir().join(format!("anneal-diff-{ns}.yaml"));
    std::fs::write(&path, yaml)?;
    let output = kubectl()?
        .args([
            "diff",
            "--server-side",
            "--field-manager",
            "gitops",
            "-n",
            ns,
            "-f",
            path.to_str().context("path")?,
        ])
        .output()
        .await?;
    // kubectl diff: 0 no difference, 1 differences, >1 an error.
    ensure!(
        output.status.code().is_some_and(|c| c <= 1),
        "kubectl diff failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn pipeline_yaml() -> Result<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/examples/pipeline.yaml");
    Ok(std::fs::read_to_string(path)?)
}

/// The evaluation's report as `anneal-runtime eval` writes it.
fn report(sha: &str, accuracy: Option<f64>, loss: f64) -> String {
    json!({"event": "eval", "model_sha256": sha, "examples": 100, "tokens": 900, "loss": loss,
           "perplexity": loss.exp(), "token_accuracy": 0.97, "exact_match": accuracy})
    .to_string()
}

/// Waits for the gate's running evaluation pod of try 1 for the round in its status; returns it.
async fn eval_pod(client: &Client, ns: &str, gate: &str) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let gates: Api<EvalGate> = Api::namespaced(client.clone(), ns);
    let evaluating = wait_for(&gates, gate, TIMEOUT, |g: Option<&EvalGate>| {
        g.and_then(|g| g.status.as_ref())
            .is_some_and(|s| s.phase == Some(GatePhase::Evaluating))
    })
    .await
    .with_context(|| format!("{gate} never started evaluating"))?
    .context("gate gone")?;
    let round = evaluating.status.and_then(|s| s.round).context("round")?;
    let name = format!("{gate}-eval-{round}-t1");
    wait_for(&pods, &name, TIMEOUT, |p: Option<&Pod>| {
        p.and_then(|p| p.status.as_ref())
            .and_then(|s| s.phase.as_deref())
            == Some("Running")
    })
    .await
    .with_context(|| format!("evaluation pod {name} never ran"))?
    .context("pod gone")
}

/// Waits until the gate has decided the round the predicate accepts; returns the gate.
async fn gate_decided(client: &Client, ns: &str, gate: &str, phase: GatePhase) -> Result<EvalGate> {
    let gates: Api<EvalGate> = Api::namespaced(client.clone(), ns);
    wait_for(&gates, gate, TIMEOUT, |g: Option<&EvalGate>| {
        g.and_then(|g| g.status.as_ref())
            .is_some_and(|s| s.phase == Some(phase))
    })
    .await
    .with_context(|| format!("{gate} never reached {phase:?}"))?
    .context("gate gone")
}

/// Waits until the server is in `phase` serving `sha`; returns it.
async fn server_serving(
    client: &Client,
    ns: &str,
    server: &str,
    phase: ServerPhase,
    uri_or_sha: &str,
) -> Result<ModelServer> {
    let servers: Api<ModelServer> = Api::namespaced(client.clone(), ns);
    wait_for(&servers, server, TIMEOUT, |s: Option<&ModelServer>| {
        s.and_then(|s| s.status.as_ref()).is_some_and(|st| {
            st.phase == Some(phase)
                && st
                    .current_model
                    .as_ref()
                    .is_some_and(|m| m.sha256.as_deref() == Some(uri_or_sha) || m.uri == uri_or_sha)
        })
    })
    .await
    .with_context(|| format!("{server} never {phase:?} with {uri_or_sha}"))?
    .context("server gone")
}

/// The model the Deployment's pod template runs (its annotations): (uri, sha256).
async fn deployed(client: &Client, ns: &str, name: &str) -> Result<(String, Option<String>)> {
    let d = Api::<Deployment>::namespaced(client.clone(), ns)
        .get(name)
        .await?;
    let a = d
        .spec
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.annotations)
        .unwrap_or_default();
    Ok((
        a.get("anneal.dev/model-uri").cloned().unwrap_or_default(),
        a.get("anneal.dev/model-sha256").cloned(),
    ))
}

async fn operator_writes(operator: &OperatorProcess) -> Result<f64> {
    operator
        .metric_sum("anneal_operator_api_writes_total")
        .await
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_pipeline_trains_gates_and_serves_the_promoted_model_by_digest_and_stays_in_sync()
-> Result<()> {
    let client = client().await?;
    let (namespace, operator) = restricted_namespace(&client, "pipeline").await?;
    let ns = namespace.name();
    let yaml = pipeline_yaml()?;
    apply(ns, &yaml).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let servers: Api<ModelServer> = Api::namespaced(client.clone(), ns);

    // Nothing is served before the gate has passed a model.
    let pending = wait_for(&servers, "arith", TIMEOUT, |s: Option<&ModelServer>| {
        s.and_then(|s| s.status.as_ref())
            .is_some_and(|st| st.phase == Some(ServerPhase::Pending))
    })
    .await?
    .context("server")?;
    ensure!(
        pending
            .status
            .as_ref()
            .and_then(|s| s.current_model.as_ref())
            .is_none(),
        "a model is served before the gate passed one"
    );

    running_worker(&pods, "arith", 1, TIMEOUT).await?;
    let trained = Instant::now();
    let artifact = json!({"artifact": {"uri": "pvc://anneal-models/arith", "sha256": sha(1)}});
    exit_pod(&client, ns, &worker("arith", 1), 0, &artifact.to_string()).await?;
    let pod = eval_pod(&client, ns, "arith").await?;
    let args = pod.spec.as_ref().context("spec")?.containers[0]
        .args
        .clone()
        .unwrap_or_default();
    ensure!(
        args.windows(2)
            .any(|w| w == ["--model", "pvc://anneal-models/arith"]),
        "the evaluation reads another model: {args:?}"
    );
    exit_pod(
        &client,
        ns,
        &pod.name_any(),
        0,
        &report(&sha(1), Some(0.96), 0.1),
    )
    .await?;
    // What a CI pipeline awaits.
    run(kubectl()?.args([
        "wait",
        "-n",
        ns,
        "--for=condition=Promoted",
        "evalgate/arith",
        "--timeout=60s",
    ]))
    .await?;
    let promoted_after = trained.elapsed();
    let gate = gate_decided(&client, ns, "arith", GatePhase::Passed).await?;
    let status = gate.status.context("status")?;
    let promoted = status.promoted.context("promoted")?;
    ensure!(
        promoted.sha256.as_deref() == Some(sha(1).as_str()),
        "{promoted:?}"
    );
    ensure!(
        status
            .results
            .iter()
            .any(|r| r.value == Some(0.96) && r.passed),
        "{:?}",
        status.results
    );
    let server = server_serving(&client, ns, "arith", ServerPhase::Ready, &sha(1)).await?;
    let served_after = trained.elapsed();
    let st = server.status.context("status")?;
    ensure!(st.ready_replicas == Some(1), "{st:?}");
    ensure!(
        st.endpoint.as_deref() == Some(format!("http://arith.{ns}.svc:80/v1").as_str()),
        "{:?}",
        st.endpoint
    );
    let (uri, pinned) = deployed(&client, ns, "arith").await?;
    ensure!(
        uri == "pvc://anneal-models/arith" && pinned == Some(sha(1)),
        "{uri} {pinned:?}"
    );
    let dep = Api::<Deployment>::namespaced(client.clone(), ns)
        .get("arith")
        .await?;
    let container = &dep
        .spec
        .context("spec")?
        .template
        .spec
        .context("pod spec")?
        .containers[0];
    let args = container.args.clone().unwrap_or_default();
    ensure!(
        args.windows(2)
            .any(|w| w[0] == "--model-sha256" && w[1] == sha(1)),
        "{args:?}"
    );
    // The evaluation pod is gone once its verdict is recorded.
    ensure!(
        pods.list(&ListParams::default().labels("anneal.dev/evalgate=arith"))
            .await?
            .items
            .iter()
            .all(|p| p.metadata.deletion_timestamp.is_some()),
        "evaluation pods left behind"
    );
    event_seen(&client, ns, "arith", "Promoted").await?;
    event_seen(&client, ns, "arith", "RolledOut").await?;
    // Nobody edited the children: nothing was repaired.
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    let repaired: Vec<_> = events
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("Repaired"))
        .map(|e| e.note.clone().unwrap_or_default())
        .collect();
    ensure!(
        repaired.is_empty(),
        "children repaired without an edit: {repaired:?}"
    );
    eprintln!(
        "pipeline: artifact -> Promoted {:.1} s, -> server Ready {:.1} s",
        promoted_after.as_secs_f64(),
        served_after.as_secs_f64()
    );

    // GitOps: the user's manifests are in sync, and no spec field is the operator's.
    let out = diff(ns, &yaml).await?;
    ensure!(
        out.trim().is_empty(),
        "kubectl diff after promotion:\n{out}"
    );
    for kind in ["trainingjob", "evalgate", "modelserver"] {
        let text = run(kubectl()?.args([
            "get",
            "-n",
            ns,
            kind,
            "arith",
            "-o",
            "json",
            "--show-managed-fields",
        ]))
        .await?;
        let object: serde_json::Value = serde_json::from_str(&text)?;
        for entry in object["metadata"]["managedFields"]
            .as_array()
            .context("managedFields")?
        {
            if entry["manager"] == "anneal-operator" {
                ensure!(
                    entry["subresource"] == "status" && entry["fieldsV1"].get("f:spec").is_none(),
                    "{kind}: the operator owns a field outside status: {entry}"
                );
            }
        }
    }

    // Steady state: a promoted, Ready pipeline makes no writes.
    let before = operator_writes(&operator).await?;
    // The measurement window itself: nothing is awaited, the absence of writes is what is measured.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let after = operator_writes(&operator).await?;
    ensure!(
        after == before,
        "{} writes in a minute of steady state",
        after - before
    );
    Ok(())
}

/// A gate on a pinned URI (`candidate.uri`) followed by server `s`; each change of the URI in Git is
/// a new round.
fn gated_yaml(uri: &str, timeout: u32, no_regression: bool) -> String {
    let regression = if no_regression {
        "  noRegression:\n    modelServer:\n      name: s\n    tolerance: 0.01\n"
    } else {
        ""
    };
    format!(
        "apiVersion: anneal.dev/v1alpha1
kind: EvalGate
metadata:
  name: g
spec:
  candidate:
    uri: {uri}
  dataset:
    uri: builtin:arith
  metrics:
    - metric: accuracy
      min: 0.9
    - metric: loss
      max: 0.5
{regression}  timeoutSeconds: {timeout}
  retries: 0
---
apiVersion: anneal.dev/v1alpha1
kind: ModelServer
metadata:
  name: s
spec:
  model:
    fromEvalGate:
      name: g
  resources:
    gpus: 1
    gpuType: A100
  rollbackDeadlineSeconds: 15
"
    )
}

/// Runs one round for `uri`: applies it, reports `message` (or nothing, for a timeout), and waits
/// for the verdict; returns the gate and the Evaluated condition's reason.
async fn round(
    client: &Client,
    ns: &str,
    uri: &str,
    timeout: u32,
    no_regression: bool,
    message: Option<&str>,
    expect: GatePhase,
) -> Result<(EvalGate, String)> {
    apply(ns, &gated_yaml(uri, timeout, no_regression)).await?;
    let gates: Api<EvalGate> = Api::namespaced(client.clone(), ns);
    // The round of this URI (the gate's status names the candidate).
    wait_for(&gates, "g", TIMEOUT, |g: Option<&EvalGate>| {
        g.and_then(|g| g.status.as_ref()).is_some_and(|s| {
            s.phase == Some(GatePhase::Evaluating)
                && s.candidate.as_ref().is_some_and(|c| c.uri == uri)
        })
    })
    .await?;
    let pod = eval_pod(client, ns, "g").await?;
    if let Some(message) = message {
        exit_pod(client, ns, &pod.name_any(), 0, message).await?;
    }
    let gate = wait_for(
        &gates,
        "g",
        Duration::from_secs(u64::from(timeout) + 30),
        |g: Option<&EvalGate>| {
            g.and_then(|g| g.status.as_ref()).is_some_and(|s| {
                s.phase == Some(expect) && s.candidate.as_ref().is_some_and(|c| c.uri == uri)
            })
        },
    )
    .await?
    .context("gate")?;
    let reason = gate
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Evaluated"))
        .map(|c| c.reason.clone())
        .unwrap_or_default();
    Ok((gate, reason))
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_candidates_that_fail_their_gate_never_roll_out_and_the_passed_model_keeps_serving()
-> Result<()> {
    let client = client().await?;
    let (namespace, _operator) = restricted_namespace(&client, "gate-fails").await?;
    let ns = namespace.name();
    let v1 = "pvc://anneal-models/v1";
    let started = Instant::now();
    round(
        &client,
        ns,
        v1,
        60,
        false,
        Some(&report(&sha(1), Some(0.95), 0.2)),
        GatePhase::Passed,
    )
    .await?;
    server_serving(&client, ns, "s", ServerPhase::Ready, &sha(1)).await?;
    eprintln!(
        "v1 passed and served in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let mut seen = Vec::new();
    let cases: [(&str, Option<String>, bool, &str); 5] = [
        (
            "v2",
            Some(report(&sha(2), Some(0.5), 0.2)),
            false,
            "ThresholdFailed",
        ),
        (
            "v3",
            Some(report(&sha(3), Some(0.95), f64::NAN)),
            false,
            "ThresholdFailed",
        ),
        (
            "v4",
            Some(report(&sha(4), None, 0.2)),
            false,
            "ThresholdFailed",
        ),
        ("v5", None, false, "Timeout"),
        (
            "v6",
            Some({
                let mut r: serde_json::Value =
                    serde_json::from_str(&report(&sha(6), Some(0.95), 0.4))?;
                r["baseline"] = serde_json::from_str(&report(&sha(1), Some(0.95), 0.2))?;
                r.to_string()
            }),
            true,
            "Regression",
        ),
    ];
    for (name, message, no_regression, want) in cases {
        let uri = format!("pvc://anneal-models/{name}");
        let timeout = if message.is_none() { 10 } else { 60 };
        let t = Instant::now();
        let (gate, reason) = round(
            &client,
            ns,
            &uri,
            timeout,
            no_regression,
            message.as_deref(),
            GatePhase::Failed,
        )
        .await?;
        ensure!(reason == want, "{name}: reason {reason}, wanted {want}");
        let status = gate.status.context("status")?;
        ensure!(
            status.promoted.as_ref().and_then(|m| m.sha256.as_deref()) == Some(sha(1).as_str()),
            "{name}: the promoted model changed: {:?}",
            status.promoted
        );
        if no_regression {
            ensure!(
                status.baseline.as_ref().and_then(|b| b.sha256.as_deref()) == Some(sha(1).as_str()),
                "{name}: compared with {:?}",
                status.baseline
            );
        }
        // Nothing rolls out: the Deployment still runs v1, and the server is Ready with it.
        let (uri_now, sha_now) = deployed(&client, ns, "s").await?;
        ensure!(
            uri_now == v1 && sha_now == Some(sha(1)),
            "{name}: deployed {uri_now}"
        );
        server_serving(&client, ns, "s", ServerPhase::Ready, &sha(1)).await?;
        let message = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Evaluated")
            .map(|c| c.message.clone())
            .unwrap_or_default();
        seen.push(format!(
            "{name}: {reason} in {:.1} s: {message}",
            t.elapsed().as_secs_f64()
        ));
    }
    for line in &seen {
        eprintln!("{line}");
    }
    let events = event_seen(&client, ns, "g", "ThresholdFailed").await?;
    ensure!(
        events.note.as_deref().unwrap_or("").contains("accuracy"),
        "{:?}",
        events.note
    );
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_a_second_training_round_is_gated_again_and_weights_other_than_the_artifact_fail()
-> Result<()> {
    let client = client().await?;
    let (namespace, _operator) = restricted_namespace(&client, "rounds").await?;
    let ns = namespace.name();
    let yaml = pipeline_yaml()?;
    apply(ns, &yaml).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let train = |attempt: u32, n: u8| {
        let (client, ns, pods) = (client.clone(), ns.to_string(), pods.clone());
        async move {
            running_worker(&pods, "arith", attempt, TIMEOUT).await?;
            let artifact =
                json!({"artifact": {"uri": "pvc://anneal-models/arith", "sha256": sha(n)}});
            exit_pod(
                &client,
                &ns,
                &worker("arith", attempt),
                0,
                &artifact.to_string(),
            )
            .await
        }
    };
    train(1, 1).await?;
    let pod = eval_pod(&client, ns, "arith").await?;
    exit_pod(
        &client,
        ns,
        &pod.name_any(),
        0,
        &report(&sha(1), Some(0.95), 0.1),
    )
    .await?;
    server_serving(&client, ns, "arith", ServerPhase::Ready, &sha(1)).await?;

    // Round 2: the job trained again (deleted and applied again from Git), a new artifact. The
    // evaluation measures other weights than the artifact's: the gate fails closed.
    let recreate = |ns: String, jobs: Api<TrainingJob>, yaml: String| async move {
        jobs.delete("arith", &Default::default()).await?;
        wait_for(&jobs, "arith", TIMEOUT, |j: Option<&TrainingJob>| {
            j.is_none()
        })
        .await?;
        apply(&ns, &yaml).await
    };
    recreate(ns.to_string(), jobs.clone(), yaml.clone()).await?;
    train(1, 2).await?;
    let pod = eval_pod(&client, ns, "arith").await?;
    exit_pod(
        &client,
        ns,
        &pod.name_any(),
        0,
        &report(&sha(9), Some(0.99), 0.1),
    )
    .await?;
    let gate = gate_decided(&client, ns, "arith", GatePhase::Failed).await?;
    let evaluated = gate
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Evaluated"))
        .context("Evaluated")?;
    ensure!(evaluated.reason == "DigestMismatch", "{evaluated:?}");
    ensure!(
        deployed(&client, ns, "arith").await?.1 == Some(sha(1)),
        "a failed round rolled out"
    );

    // Round 3: passes and rolls out.
    recreate(ns.to_string(), jobs.clone(), yaml.clone()).await?;
    train(1, 3).await?;
    let pod = eval_pod(&client, ns, "arith").await?;
    exit_pod(
        &client,
        ns,
        &pod.name_any(),
        0,
        &report(&sha(3), Some(0.97), 0.1),
    )
    .await?;
    let server = server_serving(&client, ns, "arith", ServerPhase::Ready, &sha(3)).await?;
    let st = server.status.context("status")?;
    ensure!(
        st.previous_model.as_ref().and_then(|m| m.sha256.as_deref()) == Some(sha(1).as_str()),
        "{:?}",
        st.previous_model
    );
    let gate: EvalGate = Api::namespaced(client.clone(), ns).get("arith").await?;
    let history: Vec<_> = gate
        .status
        .context("status")?
        .history
        .iter()
        .map(|r| (r.candidate.sha256.clone().unwrap_or_default(), r.phase))
        .collect();
    ensure!(
        history
            == [
                (sha(1), GatePhase::Passed),
                (sha(2), GatePhase::Failed),
                (sha(3), GatePhase::Passed)
            ],
        "{history:?}"
    );
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_a_model_whose_pods_never_become_ready_is_rolled_back_and_not_retried() -> Result<()> {
    let client = client().await?;
    let (namespace, _operator) = restricted_namespace(&client, "rollback").await?;
    let ns = namespace.name();
    let pinned = |uri: &str| {
        format!(
            "apiVersion: anneal.dev/v1alpha1
kind: ModelServer
metadata:
  name: pinned
spec:
  model:
    uri: {uri}
  replicas: 2
  resources:
    gpus: 1
    gpuType: A100
  rollbackDeadlineSeconds: 10
"
        )
    };
    let good = "pvc://anneal-models/good";
    apply(ns, &pinned(good)).await?;
    server_serving(&client, ns, "pinned", ServerPhase::Ready, good).await?;
    let pdb =
        Api::<k8s_openapi::api::policy::v1::PodDisruptionBudget>::namespaced(client.clone(), ns)
            .get_opt("pinned")
            .await?;
    ensure!(pdb.is_some(), "two replicas have no PodDisruptionBudget");

    let t = Instant::now();
    apply(ns, &pinned(NEVER_READY)).await?;
    let servers: Api<ModelServer> = Api::namespaced(client.clone(), ns);
    wait_for(&servers, "pinned", TIMEOUT, |s: Option<&ModelServer>| {
        s.and_then(|s| s.status.as_ref())
            .is_some_and(|st| st.phase == Some(ServerPhase::RollingOut))
    })
    .await?;
    let rolled = wait_for(&servers, "pinned", TIMEOUT, |s: Option<&ModelServer>| {
        s.and_then(|s| s.status.as_ref())
            .is_some_and(|st| st.phase == Some(ServerPhase::RolledBack))
    })
    .await?
    .context("server")?;
    let rolled_after = t.elapsed();
    let st = rolled.status.context("status")?;
    ensure!(
        st.rolled_back_from.as_ref().map(|m| m.uri.as_str()) == Some(NEVER_READY),
        "{st:?}"
    );
    let rolled_back = st
        .conditions
        .iter()
        .find(|c| c.type_ == "RolledBack")
        .context("RolledBack")?;
    ensure!(rolled_back.status == "True", "{rolled_back:?}");
    // The Deployment follows the status in the same reconcile.
    wait_for(
        &Api::<Deployment>::namespaced(client.clone(), ns),
        "pinned",
        TIMEOUT,
        |d: Option<&Deployment>| {
            d.and_then(|d| d.spec.as_ref())
                .and_then(|s| s.template.metadata.as_ref())
                .and_then(|m| m.annotations.as_ref())
                .and_then(|a| a.get("anneal.dev/model-uri"))
                .map(String::as_str)
                == Some(good)
        },
    )
    .await
    .context("the Deployment still runs the bad model")?;
    // The old model serves on every replica again, and the bad one is not tried again.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let settled = wait_for(&servers, "pinned", TIMEOUT, |s: Option<&ModelServer>| {
        s.and_then(|s| s.status.as_ref()).is_some_and(|st| {
            st.phase == Some(ServerPhase::RolledBack)
                && st.rollout_started_at.is_none()
                && st.ready_replicas == Some(2)
        })
    })
    .await?
    .context("server")?;
    ensure!(
        settled
            .status
            .as_ref()
            .and_then(|s| s.current_model.as_ref())
            .map(|m| m.uri.as_str())
            == Some(good),
        "not serving the good model"
    );
    let live: Vec<_> = pods
        .list(&ListParams::default().labels("anneal.dev/modelserver=pinned"))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    ensure!(
        live.iter().all(|p| p
            .annotations()
            .get("anneal.dev/model-uri")
            .map(String::as_str)
            == Some(good)),
        "pods of the bad model remain: {:?}",
        live.iter().map(|p| p.name_any()).collect::<Vec<_>>()
    );
    event_seen(&client, ns, "pinned", "RolledBack").await?;
    eprintln!(
        "roll-back: bad model applied -> RolledBack {:.1} s (deadline 10 s)",
        rolled_after.as_secs_f64()
    );
    // The user's spec still names the bad model: nothing of it was rewritten.
    let spec_uri = servers.get("pinned").await?.spec.model.uri.map(|u| u.0);
    ensure!(
        spec_uri.as_deref() == Some(NEVER_READY),
        "spec rewritten: {spec_uri:?}"
    );
    let out = diff(ns, &pinned(NEVER_READY)).await?;
    ensure!(
        out.trim().is_empty(),
        "kubectl diff after the roll-back:\n{out}"
    );
    // A new model in Git clears the roll-back.
    apply(ns, &pinned("pvc://anneal-models/better")).await?;
    let fixed = server_serving(
        &client,
        ns,
        "pinned",
        ServerPhase::Ready,
        "pvc://anneal-models/better",
    )
    .await?;
    ensure!(
        fixed.status.and_then(|s| s.rolled_back_from).is_none(),
        "roll-back kept"
    );
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_operator_sigkilled_during_evaluation_and_promotion_evaluates_once_and_serves_only_passed_models()
-> Result<()> {
    let seed = support::chaos::seed();
    println!("chaos seed {seed} (replay with ANNEAL_CHAOS_SEED={seed})");
    let client = client().await?;
    let namespace =
        anneal_e2e::trainingjob::restricted_namespace_only(&client, "gate-chaos").await?;
    let ns = namespace.name().to_string();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);

    // Every pod UID ever created, by name; every model a server pod template ever named.
    let created: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>> = Arc::default();
    let served: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let recorders = {
        let (created, served) = (created.clone(), served.clone());
        let pods = pods.clone();
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        [
            tokio::spawn(async move {
                let mut stream =
                    std::pin::pin!(watcher(pods, watcher::Config::default()).applied_objects());
                while let Some(Ok(pod)) = stream.next().await {
                    if let Some(uid) = pod.uid() {
                        let mut map = created.lock().unwrap_or_else(|p| p.into_inner());
                        map.entry(pod.name_any()).or_default().insert(uid);
                    }
                }
            }),
            tokio::spawn(async move {
                let mut stream = std::pin::pin!(
                    watcher(deployments, watcher::Config::default()).applied_objects()
                );
                while let Some(Ok(d)) = stream.next().await {
                    let sha = d
                        .spec
                        .and_then(|s| s.template.metadata)
                        .and_then(|m| m.annotations)
                        .and_then(|a| a.get("anneal.dev/model-sha256").cloned());
                    if let Some(sha) = sha {
                        served.lock().unwrap_or_else(|p| p.into_inner()).insert(sha);
                    }
                }
            }),
        ]
    };
    let mut chaos = Chaos {
        ns: ns.clone(),
        operator: Some(OperatorProcess::start(&ns).await?),
        rng: Rng(seed),
        kills: Vec::new(),
    };
    let yaml = pipeline_yaml()?;
    let outcome: Result<()> = async {
        // Round 1 passes, round 2 fails; the operator dies somewhere after every step.
        for (n, accuracy) in [(1u8, 0.97), (2, 0.4)] {
            if n > 1 {
                jobs.delete("arith", &Default::default()).await?;
                wait_for(&jobs, "arith", TIMEOUT, |j: Option<&TrainingJob>| {
                    j.is_none()
                })
                .await?;
            }
            apply(&ns, &yaml).await?;
            chaos.kill_somewhere().await?;
            running_worker(&pods, "arith", 1, TIMEOUT).await?;
            let artifact =
                json!({"artifact": {"uri": "pvc://anneal-models/arith", "sha256": sha(n)}});
            exit_pod(&client, &ns, &worker("arith", 1), 0, &artifact.to_string()).await?;
            chaos.kill_somewhere().await?;
            let pod = eval_pod(&client, &ns, "arith").await?;
            chaos.kill_somewhere().await?;
            exit_pod(
                &client,
                &ns,
                &pod.name_any(),
                0,
                &report(&sha(n), Some(accuracy), 0.1),
            )
            .await?;
            chaos.kill_somewhere().await?;
            let expect = if n == 1 {
                GatePhase::Passed
            } else {
                GatePhase::Failed
            };
            let gates: Api<EvalGate> = Api::namespaced(client.clone(), &ns);
            wait_for(&gates, "arith", TIMEOUT, |g: Option<&EvalGate>| {
                g.and_then(|g| g.status.as_ref()).is_some_and(|s| {
                    s.phase == Some(expect)
                        && s.candidate.as_ref().and_then(|c| c.sha256.as_deref())
                            == Some(sha(n).as_str())
                })
            })
            .await?;
            chaos.kill_somewhere().await?;
            server_serving(&client, &ns, "arith", ServerPhase::Ready, &sha(1)).await?;
        }
        Ok(())
    }
    .await;
    for r in &recorders {
        r.abort();
    }
    let outcome = outcome.with_context(|| format!("seed {seed}, kills (ms) {:?}", chaos.kills));
    outcome?;
    // Exactly one evaluation pod per candidate, each created once, never a second try.
    let created = created.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let evals: Vec<_> = created
        .keys()
        .filter(|k| k.starts_with("arith-eval-"))
        .collect();
    ensure!(evals.len() == 2, "evaluation pods: {evals:?}");
    for name in &evals {
        ensure!(name.ends_with("-t1"), "a retry without a lost pod: {name}");
        ensure!(
            created[*name].len() == 1,
            "{name} created {} times",
            created[*name].len()
        );
    }
    // Exactly one promotion, and no model that did not pass was ever in a pod template.
    let gate: EvalGate = Api::namespaced(client.clone(), &ns).get("arith").await?;
    let history: Vec<_> = gate
        .status
        .context("status")?
        .history
        .iter()
        .map(|r| (r.candidate.sha256.clone().unwrap_or_default(), r.phase))
        .collect();
    ensure!(
        history == [(sha(1), GatePhase::Passed), (sha(2), GatePhase::Failed)],
        "{history:?}"
    );
    let served = served.lock().unwrap_or_else(|p| p.into_inner()).clone();
    ensure!(served == BTreeSet::from([sha(1)]), "served: {served:?}");
    println!(
        "{} operator kills at {:?} ms; one evaluation per candidate, one promotion",
        chaos.kills.len(),
        chaos.kills
    );
    Ok(())
}

/// `manifests/examples/pipeline-smollm2.yaml` wired end to end (the runtime's part played as
/// above): the dpo job waits for the sft job's model (Pending, `BaseModelReady=False`), then
/// records it in `status.baseModel` and its workers read it as their `baseModel`; the gate's
/// evaluation ranks preference pairs against that model (`--reference`) and compares with the
/// sft model (`--baseline`, noRegression on a TrainingJob); the server serves the dpo model.
#[tokio::test]
#[ignore = "needs the cluster tier: e2e/cluster/up.sh"]
async fn kwok_smollm2_pipeline_dpo_waits_for_its_sft_base_and_the_gate_ranks_against_it()
-> Result<()> {
    let client = client().await?;
    let (namespace, _operator) = restricted_namespace(&client, "smollm2").await?;
    let ns = namespace.name();
    let yaml = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../manifests/examples/pipeline-smollm2.yaml"),
    )?;
    apply(ns, &yaml).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);

    // The dpo job waits for its base, says why, and runs nothing.
    let waiting = wait_for(&jobs, "smollm2-dpo", TIMEOUT, |j: Option<&TrainingJob>| {
        j.and_then(|j| j.status.as_ref()).is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "BaseModelReady" && c.status == "False")
        })
    })
    .await?
    .context("dpo job")?;
    let why = &waiting.status.as_ref().context("status")?.conditions;
    ensure!(
        why.iter()
            .any(|c| c.reason == "WaitingForTrainingJob" && c.message.contains("smollm2-sft")),
        "{why:?}"
    );
    running_worker(&pods, "smollm2-sft", 1, TIMEOUT).await?;
    ensure!(
        pods.get_opt(&worker("smollm2-dpo", 1)).await?.is_none(),
        "the dpo job started before its base model existed"
    );

    let sft = json!({"artifact": {"uri": "pvc://anneal-models/smollm2-sft", "sha256": sha(1)}});
    exit_pod(&client, ns, &worker("smollm2-sft", 1), 0, &sft.to_string()).await?;
    running_worker(&pods, "smollm2-dpo", 1, TIMEOUT).await?;
    let dpo = jobs.get("smollm2-dpo").await?;
    let recorded = dpo
        .status
        .as_ref()
        .and_then(|s| s.base_model.clone())
        .context("status.baseModel")?;
    ensure!(
        recorded.uri == "pvc://anneal-models/smollm2-sft" && recorded.sha256 == sha(1),
        "{recorded:?}"
    );
    ensure!(
        dpo.spec.model.base_model.is_none(),
        "the operator wrote the user's spec"
    );
    // The workers' configuration names the sft model as the base.
    let cm = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels("anneal.dev/trainingjob=smollm2-dpo"))
        .await?;
    let config = cm
        .items
        .iter()
        .flat_map(|c| c.data.iter().flat_map(|d| d.values()))
        .find(|v| v.contains("baseModel"))
        .context("the dpo job's configuration")?;
    ensure!(
        config.contains("pvc://anneal-models/smollm2-sft") && !config.contains("fromTrainingJob"),
        "{config}"
    );

    let dpo_artifact =
        json!({"artifact": {"uri": "pvc://anneal-models/smollm2-dpo", "sha256": sha(2)}});
    exit_pod(
        &client,
        ns,
        &worker("smollm2-dpo", 1),
        0,
        &dpo_artifact.to_string(),
    )
    .await?;
    let pod = eval_pod(&client, ns, "smollm2").await?;
    let args = pod.spec.as_ref().context("spec")?.containers[0]
        .args
        .clone()
        .unwrap_or_default();
    for (flag, value) in [
        ("--model", "pvc://anneal-models/smollm2-dpo"),
        ("--reference", "pvc://anneal-models/smollm2-sft"),
        ("--baseline", "pvc://anneal-models/smollm2-sft"),
    ] {
        ensure!(
            args.windows(2).any(|w| w == [flag, value]),
            "{flag} {value} missing: {args:?}"
        );
    }
    let baseline = json!({"model_sha256": sha(1), "examples": 30, "loss": 0.5,
        "exact_match": 0.5, "preference_accuracy": 0.0});
    let report = json!({"event": "eval", "model_sha256": sha(2), "examples": 30, "loss": 0.4,
        "exact_match": 0.55, "preference_accuracy": 0.96, "baseline": baseline});
    exit_pod(&client, ns, &pod.name_any(), 0, &report.to_string()).await?;
    let gate = gate_decided(&client, ns, "smollm2", GatePhase::Passed).await?;
    let results = gate.status.context("status")?.results;
    ensure!(
        results.iter().any(
            |r| r.metric == anneal_crds::evalgate::Metric::PreferenceAccuracy
                && r.value == Some(0.96)
                && r.passed
        ),
        "{results:?}"
    );
    server_serving(&client, ns, "smollm2-tuned", ServerPhase::Ready, &sha(2)).await?;
    Ok(())
}
