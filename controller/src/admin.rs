//! The local admin API: one JSON request and one JSON response per connection on a Unix
//! socket. The socket file is created with mode 0600, so only its owner (the operator
//! account that runs the controller) can use it; that file mode is the access control.
//!
//! Only operations that need the running controller live here (who is connected, launching,
//! cancelling, asking an agent). Reading jobs is done from the job store's files.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use unidesk_protocol::{AgentId, LaunchSpec, ProbeSpec, Query, Reply};

use crate::hub::Hub;

/// The longest request accepted.
const MAX_REQUEST: usize = 1 << 20;

/// A request to the running controller.
// One request per connection; boxing the launch spec would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AdminRequest {
    Agents,
    Launch {
        agent: AgentId,
        spec: LaunchSpec,
        deadline_ms: u64,
    },
    Cancel {
        job_id: String,
        reason: String,
    },
    Query {
        agent: AgentId,
        query: Query,
        timeout_ms: u64,
    },
}

impl AdminRequest {
    /// A probe of `agent`.
    pub fn probe(agent: AgentId, echo_lines: u32, deadline_ms: u64) -> Self {
        AdminRequest::Launch {
            agent,
            spec: LaunchSpec::Probe(ProbeSpec { echo_lines }),
            deadline_ms,
        }
    }
}

/// The answer: `{"ok":true,"data":…}` or `{"ok":false,"error":"…"}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The admin socket could not be served or reached.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot bind admin socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot reach the controller at {path} (is `unidesk-controller serve` running?): {source}"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("admin socket {path}: {reason}")]
    Exchange { path: PathBuf, reason: String },
}

/// Binds the admin socket with mode 0600, replacing a stale socket file.
///
/// The socket is bound under a temporary name, given mode 0600 and then renamed into
/// place, so at its real path it is never reachable with the umask's looser mode.
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let bind_err = |at: &Path| {
        let at = at.to_path_buf();
        move |source| AdminError::Bind { path: at, source }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err(path))?;
    }
    let mut staged = path.as_os_str().to_owned();
    staged.push(".new");
    let staged = PathBuf::from(staged);
    match std::fs::remove_file(&staged) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(&staged)(e)),
    }
    let listener = UnixListener::bind(&staged).map_err(bind_err(&staged))?;
    let placed = std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
        .map_err(bind_err(&staged))
        .and_then(|()| std::fs::rename(&staged, path).map_err(bind_err(path)));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staged);
        return Err(e);
    }
    Ok(listener)
}

/// Serves admin requests until `cancel` fires.
pub async fn serve(hub: Arc<Hub>, listener: UnixListener, cancel: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let hub = hub.clone();
        tokio::spawn(async move { answer(hub, stream).await });
    }
}

async fn answer(hub: Arc<Hub>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64);
    let response = match reader.read_line(&mut line).await {
        Err(e) => fail(format!("cannot read request: {e}")),
        Ok(_) => match serde_json::from_str::<AdminRequest>(&line) {
            Err(e) => fail(format!("malformed admin request: {e}")),
            Ok(request) => handle(&hub, request).await,
        },
    };
    let mut bytes = serde_json::to_vec(&response).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    bytes.push(b'\n');
    let _ = write.write_all(&bytes).await;
}

fn fail(error: String) -> AdminResponse {
    AdminResponse {
        ok: false,
        data: None,
        error: Some(error),
    }
}

fn ok(data: impl Serialize) -> AdminResponse {
    match serde_json::to_value(data) {
        Ok(v) => AdminResponse {
            ok: true,
            data: Some(v),
            error: None,
        },
        Err(e) => fail(e.to_string()),
    }
}

async fn handle(hub: &Hub, request: AdminRequest) -> AdminResponse {
    match request {
        AdminRequest::Agents => ok(hub.agents()),
        AdminRequest::Launch {
            agent,
            spec,
            deadline_ms,
        } => match hub
            .submit(&agent, spec, Duration::from_millis(deadline_ms))
            .await
        {
            Ok(record) => ok(record),
            Err(e) => fail(e.to_string()),
        },
        AdminRequest::Cancel { job_id, reason } => match hub.cancel(&job_id, &reason).await {
            Ok(record) => ok(record),
            Err(e) => fail(e.to_string()),
        },
        AdminRequest::Query {
            agent,
            query,
            timeout_ms,
        } => match hub
            .query(&agent, query, Duration::from_millis(timeout_ms))
            .await
        {
            Ok(Reply::Error { reason }) => fail(format!("agent {agent}: {reason}")),
            Ok(reply) => ok(reply),
            Err(e) => fail(e.to_string()),
        },
    }
}

/// Sends one request to the controller's admin socket and returns its data.
pub async fn request(
    socket: &Path,
    request: &AdminRequest,
) -> Result<Result<serde_json::Value, String>, AdminError> {
    let exchange = |reason: String| AdminError::Exchange {
        path: socket.to_path_buf(),
        reason,
    };
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| AdminError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
    let (read, mut write) = stream.into_split();
    let mut bytes = serde_json::to_vec(request).map_err(|e| exchange(e.to_string()))?;
    bytes.push(b'\n');
    write
        .write_all(&bytes)
        .await
        .map_err(|e| exchange(e.to_string()))?;
    let mut line = String::new();
    BufReader::new(read)
        .read_line(&mut line)
        .await
        .map_err(|e| exchange(e.to_string()))?;
    let response: AdminResponse =
        serde_json::from_str(&line).map_err(|e| exchange(format!("malformed response: {e}")))?;
    Ok(match (response.ok, response.data, response.error) {
        (true, data, _) => Ok(data.unwrap_or(serde_json::Value::Null)),
        (false, _, error) => Err(error.unwrap_or_else(|| "unknown error".into())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bind_replaces_a_stale_socket_and_places_it_0600_with_nothing_left_beside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        std::fs::write(&path, b"stale").unwrap();
        std::fs::write(dir.path().join("admin.sock.new"), b"left by a crash").unwrap();
        let _listener = bind(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["admin.sock"]);
        UnixStream::connect(&path).await.unwrap();
    }

    #[tokio::test]
    async fn bind_names_the_path_it_could_not_use() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), b"").unwrap();
        let path = dir.path().join("file/admin.sock");
        let err = bind(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
}
