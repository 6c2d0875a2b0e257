//! Client-side unpacking, as `ctr images import` does it: per layer in stack order, a snapshot
//! named by the chain id, made by Snapshots `Prepare` on the parent chain id, Diff `Apply` of
//! the layer blob onto its mounts (containerd reads the blob itself), and Snapshots `Commit`.

use std::collections::HashMap;
use std::time::Instant;

use containerd_client::services::v1::ApplyRequest;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
};
use tokio::sync::watch;
use tonic::Code;

use super::oci::{self, Desc};
use super::{Containerd, ContainerdError, Lease, descriptor, random_hex};
use crate::launch::steplog::StepLog;

/// One layer of a stack, for unpacking.
pub(super) struct Stack<'a> {
    pub image: &'a str,
    pub diff_ids: &'a [String],
    pub chains: &'a [String],
}

impl Containerd {
    /// The number of bottom layers whose snapshot exists already (their chain ids are there;
    /// a snapshot's parents always are). Those snapshots are added to the lease.
    pub(super) async fn unpacked_prefix(
        &self,
        chains: &[String],
        lease: Option<&Lease>,
    ) -> Result<usize, ContainerdError> {
        for i in (0..chains.len()).rev() {
            if self.snapshot_exists(&chains[i]).await? {
                if let Some(lease) = lease {
                    let kind = format!("snapshots/{}", self.snapshotter);
                    self.lease_resource(lease, &chains[i], &kind).await?;
                }
                return Ok(i + 1);
            }
        }
        Ok(0)
    }

    /// Unpacks layers `from..` as their blobs become ready in `ready`; returns how many it
    /// unpacked.
    pub(super) async fn unpack_from(
        &self,
        lease: &Lease,
        stack: &Stack<'_>,
        from: usize,
        mut ready: watch::Receiver<Vec<Option<Desc>>>,
        log: &StepLog,
    ) -> Result<usize, ContainerdError> {
        let n = stack.chains.len();
        let mut unpacked = 0;
        for i in from..n {
            let desc = {
                let seen = ready.wait_for(|v| v[i].is_some()).await.map_err(|_| {
                    ContainerdError::Format {
                        image: stack.image.to_string(),
                        why: format!("layer {} ({}) never arrived", i + 1, stack.diff_ids[i]),
                    }
                })?;
                seen[i].clone()
            };
            let Some(desc) = desc else { continue };
            let started = Instant::now();
            let parent = if i == 0 { "" } else { &stack.chains[i - 1] };
            let did = self
                .unpack_layer(lease, &desc, &stack.diff_ids[i], &stack.chains[i], parent)
                .await?;
            if did {
                unpacked += 1;
                log.line(format!(
                    "layer {}/{n} unpacked ({}, {:.1} s)",
                    i + 1,
                    oci::human_size(desc.size),
                    started.elapsed().as_secs_f64()
                ))
                .await;
            }
        }
        Ok(unpacked)
    }

    /// Unpacks one layer onto `parent`; false when its snapshot already existed.
    async fn unpack_layer(
        &self,
        lease: &Lease,
        layer: &Desc,
        diff_id: &str,
        chain: &str,
        parent: &str,
    ) -> Result<bool, ContainerdError> {
        if self.snapshot_exists(chain).await? {
            return Ok(false);
        }
        let key = format!("unidesk-extract-{}-{chain}", random_hex());
        let prepare = PrepareSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.clone(),
            parent: parent.to_string(),
            labels: HashMap::new(),
        };
        let mounts = match self
            .snapshots()
            .prepare(self.req(prepare, Some(lease)))
            .await
        {
            Ok(r) => r.into_inner().mounts,
            Err(s) => {
                return Err(self.rpc("prepare snapshot", format!("{chain} (layer {diff_id})"), s));
            }
        };
        let apply = ApplyRequest {
            diff: Some(descriptor(layer)),
            mounts,
            payloads: HashMap::new(),
            sync_fs: false,
        };
        let applied = DiffClient::new(self.channel.clone())
            .apply(self.req(apply, Some(lease)))
            .await;
        let applied = match applied {
            Ok(r) => r.into_inner().applied.map(|d| d.digest).unwrap_or_default(),
            Err(s) => {
                self.remove_snapshot(&key, lease).await;
                return Err(self.rpc("apply layer", format!("{} onto {key}", layer.digest), s));
            }
        };
        if applied != diff_id {
            self.remove_snapshot(&key, lease).await;
            return Err(ContainerdError::Format {
                image: layer.digest.clone(),
                why: format!("applying it gave diff id {applied}, not {diff_id}"),
            });
        }
        let commit = CommitSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            name: chain.to_string(),
            key: key.clone(),
            labels: HashMap::new(),
        };
        match self.snapshots().commit(self.req(commit, Some(lease))).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::AlreadyExists => {
                // Another unpack of the same layer won the race; its snapshot is as good.
                self.remove_snapshot(&key, lease).await;
                Ok(false)
            }
            Err(s) => {
                self.remove_snapshot(&key, lease).await;
                Err(self.rpc("commit snapshot", chain, s))
            }
        }
    }

    async fn remove_snapshot(&self, key: &str, lease: &Lease) {
        let req = RemoveSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
        };
        let _ = self.snapshots().remove(self.req(req, Some(lease))).await;
    }
}
