//! The Kubernetes half of the k3s executor: manifest narrowing and stamping, server-side
//! apply through kube-rs, rollout judgement and verification through the API server.
