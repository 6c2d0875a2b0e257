//! The sandbox ("pause") image: present and unpacked, or pulled from its registry through the
//! agent's egress proxy. A pulled image is accepted only when its config's Entrypoint is
//! exactly `["/pause"]`; its blobs are written as the registry gives them (compressed layers
//! stay compressed; containerd decompresses while applying) and it is unpacked and recorded
//! with the CRI labels, pinned.

use std::collections::HashMap;
use std::time::Instant;

use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tokio::sync::watch;

use super::content::{BlobWriter, Committed, Opened};
use super::docker::OpenRefs;
use super::oci::{self, Desc, ManifestKind};
use super::reference::{BadReference, normalize};
use super::unpack::Stack;
use super::{Containerd, ContainerdError, Lease, descriptor};
use crate::launch::steplog::StepLog;

/// What `ensure_pause` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PauseReport {
    /// The image record (normalized name).
    pub name: String,
    /// It was there, complete, unpacked and a pause image: nothing was pulled.
    pub already_present: bool,
    /// The record's target (the index when the registry gave one).
    pub target_digest: String,
    pub manifest_digest: String,
    pub config_digest: String,
    pub blobs_written: usize,
    pub blobs_skipped: usize,
    pub bytes_written: u64,
    pub layers_unpacked: usize,
}

const ACCEPTED: [&str; 4] = [
    oci::MEDIA_DOCKER_MANIFEST,
    oci::MEDIA_OCI_MANIFEST,
    oci::MEDIA_DOCKER_LIST,
    oci::MEDIA_OCI_INDEX,
];

impl Containerd {
    /// Makes sure the sandbox image `reference` (k3s's default is
    /// [`super::DEFAULT_PAUSE_IMAGE`]) is present and unpacked. When it is not, pulls it with
    /// `proxy` as the HTTP and HTTPS proxy (the agent's egress proxy, `http://127.0.0.1:18789`;
    /// `None` connects directly), over plain HTTP only when the registry is on loopback
    /// ([`super::reference::loopback_registry`]). The image is refused unless its Entrypoint is
    /// `["/pause"]`.
    pub async fn ensure_pause(
        &self,
        reference: &str,
        proxy: Option<&str>,
        log: &StepLog,
    ) -> Result<PauseReport, ContainerdError> {
        let name = normalize(reference)?;
        match self.check(&name).await {
            Ok(check) if check.complete && check.unpacked => {
                let config = self.config_bytes(&name).await?;
                match oci::judge_pause_config(&config) {
                    Ok(()) => {
                        log.decision("pause_image", "present").await;
                        return Ok(PauseReport {
                            name,
                            already_present: true,
                            target_digest: check.target,
                            config_digest: check.config,
                            ..Default::default()
                        });
                    }
                    Err(why) => {
                        log.line(format!(
                            "{name} is in containerd but is not a pause image ({why}); pulling it"
                        ))
                        .await;
                    }
                }
            }
            Ok(_) | Err(ContainerdError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        log.decision("pause_image", "pull").await;
        // reqwest is built without a default TLS provider; the workspace uses ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let parsed = Reference::try_from(reference).map_err(|e| BadReference {
            reference: reference.to_string(),
            why: e.to_string(),
        })?;
        let config = ClientConfig {
            protocol: if super::reference::loopback_registry(reference) {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            http_proxy: proxy.map(str::to_string),
            https_proxy: proxy.map(str::to_string),
            connect_timeout: Some(std::time::Duration::from_secs(30)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        };
        let client = Client::try_from(config).map_err(|e| ContainerdError::Registry {
            reference: reference.to_string(),
            step: "client set-up",
            source: Box::new(e),
        })?;
        log.line(format!(
            "pulling {reference} from {} via {}",
            parsed.resolve_registry(),
            proxy.unwrap_or("a direct connection")
        ))
        .await;
        let pulled = self.pull_pause(&client, &parsed, reference, log).await?;
        let lease = self.create_lease(reference).await?;
        let refs = OpenRefs::default();
        let result = self
            .write_pause(&client, &parsed, &name, pulled, &lease, log, &refs)
            .await;
        if result.is_err() {
            let open = refs.lock().map(|r| r.clone()).unwrap_or_default();
            self.abort_ingests(&open).await;
        }
        if let Err(e) = self.delete_lease(&lease).await {
            tracing::warn!(error = %e, "cannot delete the pull lease; it expires on its own");
        }
        result
    }

    /// Fetches the manifest (through an index if there is one) and the config, and judges the
    /// config. Nothing is written yet.
    async fn pull_pause(
        &self,
        client: &Client,
        parsed: &Reference,
        reference: &str,
        log: &StepLog,
    ) -> Result<Pulled, ContainerdError> {
        let registry = |step: &'static str| {
            move |e: oci_client::errors::OciDistributionError| ContainerdError::Registry {
                reference: reference.to_string(),
                step,
                source: Box::new(e),
            }
        };
        let format = |why: String| ContainerdError::Format {
            image: reference.to_string(),
            why,
        };
        let (bytes, _) = client
            .pull_manifest_raw(parsed, &RegistryAuth::Anonymous, &ACCEPTED)
            .await
            .map_err(registry("pull manifest"))?;
        let top_digest = oci::sha256_digest(&bytes);
        if let Some(want) = parsed.digest()
            && want != top_digest
        {
            return Err(format(format!("the registry sent {top_digest} for {want}")));
        }
        let (media, kind) =
            oci::parse_manifest(&bytes).map_err(|w| format(format!("{top_digest}: {w}")))?;
        let (index, manifest_bytes, manifest_media, config, layers, by_digest) = match kind {
            ManifestKind::Image { config, layers } => {
                (None, bytes.to_vec(), media, config, layers, parsed.clone())
            }
            ManifestKind::Index { manifests } => {
                let arch = oci::host_architecture();
                let (pos, entry) = oci::pick_platform(&manifests, arch)
                    .ok_or_else(|| format(format!("{top_digest} has no linux/{arch} image")))?;
                let by_digest = Reference::with_digest(
                    parsed.registry().to_string(),
                    parsed.repository().to_string(),
                    entry.desc.digest.clone(),
                );
                let (inner, _) = client
                    .pull_manifest_raw(&by_digest, &RegistryAuth::Anonymous, &ACCEPTED)
                    .await
                    .map_err(registry("pull platform manifest"))?;
                if oci::sha256_digest(&inner) != entry.desc.digest {
                    return Err(format(format!(
                        "the registry sent other bytes for {}",
                        entry.desc.digest
                    )));
                }
                let (inner_media, inner_kind) = oci::parse_manifest(&inner)
                    .map_err(|w| format(format!("{}: {w}", entry.desc.digest)))?;
                let ManifestKind::Image { config, layers } = inner_kind else {
                    return Err(format(format!("{} is an index again", entry.desc.digest)));
                };
                let index = Desc {
                    media_type: media,
                    size: bytes.len() as u64,
                    digest: top_digest.clone(),
                };
                (
                    Some((index, bytes.to_vec(), pos)),
                    inner.to_vec(),
                    inner_media,
                    config,
                    layers,
                    by_digest,
                )
            }
        };
        let mut config_bytes = Vec::new();
        client
            .pull_blob(&by_digest, config.digest.as_str(), &mut config_bytes)
            .await
            .map_err(registry("pull config"))?;
        if oci::sha256_digest(&config_bytes) != config.digest {
            return Err(format(format!(
                "the registry sent other bytes for config {}",
                config.digest
            )));
        }
        if let Err(why) = oci::judge_pause_config(&config_bytes) {
            log.line(format!("{reference} refused: {why}")).await;
            return Err(ContainerdError::NotPause {
                reference: reference.to_string(),
                why,
            });
        }
        let facts = oci::parse_config(&config_bytes).map_err(|w| format(format!("config: {w}")))?;
        if facts.diff_ids.len() != layers.len() {
            return Err(format(format!(
                "the manifest has {} layers, the config {} diff ids",
                layers.len(),
                facts.diff_ids.len()
            )));
        }
        let manifest = Desc {
            media_type: manifest_media,
            size: manifest_bytes.len() as u64,
            digest: oci::sha256_digest(&manifest_bytes),
        };
        Ok(Pulled {
            by_digest,
            index,
            manifest,
            manifest_bytes,
            config,
            config_bytes,
            layers,
            diff_ids: facts.diff_ids,
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn write_pause(
        &self,
        client: &Client,
        _parsed: &Reference,
        name: &str,
        pulled: Pulled,
        lease: &Lease,
        log: &StepLog,
        refs: &OpenRefs,
    ) -> Result<PauseReport, ContainerdError> {
        let mut report = PauseReport {
            name: name.to_string(),
            manifest_digest: pulled.manifest.digest.clone(),
            config_digest: pulled.config.digest.clone(),
            ..Default::default()
        };
        let n = pulled.layers.len();
        for (i, layer) in pulled.layers.iter().enumerate() {
            if self.blob_size(&layer.digest).await?.is_some() {
                self.lease_resource(lease, &layer.digest, "content").await?;
                report.blobs_skipped += 1;
                continue;
            }
            let started = Instant::now();
            let what = format!("layer {}/{n} {}", i + 1, layer.digest);
            let reference = format!("unidesk-{}-{}", lease.id, layer.digest);
            let opened = BlobWriter::open(
                self.channel.clone(),
                |s| self.req(s, Some(lease)),
                &reference,
                Some(&layer.digest),
                layer.size,
            )
            .await
            .map_err(|s| self.rpc("open content write", &what, s))?;
            let Opened::Writing(mut w) = opened else {
                self.lease_resource(lease, &layer.digest, "content").await?;
                report.blobs_skipped += 1;
                continue;
            };
            if let Ok(mut open) = refs.lock() {
                open.insert(reference.clone());
            }
            let mut stream = client
                .pull_blob_stream(&pulled.by_digest, layer.digest.as_str())
                .await
                .map_err(|e| ContainerdError::Registry {
                    reference: name.to_string(),
                    step: "pull layer",
                    source: Box::new(e),
                })?;
            let mut pending: Vec<u8> = Vec::new();
            while let Some(part) = stream.next().await {
                let part = part.map_err(|e| ContainerdError::Format {
                    image: name.to_string(),
                    why: format!("reading {what} from the registry: {e}"),
                })?;
                pending.extend_from_slice(&part);
                if pending.len() >= super::export::CHUNK {
                    w.write(std::mem::take(&mut pending))
                        .await
                        .map_err(|s| self.rpc("write content", &what, s))?;
                }
            }
            if !pending.is_empty() {
                w.write(pending)
                    .await
                    .map_err(|s| self.rpc("write content", &what, s))?;
            }
            let labels = HashMap::from([(
                oci::LABEL_UNCOMPRESSED.to_string(),
                pulled.diff_ids[i].clone(),
            )]);
            match w
                .commit(&layer.digest, labels)
                .await
                .map_err(|s| self.rpc("commit content", &what, s))?
            {
                Committed::Written => {
                    report.blobs_written += 1;
                    report.bytes_written += layer.size;
                }
                Committed::Exists => report.blobs_skipped += 1,
            }
            if let Ok(mut open) = refs.lock() {
                open.remove(&reference);
            }
            log.line(format!(
                "{what} ({}) written in {:.1} s",
                oci::human_size(layer.size),
                started.elapsed().as_secs_f64()
            ))
            .await;
        }
        let chains = oci::chain_ids(&pulled.diff_ids);
        let config_labels: HashMap<String, String> = chains
            .last()
            .map(|top| (oci::snapshot_gc_label(&self.snapshotter), top.clone()))
            .into_iter()
            .collect();
        let mut small = vec![(
            pulled.config.digest.clone(),
            pulled.config_bytes,
            config_labels,
        )];
        small.push((
            pulled.manifest.digest.clone(),
            pulled.manifest_bytes,
            oci::manifest_gc_labels(&pulled.config.digest, &pulled.layers),
        ));
        let mut target = pulled.manifest.clone();
        if let Some((index, bytes, pos)) = pulled.index {
            small.push((
                index.digest.clone(),
                bytes,
                oci::index_gc_labels(&[(pos, pulled.manifest.digest.clone())]),
            ));
            target = index;
        }
        for (digest, bytes, labels) in small {
            let size = bytes.len() as u64;
            match self
                .write_small_blob(lease, &digest, bytes, labels.clone(), refs)
                .await?
            {
                Committed::Written => {
                    report.blobs_written += 1;
                    report.bytes_written += size;
                }
                Committed::Exists => {
                    report.blobs_skipped += 1;
                    self.label_blob(&digest, labels).await?;
                }
            }
        }
        let ready: Vec<Option<Desc>> = pulled.layers.iter().cloned().map(Some).collect();
        let (_tx, rx) = watch::channel(ready);
        let stack = Stack {
            image: name,
            diff_ids: &pulled.diff_ids,
            chains: &chains,
        };
        let from = self.unpacked_prefix(&chains, Some(lease)).await?;
        report.layers_unpacked = self.unpack_from(lease, &stack, from, rx, log).await?;
        self.put_image(name, descriptor(&target), lease).await?;
        report.target_digest = target.digest;
        log.line(format!(
            "pause image {name} recorded ({}), {} blobs written, {} present",
            report.target_digest, report.blobs_written, report.blobs_skipped
        ))
        .await;
        Ok(report)
    }
}

/// A pause image fetched and judged, before anything is written.
struct Pulled {
    by_digest: Reference,
    index: Option<(Desc, Vec<u8>, usize)>,
    manifest: Desc,
    manifest_bytes: Vec<u8>,
    config: Desc,
    config_bytes: Vec<u8>,
    layers: Vec<Desc>,
    diff_ids: Vec<String>,
}
