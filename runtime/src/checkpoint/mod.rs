//! Checkpoints and model directories on disk.
//!
//! Layout of a checkpoint directory (the TrainingJob's, usually `$ANNEAL_CHECKPOINT_DIR`):
//!
//! ```text
//! FENCE                      highest attempt number that claimed the directory
//! FENCE.lock                 flock'ed while claiming and while committing
//! step-00000100/             one committed checkpoint (never half-written)
//!   model.safetensors        weights
//!   optimizer.safetensors    AdamW moments (`m.<param>`, `v.<param>`)
//!   state.json               step, attempt, data cursor, RNG state, optimizer step, config,
//!                            the job that wrote it and the digest of its run
//!                            (`train::resume` refuses another job's or run's)
//!   MANIFEST.json            sha256 of each file above
//! .tmp-step-00000200-a3-WRITER/  a checkpoint being written by attempt 3 (ignored, cleaned up);
//!                            WRITER is unique per writer (see [`atomic::writer_tag`])
//! ```
//!
//! Resume takes the newest `step-*` directory whose manifest verifies and skips corrupt or
//! partial ones with a warning. See [`fence`] for how stale attempts are kept out.

pub mod atomic;
pub mod fence;
pub mod gguf_export;
pub mod model_dir;

use std::path::{Path, PathBuf};

/// A checkpoint or model directory could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A file does not match its manifest or cannot be parsed.
    #[error("corrupt: {0}")]
    Corrupt(String),
    /// A value could not be serialised.
    #[error("format: {0}")]
    Format(String),
    /// A newer attempt owns the checkpoint directory: this worker is stale and must stop.
    #[error(
        "fenced: attempt {attempt} is stale, attempt {newer} owns the checkpoint directory; not writing"
    )]
    Fenced {
        /// This writer's attempt.
        attempt: u64,
        /// The newer attempt recorded in FENCE.
        newer: u64,
    },
    /// Tensor (de)serialisation failed.
    #[error("tensors: {0}")]
    Tensor(#[from] candle_core::Error),
}

fn io(path: &Path, e: std::io::Error) -> CheckpointError {
    CheckpointError::Io {
        path: path.display().to_string(),
        source: e,
    }
}

/// A checkpoint directory claimed by one attempt.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    /// The directory.
    pub root: PathBuf,
    /// This writer's attempt number.
    pub attempt: u64,
}

impl CheckpointDir {
    /// Creates `root` if needed and claims it for `attempt` (failing if a newer attempt has),
    /// then removes leftovers of interrupted writes by this or older attempts.
    pub fn open(root: &Path, attempt: u64) -> Result<Self, CheckpointError> {
        std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
        fence::claim(root, attempt)?;
        for entry in std::fs::read_dir(root).map_err(|e| io(root, e))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(a) = tmp_attempt(&name)
                && a <= attempt
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
            attempt,
        })
    }

    /// Committed checkpoints as (step, path), newest first.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
        committed(&self.root)
    }

    /// The newest checkpoint that verifies; each one skipped is reported through `warn`.
    pub fn latest_valid(
        &self,
        warn: impl FnMut(&str),
    ) -> Result<Option<(u64, PathBuf)>, CheckpointError> {
        latest_valid(&self.root, warn)
    }

    /// Writes checkpoint `step`: `write` fills a temporary directory, which is committed only
    /// if no newer attempt has claimed the directory meanwhile. Keeps the newest `keep`.
    pub fn save(
        &self,
        step: u64,
        keep: usize,
        write: impl FnOnce(&Path) -> Result<(), CheckpointError>,
    ) -> Result<PathBuf, CheckpointError> {
        // Fail early rather than spend the write on a checkpoint that cannot be committed.
        fence::check(&self.root, self.attempt)?;
        let tmp = self.root.join(format!(
            ".tmp-step-{step:08}-a{}-{}",
            self.attempt,
            atomic::writer_tag()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(|e| io(&tmp, e))?;
        let result = write(&tmp).and_then(|()| {
            let dest = self.root.join(format!("step-{step:08}"));
            let _lock = fence::FenceLock::acquire(&self.root)?;
            atomic::commit_dir(&tmp, &dest, || fence::check(&self.root, self.attempt))?;
            Ok(dest)
        });
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        let dest = result?;
        for (_, old) in self.list()?.into_iter().skip(keep.max(1)) {
            let _ = std::fs::remove_dir_all(old);
        }
        Ok(dest)
    }
}

/// The newest checkpoint in `root` that verifies, reading only (the ranks of a gang other than
/// rank 0 resume without claiming the directory); each one skipped is reported through `warn`.
pub fn latest_valid(
    root: &Path,
    mut warn: impl FnMut(&str),
) -> Result<Option<(u64, PathBuf)>, CheckpointError> {
    for (step, path) in committed(root)? {
        match atomic::verify_dir(&path) {
            Ok(_) => return Ok(Some((step, path))),
            Err(e) => warn(&format!("skipping checkpoint {}: {e}", path.display())),
        }
    }
    Ok(None)
}

/// Committed checkpoints in `root` as (step, path), newest first; none when `root` does not
/// exist. Reading only: for looking at a directory before claiming it.
pub fn committed(root: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(root, e)),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((step, entry.path()));
        }
    }
    out.sort_by_key(|s| std::cmp::Reverse(s.0));
    Ok(out)
}

/// The attempt number in a temporary directory name `.tmp-step-N-aA-WRITER`.
fn tmp_attempt(name: &str) -> Option<u64> {
    let rest = name.strip_prefix(".tmp-step-")?;
    let a = rest.split('-').nth(1)?.strip_prefix('a')?;
    a.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("anneal-ckpt-{name}-{}", atomic::writer_tag()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn save_verify_prune_and_fence() {
        let root = tmpdir("unit");
        let dir = CheckpointDir::open(&root, 1).unwrap();
        for step in [1, 2, 3] {
            dir.save(step, 2, |p| {
                atomic::write_synced(&p.join("a"), &[step as u8])
            })
            .unwrap();
        }
        let steps: Vec<u64> = dir.list().unwrap().into_iter().map(|s| s.0).collect();
        assert_eq!(steps, vec![3, 2]);
        // Corrupt the newest: resume falls back to the previous one.
        std::fs::write(root.join("step-00000003/a"), b"x").unwrap();
        let mut warnings = Vec::new();
        let best = dir.latest_valid(|w| warnings.push(w.to_string())).unwrap();
        assert_eq!(best.unwrap().0, 2);
        assert_eq!(warnings.len(), 1);
        // A newer attempt claims the directory: the old writer is fenced out.
        let newer = CheckpointDir::open(&root, 2).unwrap();
        let err = dir.save(4, 2, |_| Ok(())).unwrap_err();
        assert!(
            matches!(
                err,
                CheckpointError::Fenced {
                    attempt: 1,
                    newer: 2
                }
            ),
            "{err}"
        );
        assert!(CheckpointDir::open(&root, 1).is_err());
        newer.save(4, 2, |_| Ok(())).unwrap();
        assert_eq!(tmp_attempt(".tmp-step-00000004-a7-99"), Some(7));
        assert_eq!(
            tmp_attempt(".tmp-step-00000004-a7-job-a7-w0.0123abcd.5"),
            Some(7)
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    /// Two writers of one attempt saving the same step at once (as two pods of one attempt on a
    /// shared volume did, both pid 1): each fills its own temporary directory, so both commit
    /// and the checkpoint holds one writer's files, whole. With temporary names by process id
    /// the two threads (one process) shared one directory and one of them failed or committed
    /// the other's half-written files.
    #[test]
    fn concurrent_writers_of_one_step_do_not_share_a_temporary_directory() {
        use std::sync::{Condvar, Mutex};
        use std::time::Duration;
        let root = tmpdir("writers");
        let dir = CheckpointDir::open(&root, 3).unwrap();
        // Each writer waits (up to a bound, so that the old behaviour fails instead of hanging)
        // until both are inside `write`, so that their temporary directories coexist.
        let inside = (Mutex::new(0usize), Condvar::new());
        let results: Vec<Result<PathBuf, CheckpointError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0u8..2)
                .map(|writer| {
                    let (dir, inside) = (&dir, &inside);
                    s.spawn(move || {
                        dir.save(9, 3, |tmp| {
                            atomic::write_synced(&tmp.join("first"), &[writer])?;
                            let (count, cv) = inside;
                            let mut n = count.lock().unwrap();
                            *n += 1;
                            cv.notify_all();
                            let _ = cv
                                .wait_timeout_while(n, Duration::from_secs(2), |n| *n < 2)
                                .unwrap();
                            atomic::write_synced(&tmp.join("second"), &[writer])
                        })
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in &results {
            assert!(r.is_ok(), "{r:?}");
        }
        let (step, path) = dir.latest_valid(|w| panic!("{w}")).unwrap().unwrap();
        assert_eq!(step, 9);
        let first = std::fs::read(path.join("first")).unwrap();
        assert_eq!(std::fs::read(path.join("second")).unwrap(), first);
        let leftovers: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp-") || n.contains("replaced"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
