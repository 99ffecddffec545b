//! The pinned `kubectl` and `helm` of `e2e/cluster/versions.env`, pointed at the local cluster.

use std::ffi::OsStr;

use anyhow::{Context, Result, bail};
use tokio::process::Command;

use crate::cluster::{kubeconfig_path, tools_bin};

/// `kubectl --kubeconfig <the cluster's>`; add arguments and pass it to [`run`].
pub fn kubectl() -> Result<Command> {
    tool("kubectl")
}

/// `helm --kubeconfig <the cluster's>`; add arguments and pass it to [`run`].
pub fn helm() -> Result<Command> {
    tool("helm")
}

fn tool(name: &str) -> Result<Command> {
    let binary = tools_bin()?.join(name);
    if !binary.is_file() {
        bail!(
            "{} not found; build the tools with e2e/cluster/build-tools.sh",
            binary.display()
        );
    }
    let mut command = Command::new(binary);
    command.arg("--kubeconfig").arg(kubeconfig_path()?);
    command.kill_on_drop(true);
    Ok(command)
}

/// Runs `command` to completion and returns its stdout; a non-zero exit is an error carrying stderr.
pub async fn run(command: &mut Command) -> Result<String> {
    let shown = show(command);
    let output = command
        .output()
        .await
        .with_context(|| format!("starting `{shown}`"))?;
    if !output.status.success() {
        bail!(
            "`{shown}` failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
    }
    String::from_utf8(output.stdout).with_context(|| format!("`{shown}` printed non-UTF-8"))
}

fn show(command: &Command) -> String {
    let command = command.as_std();
    let program = command.get_program();
    let name = std::path::Path::new(program).file_name().unwrap_or(program);
    std::iter::once(name)
        .chain(command.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `command` to completion without an async runtime, for cleanups in `Drop` (which may run while a
/// panicking test unwinds). A failure is reported on stderr, not raised: it must not hide the test's outcome.
pub(crate) fn run_cleanup(mut command: std::process::Command, what: &str) {
    match command.output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!("{what} failed: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => eprintln!("{what} failed: {e}"),
    }
}
