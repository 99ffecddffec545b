//! The project's CRDs, installed into the local cluster from `manifests/crds/`.

use std::path::PathBuf;

use anyhow::Result;

use crate::tools::{kubectl, run};

/// Installs (or updates) the CRDs from `manifests/crds/` and waits until they are served.
/// Idempotent: every test that needs them calls it.
pub async fn install() -> Result<()> {
    let crds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds");
    run(kubectl()?
        .args(["apply", "--server-side", "--force-conflicts", "-f"])
        .arg(&crds))
    .await?;
    run(kubectl()?
        .args(["wait", "--for=condition=Established", "--timeout=60s", "-f"])
        .arg(&crds))
    .await?;
    Ok(())
}
