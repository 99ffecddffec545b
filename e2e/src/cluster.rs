//! Where the local cluster is: its kubeconfig, its pinned tools, and a client for it.
//!
//! `ANNEAL_KUBECONFIG` and `ANNEAL_TOOLS_BIN` (as exported by `e2e/cluster/env.sh`) win; without them the paths
//! come from `e2e/cluster/paths.sh`, the same place `up.sh` takes them from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow};
use kube::Client;
use kube::config::{Config, KubeConfigOptions, Kubeconfig};

/// `e2e/cluster/`: the scripts, versions file, node and stage definitions of the local cluster.
pub fn cluster_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster")
}

/// The admin kubeconfig of the local cluster.
pub fn kubeconfig_path() -> Result<PathBuf> {
    path_setting("ANNEAL_KUBECONFIG")
}

/// The directory holding the pinned `kubectl`, `helm` and the cluster's components.
pub fn tools_bin() -> Result<PathBuf> {
    path_setting("ANNEAL_TOOLS_BIN")
}

/// The directory of the components' logs (worth reading when a test fails).
pub fn logs_dir() -> Result<PathBuf> {
    path_setting("ANNEAL_CLUSTER_LOGS")
}

/// A client for the local cluster, as its admin.
pub async fn client() -> Result<Client> {
    client_as(None).await
}

/// A client for the local cluster that impersonates `user` (e.g.
/// `system:serviceaccount:<ns>:<name>`), to check what that identity may do with real requests.
pub async fn client_as(user: Option<&str>) -> Result<Client> {
    let path = kubeconfig_path()?;
    let kubeconfig = Kubeconfig::read_from(&path).with_context(|| {
        format!(
            "reading the cluster's kubeconfig {} (is the cluster up? run e2e/cluster/up.sh)",
            path.display()
        )
    })?;
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading kubeconfig {}", path.display()))?;
    config.auth_info.impersonate = user.map(str::to_string);
    Client::try_from(config).context("building a client for the local cluster")
}

fn path_setting(key: &str) -> Result<PathBuf> {
    if let Some(value) = std::env::var_os(key).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(value));
    }
    let defaults = script_defaults().as_ref().map_err(|e| anyhow!("{e}"))?;
    defaults
        .get(key)
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("e2e/cluster/paths.sh printed no {key}"))
}

/// The output of `e2e/cluster/paths.sh`, run once per test binary.
fn script_defaults() -> &'static Result<HashMap<String, String>, String> {
    static DEFAULTS: OnceLock<Result<HashMap<String, String>, String>> = OnceLock::new();
    DEFAULTS.get_or_init(|| {
        let script = cluster_dir().join("paths.sh");
        let output = std::process::Command::new("bash")
            .arg(&script)
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if !output.status.success() {
            return Err(format!(
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(parse_key_values(&String::from_utf8_lossy(&output.stdout)))
    })
}

/// `KEY=VALUE` lines into a map; other lines are ignored.
fn parse_key_values(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_script_output() {
        let parsed = parse_key_values("ANNEAL_TOOLS_BIN=/a/b\nnoise\nANNEAL_KUBECONFIG=/c=d\n");
        assert_eq!(parsed["ANNEAL_TOOLS_BIN"], "/a/b");
        assert_eq!(parsed["ANNEAL_KUBECONFIG"], "/c=d");
        assert_eq!(parsed.len(), 2);
    }

    #[test]
    fn cluster_dir_holds_the_scripts() {
        for script in ["up.sh", "down.sh", "paths.sh", "fault.sh", "versions.env"] {
            assert!(cluster_dir().join(script).is_file(), "{script} missing");
        }
    }
}
