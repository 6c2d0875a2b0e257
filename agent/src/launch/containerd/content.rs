//! Writing one blob through the Content service's client-streaming `Write`.
//!
//! The server answers every request, so the answers are drained by a task of their own while
//! the data goes out; each write carries its offset (a write at offset 0 after data would
//! truncate the ingest). The first request states the expected digest when it is known, and
//! containerd answers `AlreadyExists` at once when the blob is there.

use std::collections::HashMap;

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::{WriteAction, WriteContentRequest, WriteContentResponse};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// An open ingest.
pub(super) struct BlobWriter {
    tx: Option<mpsc::Sender<WriteContentRequest>>,
    drain: JoinHandle<Result<Option<WriteContentResponse>, Status>>,
    reference: String,
    offset: i64,
    total: i64,
}

/// How opening or committing went.
pub(super) enum Opened {
    Writing(BlobWriter),
    /// The blob is already in the content store.
    Exists,
}

/// How a commit went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Committed {
    Written,
    /// Someone else committed the same blob meanwhile.
    Exists,
}

impl BlobWriter {
    /// Opens ingest `reference`; `request` adds the namespace and lease headers.
    pub(super) async fn open(
        channel: Channel,
        request: impl FnOnce(Requests) -> tonic::Request<Requests>,
        reference: &str,
        expected: Option<&str>,
        total: u64,
    ) -> Result<Opened, Status> {
        let (tx, rx) = mpsc::channel::<WriteContentRequest>(4);
        let total = i64::try_from(total).unwrap_or(i64::MAX);
        let first = WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: reference.to_string(),
            total,
            expected: expected.unwrap_or_default().to_string(),
            offset: 0,
            data: Vec::new(),
            labels: HashMap::new(),
        };
        // The channel has room: the first request is queued before the call starts.
        let _ = tx.send(first).await;
        let mut client = ContentClient::new(channel)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        let mut answers = match client.write(request(Requests(rx))).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::AlreadyExists => return Ok(Opened::Exists),
            Err(s) => return Err(s),
        };
        match answers.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return Err(Status::unknown("containerd closed the write stream")),
            Err(s) if s.code() == Code::AlreadyExists => return Ok(Opened::Exists),
            Err(s) => return Err(s),
        }
        let drain = tokio::spawn(async move {
            let mut last = None;
            while let Some(answer) = answers.message().await? {
                last = Some(answer);
            }
            Ok(last)
        });
        Ok(Opened::Writing(BlobWriter {
            tx: Some(tx),
            drain,
            reference: reference.to_string(),
            offset: 0,
            total,
        }))
    }

    /// The ingest's ref.
    pub(super) fn reference(&self) -> &str {
        &self.reference
    }

    /// Bytes sent so far.
    pub(super) fn offset(&self) -> u64 {
        self.offset as u64
    }

    async fn send(&mut self, req: WriteContentRequest) -> Result<(), Status> {
        let Some(tx) = &self.tx else {
            return Err(Status::internal("write after commit"));
        };
        tokio::select! {
            sent = tx.send(req) => match sent {
                Ok(()) => Ok(()),
                Err(_) => Err(self.failure().await),
            },
            ended = &mut self.drain => Err(match ended {
                Ok(Err(s)) => s,
                Ok(Ok(_)) => Status::unknown("containerd ended the write stream early"),
                Err(e) => Status::internal(format!("write answer task: {e}")),
            }),
        }
    }

    async fn failure(&mut self) -> Status {
        self.tx = None;
        match (&mut self.drain).await {
            Ok(Err(s)) => s,
            Ok(Ok(_)) => Status::unknown("containerd ended the write stream early"),
            Err(e) => Status::internal(format!("write answer task: {e}")),
        }
    }

    /// Sends `data` at the current offset.
    pub(super) async fn write(&mut self, data: Vec<u8>) -> Result<(), Status> {
        let len = data.len() as i64;
        let req = WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: self.reference.clone(),
            total: self.total,
            expected: String::new(),
            offset: self.offset,
            data,
            labels: HashMap::new(),
        };
        self.send(req).await?;
        crate::metrics::imported(len.unsigned_abs());
        self.offset += len;
        Ok(())
    }

    /// Commits the ingest as `expected` with `labels`; containerd checks size and digest.
    pub(super) async fn commit(
        mut self,
        expected: &str,
        labels: HashMap<String, String>,
    ) -> Result<Committed, Status> {
        let req = WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref: self.reference.clone(),
            total: self.offset,
            expected: expected.to_string(),
            offset: self.offset,
            data: Vec::new(),
            labels,
        };
        self.send(req).await?;
        self.tx = None;
        match (&mut self.drain).await {
            Ok(Ok(Some(answer))) => {
                if answer.digest != expected {
                    return Err(Status::data_loss(format!(
                        "containerd committed {} instead of {expected}",
                        answer.digest
                    )));
                }
                Ok(Committed::Written)
            }
            Ok(Ok(None)) => Err(Status::unknown("containerd did not answer the commit")),
            Ok(Err(s)) if s.code() == Code::AlreadyExists => Ok(Committed::Exists),
            Ok(Err(s)) => Err(s),
            Err(e) => Err(Status::internal(format!("write answer task: {e}"))),
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        self.drain.abort();
    }
}

/// A request stream over a channel receiver (what `tokio-stream`'s `ReceiverStream` does).
pub(super) struct Requests(mpsc::Receiver<WriteContentRequest>);

impl futures::Stream for Requests {
    type Item = WriteContentRequest;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}
