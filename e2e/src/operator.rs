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
    metrics_addr: std::net::SocketAddr,
    log_path: PathBuf,
}

impl OperatorProcess {
    /// Starts the operator for `namespace`; its log goes to `<logs>/operator-<namespace>.log`.
    pub async fn start(namespace: &str) -> Result<Self> {
        Self::start_with(namespace, &[]).await
    }

    /// Like [`OperatorProcess::start`], with extra command-line arguments.
    pub async fn start_with(namespace: &str, extra: &[&str]) -> Result<Self> {
        Self::start_as(namespace, None, extra).await
    }

    /// Like [`OperatorProcess::start_with`], as replica `identity` (its `POD_NAME`, the holder
    /// name in the leader Lease); the log goes to `<logs>/operator-<namespace>-<identity>.log`.
    pub async fn start_as(namespace: &str, identity: Option<&str>, extra: &[&str]) -> Result<Self> {
        let log_name = match identity {
            Some(id) => format!("operator-{namespace}-{id}.log"),
            None => format!("operator-{namespace}.log"),
        };
        let log_path = logs_dir()?.join(log_name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        // Several operators may run at once (one per test binary): a free port, asked of the
        // kernel, for each.
        let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut command = Command::new(operator_binary()?);
        if let Some(id) = identity {
            command.env("POD_NAME", id);
        }
        let child = command
            .args([
                "run",
                "--namespace",
                namespace,
                "--runtime-image",
                "registry.invalid/anneal/runtime:e2e",
                "--metrics-addr",
                &metrics_addr.to_string(),
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
            metrics_addr,
            log_path,
        })
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Where its log goes (JSON lines; appended to across runs of the same test).
    pub fn log_path(&self) -> &std::path::Path {
        &self.log_path
    }

    /// Sends `signal` (`TERM`, `STOP`, `CONT`, ...) to the process.
    pub async fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.pid().context("the operator has exited")?;
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .await?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed");
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit; its exit status.
    pub async fn wait_exit(
        &mut self,
        timeout: std::time::Duration,
    ) -> Result<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| format!("the operator did not exit within {timeout:?}"))?
            .context("waiting for the operator")
    }

    /// The operator's `/metrics` page (Prometheus text).
    pub async fn metrics(&self) -> Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.metrics_addr)
            .await
            .with_context(|| format!("connecting to {}", self.metrics_addr))?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: operator\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .context("malformed HTTP response")?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            bail!(
                "/metrics answered {}",
                head.lines().next().unwrap_or_default()
            );
        }
        Ok(body.to_string())
    }

    /// Sum of the samples of `metric` (all label sets) on the `/metrics` page; 0 when absent.
    pub async fn metric_sum(&self, metric: &str) -> Result<f64> {
        Ok(sum_samples(&self.metrics().await?, metric))
    }

    /// Kills the operator at once (SIGKILL) and waits for it to be gone.
    pub async fn kill(mut self) -> Result<()> {
        self.child
            .kill()
            .await
            .with_context(|| format!("killing the operator of {}", self.namespace))
    }
}

/// Sum of the samples named `metric` (with any labels) in Prometheus text.
pub fn sum_samples(text: &str, metric: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            let bare = name.split('{').next()?;
            (bare == metric).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sums_every_label_set_of_one_metric() {
        let text =
            "# HELP w writes\nw_total{verb=\"apply\"} 2\nw_total{verb=\"delete\"} 3\nw_totally 9\n";
        assert_eq!(super::sum_samples(text, "w_total"), 5.0);
        assert_eq!(super::sum_samples(text, "absent"), 0.0);
    }
}
