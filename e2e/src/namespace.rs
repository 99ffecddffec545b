//! A temporary namespace per test: created with a unique name, ready for pods, deleted when the test ends
//! (pass or fail). Set `ANNEAL_E2E_KEEP_NAMESPACES=1` to keep them for a post-mortem.

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::cluster::{kubeconfig_path, tools_bin};
use crate::tools::run_cleanup;
use crate::wait::wait_for;

/// Label on every test namespace, so leftovers are easy to find: `kubectl get ns -l anneal.dev/e2e`.
pub const TEST_NAMESPACE_LABEL: &str = "anneal.dev/e2e";

/// A namespace that lives as long as the value; dropping it deletes the namespace (without waiting).
#[derive(Debug)]
pub struct TestNamespace {
    name: String,
}

impl TestNamespace {
    /// Creates `e2e-<test>-<random>` and waits until pods can be created in it (its default
    /// ServiceAccount exists).
    pub async fn create(client: &Client, test: &str) -> Result<Self> {
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let wanted = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("e2e-{test}-")),
                labels: Some([(TEST_NAMESPACE_LABEL.to_owned(), test.to_owned())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let created = namespaces
            .create(&PostParams::default(), &wanted)
            .await
            .with_context(|| format!("creating a namespace for test {test}"))?;
        let name = created
            .metadata
            .name
            .context("the API server returned a namespace without a name")?;
        let namespace = Self { name };
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace.name);
        wait_for(
            &accounts,
            "default",
            Duration::from_secs(30),
            |sa: Option<&ServiceAccount>| sa.is_some(),
        )
        .await
        .context("waiting for the namespace's default ServiceAccount")?;
        Ok(namespace)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestNamespace {
    /// Runs `kubectl delete` synchronously: a drop can happen while a panicking test unwinds, outside any
    /// async runtime.
    fn drop(&mut self) {
        if std::env::var_os("ANNEAL_E2E_KEEP_NAMESPACES").is_some_and(|v| v == "1") {
            eprintln!(
                "keeping test namespace {} (ANNEAL_E2E_KEEP_NAMESPACES=1)",
                self.name
            );
            return;
        }
        let (Ok(bin), Ok(kubeconfig)) = (tools_bin(), kubeconfig_path()) else {
            eprintln!(
                "cannot delete test namespace {}: cluster paths unknown",
                self.name
            );
            return;
        };
        let mut command = std::process::Command::new(bin.join("kubectl"));
        command.arg("--kubeconfig").arg(kubeconfig).args([
            "delete",
            "namespace",
            &self.name,
            "--wait=false",
            "--ignore-not-found",
        ]);
        run_cleanup(command, &format!("deleting test namespace {}", self.name));
    }
}
