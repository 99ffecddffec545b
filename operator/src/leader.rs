//! Leader election through a `coordination.k8s.io` Lease, so that two replicas can run and only
//! the leader reconciles (and so writes).
//!
//! The timings follow client-go's: a lease of 15 s, renewed every 2 s; a leader that could not
//! renew for the renew deadline (10 s, shorter than the lease) stops writing at once, so it has
//! stopped before any candidate may take the lease over. Every renewal has its own timeout, so a
//! hung request cannot keep a deposed leader writing. The [`WriteGate`] is checked before every
//! write of the controllers: a leader that was frozen (SIGSTOP, a long GC pause, a partition)
//! finds its renewal too old when it wakes and writes nothing. On shutdown the leader releases
//! the lease, so that a standby takes over within its poll interval instead of a lease duration.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::{Api, Client};

/// Refused: this replica does not hold a fresh lease.
#[derive(Debug, thiserror::Error)]
#[error("not the leader: the lease was not renewed within the renew deadline")]
pub struct NotLeader;

/// Whether this replica may write now. Without leader election it always may.
#[derive(Clone, Default)]
pub struct WriteGate {
    lease: Option<Arc<LeaseClock>>,
}

struct LeaseClock {
    renewed_at: Mutex<Option<Instant>>,
    renew_deadline: Duration,
}

impl WriteGate {
    /// A gate that is always open (a single replica without leader election).
    pub fn always() -> Self {
        Self::default()
    }

    /// Ok while the lease was renewed within the renew deadline.
    pub fn check(&self) -> Result<(), NotLeader> {
        let Some(lease) = &self.lease else {
            return Ok(());
        };
        let renewed = *lease.renewed_at.lock().unwrap_or_else(|p| p.into_inner());
        match renewed {
            Some(at) if at.elapsed() < lease.renew_deadline => Ok(()),
            _ => Err(NotLeader),
        }
    }
}

/// One replica's candidacy for the lease.
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    /// A leader that has not renewed for this long has lost the lease.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long stops writing (shorter than the lease).
    pub renew_deadline: Duration,
    /// How often the leader renews.
    pub retry_period: Duration,
    /// How often a standby looks whether the lease is free.
    pub candidate_period: Duration,
    clock: Arc<LeaseClock>,
}

impl LeaderElection {
    /// A candidate `identity` for lease `namespace/name`.
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Self {
        let renew_deadline = Duration::from_secs(10);
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            lease_duration: Duration::from_secs(15),
            renew_deadline,
            retry_period: Duration::from_secs(2),
            candidate_period: Duration::from_millis(500),
            clock: Arc::new(LeaseClock {
                renewed_at: Mutex::new(None),
                renew_deadline,
            }),
        }
    }

    /// The gate the controllers check before writing.
    pub fn gate(&self) -> WriteGate {
        WriteGate {
            lease: Some(self.clock.clone()),
        }
    }

    fn renewed(&self, at: Option<Instant>) {
        *self
            .clock
            .renewed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = at;
    }

    /// Takes the lease if it is free, expired or ours; `Ok(true)` when we hold it afterwards.
    /// Every write carries the resourceVersion read, so two candidates cannot both win.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        // The renewal counts from before the request: the lease may be older than the answer.
        let started = Instant::now();
        let now = Timestamp::now();
        let seconds = i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            let won = conflict_is_no(self.api.create(&PostParams::default(), &lease).await)?;
            if won {
                self.renewed(Some(started));
            }
            return Ok(won);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let ours = spec.holder_identity.as_deref() == Some(&self.identity);
        if !ours {
            let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
            let duration = SignedDuration::from_secs(i64::from(
                spec.lease_duration_seconds.unwrap_or(seconds),
            ));
            let renewed = spec
                .renew_time
                .as_ref()
                .map(|t| t.0)
                .unwrap_or(Timestamp::UNIX_EPOCH);
            if !free && now.duration_since(renewed) < duration {
                return Ok(false);
            }
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(MicroTime(now));
        let won = conflict_is_no(
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        )?;
        self.renewed(won.then_some(started));
        Ok(won)
    }

    /// Waits until this replica leads.
    pub async fn acquire(&self) -> Result<(), kube::Error> {
        loop {
            match tokio::time::timeout(self.renew_deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => return Ok(()),
                Ok(Ok(false)) => {}
                Ok(Err(err)) => tracing::warn!(error = %err, "reading the leader lease"),
                Err(_) => tracing::warn!("reading the leader lease timed out"),
            }
            tokio::time::sleep(self.candidate_period).await;
        }
    }

    /// Renews the lease until that fails: another replica took it, or no renewal succeeded
    /// within the renew deadline. Returns the reason; the gate is closed by then.
    pub async fn hold(&self) -> String {
        let mut last_renewal = Instant::now();
        loop {
            tokio::time::sleep(self.retry_period).await;
            let left = self.renew_deadline.saturating_sub(last_renewal.elapsed());
            if left.is_zero() {
                self.renewed(None);
                return format!(
                    "no renewal within the renew deadline ({:?})",
                    self.renew_deadline
                );
            }
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => last_renewal = Instant::now(),
                Ok(Ok(false)) => {
                    self.renewed(None);
                    return "another replica holds the lease".into();
                }
                Ok(Err(err)) => tracing::warn!(error = %err, "renewing the leader lease"),
                Err(_) => tracing::warn!(?left, "renewing the leader lease timed out"),
            }
        }
    }

    /// Gives the lease up (on shutdown), so that a standby need not wait for it to expire.
    pub async fn release(&self) -> Result<(), kube::Error> {
        self.renewed(None);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        conflict_is_no(
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        )
        .map(|_| ())
    }
}

/// A write refused because someone else wrote first means "not leader", not an error.
fn conflict_is_no(result: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_closes_when_the_renewal_is_older_than_the_deadline() {
        let clock = Arc::new(LeaseClock {
            renewed_at: Mutex::new(None),
            renew_deadline: Duration::from_millis(50),
        });
        let gate = WriteGate {
            lease: Some(clock.clone()),
        };
        assert!(gate.check().is_err(), "never renewed");
        *clock.renewed_at.lock().unwrap() = Some(Instant::now());
        assert!(gate.check().is_ok());
        *clock.renewed_at.lock().unwrap() = Instant::now().checked_sub(Duration::from_millis(60));
        assert!(gate.check().is_err(), "renewal older than the deadline");
        assert!(WriteGate::always().check().is_ok());
    }
}
