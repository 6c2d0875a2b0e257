//! Cross-process integration tests: the real `unidesk-controller` and `unidesk-agent`
//! binaries on loopback, with real Git, Docker and containerd where a test needs them.
//! One test binary (`cargo test -p unidesk-tests`); `support` holds the fixtures.

// Test code: a failed unwrap is a failed test, and `pub` marks what support offers.
#![allow(clippy::unwrap_used, unreachable_pub)]

mod ci;
mod deploy;
mod environments;
mod faults;
mod k3s_deploy;
mod k3s_import;
mod kube_apply;
mod metrics;
mod packaging;
mod reliability;
mod runbook;
mod security;
mod support;
mod transport;
