//! Writes the CRD YAML files (`manifests/crds/`, `charts/anneal/crds/`) from the Rust types.
//! `crdgen --check` only compares and exits non-zero when a committed file differs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    let check = std::env::args().any(|a| a == "--check");
    let root = repo_root();
    let files = match anneal_crds::generate::generated_files() {
        Ok(files) => files,
        Err(err) => {
            eprintln!("crdgen: cannot serialise the CRDs: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut stale = 0;
    for (rel, contents) in files {
        let path = root.join(&rel);
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current == contents {
            continue;
        }
        if check {
            eprintln!("crdgen: {rel} is out of date");
            stale += 1;
            continue;
        }
        if let Err(err) = write(&path, &contents) {
            eprintln!("crdgen: cannot write {rel}: {err}");
            return ExitCode::FAILURE;
        }
        println!("wrote {rel}");
    }
    if stale > 0 {
        eprintln!("crdgen: run `cargo run -p anneal-crds --bin crdgen` and commit the result");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn write(path: &Path, contents: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, contents)
}

/// The workspace root: the parent of this crate's manifest directory.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}
