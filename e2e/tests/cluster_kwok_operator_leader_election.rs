//! Two operator replicas with leader election, as the chart runs them, against the real API
//! server; nodes simulated by kwok. A replica that gets SIGTERM hands the lease over in seconds,
//! and a replica frozen past its renew deadline (SIGSTOP: a partition or a long pause) writes
//! nothing once it wakes, so two leaders never write in the same window.
//!
//! Cluster tier: `e2e/cluster/up.sh && cargo test -p anneal-e2e -- --include-ignored`.

use std::time::{Duration, Instant};

use anneal_crds::TrainingJob;
use anneal_e2e::client;
use anneal_e2e::operator::OperatorProcess;
use anneal_e2e::trainingjob::{TIMEOUT, example_job, restricted_namespace_only, running_worker};
use anneal_e2e::wait::poll_until;
use anyhow::{Context, Result, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};

const LEASE: &str = "anneal-operator";

/// The holder of the operator's Lease in `ns`, if any.
async fn holder(client: &Client, ns: &str) -> Result<Option<String>> {
    let lease = Api::<Lease>::namespaced(client.clone(), ns)
        .get_opt(LEASE)
        .await?;
    Ok(lease
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty()))
}

/// Starts replicas `a` and `b` for `ns` (the Lease lives in `ns` too); returns them with the
/// leader first.
async fn two_replicas(
    client: &Client,
    ns: &str,
) -> Result<(OperatorProcess, OperatorProcess, String, String)> {
    let args = ["--leader-elect", "--lease-namespace", ns];
    let a = OperatorProcess::start_as(ns, Some("replica-a"), &args).await?;
    let b = OperatorProcess::start_as(ns, Some("replica-b"), &args).await?;
    let leader = poll_until("a leader", TIMEOUT, Duration::from_millis(100), || async {
        holder(client, ns).await
    })
    .await?;
    Ok(if leader == "replica-a" {
        (a, b, "replica-a".into(), "replica-b".into())
    } else {
        (b, a, "replica-b".into(), "replica-a".into())
    })
}

/// Write lines (`anneal_operator::writes`) in an operator's log.
fn writes_logged(operator: &OperatorProcess) -> Result<usize> {
    let text = std::fs::read_to_string(operator.log_path())
        .with_context(|| format!("reading {}", operator.log_path().display()))?;
    Ok(text
        .lines()
        .filter(|l| l.contains("anneal_operator::writes"))
        .count())
}

/// Waits until `operator` has logged no write for `window`: its reconciles have settled. A process
/// frozen in the middle of one (past its leadership check, before the request) sends that request
/// when it wakes, as any leader-elected client does; what the frozen-leader test asserts is that
/// nothing is decided after the lease was lost, so it freezes an operator at rest.
async fn settled(operator: &OperatorProcess, window: Duration) -> Result<()> {
    let mut last = (writes_logged(operator)?, Instant::now());
    poll_until(
        "the operator's writes to settle",
        TIMEOUT,
        Duration::from_millis(100),
        || {
            let now = writes_logged(operator);
            let result = now.map(|n| {
                if n != last.0 {
                    last = (n, Instant::now());
                }
                (last.1.elapsed() >= window).then_some(())
            });
            async move { result }
        },
    )
    .await
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_sigterm_of_the_leader_hands_over_within_two_seconds_writing_nothing_twice()
-> Result<()> {
    let client = client().await?;
    let namespace = restricted_namespace_only(&client, "op-handover").await?;
    let ns = namespace.name();
    let (mut leader, standby, leader_id, standby_id) = two_replicas(&client, ns).await?;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    jobs.create(&PostParams::default(), &example_job("before")?)
        .await?;
    running_worker(&pods, "before", 1, TIMEOUT).await?;
    ensure!(
        writes_logged(&standby)? == 0,
        "the standby wrote while the other led"
    );

    leader.signal("TERM").await?;
    let sent = Instant::now();
    let took = poll_until(
        "the standby to lead",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || async {
            Ok(
                (holder(&client, ns).await?.as_deref() == Some(standby_id.as_str()))
                    .then(|| sent.elapsed()),
            )
        },
    )
    .await?;
    let status = leader.wait_exit(Duration::from_secs(10)).await?;
    println!(
        "{leader_id} got SIGTERM; {standby_id} led {took:?} later; {leader_id} exited {status}"
    );
    ensure!(status.success(), "a SIGTERM is a clean stop: {status}");
    // On 303cac8 the lease was kept until it expired: 15 s or more.
    ensure!(took <= Duration::from_secs(2), "handover took {took:?}");

    // The new leader acts, and nothing was made twice.
    jobs.create(&PostParams::default(), &example_job("after")?)
        .await?;
    running_worker(&pods, "after", 1, TIMEOUT).await?;
    let listed = pods
        .list(&ListParams::default().labels("anneal.dev/trainingjob=before"))
        .await?;
    ensure!(
        listed.items.len() == 1,
        "the first job has {} pods",
        listed.items.len()
    );
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_leader_frozen_past_its_renew_deadline_writes_nothing_when_it_wakes() -> Result<()> {
    let client = client().await?;
    let namespace = restricted_namespace_only(&client, "op-frozen").await?;
    let ns = namespace.name();
    let (mut frozen, other, frozen_id, other_id) = two_replicas(&client, ns).await?;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    jobs.create(&PostParams::default(), &example_job("first")?)
        .await?;
    running_worker(&pods, "first", 1, TIMEOUT).await?;
    settled(&frozen, Duration::from_secs(1)).await?;

    frozen.signal("STOP").await?;
    let writes_before = writes_logged(&frozen)?;
    let stopped = Instant::now();
    poll_until(
        "the other replica to lead",
        Duration::from_secs(40),
        Duration::from_millis(200),
        || async {
            Ok((holder(&client, ns).await?.as_deref() == Some(other_id.as_str())).then_some(()))
        },
    )
    .await?;
    println!(
        "{other_id} led {:?} after {frozen_id} froze",
        stopped.elapsed()
    );
    // The new leader works: a job created now gets its worker from it.
    jobs.create(&PostParams::default(), &example_job("second")?)
        .await?;
    running_worker(&pods, "second", 1, TIMEOUT).await?;

    // The frozen one wakes with work queued (the second job's events): it must stop, unwritten.
    frozen.signal("CONT").await?;
    let status = frozen.wait_exit(Duration::from_secs(20)).await?;
    ensure!(
        !status.success(),
        "a deposed leader exits non-zero: {status}"
    );
    let writes_after = writes_logged(&frozen)?;
    ensure!(
        writes_after == writes_before,
        "the deposed leader wrote {} time(s) after waking",
        writes_after - writes_before
    );
    let log = std::fs::read_to_string(frozen.log_path())?;
    ensure!(
        log.contains("lost leadership"),
        "no 'lost leadership' in its log"
    );
    for job in ["first", "second"] {
        let listed = pods
            .list(&ListParams::default().labels(&format!("anneal.dev/trainingjob={job}")))
            .await?;
        ensure!(
            listed.items.len() == 1,
            "{job} has {} pods",
            listed.items.len()
        );
    }
    drop(other);
    Ok(())
}
