//! Rollout judgement (pure): from a Deployment, its ReplicaSets and their Pods as the API
//! server reports them, decide whether the rollout of the applied generation is complete,
//! still progressing, or failed for a reason that will not go away by waiting.
//!
//! Complete means all of: the Deployment controller observed the applied generation;
//! `updatedReplicas == availableReplicas == spec.replicas`; `status.replicas ==
//! updatedReplicas`; no old ReplicaSet has available replicas and no old pod is still ready
//! (a Deployment is never reported done while old pods still serve — argo-cd #17408).
//!
//! Failed reasons: a container waiting in `ImagePullBackOff`, `ErrImagePull`,
//! `ErrImageNeverPull`, `InvalidImageName`, or `CrashLoopBackOff` after restarts; a pod
//! `PodScheduled=False` `Unschedulable`; the new ReplicaSet's `ReplicaFailure`
//! `FailedCreate` (quota, LimitRange); the Deployment's `Progressing=False`
//! `ProgressDeadlineExceeded`. Anything else (`ContainerCreating`,
//! `CreateContainerConfigError`, …) is described in [`Rollout::Progressing`].

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The annotation the Deployment controller puts on a Deployment and its ReplicaSets.
pub const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";

/// Container waiting reasons that waiting will not fix (with `imagePullPolicy: Never`, an
/// image that is not on the node never arrives).
const TERMINAL_WAITING: &[&str] = &[
    "ImagePullBackOff",
    "ErrImagePull",
    "ErrImageNeverPull",
    "InvalidImageName",
];

/// The state of a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rollout {
    /// Not done yet; `why` says what is still awaited.
    Progressing { why: String },
    /// Every replica runs the applied generation and no old pod serves.
    Complete,
    /// Failed for good; each reason names the object and the cause.
    Failed { reasons: Vec<String> },
}

fn name_of(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or("<unnamed>")
}

fn revision(meta: &ObjectMeta) -> Option<i64> {
    meta.annotations
        .as_ref()?
        .get(REVISION_ANNOTATION)?
        .parse()
        .ok()
}

fn owned_by(meta: &ObjectMeta, owner: &ObjectMeta, kind: &str) -> bool {
    match &meta.owner_references {
        // Objects listed by the owner's selector without owner references (as some tests and
        // older controllers give them) count as owned.
        None => true,
        Some(refs) if refs.is_empty() => true,
        Some(refs) => refs.iter().any(|r| {
            r.kind == kind
                && match &owner.uid {
                    Some(uid) => &r.uid == uid,
                    None => Some(&r.name) == owner.name.as_ref(),
                }
        }),
    }
}

/// The Deployment's current ReplicaSet: the owned one with the Deployment's revision, else
/// the owned one with the highest revision.
fn new_replicaset<'a>(deployment: &Deployment, owned: &[&'a ReplicaSet]) -> Option<&'a ReplicaSet> {
    if let Some(rev) = revision(&deployment.metadata)
        && let Some(rs) = owned.iter().find(|rs| revision(&rs.metadata) == Some(rev))
    {
        return Some(rs);
    }
    owned
        .iter()
        .max_by_key(|rs| revision(&rs.metadata).unwrap_or(i64::MIN))
        .copied()
}

fn pod_of(pod: &Pod, rs: &ReplicaSet) -> bool {
    let by_owner = pod.metadata.owner_references.as_ref().is_some_and(|refs| {
        refs.iter()
            .any(|r| r.kind == "ReplicaSet" && Some(&r.name) == rs.metadata.name.as_ref())
    });
    let hash = |meta: &ObjectMeta| {
        meta.labels
            .as_ref()
            .and_then(|l| l.get("pod-template-hash"))
            .cloned()
    };
    by_owner || (hash(&pod.metadata).is_some() && hash(&pod.metadata) == hash(&rs.metadata))
}

fn pod_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Terminal reasons and waiting descriptions of one pod.
fn pod_findings(pod: &Pod, terminal: &mut Vec<String>, waiting: &mut Vec<String>) {
    let name = name_of(&pod.metadata);
    let Some(status) = &pod.status else {
        return;
    };
    for c in status.conditions.iter().flatten() {
        if c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
        {
            terminal.push(format!(
                "pod {name} is unschedulable: {}",
                c.message.as_deref().unwrap_or("(no message)")
            ));
        }
    }
    let containers: Vec<&ContainerStatus> = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .collect();
    for c in containers {
        let Some(w) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
            continue;
        };
        let reason = w.reason.as_deref().unwrap_or("Waiting");
        let message = w.message.as_deref().unwrap_or("(no message)");
        let text = format!("pod {name} container {}: {reason}: {message}", c.name);
        if TERMINAL_WAITING.contains(&reason) {
            terminal.push(text);
        } else if reason == "CrashLoopBackOff" && c.restart_count >= 1 {
            terminal.push(format!(
                "pod {name} container {}: CrashLoopBackOff after {} restarts: {message}",
                c.name, c.restart_count
            ));
        } else {
            waiting.push(text);
        }
    }
}

/// Judges the rollout of `applied_generation` (the Deployment's `metadata.generation` after
/// the apply) from the Deployment, the ReplicaSets and the Pods its selector matches.
pub fn judge(
    applied_generation: i64,
    deployment: &Deployment,
    replicasets: &[ReplicaSet],
    pods: &[Pod],
) -> Rollout {
    let dname = name_of(&deployment.metadata);
    let status = deployment.status.clone().unwrap_or_default();
    let observed = status.observed_generation.unwrap_or(0);
    if observed < applied_generation {
        return Rollout::Progressing {
            why: format!(
                "Deployment {dname}: waiting for the controller to observe generation \
                 {applied_generation} (observed {observed})"
            ),
        };
    }

    let mut terminal = Vec::new();
    let mut waiting = Vec::new();
    for c in status.conditions.iter().flatten() {
        if c.type_ == "Progressing"
            && c.status == "False"
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
        {
            terminal.push(format!(
                "Deployment {dname}: ProgressDeadlineExceeded: {}",
                c.message.as_deref().unwrap_or("(no message)")
            ));
        }
    }

    let owned: Vec<&ReplicaSet> = replicasets
        .iter()
        .filter(|rs| owned_by(&rs.metadata, &deployment.metadata, "Deployment"))
        .collect();
    let new_rs = new_replicaset(deployment, &owned);
    if let Some(rs) = new_rs {
        let conditions = rs.status.as_ref().and_then(|s| s.conditions.as_ref());
        for c in conditions.into_iter().flatten() {
            if c.type_ == "ReplicaFailure"
                && c.status == "True"
                && c.reason.as_deref() == Some("FailedCreate")
            {
                terminal.push(format!(
                    "ReplicaSet {}: FailedCreate: {}",
                    name_of(&rs.metadata),
                    c.message.as_deref().unwrap_or("(no message)")
                ));
            }
        }
    }
    let is_new = |pod: &Pod| new_rs.is_some_and(|rs| pod_of(pod, rs));
    for pod in pods.iter().filter(|p| is_new(p)) {
        pod_findings(pod, &mut terminal, &mut waiting);
    }
    if !terminal.is_empty() {
        return Rollout::Failed { reasons: terminal };
    }

    let desired = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let replicas = status.replicas.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    let mut pending = Vec::new();
    if updated < desired {
        pending.push(format!("{updated} of {desired} new replicas updated"));
    }
    if replicas > updated {
        pending.push(format!(
            "{} old replicas pending termination",
            replicas - updated
        ));
    }
    if available != desired || available != updated {
        pending.push(format!(
            "{available} replicas available ({updated} updated, {desired} desired)"
        ));
    }
    for rs in owned.iter().filter(|rs| Some(**rs) != new_rs) {
        let old_available = rs
            .status
            .as_ref()
            .and_then(|s| s.available_replicas)
            .unwrap_or(0);
        if old_available > 0 {
            pending.push(format!(
                "old ReplicaSet {} still has {old_available} available replicas",
                name_of(&rs.metadata)
            ));
        }
    }
    for pod in pods.iter().filter(|p| !is_new(p) && pod_ready(p)) {
        pending.push(format!("old pod {} is still ready", name_of(&pod.metadata)));
    }
    if pending.is_empty() {
        return Rollout::Complete;
    }
    pending.extend(waiting);
    Rollout::Progressing {
        why: format!("Deployment {dname}: {}", pending.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn deployment(generation: i64, status: Value) -> Deployment {
        serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {
                "name": "web", "namespace": "unidesk-dev", "uid": "d-uid",
                "generation": generation,
                "annotations": {REVISION_ANNOTATION: "2"}
            },
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}},
                             "spec": {"containers": [{"name": "web", "image": "web:1"}]}}
            },
            "status": status
        }))
        .unwrap()
    }

    fn rs(name: &str, revision: &str, available: i32, conditions: Value) -> ReplicaSet {
        serde_json::from_value(json!({
            "metadata": {
                "name": name, "namespace": "unidesk-dev",
                "annotations": {REVISION_ANNOTATION: revision},
                "labels": {"app": "web", "pod-template-hash": name},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": "web", "uid": "d-uid"}]
            },
            "status": {"replicas": available, "availableReplicas": available,
                       "conditions": conditions}
        }))
        .unwrap()
    }

    fn pod(name: &str, rs: &str, ready: bool, extra_status: Value) -> Pod {
        let mut status = json!({
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
        });
        if let (Value::Object(s), Value::Object(extra)) = (&mut status, extra_status) {
            for (k, v) in extra {
                s.insert(k, v);
            }
        }
        serde_json::from_value(json!({
            "metadata": {
                "name": name, "namespace": "unidesk-dev",
                "labels": {"app": "web", "pod-template-hash": rs},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                      "name": rs, "uid": format!("{rs}-uid")}]
            },
            "status": status
        }))
        .unwrap()
    }

    fn done_status() -> Value {
        json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2,
               "availableReplicas": 2, "readyReplicas": 2})
    }

    fn waiting(container: &str, reason: &str, message: &str, restarts: i32) -> Value {
        json!({"containerStatuses": [{
            "name": container, "image": "web:2", "imageID": "", "ready": false,
            "restartCount": restarts,
            "state": {"waiting": {"reason": reason, "message": message}}
        }]})
    }

    fn reasons(r: &Rollout) -> Vec<String> {
        match r {
            Rollout::Failed { reasons } => reasons.clone(),
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    fn why(r: &Rollout) -> String {
        match r {
            Rollout::Progressing { why } => why.clone(),
            other => panic!("expected Progressing, got {other:?}"),
        }
    }

    #[test]
    fn k8s_rollout_complete_when_all_new_replicas_are_available() {
        let d = deployment(2, done_status());
        let sets = [rs("new", "2", 2, json!([])), rs("old", "1", 0, json!([]))];
        let pods = [
            pod("new-a", "new", true, json!({})),
            pod("new-b", "new", true, json!({})),
        ];
        assert_eq!(judge(2, &d, &sets, &pods), Rollout::Complete);
    }

    #[test]
    fn k8s_rollout_zero_replicas_completes() {
        let mut d = deployment(
            1,
            json!({"observedGeneration": 1, "replicas": 0, "updatedReplicas": 0}),
        );
        d.spec.as_mut().unwrap().replicas = Some(0);
        assert_eq!(judge(1, &d, &[], &[]), Rollout::Complete);
    }

    #[test]
    fn k8s_rollout_unobserved_generation_is_progressing() {
        // Status from the previous generation says "done": it must not count.
        let d = deployment(3, done_status());
        let w = why(&judge(3, &d, &[rs("new", "2", 2, json!([]))], &[]));
        assert!(w.contains("observe generation 3 (observed 2)"), "{w}");
        // No status at all.
        let d = deployment(1, json!(null));
        assert!(matches!(
            judge(1, &d, &[], &[]),
            Rollout::Progressing { .. }
        ));
    }

    #[test]
    fn k8s_rollout_old_pods_still_serving_is_never_complete() {
        // argo-cd #17408: updated == available == desired, but an old pod still serves.
        let status = json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 2,
                            "availableReplicas": 2});
        let d = deployment(2, status);
        let sets = [rs("new", "2", 2, json!([])), rs("old", "1", 1, json!([]))];
        let pods = [
            pod("new-a", "new", true, json!({})),
            pod("new-b", "new", true, json!({})),
            pod("old-a", "old", true, json!({})),
        ];
        let w = why(&judge(2, &d, &sets, &pods));
        assert!(w.contains("1 old replicas pending termination"), "{w}");
        assert!(
            w.contains("old ReplicaSet old still has 1 available"),
            "{w}"
        );
        assert!(w.contains("old pod old-a is still ready"), "{w}");
        // Even when the Deployment status already looks done, a ready old pod blocks.
        let d = deployment(2, done_status());
        let sets = [rs("new", "2", 2, json!([])), rs("old", "1", 0, json!([]))];
        let w = why(&judge(2, &d, &sets, &pods));
        assert!(w.contains("old pod old-a"), "{w}");
    }

    #[test]
    fn k8s_rollout_partial_progress_is_described() {
        let status = json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 1,
                            "availableReplicas": 1});
        let d = deployment(2, status);
        let sets = [rs("new", "2", 1, json!([]))];
        let pods = [pod(
            "new-a",
            "new",
            false,
            waiting("web", "ContainerCreating", "pulling", 0),
        )];
        let w = why(&judge(2, &d, &sets, &pods));
        assert!(w.contains("1 of 2 new replicas updated"), "{w}");
        assert!(
            w.contains("pod new-a container web: ContainerCreating"),
            "{w}"
        );
    }

    #[test]
    fn k8s_rollout_failure_table() {
        let not_done = json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 1,
                              "availableReplicas": 0});
        let quota = json!([{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
            "message": "pods \"new-x\" is forbidden: exceeded quota: dev-quota, requested: cpu=2"}]);
        let unschedulable = json!({"conditions": [{"type": "PodScheduled", "status": "False",
            "reason": "Unschedulable", "message": "0/1 nodes are available: Insufficient memory."}]});
        let deadline = json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 1,
            "conditions": [{"type": "Progressing", "status": "False",
                            "reason": "ProgressDeadlineExceeded",
                            "message": "ReplicaSet \"new\" has timed out progressing."}]});
        // (name, status, new RS conditions, new pod status, expected reason fragments)
        let table: Vec<(&str, Value, Value, Value, Vec<&str>)> = vec![
            (
                "ImagePullBackOff",
                not_done.clone(),
                json!([]),
                waiting(
                    "web",
                    "ImagePullBackOff",
                    "Back-off pulling image \"web:2\"",
                    0,
                ),
                vec!["pod new-a container web: ImagePullBackOff", "web:2"],
            ),
            (
                "ErrImagePull",
                not_done.clone(),
                json!([]),
                waiting("web", "ErrImagePull", "pull access denied", 0),
                vec!["ErrImagePull: pull access denied"],
            ),
            (
                "ErrImageNeverPull",
                not_done.clone(),
                json!([]),
                waiting(
                    "web",
                    "ErrImageNeverPull",
                    "image is not present with pull policy of Never",
                    0,
                ),
                vec!["container web: ErrImageNeverPull: image is not present"],
            ),
            (
                "CrashLoopBackOff",
                not_done.clone(),
                json!([]),
                waiting(
                    "web",
                    "CrashLoopBackOff",
                    "back-off 10s restarting failed container",
                    3,
                ),
                vec!["pod new-a container web: CrashLoopBackOff after 3 restarts"],
            ),
            (
                "Unschedulable",
                not_done.clone(),
                json!([]),
                unschedulable,
                vec!["pod new-a is unschedulable: 0/1 nodes are available: Insufficient memory."],
            ),
            (
                "FailedCreate",
                not_done.clone(),
                quota,
                json!({}),
                vec!["ReplicaSet new: FailedCreate: pods \"new-x\" is forbidden: exceeded quota"],
            ),
            (
                "ProgressDeadlineExceeded",
                deadline,
                json!([]),
                json!({}),
                vec!["Deployment web: ProgressDeadlineExceeded: ReplicaSet \"new\" has timed out"],
            ),
        ];
        for (name, status, rs_conditions, pod_status, expected) in table {
            let d = deployment(2, status);
            let sets = [
                rs("new", "2", 0, rs_conditions),
                rs("old", "1", 2, json!([])),
            ];
            let pods = [pod("new-a", "new", false, pod_status)];
            let got = reasons(&judge(2, &d, &sets, &pods));
            let text = got.join(" | ");
            for fragment in expected {
                assert!(
                    text.contains(fragment),
                    "{name}: {fragment:?} not in {text:?}"
                );
            }
        }
    }

    #[test]
    fn k8s_rollout_non_terminal_reasons_keep_progressing() {
        let not_done = json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 1,
                              "availableReplicas": 0});
        for (reason, restarts) in [
            ("CreateContainerConfigError", 0),
            ("ContainerCreating", 0),
            ("CrashLoopBackOff", 0),
            ("PodInitializing", 0),
        ] {
            let d = deployment(2, not_done.clone());
            let sets = [rs("new", "2", 0, json!([]))];
            let pods = [pod(
                "new-a",
                "new",
                false,
                waiting("web", reason, "m", restarts),
            )];
            let w = why(&judge(2, &d, &sets, &pods));
            assert!(w.contains(reason), "{reason}: {w}");
        }
    }

    #[test]
    fn k8s_rollout_failures_of_old_pods_do_not_count() {
        // An old pod crash-looping is the old version's problem, not this rollout's.
        let d = deployment(2, done_status());
        let sets = [rs("new", "2", 2, json!([])), rs("old", "1", 0, json!([]))];
        let pods = [
            pod("new-a", "new", true, json!({})),
            pod("new-b", "new", true, json!({})),
            pod(
                "old-a",
                "old",
                false,
                waiting("web", "CrashLoopBackOff", "x", 9),
            ),
        ];
        assert_eq!(judge(2, &d, &sets, &pods), Rollout::Complete);
    }

    #[test]
    fn k8s_rollout_new_replicaset_by_highest_revision_without_deployment_annotation() {
        let mut d = deployment(2, done_status());
        d.metadata.annotations = None;
        let quota = json!([{"type": "ReplicaFailure", "status": "True",
                            "reason": "FailedCreate", "message": "quota"}]);
        // The failing RS is old (revision 1): not this rollout's failure.
        let sets = [rs("new", "5", 2, json!([])), rs("old", "1", 0, quota)];
        assert_eq!(judge(2, &d, &sets, &[]), Rollout::Complete);
    }

    #[test]
    fn k8s_rollout_replicasets_of_other_owners_are_ignored() {
        let d = deployment(2, done_status());
        let mut foreign = rs("other", "1", 3, json!([]));
        foreign.metadata.owner_references.as_mut().unwrap()[0].uid = "someone-else".into();
        let sets = [rs("new", "2", 2, json!([])), foreign];
        assert_eq!(judge(2, &d, &sets, &[]), Rollout::Complete);
    }
}
