//! A supervised worker thread (the generation engine, the embedding batcher): a panic is caught,
//! logged and reported, so the probes fail and the server exits rather than answer 503 forever.

use std::panic::AssertUnwindSafe;
use tokio::sync::watch;

/// Whether a supervised thread still runs, and why it ended once it has.
#[derive(Clone)]
pub struct Supervised {
    /// Set (or closed) when the thread ends.
    stopped: watch::Receiver<Option<String>>,
    /// What the thread is, for messages.
    what: &'static str,
}

impl Supervised {
    /// Runs `body` on a thread named `anneal-<what>`, catching a panic.
    pub fn spawn(
        what: &'static str,
        body: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<Self> {
        let (stopped_tx, stopped) = watch::channel(None);
        std::thread::Builder::new()
            .name(format!("anneal-{what}"))
            .spawn(move || {
                // Unwinding drops what the body owns (its requests' reply senders): their
                // clients get an error instead of waiting for ever. The sender lives until the
                // thread ends, so a clean end is seen too (the channel closes).
                if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(body)) {
                    let msg = panic
                        .downcast_ref::<&str>()
                        .copied()
                        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                        .unwrap_or("(no message)");
                    let why = format!("the {what} panicked: {msg}");
                    tracing::error!("{why}");
                    let _ = stopped_tx.send(Some(why));
                }
            })?;
        Ok(Self { stopped, what })
    }

    /// Why the thread ended, once it has: from then on no request can be answered.
    pub fn stopped(&self) -> Option<String> {
        if let Some(why) = self.stopped.borrow().clone() {
            return Some(why);
        }
        self.stopped
            .has_changed()
            .is_err()
            .then(|| format!("the {} thread ended", self.what))
    }

    /// Waits until the thread ends; why it ended.
    pub async fn wait_stopped(&self) -> String {
        let mut rx = self.stopped.clone();
        // An error means the sender is gone: the thread ended without a word.
        let _ = rx.wait_for(Option::is_some).await;
        self.stopped()
            .unwrap_or_else(|| format!("the {} thread ended", self.what))
    }
}
