//! Fencing of checkpoint writers by attempt number. The operator gives every worker attempt a
//! higher number; a worker claims the checkpoint directory by recording its attempt in
//! `FENCE`, and re-reads it (under an exclusive `flock` on `FENCE.lock`) right before every
//! commit. A zombie of an older attempt (e.g. on a partitioned node that still writes) thus
//! finds a newer number and stops instead of superseding the newer attempt's checkpoints.

use super::CheckpointError;
use super::atomic::{write_synced, writer_tag};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// File holding the highest attempt number that has claimed the directory.
pub const FENCE: &str = "FENCE";
const LOCK: &str = "FENCE.lock";

/// An exclusive advisory lock on the directory, released on drop.
pub struct FenceLock {
    file: File,
}

impl FenceLock {
    /// Blocks until the lock on `root` is held.
    pub fn acquire(root: &Path) -> Result<Self, CheckpointError> {
        let path = root.join(LOCK);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| CheckpointError::Io {
                path: path.display().to_string(),
                source: e,
            })?;
        // SAFETY: flock on a file descriptor we own; no memory is shared with the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            let source = std::io::Error::last_os_error();
            return Err(CheckpointError::Io {
                path: path.display().to_string(),
                source,
            });
        }
        Ok(Self { file })
    }
}

impl Drop for FenceLock {
    fn drop(&mut self) {
        // SAFETY: as above; closing the descriptor would release it anyway.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// The highest attempt that has claimed `root` (0 when none has).
pub fn read_fence(root: &Path) -> Result<u64, CheckpointError> {
    let path = root.join(FENCE);
    match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse().map_err(|_| {
            CheckpointError::Corrupt(format!("{}: not an attempt number: {s:?}", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(CheckpointError::Io {
            path: path.display().to_string(),
            source: e,
        }),
    }
}

/// Fails with [`CheckpointError::Fenced`] when a newer attempt than `attempt` has claimed `root`.
pub fn check(root: &Path, attempt: u64) -> Result<(), CheckpointError> {
    let newer = read_fence(root)?;
    if newer > attempt {
        return Err(CheckpointError::Fenced { attempt, newer });
    }
    Ok(())
}

/// Claims `root` for `attempt`: fails if a newer attempt holds it, else records `attempt`.
pub fn claim(root: &Path, attempt: u64) -> Result<(), CheckpointError> {
    let _lock = FenceLock::acquire(root)?;
    check(root, attempt)?;
    let tmp: PathBuf = root.join(format!(".{FENCE}.{}", writer_tag()));
    write_synced(&tmp, attempt.to_string().as_bytes())?;
    std::fs::rename(&tmp, root.join(FENCE)).map_err(|e| CheckpointError::Io {
        path: root.display().to_string(),
        source: e,
    })
}
