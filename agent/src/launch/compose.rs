//! The Compose executor (`unidesk-direct`, `internal-sidecar`): finds the running container of
//! a Compose service from its compose labels and recreates it from a new image with the
//! semantics of `docker compose up -d --no-build --no-deps --force-recreate <service>` — same
//! name, labels, networks, mounts and restart policy, new image, `UNIDESK_DEPLOY_*` env — and
//! puts the previous container back when the new one cannot be created or started.
//!
//! It must not shell out to `docker` or `docker compose`, guess an image tag the service does
//! not run, build, or touch any container other than the service's own.

use std::collections::{HashMap, HashSet};

use bollard::Docker;
use bollard::models::{
    ContainerConfig, ContainerCreateBody, ContainerInspectResponse, EndpointSettings, HostConfig,
    ImageConfig, NetworkConnectRequest, NetworkingConfig,
};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, RemoveContainerOptions, RenameContainerOptions,
    StopContainerOptions,
};
use tokio_util::sync::CancellationToken;

use super::steplog::StepLog;

/// Compose label: the project a container belongs to.
pub const LABEL_PROJECT: &str = "com.docker.compose.project";
/// Compose label: the service a container runs.
pub const LABEL_SERVICE: &str = "com.docker.compose.service";
/// Compose label: the comma-separated compose files of the project.
pub const LABEL_CONFIG_FILES: &str = "com.docker.compose.project.config_files";
/// Compose label: the project's working directory.
pub const LABEL_WORKING_DIR: &str = "com.docker.compose.project.working_dir";
/// Compose label: `True` on `docker compose run` containers, which are not the service.
pub const LABEL_ONEOFF: &str = "com.docker.compose.oneoff";
/// Compose v2 label: the image id the container was created from.
pub const LABEL_IMAGE: &str = "com.docker.compose.image";

/// How long the old container gets to stop when its config names no stop timeout.
const DEFAULT_STOP_SECONDS: i64 = 10;

/// The running container of a Compose service, as its labels and inspect describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceContainer {
    /// Container id.
    pub id: String,
    /// Container name, without the leading `/`.
    pub name: String,
    /// Compose project (`com.docker.compose.project`).
    pub project: String,
    /// Compose service (`com.docker.compose.service`).
    pub service: String,
    /// Compose files of the project (`com.docker.compose.project.config_files`).
    pub config_files: Vec<String>,
    /// Working directory of the project (`com.docker.compose.project.working_dir`).
    pub working_dir: Option<String>,
    /// The image name the service runs (`Config.Image`): the tag a deploy must build.
    pub image: String,
    /// The image id the container runs.
    pub image_id: String,
}

/// The container that replaced the service's previous one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recreated {
    /// Id of the new container.
    pub container_id: String,
    /// Image id the new container runs.
    pub image_id: String,
}

/// Why finding or recreating a Compose service's container failed.
#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    /// No running container carries the service's compose labels.
    #[error("no running container for compose service {service} (project {project}); found: {found}", project = project.as_deref().unwrap_or("any"))]
    NotRunning {
        service: String,
        project: Option<String>,
        found: String,
    },
    /// More than one running container carries the service's compose labels.
    #[error("several running containers for compose service {service} (project {project}): {found}", project = project.as_deref().unwrap_or("any"))]
    Several {
        service: String,
        project: Option<String>,
        found: String,
    },
    /// The service's container lacks a label the executor needs.
    #[error("container {container} of compose service {service} has no {label} label")]
    MissingLabel {
        container: String,
        service: String,
        label: &'static str,
    },
    /// A Docker API call failed.
    #[error("docker {action} of {target} failed")]
    Docker {
        action: &'static str,
        target: String,
        #[source]
        source: bollard::errors::Error,
    },
    /// The launch was cancelled while recreating.
    #[error("recreating compose service {service} was cancelled")]
    Cancelled { service: String },
    /// The new container failed; the previous one was put back and runs again.
    #[error(
        "recreating compose service {service} with image {image} failed; the previous container {container} was restored and runs again"
    )]
    Restored {
        service: String,
        image: String,
        container: String,
        #[source]
        cause: Box<ComposeError>,
    },
    /// The new container failed and putting the previous one back failed too.
    #[error(
        "recreating compose service {service} with image {image} failed and restoring the previous container {container} failed too: {restore}"
    )]
    RestoreFailed {
        service: String,
        image: String,
        container: String,
        /// The restore failure with its causes, as text.
        restore: String,
        #[source]
        cause: Box<ComposeError>,
    },
}

fn docker_err(
    action: &'static str,
    target: &str,
) -> impl FnOnce(bollard::errors::Error) -> ComposeError {
    let target = target.to_owned();
    move |source| ComposeError::Docker {
        action,
        target,
        source,
    }
}

/// Finds the one running container of compose `service` (in `project` when given), skipping
/// one-off `run` containers. None or several running is an error that lists what was found.
#[tracing::instrument(skip(docker))]
pub async fn find_service_container(
    docker: &Docker,
    project: Option<&str>,
    service: &str,
) -> Result<ServiceContainer, ComposeError> {
    let mut labels = vec![format!("{LABEL_SERVICE}={service}")];
    if let Some(project) = project {
        labels.push(format!("{LABEL_PROJECT}={project}"));
    }
    let options = ListContainersOptions {
        all: true,
        filters: Some(HashMap::from([("label".to_owned(), labels)])),
        ..Default::default()
    };
    let target = format!("compose service {service}");
    let listed = docker
        .list_containers(Some(options))
        .await
        .map_err(docker_err("container list", &target))?;
    let mut running = Vec::new();
    let mut found = Vec::new();
    for c in &listed {
        let labels = c.labels.clone().unwrap_or_default();
        if labels
            .get(LABEL_ONEOFF)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            continue;
        }
        let name = c
            .names
            .as_ref()
            .and_then(|n| n.first())
            .map(|n| n.trim_start_matches('/').to_owned())
            .unwrap_or_else(|| c.id.clone().unwrap_or_default());
        let state = c.state.map(|s| s.to_string()).unwrap_or_default();
        found.push(format!(
            "{name} ({state}, image {})",
            c.image.as_deref().unwrap_or("?")
        ));
        if let (true, Some(id)) = (state == "running", &c.id) {
            running.push(id.clone());
        }
    }
    let found_text = if found.is_empty() {
        "no container with its compose labels".to_owned()
    } else {
        found.join(", ")
    };
    let id = match running.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(ComposeError::NotRunning {
                service: service.to_owned(),
                project: project.map(str::to_owned),
                found: found_text,
            });
        }
        _ => {
            return Err(ComposeError::Several {
                service: service.to_owned(),
                project: project.map(str::to_owned),
                found: found_text,
            });
        }
    };
    let inspected = docker
        .inspect_container(&id, None)
        .await
        .map_err(docker_err("container inspect", &id))?;
    service_container(&inspected, service)
}

/// The [`ServiceContainer`] view of an inspected container.
fn service_container(
    inspected: &ContainerInspectResponse,
    service: &str,
) -> Result<ServiceContainer, ComposeError> {
    let id = inspected.id.clone().unwrap_or_default();
    let name = inspected
        .name
        .as_deref()
        .map(|n| n.trim_start_matches('/').to_owned())
        .unwrap_or_else(|| id.clone());
    let config = inspected.config.clone().unwrap_or_default();
    let labels = config.labels.clone().unwrap_or_default();
    let missing = |label| ComposeError::MissingLabel {
        container: name.clone(),
        service: service.to_owned(),
        label,
    };
    let project = labels
        .get(LABEL_PROJECT)
        .ok_or_else(|| missing(LABEL_PROJECT))?;
    let config_files = labels
        .get(LABEL_CONFIG_FILES)
        .map(|files| {
            files
                .split(',')
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    Ok(ServiceContainer {
        id: id.clone(),
        name: name.clone(),
        project: project.clone(),
        service: labels
            .get(LABEL_SERVICE)
            .cloned()
            .unwrap_or_else(|| service.to_owned()),
        config_files,
        working_dir: labels.get(LABEL_WORKING_DIR).cloned(),
        image: config.image.clone().unwrap_or_default(),
        image_id: inspected.image.clone().unwrap_or_default(),
    })
}

/// An error and its sources as one line (`a: b: c`).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The first 12 characters of a container id, as Docker shows it.
fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Drops `value` when the old image supplied it (so the new image's value applies instead).
fn unless_from_image<T: PartialEq>(value: Option<T>, image: Option<&T>) -> Option<T> {
    match (&value, image) {
        (Some(v), Some(i)) if v == i => None,
        _ => value,
    }
}

/// Entries of `values` that the old image did not supply.
fn minus_image(values: Option<Vec<String>>, image: Option<&Vec<String>>) -> Option<Vec<String>> {
    let from_image: HashSet<&String> = image.map(|i| i.iter().collect()).unwrap_or_default();
    values.map(|v| v.into_iter().filter(|x| !from_image.contains(x)).collect())
}

/// Inspect shows links as `/other:/self/alias`; create wants `other:alias`.
fn create_links(links: Vec<String>) -> Vec<String> {
    links
        .into_iter()
        .map(|link| match link.split_once(':') {
            Some((target, alias)) if target.starts_with('/') => {
                let alias = alias.rsplit('/').next().unwrap_or(alias);
                format!("{}:{alias}", target.trim_start_matches('/'))
            }
            _ => link,
        })
        .collect()
}

/// What to create in place of `old`: its config and host config with the image's own
/// contributions taken out (so `new_image`'s CMD, env and labels apply), the new image, the
/// deploy env set, and its networks. Returns the create body and the further networks to
/// connect before start (the API takes one network at create).
fn recreate_body(
    old: &ContainerInspectResponse,
    old_image: &ImageConfig,
    new_image: &str,
    new_image_id: &str,
    deploy_env: &[(String, String)],
) -> (ContainerCreateBody, Vec<(String, EndpointSettings)>) {
    let id = old.id.clone().unwrap_or_default();
    let config: ContainerConfig = old.config.clone().unwrap_or_default();
    let mut host: HostConfig = old.host_config.clone().unwrap_or_default();
    let network_mode = host.network_mode.clone().unwrap_or_default();
    let shares_namespace = network_mode == "host" || network_mode.starts_with("container:");

    let mut env = minus_image(config.env, old_image.env.as_ref()).unwrap_or_default();
    for (key, value) in deploy_env {
        env.retain(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) != key);
        env.push(format!("{key}={value}"));
    }

    let image_labels = old_image.labels.clone().unwrap_or_default();
    let mut labels: HashMap<String, String> = config
        .labels
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, v)| image_labels.get(k) != Some(v))
        .collect();
    if labels.contains_key(LABEL_IMAGE) {
        labels.insert(LABEL_IMAGE.to_owned(), new_image_id.to_owned());
    }

    // Docker names the default hostname after the container id (or the host, on the host
    // network); carrying it over would name the new container after the old one.
    let hostname = config
        .hostname
        .filter(|h| !shares_namespace && !h.is_empty() && h != short_id(&id));

    // Anonymous volumes (from the image's VOLUME) keep their data across the recreate, as
    // Compose does, by binding them at the same place.
    let mut taken: HashSet<String> = host
        .binds
        .iter()
        .flatten()
        .filter_map(|b| b.split(':').nth(1).map(str::to_owned))
        .collect();
    taken.extend(
        host.mounts
            .iter()
            .flatten()
            .filter_map(|m| m.target.clone()),
    );
    let mut binds = host.binds.take().unwrap_or_default();
    for mount in old.mounts.iter().flatten() {
        let (Some("volume"), Some(name), Some(dest)) = (
            mount.typ.as_deref(),
            mount.name.as_deref(),
            mount.destination.as_deref(),
        ) else {
            continue;
        };
        if taken.insert(dest.to_owned()) {
            let ro = if mount.rw == Some(false) { ":ro" } else { "" };
            binds.push(format!("{name}:{dest}{ro}"));
        }
    }
    host.binds = (!binds.is_empty()).then_some(binds);
    host.links = host.links.take().map(create_links);

    let mut primary = None;
    let mut extra = Vec::new();
    if !shares_namespace && network_mode != "none" {
        let primary_name = if network_mode == "default" || network_mode.is_empty() {
            "bridge".to_owned()
        } else {
            network_mode.clone()
        };
        let networks = old
            .network_settings
            .as_ref()
            .and_then(|n| n.networks.clone())
            .unwrap_or_default();
        for (name, endpoint) in networks {
            let aliases = endpoint.aliases.map(|a| {
                a.into_iter()
                    .filter(|alias| alias != short_id(&id))
                    .collect::<Vec<_>>()
            });
            let settings = EndpointSettings {
                ipam_config: endpoint.ipam_config,
                links: endpoint.links.map(create_links),
                aliases,
                driver_opts: endpoint.driver_opts,
                ..Default::default()
            };
            if name == primary_name {
                primary = Some((name, settings));
            } else {
                extra.push((name, settings));
            }
        }
    }

    let body = ContainerCreateBody {
        hostname,
        domainname: config.domainname,
        user: unless_from_image(config.user, old_image.user.as_ref()),
        attach_stdin: config.attach_stdin,
        attach_stdout: config.attach_stdout,
        attach_stderr: config.attach_stderr,
        exposed_ports: minus_image(config.exposed_ports, old_image.exposed_ports.as_ref())
            .filter(|p| !p.is_empty()),
        tty: config.tty,
        open_stdin: config.open_stdin,
        stdin_once: config.stdin_once,
        env: Some(env),
        cmd: unless_from_image(config.cmd, old_image.cmd.as_ref()),
        healthcheck: unless_from_image(config.healthcheck, old_image.healthcheck.as_ref()),
        args_escaped: None,
        image: Some(new_image.to_owned()),
        volumes: minus_image(config.volumes, old_image.volumes.as_ref()).filter(|v| !v.is_empty()),
        working_dir: unless_from_image(config.working_dir, old_image.working_dir.as_ref())
            .filter(|w| !w.is_empty()),
        entrypoint: unless_from_image(config.entrypoint, old_image.entrypoint.as_ref()),
        network_disabled: config.network_disabled,
        on_build: None,
        labels: Some(labels),
        stop_signal: unless_from_image(config.stop_signal, old_image.stop_signal.as_ref()),
        stop_timeout: config.stop_timeout,
        shell: unless_from_image(config.shell, old_image.shell.as_ref()),
        host_config: Some(host),
        networking_config: primary.map(|(name, settings)| NetworkingConfig {
            endpoints_config: Some(HashMap::from([(name, settings)])),
        }),
    };
    (body, extra)
}

/// Recreates the service's container from `new_image` (`up -d --no-build --no-deps
/// --force-recreate <service>`): stops the old container, renames it to
/// `<name>-unidesk-old-<short id>`, creates and starts the new one under the old name, then
/// removes the old one. When create or start fails (or the launch is cancelled mid-way), the
/// new container is removed and the old one gets its name back and is started again.
#[tracing::instrument(skip_all, fields(service = %current.service, container = %current.name, image = new_image))]
pub async fn recreate(
    docker: &Docker,
    current: &ServiceContainer,
    new_image: &str,
    deploy_env: &[(String, String)],
    log: &StepLog,
    cancel: &CancellationToken,
) -> Result<Recreated, ComposeError> {
    let old = docker
        .inspect_container(&current.id, None)
        .await
        .map_err(docker_err("container inspect", &current.name))?;
    let old_id = old.id.clone().unwrap_or_else(|| current.id.clone());
    // The old image's own settings are subtracted so the new image's apply; if it is gone
    // (force-removed), everything the container has is kept.
    let old_image = match docker.inspect_image(&current.image_id).await {
        Ok(image) => image.config.unwrap_or_default(),
        Err(err) => {
            log.line(format!(
                "old image {} not inspectable ({err}); keeping the container's whole config",
                current.image_id
            ))
            .await;
            ImageConfig::default()
        }
    };
    let new_image_id = docker
        .inspect_image(new_image)
        .await
        .map_err(docker_err("image inspect", new_image))?
        .id
        .unwrap_or_default();
    let (body, extra_networks) =
        recreate_body(&old, &old_image, new_image, &new_image_id, deploy_env);
    if cancel.is_cancelled() {
        return Err(ComposeError::Cancelled {
            service: current.service.clone(),
        });
    }

    log.line(format!(
        "recreating compose service {} of project {}: container {} ({}) from image {} to {new_image}",
        current.service,
        current.project,
        current.name,
        short_id(&old_id),
        current.image
    ))
    .await;
    let stop_seconds = old
        .config
        .as_ref()
        .and_then(|c| c.stop_timeout)
        .unwrap_or(DEFAULT_STOP_SECONDS);
    docker
        .stop_container(
            &old_id,
            Some(StopContainerOptions {
                t: Some(i32::try_from(stop_seconds).unwrap_or(i32::MAX)),
                signal: None,
            }),
        )
        .await
        .map_err(docker_err("container stop", &current.name))?;
    log.line(format!("stopped {}", current.name)).await;
    let parked = format!("{}-unidesk-old-{}", current.name, short_id(&old_id));
    if let Err(source) = docker
        .rename_container(
            &old_id,
            RenameContainerOptions {
                name: parked.clone(),
            },
        )
        .await
    {
        let cause = ComposeError::Docker {
            action: "container rename",
            target: current.name.clone(),
            source,
        };
        return Err(restore(docker, current, &old_id, None, new_image, cause, log).await);
    }
    log.line(format!("renamed {} to {parked}", current.name))
        .await;

    let new_id = match create_and_start(docker, current, body, extra_networks, cancel).await {
        Ok(id) => id,
        Err((created, cause)) => {
            return Err(restore(
                docker,
                current,
                &old_id,
                created.as_deref(),
                new_image,
                cause,
                log,
            )
            .await);
        }
    };
    log.line(format!(
        "started {} ({}) from {new_image}",
        current.name,
        short_id(&new_id)
    ))
    .await;

    // Anonymous volumes now belong to the new container: remove the old one without them.
    let remove = RemoveContainerOptions {
        force: true,
        v: false,
        link: false,
    };
    match docker.remove_container(&old_id, Some(remove)).await {
        Ok(()) => {
            log.line(format!("removed previous container {parked}"))
                .await
        }
        Err(err) => {
            tracing::warn!(container = %parked, error = %err, "previous container not removed");
            log.line(format!(
                "previous container {parked} was not removed: {err}"
            ))
            .await;
        }
    }
    let image_id = docker
        .inspect_container(&new_id, None)
        .await
        .map_err(docker_err("container inspect", &current.name))?
        .image
        .unwrap_or(new_image_id);
    Ok(Recreated {
        container_id: new_id,
        image_id,
    })
}

/// Creates the new container under the service's name, connects its further networks and
/// starts it. On failure returns the id of what was created (to remove) and the cause.
async fn create_and_start(
    docker: &Docker,
    current: &ServiceContainer,
    body: ContainerCreateBody,
    extra_networks: Vec<(String, EndpointSettings)>,
    cancel: &CancellationToken,
) -> Result<String, (Option<String>, ComposeError)> {
    let cancelled = || ComposeError::Cancelled {
        service: current.service.clone(),
    };
    if cancel.is_cancelled() {
        return Err((None, cancelled()));
    }
    let options = CreateContainerOptions {
        name: Some(current.name.clone()),
        ..Default::default()
    };
    let created = docker
        .create_container(Some(options), body)
        .await
        .map_err(|e| (None, docker_err("container create", &current.name)(e)))?;
    let id = created.id;
    for (network, endpoint) in extra_networks {
        let request = NetworkConnectRequest {
            container: id.clone(),
            endpoint_config: Some(endpoint),
        };
        if let Err(e) = docker.connect_network(&network, request).await {
            return Err((Some(id), docker_err("network connect", &network)(e)));
        }
    }
    if cancel.is_cancelled() {
        return Err((Some(id), cancelled()));
    }
    if let Err(e) = docker.start_container(&id, None).await {
        return Err((Some(id), docker_err("container start", &current.name)(e)));
    }
    Ok(id)
}

/// Puts the previous container back: removes the failed new one, gives the old one its name
/// back and starts it. Returns the error to report.
async fn restore(
    docker: &Docker,
    current: &ServiceContainer,
    old_id: &str,
    new_id: Option<&str>,
    new_image: &str,
    cause: ComposeError,
    log: &StepLog,
) -> ComposeError {
    log.line(format!(
        "recreate failed: {cause}; restoring {}",
        current.name
    ))
    .await;
    let result: Result<(), ComposeError> = async {
        if let Some(new_id) = new_id {
            let remove = RemoveContainerOptions {
                force: true,
                v: false,
                link: false,
            };
            docker
                .remove_container(new_id, Some(remove))
                .await
                .map_err(docker_err("container remove", new_id))?;
        }
        let name = RenameContainerOptions {
            name: current.name.clone(),
        };
        match docker.rename_container(old_id, name).await {
            Ok(()) => {}
            // Renaming to the name it already has (the rename that failed) is fine.
            Err(bollard::errors::Error::DockerResponseServerError { message, .. })
                if message.contains("same name") => {}
            Err(e) => return Err(docker_err("container rename", old_id)(e)),
        }
        docker
            .start_container(old_id, None)
            .await
            .map_err(docker_err("container start", &current.name))
    }
    .await;
    match result {
        Ok(()) => {
            log.line(format!("restored previous container {}", current.name))
                .await;
            ComposeError::Restored {
                service: current.service.clone(),
                image: new_image.to_owned(),
                container: current.name.clone(),
                cause: Box::new(cause),
            }
        }
        Err(restore) => {
            tracing::error!(container = %current.name, error = %restore, "restore failed");
            log.line(format!(
                "restoring {} failed: {}",
                current.name,
                error_chain(&restore)
            ))
            .await;
            ComposeError::RestoreFailed {
                service: current.service.clone(),
                image: new_image.to_owned(),
                container: current.name.clone(),
                restore: error_chain(&restore),
                cause: Box::new(cause),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bollard::models::{RestartPolicy, RestartPolicyNameEnum};
    use unidesk_protocol::Step;

    use super::*;
    use crate::launch::build::test_support::*;
    use crate::launch::build::{BuildRequest, build};
    use crate::launch::verify::{Expectation, VerifyError, judge, observe};

    const OLD: &str = "1111111111111111111111111111111111111111";
    const NEW: &str = "2222222222222222222222222222222222222222";

    #[test]
    fn body_takes_out_the_old_images_settings_and_sets_deploy_env() {
        let old = ContainerInspectResponse {
            id: Some("abcdef0123456789".to_owned()),
            config: Some(ContainerConfig {
                hostname: Some("abcdef012345".to_owned()),
                env: Some(vec![
                    "PATH=/bin".to_owned(),
                    "FOO=bar".to_owned(),
                    "UNIDESK_DEPLOY_COMMIT=old".to_owned(),
                ]),
                cmd: Some(vec!["httpd".to_owned()]),
                labels: Some(HashMap::from([
                    (LABEL_SERVICE.to_owned(), "web".to_owned()),
                    (LABEL_IMAGE.to_owned(), "sha256:old".to_owned()),
                    ("unidesk.ai/source-commit".to_owned(), "old".to_owned()),
                ])),
                ..Default::default()
            }),
            host_config: Some(HostConfig {
                network_mode: Some("proj_default".to_owned()),
                binds: Some(vec!["/srv/data:/data".to_owned()]),
                links: Some(vec!["/db:/web/database".to_owned()]),
                ..Default::default()
            }),
            mounts: Some(vec![
                bollard::models::MountPoint {
                    typ: Some("bind".to_owned()),
                    source: Some("/srv/data".to_owned()),
                    destination: Some("/data".to_owned()),
                    ..Default::default()
                },
                bollard::models::MountPoint {
                    typ: Some("volume".to_owned()),
                    name: Some("f00d".to_owned()),
                    destination: Some("/cache".to_owned()),
                    rw: Some(true),
                    ..Default::default()
                },
            ]),
            network_settings: Some(bollard::models::NetworkSettings {
                networks: Some(HashMap::from([
                    (
                        "proj_default".to_owned(),
                        EndpointSettings {
                            aliases: Some(vec!["web".to_owned(), "abcdef012345".to_owned()]),
                            ip_address: Some("10.0.0.2".to_owned()),
                            ..Default::default()
                        },
                    ),
                    ("other".to_owned(), EndpointSettings::default()),
                ])),
                ..Default::default()
            }),
            ..Default::default()
        };
        let image = ImageConfig {
            env: Some(vec!["PATH=/bin".to_owned()]),
            cmd: Some(vec!["httpd".to_owned()]),
            labels: Some(HashMap::from([(
                "unidesk.ai/source-commit".to_owned(),
                "old".to_owned(),
            )])),
            ..Default::default()
        };
        let env = [("UNIDESK_DEPLOY_COMMIT".to_owned(), "new".to_owned())];
        let (body, extra) = recreate_body(&old, &image, "web:new", "sha256:new", &env);
        assert_eq!(body.image.as_deref(), Some("web:new"));
        assert_eq!(
            body.env,
            Some(vec![
                "FOO=bar".to_owned(),
                "UNIDESK_DEPLOY_COMMIT=new".to_owned()
            ])
        );
        assert_eq!(body.cmd, None, "the new image's CMD applies");
        assert_eq!(body.hostname, None);
        let labels = body.labels.unwrap();
        assert_eq!(labels[LABEL_SERVICE], "web");
        assert_eq!(labels[LABEL_IMAGE], "sha256:new");
        assert!(!labels.contains_key("unidesk.ai/source-commit"));
        let host = body.host_config.unwrap();
        assert_eq!(
            host.binds,
            Some(vec!["/srv/data:/data".to_owned(), "f00d:/cache".to_owned()])
        );
        assert_eq!(host.links, Some(vec!["db:database".to_owned()]));
        let endpoints = body.networking_config.unwrap().endpoints_config.unwrap();
        assert_eq!(
            endpoints["proj_default"].aliases,
            Some(vec!["web".to_owned()])
        );
        assert_eq!(endpoints["proj_default"].ip_address, None);
        assert_eq!(extra.len(), 1);
        assert_eq!(extra[0].0, "other");
    }

    #[test]
    fn host_network_keeps_no_hostname_and_no_endpoints() {
        let old = ContainerInspectResponse {
            id: Some("abcdef0123456789".to_owned()),
            config: Some(ContainerConfig {
                hostname: Some("the-host".to_owned()),
                ..Default::default()
            }),
            host_config: Some(HostConfig {
                network_mode: Some("host".to_owned()),
                ..Default::default()
            }),
            network_settings: Some(bollard::models::NetworkSettings {
                networks: Some(HashMap::from([(
                    "host".to_owned(),
                    EndpointSettings::default(),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (body, extra) = recreate_body(&old, &ImageConfig::default(), "i", "sha256:i", &[]);
        assert_eq!(body.hostname, None);
        assert!(body.networking_config.is_none());
        assert!(extra.is_empty());
        assert_eq!(
            body.host_config.unwrap().network_mode.as_deref(),
            Some("host")
        );
    }

    /// Builds the test web service for `commit`, serving its health on `port`.
    async fn build_web(docker: &Docker, image: &str, commit: &str, port: u16) -> String {
        let (log, mut rx) = StepLog::channel(Step::Build, 64);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let req = BuildRequest {
            service_id: "web".to_owned(),
            repo_url: "http://127.0.0.1:1/web.git".to_owned(),
            commit: commit.to_owned(),
            dockerfile: "Dockerfile".to_owned(),
            image: image.to_owned(),
            proxy: None,
            build_base: None,
            timeout: Duration::from_secs(120),
        };
        let context = tar_context(&[("Dockerfile", &web_dockerfile(port))]);
        build(docker, &req, body(context), &log, &CancellationToken::new())
            .await
            .unwrap()
            .image_id
    }

    /// Creates and starts a container that looks like Compose made it.
    async fn compose_container(
        docker: &Docker,
        name: &str,
        project: &str,
        image: &str,
        data_dir: &str,
    ) -> String {
        let labels = HashMap::from([
            (LABEL_PROJECT.to_owned(), project.to_owned()),
            (LABEL_SERVICE.to_owned(), "web".to_owned()),
            (
                LABEL_CONFIG_FILES.to_owned(),
                "/srv/p/compose.yml,/srv/p/override.yml".to_owned(),
            ),
            (LABEL_WORKING_DIR.to_owned(), "/srv/p".to_owned()),
            (LABEL_ONEOFF.to_owned(), "False".to_owned()),
        ]);
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            env: Some(vec!["FOO=bar".to_owned()]),
            labels: Some(labels),
            host_config: Some(HostConfig {
                network_mode: Some("host".to_owned()),
                binds: Some(vec![format!("{data_dir}:/data")]),
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                    maximum_retry_count: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(name.to_owned()),
            ..Default::default()
        };
        let id = docker
            .create_container(Some(options), body)
            .await
            .unwrap()
            .id;
        docker.start_container(&id, None).await.unwrap();
        id
    }

    fn deploy_env(commit: &str) -> Vec<(String, String)> {
        vec![
            ("UNIDESK_DEPLOY_SERVICE_ID".to_owned(), "web".to_owned()),
            ("UNIDESK_DEPLOY_COMMIT".to_owned(), commit.to_owned()),
        ]
    }

    #[tokio::test]
    async fn recreate_replaces_the_service_container_and_the_new_commit_verifies() {
        let docker = docker().await;
        let name = unique("web");
        let project = unique("proj");
        let repo = format!("local/{name}");
        let port = free_port();
        let data = tempfile::tempdir().unwrap();
        let data_dir = data.path().to_str().unwrap().to_owned();
        let mut cleanup = Cleanup::default();
        cleanup.containers.push(name.clone());
        cleanup
            .images
            .extend([format!("{repo}:old"), format!("{repo}:new")]);

        let old_id = build_web(&docker, &format!("{repo}:old"), OLD, port).await;
        let new_id = build_web(&docker, &format!("{repo}:new"), NEW, port).await;
        let old_container =
            compose_container(&docker, &name, &project, &format!("{repo}:old"), &data_dir).await;

        let found = find_service_container(&docker, Some(&project), "web")
            .await
            .unwrap();
        assert_eq!(found.id, old_container);
        assert_eq!(found.name, name);
        assert_eq!(found.project, project);
        assert_eq!(found.service, "web");
        assert_eq!(
            found.config_files,
            vec!["/srv/p/compose.yml", "/srv/p/override.yml"]
        );
        assert_eq!(found.working_dir.as_deref(), Some("/srv/p"));
        assert_eq!(found.image, format!("{repo}:old"));
        assert_eq!(found.image_id, old_id);

        // The healthy old service does not prove the new commit.
        let health = format!("http://127.0.0.1:{port}/health");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let observed = observe(&docker, &old_container, Some(&health), deadline)
            .await
            .unwrap();
        let expected = Expectation {
            service_id: "web".to_owned(),
            commit: NEW.to_owned(),
            image_id: new_id.clone(),
        };
        let err = judge(&expected, &observed).unwrap_err();
        assert!(matches!(err, VerifyError::WrongCommit { .. }), "{err}");
        assert!(
            err.to_string().starts_with(&format!(
                "live service web runs commit {OLD}, requested {NEW}"
            )),
            "{err}"
        );

        let (log, mut rx) = StepLog::channel(Step::Recreate, 64);
        let lines = tokio::spawn(async move {
            let mut lines = Vec::new();
            while let Some(l) = rx.recv().await {
                lines.push(l.line);
            }
            lines
        });
        let recreated = recreate(
            &docker,
            &found,
            &format!("{repo}:new"),
            &deploy_env(NEW),
            &log,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        drop(log);
        let lines = lines.await.unwrap();
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("recreating compose service web")),
            "{lines:#?}"
        );
        assert_eq!(recreated.image_id, new_id);
        assert_ne!(recreated.container_id, old_container);

        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let observed = observe(&docker, &recreated.container_id, Some(&health), deadline)
            .await
            .unwrap();
        judge(&expected, &observed).unwrap();

        let new = docker.inspect_container(&name, None).await.unwrap();
        assert_eq!(new.id.as_deref(), Some(recreated.container_id.as_str()));
        let config = new.config.unwrap();
        let labels = config.labels.unwrap();
        assert_eq!(labels[LABEL_PROJECT], project);
        assert_eq!(labels[LABEL_SERVICE], "web");
        assert_eq!(labels[LABEL_WORKING_DIR], "/srv/p");
        let env = config.env.unwrap();
        assert!(env.contains(&"FOO=bar".to_owned()), "{env:?}");
        assert!(
            env.contains(&format!("UNIDESK_DEPLOY_COMMIT={NEW}")),
            "{env:?}"
        );
        let host = new.host_config.unwrap();
        assert_eq!(host.network_mode.as_deref(), Some("host"));
        assert_eq!(host.binds, Some(vec![format!("{data_dir}:/data")]));
        assert_eq!(
            host.restart_policy.unwrap().name,
            Some(RestartPolicyNameEnum::UNLESS_STOPPED)
        );
        // The previous container is gone, under either name.
        let err = docker
            .inspect_container(&old_container, None)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                bollard::errors::Error::DockerResponseServerError {
                    status_code: 404,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn failed_recreate_restores_the_previous_container() {
        let docker = docker().await;
        let name = unique("web");
        let project = unique("proj");
        let repo = format!("local/{name}");
        let port = free_port();
        let data = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        cleanup.containers.push(name.clone());
        cleanup
            .images
            .extend([format!("{repo}:old"), format!("{repo}:broken")]);

        let old_image_id = build_web(&docker, &format!("{repo}:old"), OLD, port).await;
        let (log, mut rx) = StepLog::channel(Step::Build, 64);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let broken = BuildRequest {
            service_id: "web".to_owned(),
            repo_url: "http://127.0.0.1:1/web.git".to_owned(),
            commit: NEW.to_owned(),
            dockerfile: "Dockerfile".to_owned(),
            image: format!("{repo}:broken"),
            proxy: None,
            build_base: None,
            timeout: Duration::from_secs(120),
        };
        let context = tar_context(&[(
            "Dockerfile",
            "FROM local/busybox:latest\nCMD [\"/no/such/program\"]\n",
        )]);
        build(
            &docker,
            &broken,
            body(context),
            &log,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        let old_container = compose_container(
            &docker,
            &name,
            &project,
            &format!("{repo}:old"),
            data.path().to_str().unwrap(),
        )
        .await;

        let found = find_service_container(&docker, Some(&project), "web")
            .await
            .unwrap();
        let (log, mut rx) = StepLog::channel(Step::Recreate, 64);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let err = recreate(
            &docker,
            &found,
            &format!("{repo}:broken"),
            &deploy_env(NEW),
            &log,
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        let ComposeError::Restored {
            cause, container, ..
        } = &err
        else {
            panic!("expected a restored error, got {err:?}");
        };
        assert_eq!(container, &name);
        assert!(
            matches!(
                **cause,
                ComposeError::Docker {
                    action: "container start",
                    ..
                }
            ),
            "{cause:?}"
        );
        let chain = format!(
            "{err}: {cause}: {}",
            std::error::Error::source(&**cause).unwrap()
        );
        assert!(chain.contains("/no/such/program"), "{chain}");
        assert!(chain.contains("was restored and runs again"), "{chain}");

        let again = find_service_container(&docker, Some(&project), "web")
            .await
            .unwrap();
        assert_eq!(again.id, old_container);
        assert_eq!(again.name, name);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let health = format!("http://127.0.0.1:{port}/health");
        let observed = observe(&docker, &old_container, Some(&health), deadline)
            .await
            .unwrap();
        assert!(observed.container_running);
        assert_eq!(observed.health_commit, Some(Some(OLD.to_owned())));
        let old = Expectation {
            service_id: "web".to_owned(),
            commit: OLD.to_owned(),
            image_id: old_image_id,
        };
        judge(&old, &observed).unwrap();
    }

    #[tokio::test]
    async fn finding_a_service_names_what_was_found() {
        let docker = docker().await;
        let project = unique("proj");
        let err = find_service_container(&docker, Some(&project), "web")
            .await
            .unwrap_err();
        assert!(matches!(err, ComposeError::NotRunning { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "no running container for compose service web (project {project}); found: no container with its compose labels"
            )
        );

        // Two running replicas are ambiguous: the executor refuses to pick one.
        let (a, b) = (unique("web"), unique("web"));
        let mut cleanup = Cleanup::default();
        cleanup.containers.extend([a.clone(), b.clone()]);
        for name in [&a, &b] {
            let labels = HashMap::from([
                (LABEL_PROJECT.to_owned(), project.clone()),
                (LABEL_SERVICE.to_owned(), "web".to_owned()),
            ]);
            let body = ContainerCreateBody {
                image: Some("local/busybox:latest".to_owned()),
                cmd: Some(vec!["sleep".to_owned(), "60".to_owned()]),
                labels: Some(labels),
                host_config: Some(HostConfig {
                    network_mode: Some("host".to_owned()),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let options = CreateContainerOptions {
                name: Some(name.clone()),
                ..Default::default()
            };
            docker.create_container(Some(options), body).await.unwrap();
        }
        let err = find_service_container(&docker, Some(&project), "web")
            .await
            .unwrap_err();
        assert!(matches!(err, ComposeError::NotRunning { .. }), "{err:?}");
        assert!(err.to_string().contains(&format!("{a} (created")), "{err}");
        docker.start_container(&a, None).await.unwrap();
        docker.start_container(&b, None).await.unwrap();
        let err = find_service_container(&docker, Some(&project), "web")
            .await
            .unwrap_err();
        assert!(matches!(err, ComposeError::Several { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&a) && err.to_string().contains(&b),
            "{err}"
        );
    }
}
