//! The real `anneal-operator` binary, run as a process against the local cluster for one test,
//! scoped to the test's namespace so that tests running side by side do not share a controller.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

use crate::cluster::{kubeconfig_path, logs_dir};

/// The operator binary: `ANNEAL_OPERATOR_BIN`, else `<cargo target dir>/debug/anneal-operator`
/// (`cargo build -p anneal-operator` makes it; `e2e/test-all.sh` does).
pub fn operator_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("ANNEAL_OPERATOR_BIN") {
        return Ok(PathBuf::from(path));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let binary = target.join("debug/anneal-operator");
    if !binary.is_file() {
        bail!(
            "{} not found: run `cargo build -p anneal-operator`",
            binary.display()
        );
    }
    Ok(binary)
}

/// A running operator; killed when dropped (SIGKILL, as a crash would).
#[derive(Debug)]
pub struct OperatorProcess {
    child: Child,
    namespace: String,
}

impl OperatorProcess {
    /// Starts the operator for `namespace`; its log goes to `<logs>/operator-<namespace>.log`.
    pub async fn start(namespace: &str) -> Result<Self> {
        Self::start_with(namespace, &[]).await
    }

    /// Like [`OperatorProcess::start`], with extra command-line arguments.
    pub async fn start_with(namespace: &str, extra: &[&str]) -> Result<Self> {
        let log_path = logs_dir()?.join(format!("operator-{namespace}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let child = Command::new(operator_binary()?)
            .args([
                "run",
                "--namespace",
                namespace,
                "--runtime-image",
                "registry.invalid/anneal/runtime:e2e",
                // Several operators may run at once (one per test binary): no fixed port.
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("KUBECONFIG", kubeconfig_path()?)
            .env("RUST_LOG", "info,anneal_operator=debug")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("starting anneal-operator")?;
        Ok(Self {
            child,
            namespace: namespace.to_string(),
        })
    }

    /// Kills the operator at once (SIGKILL) and waits for it to be gone.
    pub async fn kill(mut self) -> Result<()> {
        self.child
            .kill()
            .await
            .with_context(|| format!("killing the operator of {}", self.namespace))
    }
}
