//! The Probe launch and `unidesk-agent check`: what this agent is, what it can do, and which
//! of Docker, containerd, Kubernetes, its egress proxy and the controller it can reach —
//! and why not. A probe may also echo numbered log lines to exercise the event plane.

use std::time::Duration;

use unidesk_protocol::{AgentFacts, Capability, Component, Reach};

use super::StepFailure;
use super::steplog::StepLog;
use crate::config::AgentConfig;

/// The agent's version.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What this build can run.
pub fn capabilities() -> Vec<Capability> {
    vec![
        Capability::Probe,
        Capability::Egress,
        Capability::ComposeDeploy,
        Capability::K3sDeploy,
        Capability::CiRun,
    ]
}

const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Checks each component the agent depends on. `controller` is what the caller knows of the
/// controller link.
pub async fn reach(config: &AgentConfig, controller: (bool, String)) -> Vec<Reach> {
    let docker_socket = config.path(&config.runtime.docker_socket);
    let docker = match bollard::Docker::connect_with_unix(
        &docker_socket.to_string_lossy(),
        3,
        bollard::API_DEFAULT_VERSION,
    ) {
        Err(e) => (
            false,
            format!("cannot use {}: {e}", docker_socket.display()),
        ),
        Ok(d) => match tokio::time::timeout(CHECK_TIMEOUT, d.version()).await {
            Ok(Ok(v)) => (
                true,
                format!(
                    "Docker Engine {} at {}",
                    v.version.unwrap_or_default(),
                    docker_socket.display()
                ),
            ),
            Ok(Err(e)) => (
                false,
                format!(
                    "Docker at {} does not answer: {e}; start dockerd",
                    docker_socket.display()
                ),
            ),
            Err(_) => (
                false,
                format!("Docker at {} timed out", docker_socket.display()),
            ),
        },
    };
    let containerd_socket = config.path(&config.runtime.containerd_socket);
    let containerd = match tokio::time::timeout(
        CHECK_TIMEOUT,
        tokio::net::UnixStream::connect(&containerd_socket),
    )
    .await
    {
        Ok(Ok(_)) => (
            true,
            format!(
                "containerd socket {} accepts connections",
                containerd_socket.display()
            ),
        ),
        Ok(Err(e)) => (
            false,
            format!(
                "cannot connect to {}: {e}; start containerd",
                containerd_socket.display()
            ),
        ),
        Err(_) => (false, format!("{} timed out", containerd_socket.display())),
    };
    let kubeconfig = config.path(&config.runtime.kubeconfig);
    let kubernetes = match std::fs::metadata(&kubeconfig) {
        Ok(_) => (
            true,
            format!(
                "kubeconfig {} present (API server not contacted by this check)",
                kubeconfig.display()
            ),
        ),
        Err(e) => (false, format!("kubeconfig {}: {e}", kubeconfig.display())),
    };
    let proxy = match config.proxy.egress {
        crate::config::EgressMode::Direct => {
            (true, "egress is direct on this node; no proxy".to_string())
        }
        crate::config::EgressMode::Tunnel => {
            match tokio::time::timeout(
                CHECK_TIMEOUT,
                tokio::net::TcpStream::connect(config.proxy.listen),
            )
            .await
            {
                Ok(Ok(_)) => (
                    true,
                    format!("egress proxy listening on {}", config.proxy.listen),
                ),
                Ok(Err(e)) => (false, format!("egress proxy {}: {e}", config.proxy.listen)),
                Err(_) => (
                    false,
                    format!("egress proxy {} timed out", config.proxy.listen),
                ),
            }
        }
    };
    [
        (Component::Docker, docker),
        (Component::Containerd, containerd),
        (Component::Kubernetes, kubernetes),
        (Component::EgressProxy, proxy),
        (Component::Controller, controller),
    ]
    .into_iter()
    .map(|(component, (ok, detail))| Reach {
        component,
        ok,
        detail,
    })
    .collect()
}

/// Connects to the Docker Engine at `socket`, agreeing on the API version with the daemon
/// (Debian's Docker 20.10 speaks at most API 1.41). `timeout_secs` bounds every request.
pub async fn docker(
    socket: &std::path::Path,
    timeout_secs: u64,
) -> Result<bollard::Docker, String> {
    let docker = bollard::Docker::connect_with_unix(
        &socket.to_string_lossy(),
        timeout_secs,
        bollard::API_DEFAULT_VERSION,
    )
    .map_err(|e| format!("cannot use Docker at {}: {e}", socket.display()))?;
    match tokio::time::timeout(CHECK_TIMEOUT, docker.negotiate_version()).await {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(format!(
            "Docker at {} does not answer: {e}; start dockerd (bash scripts/testbed-up)",
            socket.display()
        )),
        Err(_) => Err(format!(
            "Docker at {} did not answer within {CHECK_TIMEOUT:?}",
            socket.display()
        )),
    }
}

/// Runs a probe launch.
pub async fn run(
    config: &AgentConfig,
    echo_lines: u32,
    log: StepLog,
) -> Result<AgentFacts, StepFailure> {
    let reach = reach(
        config,
        (true, "this launch arrived from the controller".into()),
    )
    .await;
    for r in &reach {
        log.line(format!(
            "reach component={:?} ok={} detail={}",
            r.component, r.ok, r.detail
        ))
        .await;
    }
    for i in 1..=echo_lines {
        log.line(format!("echo line {i} of {echo_lines}")).await;
    }
    Ok(AgentFacts {
        agent_id: config.id.clone(),
        agent_version: AGENT_VERSION.to_string(),
        capabilities: capabilities(),
        reach,
    })
}
