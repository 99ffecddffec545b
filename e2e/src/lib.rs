//! Test support for anneal's end-to-end tests against the local cluster of `e2e/cluster/`
//! (real etcd, kube-apiserver, kube-controller-manager, kube-scheduler; nodes and pods simulated by kwok).
//!
//! - [`cluster`]: where the cluster is (kubeconfig, pinned tools) and a [`kube::Client`] for it;
//! - [`crds`]: the project's CRDs installed from `manifests/crds/`;
//! - [`tools`]: the pinned `kubectl` and `helm`, pointed at the cluster;
//! - [`wait`]: waiting on a condition of an object, with a deadline (a watch, never a blind sleep);
//! - [`namespace`]: a temporary namespace per test, deleted when the test ends, pass or fail;
//! - [`faults`]: dead nodes, unhealthy GPUs, container exits, as `e2e/cluster/fault.sh` does them;
//! - [`node_lease`]: a node's Lease renewed by the test at a stock kubelet's interval instead of by kwok;
//! - [`operator`]: the real operator binary as a process, scoped to a test namespace;
//! - [`trainingjob`]: the example TrainingJob, a restricted namespace, waiting for workers;
//! - [`nodes`]: the node tier's real nodes, the operator installed by Helm, volumes every real node mounts;
//! - [`real_failover`]: a TrainingJob failed over between real nodes (partitioned node, device fault), timed.
//!
//! Tests that need the cluster are marked `#[ignore = "cluster tier: needs e2e/cluster/up.sh"]` and run with
//! `cargo test -p anneal-e2e -- --include-ignored` once `e2e/cluster/up.sh` has brought the cluster up. Tests of
//! the node tier (real containerd + kubelet nodes, `e2e/cluster/nodes-up.sh`) are in `tests/cluster_node_*.rs`,
//! named `real_node_*`, and marked `#[ignore = "node tier: ..."]`.
//!
//! Errors are `anyhow` with context: this crate only serves tests, whose failures a person reads.

pub mod cluster;
pub mod crds;
pub mod faults;
pub mod namespace;
pub mod node_lease;
pub mod nodes;
pub mod operator;
pub mod real_failover;
pub mod tools;
pub mod trainingjob;
pub mod wait;

pub use cluster::client;
pub use namespace::TestNamespace;
