//! Leader election through a `coordination.k8s.io` Lease, so that two replicas can run and only
//! the leader reconciles (and so writes). A replica that loses the lease exits; its restart
//! competes again.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::{Api, Client};

/// One replica's candidacy for the lease.
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    /// A leader that has not renewed for this long has lost the lease.
    pub lease_duration: Duration,
    /// How often the leader renews, and a candidate retries.
    pub retry_period: Duration,
}

impl LeaderElection {
    /// A candidate `identity` for lease `namespace/name`.
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
        }
    }

    /// Takes the lease if it is free, expired or ours; `Ok(true)` when we hold it afterwards.
    /// Every write carries the resourceVersion read, so two candidates cannot both win.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
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
            return conflict_is_no(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let ours = spec.holder_identity.as_deref() == Some(&self.identity);
        if !ours {
            let duration = SignedDuration::from_secs(i64::from(
                spec.lease_duration_seconds.unwrap_or(seconds),
            ));
            let renewed = spec
                .renew_time
                .as_ref()
                .map(|t| t.0)
                .unwrap_or(Timestamp::UNIX_EPOCH);
            if now.duration_since(renewed) < duration {
                return Ok(false);
            }
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(MicroTime(now));
        conflict_is_no(
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        )
    }

    /// Waits until this replica leads.
    pub async fn acquire(&self) -> Result<(), kube::Error> {
        loop {
            if self.try_acquire_or_renew().await? {
                return Ok(());
            }
            tokio::time::sleep(self.retry_period).await;
        }
    }

    /// Renews the lease until that fails (lost or unreachable for a whole lease duration);
    /// returns the reason. The caller must stop writing then.
    pub async fn hold(&self) -> String {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.retry_period).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => return "another replica holds the lease".into(),
                Err(err) if last_renewal.elapsed() >= self.lease_duration => {
                    return format!(
                        "could not renew the lease for {:?}: {err}",
                        self.lease_duration
                    );
                }
                Err(err) => tracing::warn!(error = %err, "renewing the leader lease"),
            }
        }
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
