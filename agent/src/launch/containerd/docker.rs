//! The import of an image from Docker: inspect it, see which blobs and snapshots containerd
//! has, stream Docker's export (only when something is missing), write each missing layer
//! and the config as they arrive, unpack each layer as soon as it and the layers below it are
//! in, then write the manifest and point the image records at it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bollard::Docker;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::content::{BlobWriter, Committed, Opened};
use super::export::{self, ChannelReader, Event, Plan, ReadError};
use super::oci::{self, Desc};
use super::reference::{normalize, parse_digest};
use super::unpack::Stack;
use super::{Containerd, ContainerdError, Lease, descriptor};
use crate::launch::steplog::StepLog;

/// How often a large layer reports progress.
const PROGRESS_EVERY: u64 = 64 * 1024 * 1024;

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// The image records written (normalized names).
    pub names: Vec<String>,
    pub config_digest: String,
    pub manifest_digest: String,
    /// Layers in the stack (a layer that appears twice counts twice).
    pub layers: usize,
    /// Blobs (layers, config, manifest) written, and found present and not written.
    pub blobs_written: usize,
    pub blobs_skipped: usize,
    /// Bytes sent to the content store.
    pub bytes_written: u64,
    /// Snapshots made (layers whose snapshot existed are not counted).
    pub layers_unpacked: usize,
    /// Whether Docker's export was read at all (not when every blob was present).
    pub exported: bool,
}

/// Blob counts of one import.
#[derive(Debug, Default)]
struct Tally {
    written: usize,
    skipped: usize,
    bytes: u64,
}

/// Ingests open at the moment, to abort if the import stops.
pub(super) type OpenRefs = Arc<Mutex<HashSet<String>>>;

fn lock(refs: &OpenRefs) -> std::sync::MutexGuard<'_, HashSet<String>> {
    refs.lock().unwrap_or_else(|p| p.into_inner())
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

impl Containerd {
    /// Streams `docker_image` (a tag or id) out of Docker into containerd, records it under
    /// each of `names` (normalized, e.g. `app:dev` → `docker.io/library/app:dev`) with the
    /// CRI labels, and unpacks it for the snapshotter. Blobs already present are not written;
    /// when all are, Docker's export is not read. On `cancel` the export stops, the lease is
    /// deleted and no image record is made.
    pub async fn import_from_docker(
        &self,
        docker: &Docker,
        docker_image: &str,
        names: &[String],
        log: &StepLog,
        cancel: &CancellationToken,
    ) -> Result<ImportReport, ContainerdError> {
        let format = |why: String| ContainerdError::Format {
            image: docker_image.to_string(),
            why,
        };
        if names.is_empty() {
            return Err(format("no name to record the image under".into()));
        }
        let names = names
            .iter()
            .map(|n| normalize(n))
            .collect::<Result<Vec<_>, _>>()?;
        let inspect =
            docker
                .inspect_image(docker_image)
                .await
                .map_err(|e| ContainerdError::Docker {
                    image: docker_image.to_string(),
                    step: "inspect",
                    source: Box::new(e),
                })?;
        let config_digest = inspect.id.unwrap_or_default();
        parse_digest(&config_digest).map_err(|w| format(format!("image id: {w}")))?;
        let diff_ids = inspect.root_fs.and_then(|r| r.layers).unwrap_or_default();
        for d in &diff_ids {
            parse_digest(d).map_err(|w| format(format!("layer diff id: {w}")))?;
        }
        log.line(format!(
            "import {docker_image} (id {}, {} layers) into containerd {} namespace {} as {}",
            short(&config_digest),
            diff_ids.len(),
            self.socket.display(),
            self.namespace,
            names.join(", ")
        ))
        .await;
        if cancel.is_cancelled() {
            return Err(ContainerdError::Cancelled {
                image: docker_image.to_string(),
            });
        }
        let lease = self.create_lease(docker_image).await?;
        let refs: OpenRefs = Arc::default();
        let work = self.import_leased(
            docker,
            docker_image,
            &names,
            &config_digest,
            &diff_ids,
            &lease,
            log,
            &refs,
        );
        let result = tokio::select! {
            r = work => r,
            _ = cancel.cancelled() => Err(ContainerdError::Cancelled { image: docker_image.to_string() }),
        };
        if result.is_err() {
            let open = lock(&refs).clone();
            self.abort_ingests(&open).await;
        }
        if let Err(e) = self.delete_lease(&lease).await {
            tracing::warn!(error = %e, "cannot delete the import lease; it expires on its own");
        }
        if let Err(e) = &result {
            log.line(format!("import failed: {e}")).await;
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn import_leased(
        &self,
        docker: &Docker,
        docker_image: &str,
        names: &[String],
        config_digest: &str,
        diff_ids: &[String],
        lease: &Lease,
        log: &StepLog,
        refs: &OpenRefs,
    ) -> Result<ImportReport, ContainerdError> {
        let chains = oci::chain_ids(diff_ids);
        let n = diff_ids.len();
        let mut tally = Tally::default();

        // What is there already: blobs (kept under the lease from now on) and snapshots.
        let mut present: HashMap<String, u64> = HashMap::new();
        for d in diff_ids {
            if present.contains_key(d) {
                continue;
            }
            if let Some(size) = self.blob_size(d).await? {
                self.lease_resource(lease, d, "content").await?;
                present.insert(d.clone(), size);
            }
        }
        let config_size = self.blob_size(config_digest).await?;
        let config_was_present = config_size.is_some();
        if config_was_present {
            self.lease_resource(lease, config_digest, "content").await?;
        }
        let unique: HashSet<&String> = diff_ids.iter().collect();
        tally.skipped += present.len() + usize::from(config_size.is_some());
        let already_unpacked = self.unpacked_prefix(&chains, Some(lease)).await?;
        log.decision(
            "import_blobs_present",
            &format!(
                "{}/{}",
                present.len() + usize::from(config_size.is_some()),
                unique.len() + 1
            ),
        )
        .await;
        log.decision("import_layers_unpacked", &format!("{already_unpacked}/{n}"))
            .await;
        let need_export = config_size.is_none() || present.len() < unique.len();
        log.decision(
            "import_export",
            if need_export {
                "streaming"
            } else {
                "skipped-all-present"
            },
        )
        .await;

        let initial: Vec<Option<Desc>> = diff_ids
            .iter()
            .map(|d| {
                present.get(d).map(|size| Desc {
                    media_type: oci::MEDIA_DOCKER_LAYER.into(),
                    size: *size,
                    digest: d.clone(),
                })
            })
            .collect();
        let (ready_tx, ready_rx) = watch::channel(initial);
        let stack = Stack {
            image: docker_image,
            diff_ids,
            chains: &chains,
        };
        let unpack = self.unpack_from(lease, &stack, already_unpacked, ready_rx, log);
        let (config_size, unpacked) = if need_export {
            let plan = Plan {
                image: docker_image.to_string(),
                diff_ids: diff_ids.to_vec(),
                chains: chains.clone(),
                config_digest: config_digest.to_string(),
                present: present.keys().cloned().collect(),
                config_present: config_size.is_some(),
            };
            let stream = self.stream_export(docker, plan, lease, ready_tx, log, refs, &mut tally);
            let (streamed_config, unpacked) = tokio::try_join!(stream, unpack)?;
            (config_size.or(streamed_config), unpacked)
        } else {
            drop(ready_tx);
            (config_size, unpack.await?)
        };
        let config_size = config_size.ok_or_else(|| ContainerdError::Format {
            image: docker_image.to_string(),
            why: format!("Docker's export did not contain the config {config_digest}"),
        })?;
        let snapshot_label = chains
            .last()
            .map(|top| (oci::snapshot_gc_label(&self.snapshotter), top.clone()));
        if let (Some((k, v)), true) = (&snapshot_label, config_was_present) {
            // The config was there already: make sure it keeps the top snapshot.
            self.label_blob(config_digest, HashMap::from([(k.clone(), v.clone())]))
                .await?;
        }

        // The manifest over the config and the layers in stack order.
        let config = Desc {
            media_type: oci::MEDIA_DOCKER_CONFIG.into(),
            size: config_size,
            digest: config_digest.to_string(),
        };
        let mut layers = Vec::with_capacity(n);
        for (i, d) in diff_ids.iter().enumerate() {
            let size = match present.get(d) {
                Some(s) => *s,
                None => self
                    .blob_size(d)
                    .await?
                    .ok_or_else(|| ContainerdError::Format {
                        image: docker_image.to_string(),
                        why: format!("layer {} ({d}) is missing after the export", i + 1),
                    })?,
            };
            layers.push(Desc {
                media_type: oci::MEDIA_DOCKER_LAYER.into(),
                size,
                digest: d.clone(),
            });
        }
        let manifest_bytes = oci::docker_manifest(&config, &layers);
        let manifest = Desc {
            media_type: oci::MEDIA_DOCKER_MANIFEST.into(),
            size: manifest_bytes.len() as u64,
            digest: oci::sha256_digest(&manifest_bytes),
        };
        let labels = oci::manifest_gc_labels(config_digest, &layers);
        match self
            .write_small_blob(
                lease,
                &manifest.digest,
                manifest_bytes,
                labels.clone(),
                refs,
            )
            .await?
        {
            Committed::Written => {
                tally.written += 1;
                tally.bytes += manifest.size;
            }
            Committed::Exists => {
                tally.skipped += 1;
                self.lease_resource(lease, &manifest.digest, "content")
                    .await?;
                self.label_blob(&manifest.digest, labels).await?;
            }
        }
        for name in names {
            self.put_image(name, descriptor(&manifest), lease).await?;
        }
        log.line(format!(
            "imported {docker_image} as {}: manifest {}, config {}, {} blobs written ({}), {} \
             present, {unpacked} layers unpacked",
            names.join(", "),
            short(&manifest.digest),
            short(config_digest),
            tally.written,
            oci::human_size(tally.bytes),
            tally.skipped
        ))
        .await;
        Ok(ImportReport {
            names: names.to_vec(),
            config_digest: config_digest.to_string(),
            manifest_digest: manifest.digest,
            layers: n,
            blobs_written: tally.written,
            blobs_skipped: tally.skipped,
            bytes_written: tally.bytes,
            layers_unpacked: unpacked,
            exported: need_export,
        })
    }

    /// Reads Docker's export and writes what is missing; returns the config's size when the
    /// config was in the export.
    #[allow(clippy::too_many_arguments)]
    async fn stream_export(
        &self,
        docker: &Docker,
        plan: Plan,
        lease: &Lease,
        ready: watch::Sender<Vec<Option<Desc>>>,
        log: &StepLog,
        refs: &OpenRefs,
        tally: &mut Tally,
    ) -> Result<Option<u64>, ContainerdError> {
        let image = plan.image.clone();
        let diff_ids = plan.diff_ids.clone();
        let top = plan.chains.last().cloned();
        let config_digest = plan.config_digest.clone();
        let n = diff_ids.len();
        let format = |why: String| ContainerdError::Format {
            image: image.clone(),
            why,
        };
        let (body_tx, body_rx) = mpsc::channel::<std::io::Result<bytes::Bytes>>(16);
        let (ev_tx, mut ev_rx) = mpsc::channel::<Event>(4);
        let reader = tokio::task::spawn_blocking(move || {
            export::read_export(ChannelReader::new(body_rx), &plan, &ev_tx)
        });
        let pump = async {
            let mut body = docker.export_image(&image);
            while let Some(item) = body.next().await {
                let item = item.map_err(|e| std::io::Error::other(format!("Docker: {e}")));
                let failed = item.is_err();
                if body_tx.send(item).await.is_err() || failed {
                    break;
                }
            }
            drop(body_tx);
            Ok::<(), ContainerdError>(())
        };
        let consume = async {
            let started = Instant::now();
            let mut config_size = None;
            let mut current: Option<(BlobWriter, String, Option<usize>, u64, Instant)> = None;
            let mut seen = 0usize;
            while let Some(ev) = ev_rx.recv().await {
                match ev {
                    Event::LayerStart { dir, index, size } => {
                        seen += 1;
                        let what = match index {
                            Some(i) => format!("layer {}/{n} {}", i + 1, short(&diff_ids[i])),
                            None => format!("layer in {} (placed by its hash)", short(&dir)),
                        };
                        let reference = format!("unidesk-{}-{dir}", lease.id);
                        let expected = index.map(|i| diff_ids[i].as_str());
                        let opened = BlobWriter::open(
                            self.channel.clone(),
                            |s| self.req(s, Some(lease)),
                            &reference,
                            expected,
                            size,
                        )
                        .await
                        .map_err(|s| self.rpc("open content write", &what, s))?;
                        match opened {
                            Opened::Writing(w) => {
                                lock(refs).insert(reference);
                                log.line(format!("{what} ({}): writing", oci::human_size(size)))
                                    .await;
                                current = Some((w, what, index, size, Instant::now()));
                            }
                            Opened::Exists => {
                                log.line(format!("{what}: present, not written")).await;
                            }
                        }
                    }
                    Event::Chunk(data) => {
                        if let Some((w, what, _, size, _)) = &mut current {
                            let before = w.offset();
                            w.write(data)
                                .await
                                .map_err(|s| self.rpc("write content", what.clone(), s))?;
                            let after = w.offset();
                            if after / PROGRESS_EVERY > before / PROGRESS_EVERY && after < *size {
                                log.line(format!(
                                    "{what}: {} of {}",
                                    oci::human_size(after),
                                    oci::human_size(*size)
                                ))
                                .await;
                            }
                        }
                    }
                    Event::LayerEnd { digest } => {
                        let Some(i) = diff_ids.iter().position(|d| *d == digest) else {
                            return Err(format(format!(
                                "the export holds a layer {digest} that is not one of the \
                                 image's layers"
                            )));
                        };
                        let size = match current.take() {
                            Some((w, what, index, size, t)) => {
                                if let Some(x) = index
                                    && diff_ids[x] != digest
                                {
                                    return Err(format(format!(
                                        "{what} hashed to {digest}, expected {}",
                                        diff_ids[x]
                                    )));
                                }
                                let reference = w.reference().to_string();
                                let labels = HashMap::from([(
                                    oci::LABEL_UNCOMPRESSED.to_string(),
                                    digest.clone(),
                                )]);
                                let done = w
                                    .commit(&digest, labels)
                                    .await
                                    .map_err(|s| self.rpc("commit content", &digest, s))?;
                                lock(refs).remove(&reference);
                                match done {
                                    Committed::Written => {
                                        tally.written += 1;
                                        tally.bytes += size;
                                    }
                                    Committed::Exists => {
                                        tally.skipped += 1;
                                        self.lease_resource(lease, &digest, "content").await?;
                                    }
                                }
                                let secs = t.elapsed().as_secs_f64();
                                log.line(format!(
                                    "layer {}/{n} {} written ({} in {secs:.1} s)",
                                    i + 1,
                                    short(&digest),
                                    oci::human_size(size)
                                ))
                                .await;
                                size
                            }
                            None => {
                                tally.skipped += 1;
                                self.lease_resource(lease, &digest, "content").await?;
                                self.blob_size(&digest).await?.unwrap_or_default()
                            }
                        };
                        ready.send_modify(|v| {
                            for (j, d) in diff_ids.iter().enumerate() {
                                if *d == digest {
                                    v[j] = Some(Desc {
                                        media_type: oci::MEDIA_DOCKER_LAYER.into(),
                                        size,
                                        digest: digest.clone(),
                                    });
                                }
                            }
                        });
                    }
                    Event::LayerSkipped { index, size } => {
                        seen += 1;
                        log.line(format!(
                            "layer {}/{n} {} ({}): present, not written",
                            index + 1,
                            short(&diff_ids[index]),
                            oci::human_size(size)
                        ))
                        .await;
                    }
                    Event::LayerLink { dir, target } => {
                        log.line(format!(
                            "layer in {} is the same as the one in {} (a symlink in the export)",
                            short(&dir),
                            short(&target)
                        ))
                        .await;
                    }
                    Event::Config(bytes) => {
                        let facts = oci::parse_config(&bytes)
                            .map_err(|w| format(format!("config {config_digest}: {w}")))?;
                        if facts.diff_ids != diff_ids {
                            return Err(format(format!(
                                "the config's layers {:?} differ from what Docker's inspect \
                                 said {:?}",
                                facts.diff_ids, diff_ids
                            )));
                        }
                        let size = bytes.len() as u64;
                        let labels: HashMap<String, String> = top
                            .iter()
                            .map(|t| (oci::snapshot_gc_label(&self.snapshotter), t.clone()))
                            .collect();
                        match self
                            .write_small_blob(lease, &config_digest, bytes, labels, refs)
                            .await?
                        {
                            Committed::Written => {
                                tally.written += 1;
                                tally.bytes += size;
                            }
                            Committed::Exists => tally.skipped += 1,
                        }
                        config_size = Some(size);
                    }
                }
            }
            match reader.await {
                Ok(Ok(())) => {}
                Ok(Err(ReadError::Closed)) => {
                    return Err(format("the export reader stopped".into()));
                }
                Ok(Err(e)) => return Err(format(format!("Docker's export: {e}"))),
                Err(e) => return Err(format(format!("the export reader failed: {e}"))),
            }
            let missing: Vec<&String> = {
                let v = ready.borrow();
                diff_ids
                    .iter()
                    .zip(v.iter())
                    .filter(|(_, r)| r.is_none())
                    .map(|(d, _)| d)
                    .collect()
            };
            if !missing.is_empty() {
                return Err(format(format!(
                    "Docker's export did not contain the layers {missing:?}"
                )));
            }
            log.line(format!(
                "export read: {seen} layer entries in {:.1} s",
                started.elapsed().as_secs_f64()
            ))
            .await;
            Ok(config_size)
        };
        let ((), config_size) = tokio::try_join!(pump, consume)?;
        Ok(config_size)
    }

    /// Writes a small blob (config, manifest, index) whole, or finds it present.
    pub(super) async fn write_small_blob(
        &self,
        lease: &Lease,
        digest: &str,
        bytes: Vec<u8>,
        labels: HashMap<String, String>,
        refs: &OpenRefs,
    ) -> Result<Committed, ContainerdError> {
        let reference = format!("unidesk-{}-{}", lease.id, short(digest));
        let size = bytes.len() as u64;
        let opened = BlobWriter::open(
            self.channel.clone(),
            |s| self.req(s, Some(lease)),
            &reference,
            Some(digest),
            size,
        )
        .await
        .map_err(|s| self.rpc("open content write", digest, s))?;
        let Opened::Writing(mut w) = opened else {
            self.lease_resource(lease, digest, "content").await?;
            return Ok(Committed::Exists);
        };
        lock(refs).insert(reference.clone());
        for part in bytes.chunks(export::CHUNK) {
            w.write(part.to_vec())
                .await
                .map_err(|s| self.rpc("write content", digest, s))?;
        }
        let done = w
            .commit(digest, labels)
            .await
            .map_err(|s| self.rpc("commit content", digest, s))?;
        lock(refs).remove(&reference);
        Ok(done)
    }
}
