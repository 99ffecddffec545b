//! Directories that appear whole or not at all: files are written into a temporary sibling,
//! checksummed into a manifest, fsynced, and the directory is renamed into place.

use super::CheckpointError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Name of the checksum manifest inside a committed directory.
pub const MANIFEST: &str = "MANIFEST.json";

/// sha256 of every file of a committed directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// File name -> lowercase hex sha256.
    pub files: BTreeMap<String, String>,
}

/// A suffix for a temporary name that no other writer of the same directory uses: this
/// writer's name (the pod's, from `ANNEAL_POD_NAME`, cut to 63 bytes, then a random part),
/// then a counter of the names this process made. Never the process id: every container's
/// first process is pid 1, so two pods on one shared volume would pick the same names, and
/// the random part keeps two processes of one pod (or of one machine, without a pod name)
/// apart too.
pub fn writer_tag() -> String {
    static WRITER: OnceLock<String> = OnceLock::new();
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let writer = WRITER.get_or_init(|| {
        writer_name(
            std::env::var(anneal_crds::contract::ENV_POD_NAME)
                .ok()
                .as_deref(),
            random_u32(),
        )
    });
    format!("{writer}.{}", SEQ.fetch_add(1, Ordering::Relaxed))
}

/// The writer part of [`writer_tag`]: the pod name when it is a plain name, then `random`.
fn writer_name(pod: Option<&str>, random: u32) -> String {
    let pod = pod
        .filter(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        })
        .map(|p| &p[..p.len().min(63)]);
    match pod {
        Some(pod) => format!("{pod}.{random:08x}"),
        None => format!("{random:08x}"),
    }
}

/// 32 random bits without a random-number crate: std's `RandomState` keys its hashers from the
/// operating system's random source once per process.
fn random_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.write_u128(now.as_nanos());
    h.finish() as u32
}

fn io(path: &Path, e: std::io::Error) -> CheckpointError {
    CheckpointError::Io {
        path: path.display().to_string(),
        source: e,
    }
}

/// Hex sha256 of a file's content, read in blocks.
pub fn sha256_file(path: &Path) -> Result<String, CheckpointError> {
    let mut f = File::open(path).map_err(|e| io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Writes `bytes` to `path` and fsyncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = File::create(path).map_err(|e| io(path, e))?;
    f.write_all(bytes).map_err(|e| io(path, e))?;
    f.sync_all().map_err(|e| io(path, e))
}

/// Writes the file `dest` whole or not at all: `write` fills a temporary sibling, which is
/// fsynced and renamed over `dest`, then the directory is fsynced.
pub fn write_file_atomic(
    dest: &Path,
    write: impl FnOnce(&mut File) -> Result<(), CheckpointError>,
) -> Result<(), CheckpointError> {
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".tmp-{name}-{}", writer_tag()));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| io(&tmp, e))?;
        write(&mut f)?;
        f.sync_all().map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, dest).map_err(|e| io(dest, e))?;
        sync_path(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Adds the file `name` of the committed directory `dir` to its manifest (replacing the
/// manifest atomically), so that [`verify_dir`] checks it too. Returns the file's sha256.
pub fn add_to_manifest(dir: &Path, name: &str) -> Result<String, CheckpointError> {
    let path = dir.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
    let mut manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| CheckpointError::Corrupt(format!("{}: {e}", path.display())))?;
    let sha256 = sha256_file(&dir.join(name))?;
    manifest.files.insert(name.to_string(), sha256.clone());
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| CheckpointError::Format(e.to_string()))?;
    write_file_atomic(&path, |f| f.write_all(&json).map_err(|e| io(&path, e)))?;
    Ok(sha256)
}

fn sync_path(path: &Path) -> Result<(), CheckpointError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(path, e))
}

/// Checksums and fsyncs every file of `tmp`, writes the manifest, then runs `gate` (the
/// fencing check) and renames `tmp` to `dest`, replacing an older `dest` if there is one.
/// Returns the manifest.
pub fn commit_dir(
    tmp: &Path,
    dest: &Path,
    gate: impl FnOnce() -> Result<(), CheckpointError>,
) -> Result<Manifest, CheckpointError> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(tmp).map_err(|e| io(tmp, e))? {
        let entry = entry.map_err(|e| io(tmp, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == MANIFEST {
            continue;
        }
        sync_path(&entry.path())?;
        files.insert(name, sha256_file(&entry.path())?);
    }
    let manifest = Manifest { files };
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| CheckpointError::Format(e.to_string()))?;
    write_synced(&tmp.join(MANIFEST), &json)?;
    sync_path(tmp)?;
    gate()?;
    if dest.exists() {
        // Same step written again (a resumed attempt redoing it): move the old one aside
        // first, since rename cannot replace a non-empty directory.
        let aside = dest.with_extension(format!("replaced-{}", writer_tag()));
        std::fs::rename(dest, &aside).map_err(|e| io(dest, e))?;
        std::fs::rename(tmp, dest).map_err(|e| io(dest, e))?;
        let _ = std::fs::remove_dir_all(&aside);
    } else {
        std::fs::rename(tmp, dest).map_err(|e| io(dest, e))?;
    }
    if let Some(parent) = dest.parent() {
        sync_path(parent)?;
    }
    Ok(manifest)
}

/// Checks that `dir` has a manifest and that every file it lists has the recorded sha256.
pub fn verify_dir(dir: &Path) -> Result<Manifest, CheckpointError> {
    let path = dir.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| CheckpointError::Corrupt(format!("{}: {e}", path.display())))?;
    for (name, want) in &manifest.files {
        if name.contains('/') || name.contains("..") {
            return Err(CheckpointError::Corrupt(format!(
                "bad file name {name:?} in manifest"
            )));
        }
        let got = sha256_file(&dir.join(name))?;
        if &got != want {
            return Err(CheckpointError::Corrupt(format!(
                "{name}: sha256 {got} != manifest {want}"
            )));
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_names_come_from_the_pod_never_the_process() {
        assert_eq!(
            writer_name(Some("arith-a2-w0"), 0xab),
            "arith-a2-w0.000000ab"
        );
        // Not a plain name (a path separator, empty): the random part alone.
        assert_eq!(writer_name(Some("../x"), 1), "00000001");
        assert_eq!(writer_name(Some(""), 1), "00000001");
        assert_eq!(writer_name(None, 0xdeadbeef), "deadbeef");
        let long = "p".repeat(253);
        assert_eq!(writer_name(Some(&long), 0).len(), 63 + 9);
        // Two processes (two containers, both pid 1) get different names.
        assert_ne!(random_u32(), random_u32());
        let (a, b) = (writer_tag(), writer_tag());
        assert_ne!(a, b);
    }
}
