//! Pure builders of what a ModelServer owns: the Deployment running `anneal-runtime serve`, its
//! Service, a PodDisruptionBudget when it has more than one replica, and a ServiceAccount
//! without API rights.

use anneal_crds::ModelServer;
use anneal_crds::evalgate::ResolvedModel;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::config::OperatorConfig;
use crate::labels::{MODEL_SHA256, MODEL_URI, modelserver_labels};
use crate::pod;
use crate::reconcile::Error;

/// Name of the serving container.
pub const CONTAINER: &str = "server";
/// Port the server listens on (the OpenAI-compatible API, `/metrics`, the probes).
pub const HTTP_PORT: u16 = 8080;
/// Port of the Service.
pub const SERVICE_PORT: u16 = 80;
/// Where the API key Secret is mounted.
pub const API_KEY_MOUNT: &str = "/etc/anneal/api-key";
/// Seconds between SIGTERM and closing the listener: endpoints drop the pod first.
pub const DRAIN_SECONDS: u32 = 5;

/// Name of the Deployment, Service, PodDisruptionBudget and ServiceAccount of `server`.
pub fn child_name(server: &str) -> String {
    server.to_string()
}

/// Name of the ServiceAccount of `server`'s pods.
pub fn serve_account(server: &str) -> String {
    format!("{server}-serve")
}

fn owned_meta(server: &ModelServer, name: String) -> Result<ObjectMeta, Error> {
    let owner = server
        .controller_owner_ref(&())
        .ok_or_else(|| Error::Build("ModelServer has no uid".into()))?;
    Ok(ObjectMeta {
        name: Some(name),
        namespace: server.namespace(),
        labels: Some(modelserver_labels(&server.name_any())),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    })
}

/// The in-cluster base URL of the API.
pub fn endpoint(server: &ModelServer) -> String {
    format!(
        "http://{}.{}.svc:{SERVICE_PORT}/v1",
        child_name(&server.name_any()),
        server.namespace().unwrap_or_default()
    )
}

/// The pods' ServiceAccount: no API rights, no token mounted.
pub fn service_account(server: &ModelServer) -> Result<ServiceAccount, Error> {
    Ok(ServiceAccount {
        metadata: owned_meta(server, serve_account(&server.name_any()))?,
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    })
}

/// The Deployment serving `model`: a rolling update that keeps every old pod until a new one is
/// Ready, probes on the server's own endpoints, and the model pinned by digest.
pub fn deployment(
    server: &ModelServer,
    model: &ResolvedModel,
    config: &OperatorConfig,
) -> Result<Deployment, Error> {
    let name = server.name_any();
    let spec = &server.spec;
    let res = &spec.resources;
    let engine = &spec.engine;
    let selector = modelserver_labels(&name);
    let mut annotations = serde_json::Map::new();
    annotations.insert(MODEL_URI.into(), json!(model.uri));
    if let Some(sha) = &model.sha256 {
        annotations.insert(MODEL_SHA256.into(), json!(sha));
    }
    let mut args = vec![
        "serve".to_string(),
        "--model".into(),
        model.uri.clone(),
        "--listen".into(),
        format!("0.0.0.0:{HTTP_PORT}"),
        "--device".into(),
        "auto".into(),
        "--max-batch".into(),
        engine.max_batch_size.to_string(),
        "--max-queue".into(),
        engine
            .max_concurrent_requests
            .saturating_sub(engine.max_batch_size)
            .to_string(),
        "--max-seq-len".into(),
        engine.context_length.to_string(),
        "--max-tokens".into(),
        engine.max_tokens.to_string(),
        "--drain-delay-secs".into(),
        DRAIN_SECONDS.to_string(),
        // Clients name the model by the ModelServer's name (OpenAI's `model`).
        "--served-model-name".into(),
        name.clone(),
        "--response-cache-ttl-secs".into(),
        engine.response_cache.ttl_seconds.to_string(),
        "--response-cache-max-bytes".into(),
        (u64::from(engine.response_cache.max_mebibytes) << 20).to_string(),
    ];
    if let Some(sha) = &model.sha256 {
        args.extend(["--model-sha256".into(), sha.clone()]);
    }
    let (claim_volumes, claim_mounts) = pod::claim_volumes([model.uri.as_str()], []);
    let mut volumes = vec![json!({"name": "tmp", "emptyDir": {}})];
    volumes.extend(claim_volumes);
    let mut mounts = vec![json!({"name": "tmp", "mountPath": "/tmp"})];
    mounts.extend(claim_mounts);
    if let Some(key) = &spec.api_key_secret {
        args.extend([
            "--api-key-file".into(),
            format!("{API_KEY_MOUNT}/{}", key.key),
        ]);
        volumes.push(json!({"name": "api-key", "secret": {"secretName": key.name, "items": [{"key": key.key, "path": key.key}]}}));
        mounts.push(json!({"name": "api-key", "mountPath": API_KEY_MOUNT, "readOnly": true}));
    }
    let probe = |path: &str, period: u32, failures: u32| json!({"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "failureThreshold": failures, "timeoutSeconds": 2});
    // Loading a model can take long; liveness starts only once the process answers at all.
    let startup_failures = (spec.rollback_deadline_seconds / 5).max(1);
    let deployment = json!({
        "metadata": owned_meta(server, child_name(&name))?,
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "progressDeadlineSeconds": spec.rollback_deadline_seconds,
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {"labels": selector, "annotations": annotations},
                "spec": {
                    "serviceAccountName": serve_account(&name),
                    "automountServiceAccountToken": false,
                    "affinity": pod::affinity(res, &[], config),
                    "nodeSelector": res.node_selector,
                    "tolerations": pod::tolerations(res, config),
                    "securityContext": pod::pod_security_context(),
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{
                        "name": CONTAINER,
                        "image": spec.image.clone().unwrap_or_else(|| config.runtime_image.clone()),
                        "args": args,
                        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
                        "resources": pod::resources(res),
                        "startupProbe": probe("/healthz", 5, startup_failures),
                        "readinessProbe": probe("/readyz", 5, 2),
                        "livenessProbe": probe("/healthz", 10, 3),
                        "securityContext": pod::container_security_context(),
                        "volumeMounts": mounts,
                    }],
                    "volumes": volumes,
                },
            },
        },
    });
    Ok(serde_json::from_value(deployment)?)
}

/// The Service in front of the pods (port `http`, which also serves `/metrics`).
pub fn service(server: &ModelServer) -> Result<Service, Error> {
    let name = server.name_any();
    Ok(serde_json::from_value(json!({
        "metadata": owned_meta(server, child_name(&name))?,
        "spec": {
            "selector": modelserver_labels(&name),
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }))?)
}

/// At most one pod of several down for a voluntary disruption (a node drain).
pub fn disruption_budget(server: &ModelServer) -> Result<PodDisruptionBudget, Error> {
    let name = server.name_any();
    Ok(serde_json::from_value(json!({
        "metadata": owned_meta(server, child_name(&name))?,
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": modelserver_labels(&name)},
        },
    }))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> ModelServer {
        let text = include_str!("../../../manifests/examples/modelserver.yaml");
        let mut server: ModelServer = serde_yaml::from_str(text).expect("example parses");
        server.metadata.namespace = Some("ml".into());
        server.metadata.uid = Some("uid-1".into());
        server
    }

    #[test]
    fn deployment_pins_the_model_by_digest_and_keeps_old_pods_until_new_ones_are_ready() {
        let model = ResolvedModel {
            source: "trainingjob/arith".into(),
            uri: "pvc://anneal-models/arith".into(),
            sha256: Some("cd".repeat(32)),
            gate: Some("arith".into()),
            reference: None,
        };
        let d = serde_json::to_value(
            deployment(&server(), &model, &OperatorConfig::default()).unwrap(),
        )
        .unwrap();
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
        let t = &d["spec"]["template"];
        assert_eq!(t["metadata"]["annotations"][MODEL_SHA256], "cd".repeat(32));
        let c = &t["spec"]["containers"][0];
        let args: Vec<String> = serde_json::from_value(c["args"].clone()).unwrap();
        let sha = args.iter().position(|a| a == "--model-sha256").unwrap();
        assert_eq!(args[sha + 1], "cd".repeat(32));
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(t["spec"]["automountServiceAccountToken"], false);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        let mount = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == "/mnt/pvc/anneal-models")
            .cloned()
            .unwrap();
        assert_eq!(mount["readOnly"], true);
    }
}
