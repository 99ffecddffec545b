//! Every API call the operator makes, by group, resource and verbs, with the reason: the chart's
//! RBAC must grant exactly these (a test compares them with `charts/anneal`), so that a rule
//! the code no longer needs cannot linger and a call the chart does not allow cannot ship.

/// Calls on one resource.
#[derive(Clone, Copy, Debug)]
pub struct ApiCalls {
    /// API group (`""` for the core group).
    pub group: &'static str,
    /// Resource (with `/subresource`).
    pub resource: &'static str,
    /// Verbs, sorted.
    pub verbs: &'static [&'static str],
    /// Object names, when the calls are limited to some.
    pub names: &'static [&'static str],
    /// Why the operator makes them.
    pub why: &'static str,
}

const fn calls(
    group: &'static str,
    resource: &'static str,
    verbs: &'static [&'static str],
    why: &'static str,
) -> ApiCalls {
    ApiCalls {
        group,
        resource,
        verbs,
        names: &[],
        why,
    }
}

/// Calls in any namespace (the chart's ClusterRole). Server-side apply is authorized as `patch`
/// and, when it creates the object, as `create` too.
pub const CLUSTER_WIDE: &[ApiCalls] = &[
    calls(
        "anneal.dev",
        "trainingjobs",
        &["delete", "get", "list", "watch"],
        "reconcile TrainingJobs; delete one whose ttlSecondsAfterFinished passed; an EvalGate reads its candidate's artifact",
    ),
    calls(
        "anneal.dev",
        "trainingjobs/status",
        &["patch"],
        "write status (server-side apply); never the spec",
    ),
    calls(
        "anneal.dev",
        "evalgates",
        &["get", "list", "watch"],
        "reconcile EvalGates; a ModelServer reads the model its gate promoted",
    ),
    calls(
        "anneal.dev",
        "evalgates/status",
        &["patch"],
        "write the verdict and the promoted model (server-side apply); never the spec",
    ),
    calls(
        "anneal.dev",
        "modelservers",
        &["get", "list", "watch"],
        "reconcile ModelServers; an EvalGate reads the served model it compares with",
    ),
    calls(
        "anneal.dev",
        "modelservers/status",
        &["patch"],
        "write the roll-out, roll-back and current model (server-side apply); never the spec",
    ),
    calls(
        "apps",
        "deployments",
        &["create", "get", "list", "patch", "watch"],
        "each ModelServer's Deployment: apply, repair drift (garbage-collected with its owner)",
    ),
    calls(
        "",
        "services",
        &["create", "delete", "get", "list", "patch", "watch"],
        "each ModelServer's Service and each TrainingJob gang's headless Service: apply, repair drift; a gang's is deleted when its job ends",
    ),
    calls(
        "policy",
        "poddisruptionbudgets",
        &["create", "delete", "get", "list", "patch", "watch"],
        "each ModelServer's PodDisruptionBudget while it has more than one replica",
    ),
    calls(
        "",
        "pods",
        &["create", "delete", "get", "list", "patch", "watch"],
        "worker and evaluation pods: apply, watch, delete on fail-over or when done; list a node's pods to count the GPUs they hold",
    ),
    calls(
        "",
        "serviceaccounts",
        &["create", "delete", "get", "list", "patch", "watch"],
        "ServiceAccounts of workers, evaluation and serving pods: apply, repair drift, delete when a job ends",
    ),
    calls(
        "",
        "configmaps",
        &["create", "delete", "get", "list", "patch", "watch"],
        "each job's configuration: apply, repair drift, delete when the job ends",
    ),
    calls(
        "rbac.authorization.k8s.io",
        "roles",
        &["create", "delete", "get", "list", "patch", "watch"],
        "each job's worker Role (patch of its own status only; the operator holds that right itself)",
    ),
    calls(
        "rbac.authorization.k8s.io",
        "rolebindings",
        &["create", "delete", "get", "list", "patch", "watch"],
        "binds the worker Role to the worker ServiceAccount",
    ),
    calls(
        "",
        "persistentvolumeclaims",
        &["get"],
        "a gang starts only on claims that several nodes can mount (ReadWriteMany, or ReadOnlyMany when read-only)",
    ),
    calls(
        "",
        "nodes",
        &["get", "list", "watch"],
        "node health for fail-over: Ready, GPU taints and conditions, allocatable GPUs",
    ),
    calls(
        "events.k8s.io",
        "events",
        &["create", "patch"],
        "Events explaining each decision",
    ),
    ApiCalls {
        group: "apiextensions.k8s.io",
        resource: "customresourcedefinitions",
        verbs: &["get", "list", "watch"],
        names: &[
            "evalgates.anneal.dev",
            "modelservers.anneal.dev",
            "trainingjobs.anneal.dev",
        ],
        why: "wait at start until anneal's CRDs are Established",
    },
];

/// Calls on node Leases, in `kube-node-lease` only (a Role there).
pub const NODE_LEASES: &[ApiCalls] = &[calls(
    "coordination.k8s.io",
    "leases",
    &["list", "watch"],
    "node heartbeats: a stale Lease means a dead node",
)];

/// Calls on the leader Lease, in the operator's own namespace (a Role there).
pub const LEADER_LEASE: &[ApiCalls] = &[
    calls(
        "coordination.k8s.io",
        "leases",
        &["create"],
        "create the leader Lease (create cannot be limited by name)",
    ),
    ApiCalls {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "update"],
        names: &["anneal-operator"],
        why: "hold, renew and release the leader Lease",
    },
];
