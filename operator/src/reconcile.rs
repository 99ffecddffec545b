//! What every controller of the operator shares: its error type and backoff, the fenced write
//! check, server-side apply of children with drift repair, watched caches, Events, and the
//! handling of stored objects the types cannot read.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::core::error_boundary::InvalidObject;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::FIELD_MANAGER;
use crate::leader::{NotLeader, WriteGate};
use crate::metrics::Metrics;

/// Errors of one reconcile; the category names are metric and log labels.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a request (transient: retried with backoff).
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The object cannot be turned into children (waits for a change).
    #[error("invalid object: {0}")]
    Build(String),
    /// This replica lost the lease: it writes nothing more.
    #[error(transparent)]
    NotLeader(#[from] NotLeader),
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Build(format!("cannot serialise: {e}"))
    }
}

impl Error {
    /// Short stable category for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Build(_) => "build",
            Error::NotLeader(_) => "not_leader",
        }
    }
}

/// The write check every controller's context makes: only the leader writes, and every write
/// is counted (a steady state sends none).
pub struct Writer {
    /// Open while this replica may write (it leads, or runs alone).
    pub gate: WriteGate,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Event recorder.
    pub recorder: Recorder,
}

impl Writer {
    /// Checks that this replica may write, and counts the write.
    pub fn writing(&self, resource: &str, verb: &str) -> Result<(), NotLeader> {
        self.gate.check()?;
        self.metrics.wrote(resource, verb);
        tracing::debug!(target: "anneal_operator::writes", resource, verb, "write");
        Ok(())
    }

    /// Publishes an Event on `reference` (a failure to record is logged, not fatal).
    pub async fn event(
        &self,
        reference: &k8s_openapi::api::core::v1::ObjectReference,
        warning: bool,
        reason: &str,
        note: String,
    ) -> Result<(), Error> {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        self.writing("events", "create")?;
        if let Err(err) = self.recorder.publish(&event, reference).await {
            tracing::warn!(error = %err, "recording an event");
        }
        Ok(())
    }
}

/// An Event a controller's decision asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// `Warning` or `Normal`.
    pub warning: bool,
    /// Short CamelCase reason.
    pub reason: String,
    /// What happened, for people.
    pub message: String,
}

impl Writer {
    /// Publishes the Events a decision asked for, in order.
    pub async fn notices(
        &self,
        reference: &k8s_openapi::api::core::v1::ObjectReference,
        notices: &[Notice],
    ) -> Result<(), Error> {
        for n in notices {
            self.event(reference, n.warning, &n.reason, n.message.clone())
                .await?;
        }
        Ok(())
    }
}

/// Consecutive failures per object, for exponential backoff.
pub struct Backoff<K: Resource>(Mutex<HashMap<ObjectRef<K>, u32>>);

impl<K: Resource> Default for Backoff<K> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<K> Backoff<K>
where
    K: Resource,
    K::DynamicType: Hash + Eq + Clone,
{
    /// Counts a failure of `key`; the number of failures in a row.
    pub fn failed(&self, key: ObjectRef<K>) -> u32 {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key).or_insert(0);
        *n += 1;
        *n
    }

    /// A success: the next failure starts the backoff from the beginning.
    pub fn succeeded(&self, key: &ObjectRef<K>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// What to do after a failed reconcile: an object that cannot be built waits for a change;
/// anything else is retried after 0.5 s doubling to ~1 min.
pub fn retry_after(err: &Error, failures: u32) -> Action {
    match err {
        Error::Build(_) => Action::await_change(),
        Error::Kube(_) | Error::NotLeader(_) => Action::requeue(Duration::from_millis(
            250 * 2u64.saturating_pow(failures.min(8)),
        )),
    }
}

/// A stored object the operator cannot read: say so on it, and wait for a change (style.md #6:
/// one malformed object must not stall the watch of all the others).
pub async fn report_invalid<K>(
    guard: &DeserializeGuard<K>,
    invalid: &InvalidObject,
    writer: &Writer,
) -> Result<Action, Error>
where
    K: Resource<DynamicType = ()>,
{
    let meta = &invalid.metadata;
    let kind = K::kind(&());
    tracing::warn!(
        resource = %K::plural(&()),
        namespace = meta.namespace.as_deref().unwrap_or_default(),
        name = meta.name.as_deref().unwrap_or_default(),
        error = %invalid.error,
        "cannot read a stored object; skipped until it changes"
    );
    writer
        .event(
            &guard.object_ref(&()),
            true,
            "InvalidObject",
            format!("the operator cannot read this {kind}: {}", invalid.error),
        )
        .await?;
    Ok(Action::await_change())
}

/// Keeps a store of `K` current from a watch; returns the store once it holds the first listing.
pub async fn watched_store<K>(api: Api<K>) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    );
    tokio::spawn(stream.for_each(|event| async move {
        if let Err(err) = event {
            tracing::warn!(resource = %K::plural(&()), error = %err, "watch failed; retrying with backoff");
        }
    }));
    // A controller must not judge from an empty cache.
    let _ = reader.wait_until_ready().await;
    reader
}

/// `Api` over all namespaces, or over `namespace` only.
pub fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Watch selector of what the operator made.
pub fn owned_by_operator() -> watcher::Config {
    watcher::Config::default().labels(&format!(
        "app.kubernetes.io/managed-by={}",
        crate::labels::MANAGED_BY
    ))
}

/// Whether `obj` is controlled by the object with `uid` (adoption is by owner UID, never by
/// name or label: an object created again under a deleted one's name is another owner).
pub fn controlled_by<K: Resource>(obj: &K, uid: Option<&str>) -> bool {
    uid.is_some()
        && obj
            .meta()
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true))
            .map(|o| o.uid.as_str())
            == uid
}

/// Creates `obj` (a pod: immutable once made) when no object of its name exists.
pub async fn ensure_created<K>(api: &Api<K>, obj: &K, writer: &Writer) -> Result<bool, Error>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    if api.get_opt(&name).await?.is_some() {
        return Ok(false);
    }
    writer.writing(&K::plural(&()), "apply")?;
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await?;
    Ok(true)
}

/// What [`apply_child`] found.
pub enum Applied<K> {
    /// It existed as wanted: nothing was written.
    Unchanged,
    /// It was missing and is created.
    Created,
    /// It differed (a spec change, or someone edited it) and is applied again; the old copy.
    Repaired(K),
}

impl<K> Applied<K> {
    /// Whether this was drift: an edited child, or a missing one once the owner had started.
    pub fn drifted(&self, started: bool) -> bool {
        match self {
            Applied::Unchanged => false,
            Applied::Created => started,
            Applied::Repaired(_) => true,
        }
    }
}

/// True when every field of `want` is in `have` with the same value (lists: same length, each
/// element contained). Fields the API server or other managers added are not drift, and an
/// empty map or list the API server drops (`nodeSelector: {}`) is not missing.
pub fn contains(have: &serde_json::Value, want: &serde_json::Value) -> bool {
    use serde_json::Value;
    let empty = |v: &Value| match v {
        Value::Null => true,
        Value::Object(o) => o.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    };
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, wv)| wv.is_null() || h.get(k).map_or(empty(wv), |hv| contains(hv, wv))),
        (Value::Array(h), Value::Array(w)) => {
            h.len() == w.len() && h.iter().zip(w).all(|(a, b)| contains(a, b))
        }
        _ => have == want,
    }
}

/// Applies a child with server-side apply (field manager `anneal-operator`) when it is missing
/// or differs from `obj` in a field the operator sets, so that drift is repaired and a steady
/// state makes no writes.
pub async fn apply_child<K>(api: &Api<K>, obj: &K, writer: &Writer) -> Result<Applied<K>, Error>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let existing = api.get_opt(&name).await?;
    let want = serde_json::to_value(obj)?;
    let outcome = match existing {
        None => Applied::Created,
        Some(have) => {
            if contains(&serde_json::to_value(&have)?, &want) {
                return Ok(Applied::Unchanged);
            }
            Applied::Repaired(have)
        }
    };
    writer.writing(&K::plural(&()), "apply")?;
    let mut body = want;
    body["apiVersion"] = K::api_version(&()).into();
    body["kind"] = K::kind(&()).into();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await?;
    Ok(outcome)
}

/// Deletes a child if it exists; whether it did.
pub async fn delete_child<K>(api: &Api<K>, name: &str, writer: &Writer) -> Result<bool, Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    if api.get_opt(name).await?.is_none() {
        return Ok(false);
    }
    writer.writing(&K::plural(&()), "delete")?;
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Whether `obj`, a copy from the controller's cache, is the newest the API server holds. A
/// controller asks before creating a child when it wrote no status in the same reconcile (no
/// precondition fenced the decision): the cache can lag behind the children it just listed (a
/// verdict written, then the finished pod deleted, and the deletion seen first), and a stale
/// copy would create again what a newer status has already finished. Creations are rare, so one
/// read each is cheap. When this says no, the newer copy is on its way through the watch and
/// brings its own reconcile.
pub async fn is_newest<K>(api: &Api<K>, obj: &K) -> Result<bool, Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let newest = api.get(&name).await?;
    let fresh = newest.meta().resource_version == obj.meta().resource_version;
    if !fresh {
        tracing::debug!(
            kind = %K::kind(&()),
            name,
            "the cached copy is older than the API server's: nothing created from it"
        );
    }
    Ok(fresh)
}

/// Writes `status` of `obj` with server-side apply, fenced by `obj`'s resourceVersion: a
/// decision made from a stale copy fails here (409) instead of overwriting newer status, and
/// nothing of it is carried out.
pub async fn apply_status<K>(
    api: &Api<K>,
    obj: &K,
    status: &impl Serialize,
    writer: &Writer,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"resourceVersion": obj.meta().resource_version},
        "status": status,
    });
    writer.writing(&format!("{}/status", K::plural(&())), "apply")?;
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await?;
    Ok(())
}

/// A condition of `type_`, observed at `generation`, changed `now` (set_condition keeps the old
/// transition time when the status did not flip).
pub fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: k8s_openapi::jiff::Timestamp,
) -> anneal_crds::Condition {
    anneal_crds::Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now),
    }
}

/// Logs what a controller's stream yields that is not a reconcile result already logged.
pub fn log_controller_error<E: std::fmt::Display>(
    resource: &'static str,
    err: &kube::runtime::controller::Error<Error, E>,
) {
    match err {
        kube::runtime::controller::Error::ReconcilerFailed(..) => {}
        err => tracing::warn!(resource, error = %err, "controller watch"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn contains_ignores_fields_others_added_but_not_changed_values() {
        let have = json!({"a": 1, "b": {"c": [1, {"d": 2, "e": 3}]}, "x": "server"});
        assert!(contains(&have, &json!({"a": 1, "b": {"c": [1, {"d": 2}]}})));
        assert!(!contains(&have, &json!({"a": 2})));
        assert!(!contains(&have, &json!({"b": {"c": [1]}})));
        assert!(!contains(&have, &json!({"missing": true})));
        // What the API server drops is not missing; what it keeps must match.
        assert!(contains(
            &have,
            &json!({"nodeSelector": {}, "tolerations": []})
        ));
        assert!(!contains(&json!({"t": [1]}), &json!({"t": []})));
    }
}
