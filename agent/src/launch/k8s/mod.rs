//! The Kubernetes half of the k3s executor: manifest narrowing and stamping, server-side
//! apply through kube-rs, rollout judgement and verification through the API server.
//!
//! - [`manifest`] (pure): parse, narrow to the service's objects, refuse unsafe objects,
//!   stamp image and commit; the one implementation of the namespace/exposure guards.
//! - [`rollout`] (pure): is the rollout complete, still progressing, or failed for good?
//! - [`verify`] (pure): does the live Deployment and its health prove the requested commit?
//! - [`cluster`] (I/O edge): the API server named by one kubeconfig file — apply (dry run
//!   first), wait for the rollout, read annotations and health through the service proxy.

pub mod cluster;
pub mod manifest;
pub mod rollout;
pub mod verify;
