#!/bin/sh
# Dev smoke CI of one manifest commit (docs: README "Dev CI runner").
#
# Started by the unidesk agent on the CI node with exactly this contract:
#   dev-e2e.sh --run-id <runId> --repo-url <repo> --desired-ref master \
#     --manifest-commit <full-sha> --manifest-file <work>/<runId>/deploy.json \
#     --environment dev --result-dir <runs>/<runId>/script --timeout-ms <ms> [--keep-namespace]
# and this environment only: KUBECONFIG (the node's native k3s), the run's proxy variables,
# UNIDESK_CI_IMAGE (the Code Queue image imported into k3s containerd), UNIDESK_CI_RUN_ID, PATH.
#
# It creates a Tekton PipelineRun of pipeline/unidesk-dev-namespace-e2e in unidesk-ci, records
# its name in pipelinerun.txt, waits for it, and writes result.json into --result-dir. The
# pipeline creates and smokes the temporary namespace unidesk-ci-e2e-<runId> through the
# service proxy path only; it must not touch unidesk or unidesk-dev.
set -eu

run_id= repo_url= desired_ref= manifest_commit= manifest_file= environment= result_dir=
timeout_ms= keep_namespace=false
while [ $# -gt 0 ]; do
  case "$1" in
    --run-id) run_id=$2; shift 2 ;;
    --repo-url) repo_url=$2; shift 2 ;;
    --desired-ref) desired_ref=$2; shift 2 ;;
    --manifest-commit) manifest_commit=$2; shift 2 ;;
    --manifest-file) manifest_file=$2; shift 2 ;;
    --environment) environment=$2; shift 2 ;;
    --result-dir) result_dir=$2; shift 2 ;;
    --timeout-ms) timeout_ms=$2; shift 2 ;;
    --keep-namespace) keep_namespace=true; shift ;;
    *) echo "dev-e2e: unknown argument $1" >&2; exit 2 ;;
  esac
done
for v in run_id repo_url desired_ref manifest_commit manifest_file environment result_dir timeout_ms; do
  eval "val=\${$v}"
  if [ -z "$val" ]; then echo "dev-e2e: missing --$(echo "$v" | tr _ -)" >&2; exit 2; fi
done
[ "$environment" = dev ] || { echo "dev-e2e: only --environment dev" >&2; exit 2; }
[ -f "$manifest_file" ] || { echo "dev-e2e: no manifest at $manifest_file" >&2; exit 2; }

namespace="unidesk-ci-e2e-$run_id"
pipeline_run="unidesk-dev-e2e-$run_id"
echo "ci_run_id=$run_id"
echo "ci_repo=$repo_url ci_desired_ref=$desired_ref ci_manifest_commit=$manifest_commit"
echo "ci_image=${UNIDESK_CI_IMAGE:-unset} ci_namespace=$namespace keep_namespace=$keep_namespace"

result() { # ok status
  cat > "$result_dir/result.json.tmp" <<JSON
{"ok": $1, "status": "$2", "runId": "$run_id", "manifestCommit": "$manifest_commit",
 "pipelineRun": "$pipeline_run", "temporaryNamespace": "$namespace",
 "finishedAt": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"}
JSON
  mv "$result_dir/result.json.tmp" "$result_dir/result.json"
}

if ! command -v kubectl >/dev/null 2>&1; then
  echo "dev-e2e: kubectl is not installed on this node; the Tekton dev e2e needs kubectl and Tekton" >&2
  result false failed
  exit 1
fi

timeout_s=$(( timeout_ms / 1000 ))
kubectl create -f - <<YAML
apiVersion: tekton.dev/v1
kind: PipelineRun
metadata:
  name: $pipeline_run
  namespace: unidesk-ci
  labels:
    unidesk.ai/ci-run-id: "$run_id"
spec:
  pipelineRef:
    name: unidesk-dev-namespace-e2e
  timeouts:
    pipeline: "${timeout_s}s"
  params:
    - name: run-id
      value: "$run_id"
    - name: temporary-namespace
      value: "$namespace"
    - name: manifest-commit
      value: "$manifest_commit"
    - name: code-queue-image
      value: "${UNIDESK_CI_IMAGE:-}"
    - name: keep-namespace
      value: "$keep_namespace"
YAML
echo "$pipeline_run" > "$result_dir/pipelinerun.txt"

if kubectl wait --for=condition=Succeeded --timeout="${timeout_s}s" \
     -n unidesk-ci "pipelinerun/$pipeline_run"; then
  kubectl get -n unidesk-ci "pipelinerun/$pipeline_run" -o json > "$result_dir/pipelinerun.json" || true
  result true succeeded
else
  kubectl get -n unidesk-ci "pipelinerun/$pipeline_run" -o json > "$result_dir/pipelinerun.json" || true
  result false failed
  exit 1
fi
