//! A TrainingJob's life against the real API server and the real operator binary; nodes and pod
//! execution simulated by kwok. The tests play the runtime's part (exit codes through kwok, status
//! patches through the job's ServiceAccount): suspend and resume, what each exit code leads to,
//! `ttlSecondsAfterFinished`, no writes in a steady state, and an operator killed (SIGKILL) at
//! random points of a job's life converging.
//!
//! Cluster tier: `e2e/cluster/up.sh && cargo test -p anneal-e2e -- --include-ignored`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anneal_crds::TrainingJob;
use anneal_crds::contract::{EXIT_DEVICE_FAULT, EXIT_INTERNAL, EXIT_OK, EXIT_USER_ERROR};
use anneal_crds::trainingjob::{FailoverReason, TrainingPhase};
use anneal_e2e::cluster::client_as;
use anneal_e2e::faults::exit_pod;
use anneal_e2e::operator::OperatorProcess;
use anneal_e2e::trainingjob::{
    TIMEOUT, attempt_label, condition, event_seen, example_job, is_live_running, job_where,
    no_workers, phase, restricted_namespace, restricted_namespace_only, running_worker, worker,
    workers_settle,
};
use anneal_e2e::wait::wait_for;
use anneal_e2e::{TestNamespace, client};
use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;

use support::chaos::{Chaos, Rng};

const MANAGED: &str = "app.kubernetes.io/managed-by=anneal-operator";

async fn set_suspend(jobs: &Api<TrainingJob>, name: &str, suspend: bool) -> Result<()> {
    let patch = json!({"spec": {"runPolicy": {"suspend": suspend}}});
    jobs.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("setting suspend={suspend} on {name}"))?;
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_suspend_stops_workers_and_resume_fences_them_with_a_new_attempt() -> Result<()> {
    let client = client().await?;
    let (namespace, _operator) = restricted_namespace(&client, "tj-suspend").await?;
    let ns = namespace.name();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    jobs.create(&PostParams::default(), &example_job("pausable")?)
        .await?;
    running_worker(&pods, "pausable", 1, TIMEOUT).await?;

    set_suspend(&jobs, "pausable", true).await?;
    let job = job_where(&jobs, "pausable", "Suspended", |s| {
        phase(s) == Some(TrainingPhase::Suspended)
    })
    .await?;
    let status = job.status.context("status")?;
    ensure!(status.nodes.is_empty(), "nodes kept: {:?}", status.nodes);
    let suspended = condition(&status, "Suspended").context("Suspended condition")?;
    ensure!(suspended.status == "True", "{suspended:?}");
    no_workers(&pods, "pausable").await?;
    // The checkpoint volume and the runtime's identity stay for the resume.
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .get("pausable-trainer")
        .await
        .context("the trainer ServiceAccount is kept while suspended")?;

    set_suspend(&jobs, "pausable", false).await?;
    running_worker(&pods, "pausable", 2, TIMEOUT).await?;
    let job = job_where(&jobs, "pausable", "Running attempt 2", |s| {
        phase(s) == Some(TrainingPhase::Running) && s.attempt == Some(2)
    })
    .await?;
    let status = job.status.context("status")?;
    ensure!(
        status.restarts.unwrap_or(0) == 0,
        "a resume counted as a restart: {:?}",
        status.restarts
    );
    let resumed = condition(&status, "Suspended").context("Suspended condition")?;
    ensure!(
        resumed.status == "False" && resumed.reason == "Resumed",
        "{resumed:?}"
    );
    workers_settle(&pods, "pausable", 2, 1).await?;
    event_seen(&client, ns, "pausable", "Resumed").await?;
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_exit_codes_succeed_fail_at_once_or_retry_up_to_the_backoff_limit() -> Result<()> {
    let client = client().await?;
    let (namespace, _operator) = restricted_namespace(&client, "tj-exits").await?;
    let ns = namespace.name();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    for name in ["done", "bad-data", "flaky"] {
        let mut job = example_job(name)?;
        job.spec.run_policy.backoff_limit = 1;
        jobs.create(&PostParams::default(), &job).await?;
    }
    for name in ["done", "bad-data", "flaky"] {
        running_worker(&pods, name, 1, TIMEOUT).await?;
    }
    let sha = "9f2c".repeat(16);
    let artifact = json!({"artifact": {"uri": "pvc://anneal-models/done", "sha256": sha}});
    exit_pod(
        &client,
        ns,
        &worker("done", 1),
        EXIT_OK,
        &artifact.to_string(),
    )
    .await?;
    exit_pod(
        &client,
        ns,
        &worker("bad-data", 1),
        EXIT_USER_ERROR,
        "dataset builtin:nope: no such built-in data set",
    )
    .await?;
    exit_pod(&client, ns, &worker("flaky", 1), EXIT_INTERNAL, "panicked").await?;

    // 0: done, with the artifact the runtime reported.
    let done = job_where(&jobs, "done", "Succeeded", |s| {
        phase(s) == Some(TrainingPhase::Succeeded)
    })
    .await?
    .status
    .context("status")?;
    ensure!(done.completion_time.is_some(), "no completionTime");
    let reported = done.artifact.clone().context("no artifact")?;
    ensure!(reported.sha256 == sha && reported.uri == "pvc://anneal-models/done");
    ensure!(condition(&done, "Complete").is_some_and(|c| c.status == "True"));

    // The user-error code: Failed at once, no retry.
    let failed = job_where(&jobs, "bad-data", "Failed", |s| {
        phase(s) == Some(TrainingPhase::Failed)
    })
    .await?
    .status
    .context("status")?;
    let why = condition(&failed, "Failed").context("Failed condition")?;
    ensure!(
        why.reason == "UserError" && why.message.contains("no such built-in data set"),
        "{why:?}"
    );
    ensure!(failed.attempt == Some(1) && failed.restarts.unwrap_or(0) == 0);

    // Another code: retried as attempt 2, then Failed once backoffLimit (1) is used up.
    running_worker(&pods, "flaky", 2, TIMEOUT).await?;
    event_seen(&client, ns, "flaky", "Retrying").await?;
    exit_pod(&client, ns, &worker("flaky", 2), EXIT_INTERNAL, "panicked").await?;
    let flaky = job_where(&jobs, "flaky", "Failed", |s| {
        phase(s) == Some(TrainingPhase::Failed)
    })
    .await?
    .status
    .context("status")?;
    let why = condition(&flaky, "Failed").context("Failed condition")?;
    ensure!(why.reason == "BackoffLimitExceeded", "{why:?}");
    ensure!(flaky.attempt == Some(2) && flaky.restarts == Some(1));

    // Neither failed job started another attempt.
    let listed = pods.list(&ListParams::default()).await?;
    let attempts: BTreeSet<(String, u32)> = listed
        .items
        .iter()
        .filter_map(|p| {
            Some((
                p.labels().get("anneal.dev/trainingjob")?.clone(),
                attempt_label(p)?,
            ))
        })
        .collect();
    ensure!(
        !attempts.contains(&("bad-data".into(), 2)) && !attempts.contains(&("flaky".into(), 3)),
        "a failed job started another attempt: {attempts:?}"
    );
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_finished_job_is_deleted_with_its_children_after_its_ttl() -> Result<()> {
    const TTL: u32 = 3;
    let client = client().await?;
    let (namespace, _operator) = restricted_namespace(&client, "tj-ttl").await?;
    let ns = namespace.name();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut job = example_job("short-lived")?;
    job.spec.run_policy.ttl_seconds_after_finished = Some(TTL);
    jobs.create(&PostParams::default(), &job).await?;
    running_worker(&pods, "short-lived", 1, TIMEOUT).await?;
    exit_pod(&client, ns, &worker("short-lived", 1), EXIT_OK, "").await?;
    let done = job_where(&jobs, "short-lived", "Succeeded", |s| {
        phase(s) == Some(TrainingPhase::Succeeded)
    })
    .await?;
    let completed = done
        .status
        .and_then(|s| s.completion_time)
        .context("no completionTime")?
        .0;
    wait_for(&jobs, "short-lived", TIMEOUT, |j: Option<&TrainingJob>| {
        j.is_none()
    })
    .await
    .context("the finished job was not deleted after its TTL")?;
    // Same machine, same clock: the deletion was seen this long after the recorded completion.
    let after = k8s_openapi::jiff::Timestamp::now()
        .duration_since(completed)
        .as_secs_f64();
    ensure!(
        (f64::from(TTL)..f64::from(TTL) + 15.0).contains(&after),
        "deleted {after:.1} s after completionTime, TTL {TTL} s"
    );
    println!("deleted {after:.1} s after completionTime (TTL {TTL} s)");
    // The garbage collector removes what the job owned.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    wait_for(
        &accounts,
        "short-lived-trainer",
        TIMEOUT,
        |a: Option<&ServiceAccount>| a.is_none(),
    )
    .await
    .context("the job's ServiceAccount outlived it")?;
    no_workers(&pods, "short-lived").await?;
    Ok(())
}

/// `kind/name -> resourceVersion` of every object of `K` that `params` selects.
async fn versions<K>(api: &Api<K>, params: &ListParams) -> Result<BTreeMap<String, String>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let kind = K::kind(&());
    Ok(api
        .list(params)
        .await?
        .items
        .iter()
        .map(|o| {
            (
                format!("{kind}/{}", o.name_any()),
                o.resource_version().unwrap_or_default(),
            )
        })
        .collect())
}

/// Every object of the namespace the operator or a job could write, with its resourceVersion.
async fn snapshot(client: &Client, ns: &str) -> Result<BTreeMap<String, String>> {
    let managed = ListParams::default().labels(MANAGED);
    let all = ListParams::default();
    let mut map = versions(&Api::<TrainingJob>::namespaced(client.clone(), ns), &all).await?;
    map.extend(versions(&Api::<Pod>::namespaced(client.clone(), ns), &all).await?);
    map.extend(
        versions(
            &Api::<ServiceAccount>::namespaced(client.clone(), ns),
            &managed,
        )
        .await?,
    );
    map.extend(versions(&Api::<Role>::namespaced(client.clone(), ns), &managed).await?);
    map.extend(
        versions(
            &Api::<RoleBinding>::namespaced(client.clone(), ns),
            &managed,
        )
        .await?,
    );
    map.extend(versions(&Api::<ConfigMap>::namespaced(client.clone(), ns), &managed).await?);
    map.extend(versions(&Api::<Event>::namespaced(client.clone(), ns), &all).await?);
    Ok(map)
}

/// Watches a quiet job for `window`: the operator's write requests and the objects that changed.
async fn measure_quiet(
    client: &Client,
    ns: &str,
    operator: &OperatorProcess,
    window: Duration,
    label: &str,
) -> Result<()> {
    let writes_before = operator
        .metric_sum("anneal_operator_api_writes_total")
        .await?;
    let reconciles_before = operator
        .metric_sum("anneal_operator_reconciles_total")
        .await?;
    let before = snapshot(client, ns).await?;
    // The measurement window itself: nothing is awaited, the absence of writes is what is measured.
    tokio::time::sleep(window).await;
    let writes = operator
        .metric_sum("anneal_operator_api_writes_total")
        .await?
        - writes_before;
    let reconciles = operator
        .metric_sum("anneal_operator_reconciles_total")
        .await?
        - reconciles_before;
    let after = snapshot(client, ns).await?;
    let changed: Vec<&String> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, _)| k)
        .chain(before.keys().filter(|k| !after.contains_key(*k)))
        .collect();
    let minutes = window.as_secs_f64() / 60.0;
    println!(
        "steady state, {label}: {writes} write requests ({:.1}/min), {} objects changed, {reconciles} reconciles ({:.1}/min) in {:.0} s",
        writes / minutes,
        changed.len(),
        reconciles / minutes,
        window.as_secs_f64()
    );
    ensure!(
        writes == 0.0,
        "{label}: the operator sent {writes} write requests"
    );
    ensure!(changed.is_empty(), "{label}: objects changed: {changed:?}");
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_running_and_finished_jobs_cause_no_writes_in_a_steady_state() -> Result<()> {
    let window = Duration::from_secs(
        std::env::var("ANNEAL_STEADY_WINDOW_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20),
    );
    let client = client().await?;
    let (namespace, operator) = restricted_namespace(&client, "tj-steady").await?;
    let ns = namespace.name();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    jobs.create(&PostParams::default(), &example_job("steady")?)
        .await?;
    running_worker(&pods, "steady", 1, TIMEOUT).await?;
    // The runtime reports progress once, then goes quiet.
    let trainer = client_as(Some(&format!("system:serviceaccount:{ns}:steady-trainer"))).await?;
    let progress = json!({"status": {"progress": {"step": 50, "totalSteps": 600, "stepOfTotal": "50/600", "loss": 1.9}}});
    Api::<TrainingJob>::namespaced(trainer, ns)
        .patch_status("steady", &PatchParams::default(), &Patch::Merge(&progress))
        .await?;
    job_where(&jobs, "steady", "Running with progress", |s| {
        phase(s) == Some(TrainingPhase::Running) && s.progress.is_some()
    })
    .await?;
    // The progress patch itself wakes one reconcile; let it finish: the Running event is the last
    // write of the start-up, and the status no longer changes.
    event_seen(&client, ns, "steady", "Running").await?;
    measure_quiet(&client, ns, &operator, window, "running job").await?;

    exit_pod(&client, ns, &worker("steady", 1), EXIT_OK, "").await?;
    job_where(&jobs, "steady", "Succeeded", |s| {
        phase(s) == Some(TrainingPhase::Succeeded)
    })
    .await?;
    event_seen(&client, ns, "steady", "Completed").await?;
    measure_quiet(&client, ns, &operator, window, "finished job").await?;
    Ok(())
}

/// Checks what the job owns: one of each RBAC object and ConfigMap, every one owned by the job.
async fn owned_once(client: &Client, ns: &str, job: &TrainingJob) -> Result<()> {
    let uid = job.uid().context("uid")?;
    let params =
        ListParams::default().labels(&format!("anneal.dev/trainingjob={}", job.name_any()));
    async fn owners<K>(api: Api<K>, params: &ListParams, uid: &str) -> Result<usize>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    {
        let items = api.list(params).await?.items;
        for item in &items {
            let owned = item
                .owner_references()
                .iter()
                .filter(|o| o.uid == uid && o.controller == Some(true))
                .count();
            ensure!(owned == 1, "{} not owned by the job", item.name_any());
        }
        Ok(items.len())
    }
    let counts = [
        owners(
            Api::<ServiceAccount>::namespaced(client.clone(), ns),
            &params,
            &uid,
        )
        .await?,
        owners(Api::<Role>::namespaced(client.clone(), ns), &params, &uid).await?,
        owners(
            Api::<RoleBinding>::namespaced(client.clone(), ns),
            &params,
            &uid,
        )
        .await?,
        owners(
            Api::<ConfigMap>::namespaced(client.clone(), ns),
            &params,
            &uid,
        )
        .await?,
    ];
    ensure!(
        counts == [1, 1, 1, 1],
        "ServiceAccount, Role, RoleBinding, ConfigMap: {counts:?}"
    );
    Ok(())
}

async fn chaos_round(
    client: &Client,
    chaos: &mut Chaos,
    name: &str,
    created: &Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>,
) -> Result<()> {
    let ns = chaos.ns.clone();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

    jobs.create(&PostParams::default(), &example_job(name)?)
        .await?;
    chaos.kill_somewhere().await?;
    job_where(&jobs, name, "Running attempt 1", |s| {
        phase(s) == Some(TrainingPhase::Running) && s.attempt == Some(1)
    })
    .await?;
    workers_settle(&pods, name, 1, 1).await?;

    // A device fault: the next attempt runs elsewhere, recorded once.
    exit_pod(
        client,
        &ns,
        &worker(name, 1),
        EXIT_DEVICE_FAULT,
        "CUDA error: unspecified launch failure",
    )
    .await?;
    chaos.kill_somewhere().await?;
    let job = job_where(&jobs, name, "Running attempt 2", |s| {
        phase(s) == Some(TrainingPhase::Running) && s.attempt == Some(2)
    })
    .await?;
    workers_settle(&pods, name, 2, 1).await?;
    let status = job.status.clone().context("status")?;
    ensure!(
        status.restarts == Some(1) && status.failovers.len() == 1,
        "restarts {:?}, failovers {:?}",
        status.restarts,
        status.failovers
    );
    ensure!(status.failovers[0].reason == FailoverReason::DeviceFault);
    owned_once(client, &ns, &job).await?;

    // Suspend, then resume as attempt 3.
    set_suspend(&jobs, name, true).await?;
    chaos.kill_somewhere().await?;
    job_where(&jobs, name, "Suspended", |s| {
        phase(s) == Some(TrainingPhase::Suspended)
    })
    .await?;
    no_workers(&pods, name).await?;
    set_suspend(&jobs, name, false).await?;
    chaos.kill_somewhere().await?;
    let job = job_where(&jobs, name, "Running attempt 3", |s| {
        phase(s) == Some(TrainingPhase::Running) && s.attempt == Some(3)
    })
    .await?;
    workers_settle(&pods, name, 3, 1).await?;
    let status = job.status.clone().context("status")?;
    ensure!(
        status.restarts == Some(1),
        "restarts {:?} after a resume",
        status.restarts
    );
    let failover = &status.failovers[0];
    ensure!(
        failover.recovered_at.is_some(),
        "the fail-over never recovered: {failover:?}"
    );

    // Done.
    exit_pod(client, &ns, &worker(name, 3), EXIT_OK, "").await?;
    chaos.kill_somewhere().await?;
    let job = job_where(&jobs, name, "Succeeded", |s| {
        phase(s) == Some(TrainingPhase::Succeeded)
    })
    .await?;
    let status = job.status.clone().context("status")?;
    ensure!(status.attempt == Some(3) && status.restarts == Some(1));
    let listed = pods
        .list(&ListParams::default().labels(&format!("anneal.dev/trainingjob={name}")))
        .await?;
    ensure!(
        !listed.items.iter().any(is_live_running),
        "a worker still runs after Succeeded"
    );

    // Each worker was created exactly once: no duplicate from a replayed decision.
    let created = created.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for attempt in 1..=3 {
        let pod = worker(name, attempt);
        let uids = created.get(&pod).map_or(0, BTreeSet::len);
        ensure!(uids == 1, "{pod} was created {uids} times");
    }
    let extra: Vec<&String> = created
        .keys()
        .filter(|k| k.starts_with(&format!("{name}-")))
        .filter(|k| !(1..=3).any(|a| **k == worker(name, a)))
        .collect();
    ensure!(extra.is_empty(), "unexpected pods: {extra:?}");
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_operator_sigkilled_at_random_points_converges_without_duplicates() -> Result<()> {
    let seed = support::chaos::seed();
    let rounds: usize = std::env::var("ANNEAL_CHAOS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    println!("chaos seed {seed} (replay with ANNEAL_CHAOS_SEED={seed}), {rounds} rounds");
    let client = client().await?;
    let namespace: TestNamespace = restricted_namespace_only(&client, "tj-chaos").await?;
    let ns = namespace.name().to_string();

    // Every pod UID ever created in the namespace, by pod name.
    let created: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>> = Arc::default();
    let recorder = {
        let created = created.clone();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        tokio::spawn(async move {
            let mut stream =
                std::pin::pin!(watcher(pods, watcher::Config::default()).applied_objects());
            while let Some(Ok(pod)) = stream.next().await {
                if let Some(uid) = pod.uid() {
                    created
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(pod.name_any())
                        .or_default()
                        .insert(uid);
                }
            }
        })
    };

    let mut chaos = Chaos {
        ns: ns.clone(),
        operator: Some(OperatorProcess::start(&ns).await?),
        rng: Rng(seed),
        kills: Vec::new(),
    };
    let mut outcome = Ok(());
    for round in 0..rounds {
        let name = format!("chaos-{round}");
        if let Err(err) = chaos_round(&client, &mut chaos, &name, &created).await {
            outcome = Err(err.context(format!(
                "round {round}, seed {seed}, kills (ms) {:?}",
                chaos.kills
            )));
            break;
        }
    }
    recorder.abort();
    if outcome.is_ok() {
        println!(
            "{} operator kills at {:?} ms after an action; every round converged",
            chaos.kills.len(),
            chaos.kills
        );
    }
    match outcome {
        Ok(()) => Ok(()),
        Err(err) => bail!("{err:#}"),
    }
}
