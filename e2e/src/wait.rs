//! Waiting, with a deadline, until an object of the cluster satisfies a condition. The object is watched, so
//! a wait ends as soon as the change lands; when the deadline passes, the error shows the object as last seen.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStatus, Node, Pod,
};
use kube::runtime::WatchStreamExt;
use kube::runtime::wait::Condition;
use kube::runtime::watcher::{self, watch_object, watcher};
use kube::{Api, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Waits until the object `name` satisfies `condition` (which sees `None` while the object does not exist),
/// for at most `timeout`. Returns the object as it was when the condition held (`None` if it was absent).
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    condition: impl Condition<K>,
) -> Result<Option<K>>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug + Send + 'static,
    K::DynamicType: Default,
{
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let mut last_seen: Option<K> = None;
    let watching = async {
        let mut events = std::pin::pin!(watch_object(api.clone(), name));
        while let Some(object) = events
            .try_next()
            .await
            .with_context(|| format!("watching {kind} {name}"))?
        {
            if condition.matches_object(object.as_ref()) {
                return Ok(object);
            }
            last_seen = object;
        }
        bail!("the watch of {kind} {name} ended")
    };
    match tokio::time::timeout(timeout, watching).await {
        Ok(outcome) => outcome,
        Err(_) => bail!(
            "timed out after {timeout:?} waiting for {kind} {name}; last seen: {}",
            describe(last_seen.as_ref())
        ),
    }
}

/// Waits until some object selected by `config` (labels, fields) satisfies `predicate`, for at most `timeout`,
/// and returns it. For objects whose name is not known in advance: the pod a controller created, a replacement
/// worker. `what` names the wait in the timeout error.
pub async fn wait_for_matching<K>(
    api: &Api<K>,
    config: watcher::Config,
    what: &str,
    timeout: Duration,
    predicate: impl Fn(&K) -> bool,
) -> Result<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut seen = 0usize;
    let watching = async {
        let mut objects = std::pin::pin!(watcher(api.clone(), config).applied_objects());
        while let Some(object) = objects
            .try_next()
            .await
            .with_context(|| format!("watching for {what}"))?
        {
            if predicate(&object) {
                return Ok(object);
            }
            seen += 1;
        }
        bail!("the watch for {what} ended")
    };
    match tokio::time::timeout(timeout, watching).await {
        Ok(outcome) => outcome,
        Err(_) => {
            bail!("timed out after {timeout:?} waiting for {what} ({seen} updates did not match)")
        }
    }
}

/// Waits until the set of objects selected by `config` satisfies `predicate` (which sees the whole
/// current set, possibly empty), for at most `timeout`, and returns that set. For conditions on
/// several objects at once: "exactly one live worker", "no pod of an older attempt left".
pub async fn wait_for_set<K>(
    api: &Api<K>,
    config: watcher::Config,
    what: &str,
    timeout: Duration,
    predicate: impl Fn(&[std::sync::Arc<K>]) -> bool,
) -> Result<Vec<std::sync::Arc<K>>>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = kube::runtime::reflector::store();
    let mut listed = false;
    let mut last = 0usize;
    let watching = async {
        let mut events = std::pin::pin!(kube::runtime::reflector::reflector(
            writer,
            watcher(api.clone(), config)
        ));
        while let Some(event) = events
            .try_next()
            .await
            .with_context(|| format!("watching for {what}"))?
        {
            match event {
                watcher::Event::Init | watcher::Event::InitApply(_) => continue,
                watcher::Event::InitDone => listed = true,
                watcher::Event::Apply(_) | watcher::Event::Delete(_) => {}
            }
            if listed {
                let state = reader.state();
                last = state.len();
                if predicate(&state) {
                    return Ok(state);
                }
            }
        }
        bail!("the watch for {what} ended")
    };
    match tokio::time::timeout(timeout, watching).await {
        Ok(outcome) => outcome,
        Err(_) => {
            bail!("timed out after {timeout:?} waiting for {what} ({last} objects last seen)")
        }
    }
}

/// Calls `check` every `interval` until it returns `Some`, for at most `timeout`. For what cannot be watched
/// (a command's output, an HTTP endpoint); prefer [`wait_for`] for API objects.
pub async fn poll_until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut check: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => "not yet".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        if tokio::time::Instant::now() + interval > deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last check: {last}");
        }
        tokio::time::sleep(interval).await;
    }
}

/// The object's status (or the whole object if it has none), shortened, for error messages.
fn describe<K: Serialize>(object: Option<&K>) -> String {
    let Some(object) = object else {
        return "absent".to_owned();
    };
    let value = serde_json::to_value(object).unwrap_or_default();
    let shown = value.get("status").unwrap_or(&value).to_string();
    const LIMIT: usize = 2000;
    match shown.char_indices().nth(LIMIT) {
        Some((cut, _)) => format!("{}...", &shown[..cut]),
        None => shown,
    }
}

/// Conditions for [`wait_for`] on the objects the tests care about.
pub mod conditions {
    use super::*;

    /// The node's `Ready` condition status (`"True"`, `"False"`, `"Unknown"`), if it has one.
    pub fn node_ready_status(node: &Node) -> Option<&str> {
        node.status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.status.as_str())
    }

    /// The node is Ready.
    pub fn node_ready() -> impl Condition<Node> {
        |node: Option<&Node>| node.and_then(node_ready_status) == Some("True")
    }

    /// The node exists and is not Ready (Ready is False or Unknown), as a dead node becomes.
    pub fn node_not_ready() -> impl Condition<Node> {
        |node: Option<&Node>| {
            node.is_some_and(|n| node_ready_status(n).is_some_and(|s| s != "True"))
        }
    }

    /// The pod is in `phase` (`Pending`, `Running`, `Succeeded`, `Failed`).
    pub fn pod_phase(phase: &'static str) -> impl Condition<Pod> {
        move |pod: Option<&Pod>| {
            pod.and_then(|p| p.status.as_ref())
                .and_then(|s| s.phase.as_deref())
                == Some(phase)
        }
    }

    /// Every container of the pod has ended (now, or in its last run before a restart).
    pub fn pod_containers_exited() -> impl Condition<Pod> {
        |pod: Option<&Pod>| {
            pod.and_then(|p| p.status.as_ref())
                .and_then(|s| s.container_statuses.as_ref())
                .is_some_and(|statuses| {
                    !statuses.is_empty()
                        && statuses
                            .iter()
                            .all(|c| super::last_termination(c).is_some())
                })
        }
    }
}

/// How a container ended: its current state if it is terminated, else its last one before a restart.
pub fn last_termination(status: &ContainerStatus) -> Option<&ContainerStateTerminated> {
    fn terminated(state: Option<&ContainerState>) -> Option<&ContainerStateTerminated> {
        state.and_then(|s| s.terminated.as_ref())
    }
    terminated(status.state.as_ref()).or_else(|| terminated(status.last_state.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::conditions::*;
    use super::*;
    use kube::runtime::wait::Condition;

    fn node(ready: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n"},
            "status": {"conditions": [{"type": "Ready", "status": ready}]}
        }))
        .unwrap()
    }

    #[test]
    fn node_readiness() {
        assert!(node_ready().matches_object(Some(&node("True"))));
        assert!(!node_ready().matches_object(Some(&node("Unknown"))));
        assert!(node_not_ready().matches_object(Some(&node("Unknown"))));
        assert!(node_not_ready().matches_object(Some(&node("False"))));
        assert!(!node_not_ready().matches_object(None));
    }

    #[test]
    fn exited_containers_count_last_state() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "status": {"phase": "Running", "containerStatuses": [{
                "name": "c", "image": "i", "ready": false, "restartCount": 1,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 3, "message": "m"}}
            }]}
        }))
        .unwrap();
        assert!(pod_containers_exited().matches_object(Some(&pod)));
        assert!(pod_phase("Running").matches_object(Some(&pod)));
        let status = &pod.status.unwrap().container_statuses.unwrap()[0];
        assert_eq!(last_termination(status).unwrap().exit_code, 3);
    }

    #[test]
    fn describe_shortens() {
        assert_eq!(describe::<Node>(None), "absent");
        assert!(describe(Some(&node("True"))).contains("Ready"));
    }

    #[tokio::test]
    async fn poll_until_reports_timeout() {
        let err = poll_until(
            "nothing",
            Duration::from_millis(30),
            Duration::from_millis(10),
            || async { Ok::<Option<()>, anyhow::Error>(None) },
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("waiting for nothing"), "{err}");
    }
}
