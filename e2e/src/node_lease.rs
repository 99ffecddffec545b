//! A node's Lease renewed by the test itself, at the interval a stock kubelet uses, instead of by
//! kwok (which renews every 2.5 s on the test cluster: `--node-lease-duration-seconds 10`).
//!
//! kwok renews only a Lease that it holds or that has expired, and simulates only the nodes whose
//! Lease it holds. [`KubeletLease::take_over`] makes the node's Lease held by the node itself
//! (holder identity = node name, 40 s duration, as a kubelet writes it) and renews `renewTime`
//! with a real PATCH every interval, so kwok leaves it alone; [`KubeletLease::hand_back`] (or the
//! drop) clears the holder, and kwok takes the Lease and the node over again at its next try.
//! While the test holds the Lease, kwok leaves the node's pods as they are.
//!
//! The test cluster's kube-controller-manager has `--node-monitor-grace-period 10s` (stock: 50 s),
//! which a 10 s renewal meets only just: it would mark the node Unknown now and then, which a stock
//! cluster never does. So the node's `Ready` heartbeat (`lastHeartbeatTime`, the controller's other
//! liveness signal) is also refreshed, half an interval after each renewal. The operator judges
//! the Lease by its `renewTime` and the Ready condition by its status, never by that heartbeat.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::task::JoinHandle;

use crate::cluster::{kubeconfig_path, tools_bin};
use crate::tools::run_cleanup;

/// Where node Leases live.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
/// How long a stock kubelet's Lease lasts; it renews at a quarter of it.
pub const KUBELET_LEASE_DURATION_SECONDS: i32 = 40;
/// How often a stock kubelet renews its Lease.
pub const KUBELET_RENEW_INTERVAL: Duration = Duration::from_secs(10);

const FIELD_MANAGER: &str = "anneal-e2e-kubelet";

/// The node's Lease, held and renewed by this test; handed back to kwok when dropped.
pub struct KubeletLease {
    node: String,
    client: Client,
    task: Option<JoinHandle<()>>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl KubeletLease {
    /// Takes the Lease of `node` over from kwok and renews it every `interval` from now on.
    pub async fn take_over(client: &Client, node: &str, interval: Duration) -> Result<Self> {
        let leases: Api<Lease> = Api::namespaced(client.clone(), NODE_LEASE_NAMESPACE);
        // A merge patch, not an update: it lands whatever kwok wrote last, and kwok's next update
        // (based on what it read before) conflicts, after which kwok sees another holder.
        let take = json!({"spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": KUBELET_LEASE_DURATION_SECONDS,
            "renewTime": now(),
        }});
        leases
            .patch(node, &PatchParams::default(), &Patch::Merge(&take))
            .await
            .with_context(|| format!("taking over the Lease of node {node}"))?;
        let errors = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(renew(
            client.clone(),
            node.to_owned(),
            interval,
            errors.clone(),
        ));
        Ok(Self {
            node: node.to_owned(),
            client: client.clone(),
            task: Some(task),
            errors,
        })
    }

    /// The requests of the renewal loop that failed so far (none, on a healthy cluster).
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Stops renewing and gives the Lease back to kwok, which renews it (and simulates the node)
    /// again within its renew interval.
    pub async fn hand_back(mut self) -> Result<()> {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), NODE_LEASE_NAMESPACE);
        leases
            .patch(
                &self.node,
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"holderIdentity": null}})),
            )
            .await
            .with_context(|| format!("handing the Lease of node {} back to kwok", self.node))?;
        Ok(())
    }
}

impl std::fmt::Debug for KubeletLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletLease")
            .field("node", &self.node)
            .field("renewing", &self.task.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for KubeletLease {
    /// A test that fails hands the Lease back too, synchronously (the drop may run while a panic
    /// unwinds, outside any async runtime).
    fn drop(&mut self) {
        let Some(task) = self.task.take() else {
            return;
        };
        task.abort();
        let (Ok(bin), Ok(kubeconfig)) = (tools_bin(), kubeconfig_path()) else {
            eprintln!(
                "cannot hand the Lease of {} back: cluster paths unknown",
                self.node
            );
            return;
        };
        let mut command = std::process::Command::new(bin.join("kubectl"));
        command.arg("--kubeconfig").arg(kubeconfig).args([
            "patch",
            "lease",
            &self.node,
            "--namespace",
            NODE_LEASE_NAMESPACE,
            "--type",
            "merge",
            "--patch",
            r#"{"spec":{"holderIdentity":null}}"#,
        ]);
        run_cleanup(command, &format!("handing the Lease of {} back", self.node));
    }
}

fn now() -> serde_json::Value {
    serde_json::to_value(MicroTime(Timestamp::now())).unwrap_or_default()
}

/// Renews the Lease every `interval` and, half an interval later each time, the node's Ready
/// heartbeat (see the module doc). A failed request is recorded and the loop goes on, as a
/// kubelet's would.
async fn renew(client: Client, node: String, interval: Duration, errors: Arc<Mutex<Vec<String>>>) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NODE_LEASE_NAMESPACE);
    let nodes: Api<Node> = Api::all(client);
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    let record = |what: &str, e: kube::Error| {
        if let Ok(mut errors) = errors.lock() {
            errors.push(format!("{what} at {}: {e}", Timestamp::now()));
        }
    };
    let start = tokio::time::Instant::now();
    let mut renewals = tokio::time::interval_at(start + interval, interval);
    let mut heartbeats = tokio::time::interval_at(start + interval / 2, interval);
    for timer in [&mut renewals, &mut heartbeats] {
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            _ = renewals.tick() => {
                let patch = json!({"spec": {"renewTime": now()}});
                if let Err(e) = leases.patch(&node, &params, &Patch::Merge(&patch)).await {
                    record("renewing the Lease", e);
                }
            }
            _ = heartbeats.tick() => {
                let patch = json!({"status": {"conditions": [
                    {"type": "Ready", "lastHeartbeatTime": Time(Timestamp::now())},
                ]}});
                if let Err(e) = nodes.patch_status(&node, &params, &Patch::Strategic(&patch)).await {
                    record("the node's Ready heartbeat", e);
                }
            }
        }
    }
}
