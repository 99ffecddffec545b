//! Pure builders of what a TrainingJob owns: worker pods, their ServiceAccount, Role and
//! RoleBinding, and the ConfigMap holding the training configuration. No client here.

use std::collections::BTreeMap;

use anneal_crds::TrainingJob;
use anneal_crds::contract;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::config::OperatorConfig;
use crate::labels::{ATTEMPT, TRAININGJOB, WORKER, trainingjob_labels};
use crate::pod;

/// Where the checkpoint volume is mounted in a worker.
pub const CHECKPOINT_MOUNT: &str = "/checkpoints";
/// Where the training configuration is mounted in a worker.
pub const CONFIG_MOUNT: &str = "/etc/anneal";
/// Port of the worker's Prometheus `/metrics`.
pub const METRICS_PORT: u16 = 9090;
/// File name of the configuration in the ConfigMap.
pub const CONFIG_FILE: &str = "trainingjob.json";
/// Name of the worker container.
pub const CONTAINER: &str = "trainer";

/// Why a TrainingJob cannot be built into children (it passed the API server, but not this).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The object has no name or namespace (not from the API server).
    #[error("TrainingJob has no {0}")]
    Missing(&'static str),
    /// The spec could not be serialised into the worker configuration.
    #[error("cannot serialise the spec: {0}")]
    Serialise(#[from] serde_json::Error),
}

/// Name of the ServiceAccount, Role and RoleBinding of job `job`.
pub fn trainer_account(job: &str) -> String {
    format!("{job}-trainer")
}

/// Name of the ConfigMap of job `job`.
pub fn config_map_name(job: &str) -> String {
    format!("{job}-config")
}

/// Name of worker `worker` of attempt `attempt`: the attempt is in the name, so that a replacement
/// never collides with a pod still terminating on a dead node.
pub fn worker_name(job: &str, attempt: u32, worker: u32) -> String {
    format!("{job}-a{attempt}-w{worker}")
}

fn owned_meta(job: &TrainingJob, name: String) -> Result<ObjectMeta, BuildError> {
    let owner: OwnerReference = job
        .controller_owner_ref(&())
        .ok_or(BuildError::Missing("uid"))?;
    Ok(ObjectMeta {
        name: Some(name),
        namespace: Some(job.namespace().ok_or(BuildError::Missing("namespace"))?),
        labels: Some(trainingjob_labels(&job.name_any())),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    })
}

/// The workers' ServiceAccount: it exists so that the runtime can report progress.
pub fn service_account(job: &TrainingJob) -> Result<ServiceAccount, BuildError> {
    Ok(ServiceAccount {
        metadata: owned_meta(job, trainer_account(&job.name_any()))?,
        ..ServiceAccount::default()
    })
}

/// The workers' Role: `patch` on this one TrainingJob's status, nothing else.
pub fn role(job: &TrainingJob) -> Result<Role, BuildError> {
    Ok(serde_json::from_value(json!({
        "metadata": owned_meta(job, trainer_account(&job.name_any()))?,
        "rules": [{
            "apiGroups": [anneal_crds::GROUP],
            "resources": ["trainingjobs/status"],
            "resourceNames": [job.name_any()],
            "verbs": ["patch"],
        }],
    }))?)
}

/// Binds the Role to the ServiceAccount.
pub fn role_binding(job: &TrainingJob) -> Result<RoleBinding, BuildError> {
    let name = trainer_account(&job.name_any());
    Ok(serde_json::from_value(json!({
        "metadata": owned_meta(job, name.clone())?,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": job.namespace()}],
    }))?)
}

/// The training configuration, as the spec itself, mounted into every worker.
pub fn config_map(job: &TrainingJob) -> Result<ConfigMap, BuildError> {
    let spec = serde_json::to_string_pretty(&job.spec)?;
    Ok(ConfigMap {
        metadata: owned_meta(job, config_map_name(&job.name_any()))?,
        data: Some(BTreeMap::from([(CONFIG_FILE.to_string(), spec)])),
        ..ConfigMap::default()
    })
}

/// The directory of job `namespace/name` (UID `uid`) in its checkpoint claim, below `prefix`.
pub fn checkpoint_sub_path(prefix: &str, namespace: &str, name: &str, uid: &str) -> String {
    let own = format!("{namespace}/{name}/{uid}");
    if prefix.is_empty() {
        own
    } else {
        format!("{prefix}/{own}")
    }
}

/// Worker `worker` of `attempt`, placed on a node of the requested GPU type that this job has not
/// excluded, admitted under the Pod Security "restricted" profile.
pub fn worker_pod(
    job: &TrainingJob,
    attempt: u32,
    worker: u32,
    excluded_nodes: &[String],
    config: &OperatorConfig,
) -> Result<Pod, BuildError> {
    let name = job.name_any();
    let namespace = job.namespace().ok_or(BuildError::Missing("namespace"))?;
    let spec = &job.spec;
    let res = &spec.resources;
    let mut meta = owned_meta(job, worker_name(&name, attempt, worker))?;
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(ATTEMPT.into(), attempt.to_string());
    labels.insert(WORKER.into(), worker.to_string());

    let uid = job.uid().ok_or(BuildError::Missing("uid"))?;
    // Claims named by `pvc://` URIs, mounted where the runtime looks for them; only the output's
    // is writable.
    let inputs = [Some(&spec.dataset.uri), spec.model.base_model.as_ref()];
    let (mut claim_volumes, claim_mounts) = pod::claim_volumes(
        inputs.into_iter().flatten().map(|u| u.as_str()),
        [spec.output.uri.as_str()],
    );
    let (checkpoint_volume, checkpoint_mount) = match spec
        .checkpoint
        .storage
        .as_ref()
        .and_then(|s| s.claim_and_path())
    {
        // Every job has its own directory in a shared claim, keyed by namespace, name and UID:
        // jobs of a sweep never continue or delete each other's checkpoints, and a job created
        // again under a deleted one's name starts fresh.
        Some((claim, path)) => {
            let sub_path = checkpoint_sub_path(path, &namespace, &name, &uid);
            // A pod with two volumes of one claim never starts (the kubelet waits for ever to
            // mount the second): when a data URI names the checkpoint claim too, its volume
            // carries the checkpoints as well, writable (each mount keeps its own readOnly).
            match claim_volumes
                .iter_mut()
                .find(|v| v["persistentVolumeClaim"]["claimName"] == claim)
            {
                Some(shared) => {
                    shared["persistentVolumeClaim"]["readOnly"] = json!(false);
                    (
                        None,
                        json!({"name": shared["name"], "mountPath": CHECKPOINT_MOUNT, "subPath": sub_path}),
                    )
                }
                None => (
                    Some(
                        json!({"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim}}),
                    ),
                    json!({"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT, "subPath": sub_path}),
                ),
            }
        }
        // Without a claim, checkpoints live as long as the pod: the status says so.
        None => (
            Some(json!({"name": "checkpoints", "emptyDir": {}})),
            json!({"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT}),
        ),
    };
    let mut volumes: Vec<Value> = checkpoint_volume.into_iter().collect();
    volumes.extend([
        json!({"name": "config", "configMap": {"name": config_map_name(&name)}}),
        json!({"name": "tmp", "emptyDir": {}}),
    ]);
    volumes.extend(claim_volumes);
    let mut mounts = vec![
        checkpoint_mount,
        json!({"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": true}),
        json!({"name": "tmp", "mountPath": "/tmp"}),
    ];
    mounts.extend(claim_mounts);

    let env = json!([
        {"name": contract::ENV_JOB_NAME, "value": name},
        {"name": contract::ENV_JOB_NAMESPACE, "value": namespace},
        {"name": contract::ENV_JOB_UID, "value": uid},
        {"name": contract::ENV_POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": contract::ENV_ATTEMPT, "value": attempt.to_string()},
        {"name": contract::ENV_CHECKPOINT_DIR, "value": CHECKPOINT_MOUNT},
        {"name": contract::ENV_RANK, "value": worker.to_string()},
        {"name": contract::ENV_WORLD_SIZE, "value": spec.workers.to_string()},
        {"name": contract::ENV_RENDEZVOUS, "value": rendezvous(&name, &namespace, attempt)},
        {"name": "ANNEAL_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        // Prometheus `/metrics` of the run (loss, tokens/s, ...), for a PodMonitor to scrape.
        {"name": "ANNEAL_METRICS_ADDR", "value": format!("0.0.0.0:{METRICS_PORT}")},
    ]);

    let mut affinity = pod::affinity(res, excluded_nodes, config);
    let mut ports =
        vec![json!({"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"})];
    if spec.workers > 1 {
        // One worker of an attempt per node: a node lost takes one worker, not the gang's
        // bandwidth or several ranks at once.
        affinity["podAntiAffinity"] = json!({"requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchLabels": {TRAININGJOB: name, ATTEMPT: attempt.to_string()}},
            "topologyKey": "kubernetes.io/hostname",
        }]});
        ports.push(json!({"name": "rendezvous", "containerPort": contract::RENDEZVOUS_PORT, "protocol": "TCP"}));
    }
    let mut pod = json!({
        "metadata": meta,
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": trainer_account(&name),
            "affinity": affinity,
            "nodeSelector": res.node_selector,
            "tolerations": pod::tolerations(res, config),
            "securityContext": pod::pod_security_context(),
            "containers": [{
                "name": CONTAINER,
                "image": spec.image.clone().unwrap_or_else(|| config.runtime_image.clone()),
                "args": ["train", "--job-spec", format!("{CONFIG_MOUNT}/{CONFIG_FILE}"), "--device", "auto"],
                "env": env,
                "ports": ports,
                "resources": pod::resources(res),
                "terminationMessagePath": contract::TERMINATION_LOG,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": pod::container_security_context(),
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        },
    });
    if spec.workers > 1 {
        // `<hostname>.<subdomain>` resolves through the headless Service, before the pod is
        // ready (publishNotReadyAddresses): how rank 0 is found.
        pod["spec"]["hostname"] = json!(worker_hostname(attempt, worker));
        pod["spec"]["subdomain"] = json!(gang_service_name(&name));
    }
    Ok(serde_json::from_value(pod)?)
}

/// Name of the headless Service of job `job`'s gang.
pub fn gang_service_name(job: &str) -> String {
    format!("{job}-workers")
}

/// Host name of a gang worker under the Service: the attempt is in it, so that a worker of the
/// previous attempt still terminating never answers for the new one.
pub fn worker_hostname(attempt: u32, worker: u32) -> String {
    format!("a{attempt}-w{worker}")
}

/// Where rank 0 of `attempt` listens: its DNS name under the gang's Service.
pub fn rendezvous(job: &str, namespace: &str, attempt: u32) -> String {
    format!(
        "{}.{}.{namespace}.svc:{}",
        worker_hostname(attempt, 0),
        gang_service_name(job),
        contract::RENDEZVOUS_PORT
    )
}

/// The claims `pod` mounts, each with whether every mount of it is read-only.
pub fn claims_of(pod: &Pod) -> Vec<(String, bool)> {
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    volumes
        .iter()
        .filter_map(|v| {
            let claim = v.persistent_volume_claim.as_ref()?;
            Some((claim.claim_name.clone(), claim.read_only.unwrap_or(false)))
        })
        .collect()
}

/// The headless Service of a gang (`workers` > 1): DNS names for its workers, published before
/// they are ready, since the workers themselves wait for each other to become ready.
pub fn gang_service(job: &TrainingJob) -> Result<Service, BuildError> {
    let name = job.name_any();
    Ok(serde_json::from_value(json!({
        "metadata": owned_meta(job, gang_service_name(&name))?,
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": true,
            "selector": {TRAININGJOB: name},
            "ports": [{"name": "rendezvous", "port": contract::RENDEZVOUS_PORT, "targetPort": contract::RENDEZVOUS_PORT, "protocol": "TCP"}],
        },
    }))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GPU_PRODUCT_LABEL, GPU_RESOURCE};

    fn job() -> TrainingJob {
        let text = include_str!("../../../manifests/examples/trainingjob.yaml");
        let mut job: TrainingJob = serde_yaml::from_str(text).expect("example parses");
        job.metadata.namespace = Some("ml".into());
        job.metadata.uid = Some("uid-1".into());
        job
    }

    fn json_of(pod: &Pod) -> serde_json::Value {
        serde_json::to_value(pod).unwrap()
    }

    #[test]
    fn worker_is_placed_on_the_requested_gpu_type_away_from_excluded_nodes() {
        let pod = worker_pod(
            &job(),
            3,
            0,
            &["gpu-h100-0".into()],
            &OperatorConfig::default(),
        )
        .unwrap();
        let v = json_of(&pod);
        assert_eq!(v["metadata"]["name"], "arith-a3-w0");
        assert_eq!(v["metadata"]["labels"]["anneal.dev/attempt"], "3");
        let term = &v["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0];
        assert_eq!(term["matchExpressions"][0]["key"], GPU_PRODUCT_LABEL);
        assert!(
            term["matchExpressions"][0]["values"]
                .as_array()
                .unwrap()
                .contains(&json!("NVIDIA-H100-80GB-HBM3"))
        );
        assert_eq!(term["matchFields"][0]["values"], json!(["gpu-h100-0"]));
        assert_eq!(
            v["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
            "1"
        );
        let owner = &v["metadata"]["ownerReferences"][0];
        assert_eq!(
            (owner["kind"].as_str(), owner["controller"].as_bool()),
            (Some("TrainingJob"), Some(true))
        );
    }

    #[test]
    fn a_gang_spreads_over_nodes_finds_rank_0_and_knows_its_place() {
        let mut job = job();
        job.spec.workers = 3;
        let v = json_of(&worker_pod(&job, 4, 2, &[], &OperatorConfig::default()).unwrap());
        assert_eq!(v["metadata"]["name"], "arith-a4-w2");
        let env = &v["spec"]["containers"][0]["env"];
        let value = |k: &str| {
            env.as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == k)
                .map(|e| e["value"].clone())
        };
        assert_eq!(value(contract::ENV_RANK), Some(json!("2")));
        assert_eq!(value(contract::ENV_WORLD_SIZE), Some(json!("3")));
        assert_eq!(
            value(contract::ENV_RENDEZVOUS),
            Some(json!("a4-w0.arith-workers.ml.svc:29500"))
        );
        assert_eq!(v["spec"]["hostname"], "a4-w2");
        assert_eq!(v["spec"]["subdomain"], "arith-workers");
        let anti = &v["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            [0];
        assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
        assert_eq!(
            anti["labelSelector"]["matchLabels"],
            json!({"anneal.dev/trainingjob": "arith", "anneal.dev/attempt": "4"})
        );
        // The GPU placement stays.
        assert!(v["spec"]["affinity"]["nodeAffinity"].is_object());

        let svc = serde_json::to_value(gang_service(&job).unwrap()).unwrap();
        assert_eq!(svc["metadata"]["name"], "arith-workers");
        assert_eq!(svc["spec"]["clusterIP"], "None");
        assert_eq!(svc["spec"]["publishNotReadyAddresses"], true);
        assert_eq!(
            svc["spec"]["selector"],
            json!({"anneal.dev/trainingjob": "arith"})
        );

        // A single worker has none of it.
        let solo =
            json_of(&worker_pod(&self::job(), 1, 0, &[], &OperatorConfig::default()).unwrap());
        assert!(solo["spec"].get("hostname").is_none());
        assert!(solo["spec"]["affinity"].get("podAntiAffinity").is_none());
    }

    #[test]
    fn worker_tolerates_gpu_taint_and_only_briefly_a_dead_node() {
        let v = json_of(&worker_pod(&job(), 1, 0, &[], &OperatorConfig::default()).unwrap());
        let tolerations = v["spec"]["tolerations"].as_array().unwrap();
        assert!(tolerations.iter().any(|t| t["key"] == GPU_RESOURCE));
        let unreachable = tolerations
            .iter()
            .find(|t| t["key"] == "node.kubernetes.io/unreachable")
            .unwrap();
        assert_eq!(unreachable["tolerationSeconds"], 20);
    }

    #[test]
    fn worker_meets_the_restricted_pod_security_profile() {
        let v = json_of(&worker_pod(&job(), 1, 0, &[], &OperatorConfig::default()).unwrap());
        assert_eq!(v["spec"]["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            v["spec"]["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let c = &v["spec"]["containers"][0]["securityContext"];
        assert_eq!(c["allowPrivilegeEscalation"], false);
        assert_eq!(c["capabilities"]["drop"], json!(["ALL"]));
        for volume in v["spec"]["volumes"].as_array().unwrap() {
            assert!(
                volume.get("hostPath").is_none(),
                "restricted forbids hostPath"
            );
        }
    }

    #[test]
    fn worker_gets_the_runtime_contract_env() {
        let v = json_of(&worker_pod(&job(), 2, 0, &[], &OperatorConfig::default()).unwrap());
        let env = v["spec"]["containers"][0]["env"].as_array().unwrap();
        let get = |name: &str| {
            env.iter()
                .find(|e| e["name"] == name)
                .map(|e| e["value"].clone())
        };
        assert_eq!(get(contract::ENV_JOB_NAME), Some(json!("arith")));
        assert_eq!(get(contract::ENV_JOB_NAMESPACE), Some(json!("ml")));
        assert_eq!(get(contract::ENV_ATTEMPT), Some(json!("2")));
        assert_eq!(
            get(contract::ENV_CHECKPOINT_DIR),
            Some(json!(CHECKPOINT_MOUNT))
        );
    }

    #[test]
    fn claims_of_pvc_uris_are_mounted_where_the_runtime_reads_them() {
        let mut job = job();
        job.spec.dataset.uri = anneal_crds::StorageUri("pvc://corpus/arith.jsonl".into());
        let v = json_of(&worker_pod(&job, 1, 0, &[], &OperatorConfig::default()).unwrap());
        let container = &v["spec"]["containers"][0];
        assert_eq!(
            container["args"],
            json!([
                "train",
                "--job-spec",
                "/etc/anneal/trainingjob.json",
                "--device",
                "auto"
            ])
        );
        let mounts = container["volumeMounts"].as_array().unwrap();
        let mount = |path: &str| mounts.iter().find(|m| m["mountPath"] == path).cloned();
        let data = mount("/mnt/pvc/corpus").expect("dataset claim mounted");
        assert_eq!(data["readOnly"], true);
        let models = mount("/mnt/pvc/anneal-models").expect("output claim mounted");
        assert_eq!(models["readOnly"], false);
        let volumes = v["spec"]["volumes"].as_array().unwrap();
        let claim = |name: &str| {
            volumes
                .iter()
                .find(|vol| vol["name"] == name)
                .map(|vol| vol["persistentVolumeClaim"]["claimName"].clone())
        };
        assert_eq!(claim(data["name"].as_str().unwrap()), Some(json!("corpus")));
    }

    #[test]
    fn a_checkpoint_claim_that_is_also_the_output_claim_is_one_writable_volume() {
        let mut job = job();
        job.spec.checkpoint.storage = Some(anneal_crds::trainingjob::CheckpointStorage {
            pvc: Some("anneal-models".into()),
            ..Default::default()
        });
        job.spec.dataset.uri = anneal_crds::StorageUri("pvc://anneal-models/data.jsonl".into());
        let v = json_of(&worker_pod(&job, 1, 0, &[], &OperatorConfig::default()).unwrap());
        let volumes = v["spec"]["volumes"].as_array().unwrap();
        let of_claim: Vec<_> = volumes
            .iter()
            .filter(|vol| vol["persistentVolumeClaim"]["claimName"] == "anneal-models")
            .collect();
        assert_eq!(of_claim.len(), 1, "one volume per claim: {volumes:?}");
        assert_eq!(of_claim[0]["persistentVolumeClaim"]["readOnly"], false);
        let mounts = v["spec"]["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap();
        let checkpoints = mounts
            .iter()
            .find(|m| m["mountPath"] == CHECKPOINT_MOUNT)
            .unwrap();
        assert_eq!(checkpoints["name"], of_claim[0]["name"]);
        assert!(checkpoints["subPath"].as_str().unwrap().contains("uid-1"));
        assert_ne!(checkpoints["readOnly"], true);
        let mut names: Vec<_> = volumes.iter().map(|v| v["name"].clone()).collect();
        names.dedup();
        assert_eq!(names.len(), volumes.len());
    }

    #[test]
    fn jobs_sharing_a_checkpoint_claim_get_directories_of_their_own() {
        let mounted = |job: &TrainingJob| {
            let v = json_of(&worker_pod(job, 1, 0, &[], &OperatorConfig::default()).unwrap());
            let mounts = v["spec"]["containers"][0]["volumeMounts"].clone();
            let mount = mounts
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["mountPath"] == CHECKPOINT_MOUNT)
                .cloned()
                .unwrap();
            let env = v["spec"]["containers"][0]["env"]
                .as_array()
                .unwrap()
                .clone();
            let uid = env
                .iter()
                .find(|e| e["name"] == contract::ENV_JOB_UID)
                .unwrap()["value"]
                .clone();
            (mount["subPath"].clone(), uid)
        };
        let mut a = job();
        a.spec.checkpoint.storage = Some(anneal_crds::trainingjob::CheckpointStorage {
            pvc: Some("sweep".into()),
            uri: None,
        });
        let mut b = a.clone();
        b.metadata.name = Some("arith-lr2".into());
        // Deleted and created again under the same name: another UID, another directory.
        let mut again = a.clone();
        again.metadata.uid = Some("uid-2".into());
        assert_eq!(mounted(&a), (json!("ml/arith/uid-1"), json!("uid-1")));
        assert_eq!(mounted(&b).0, json!("ml/arith-lr2/uid-1"));
        assert_eq!(mounted(&again).0, json!("ml/arith/uid-2"));
        // A pvc:// URI names the claim and a directory in it.
        a.spec.checkpoint.storage = Some(anneal_crds::trainingjob::CheckpointStorage {
            pvc: None,
            uri: Some("pvc://sweep/runs/".into()),
        });
        assert_eq!(mounted(&a).0, json!("runs/ml/arith/uid-1"));
    }

    #[test]
    fn role_allows_only_patching_its_own_status() {
        let role = serde_json::to_value(role(&job()).unwrap()).unwrap();
        assert_eq!(
            role["rules"],
            json!([{"apiGroups": ["anneal.dev"], "resources": ["trainingjobs/status"], "resourceNames": ["arith"], "verbs": ["patch"]}])
        );
        let binding = serde_json::to_value(role_binding(&job()).unwrap()).unwrap();
        assert_eq!(binding["subjects"][0]["name"], "arith-trainer");
        assert_eq!(binding["roleRef"]["name"], "arith-trainer");
    }

    #[test]
    fn any_gpu_type_asks_only_for_some_gpu_product() {
        let mut job = job();
        job.spec.resources.gpu_type = anneal_crds::GpuType::Any;
        let v = json_of(&worker_pod(&job, 1, 0, &[], &OperatorConfig::default()).unwrap());
        let term = &v["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0];
        assert_eq!(term["matchExpressions"][0]["operator"], "Exists");
    }
}
