//! Import into the node's containerd (the one k3s runs): images streamed out of Docker or
//! pulled from a registry, written through the Content service under a lease, recorded through
//! the Images service with the CRI labels, and unpacked client-side for the snapshotter.
//!
//! The import works with containerd 1.6 (no Transfer service) as well as 1.7 and 2.x: every
//! blob goes through Content `Write` (client-streaming, bounded chunks), the image record
//! through Images `Create`/`Update`, and the unpack is done the way `ctr images import` does
//! it: per layer in stack order Snapshots `Prepare(key, parent chain id)`, Diff `Apply`,
//! Snapshots `Commit(chain id)`. Everything happens under a lease (with a `gc.expire` safety
//! net) that is deleted at the end, and the `containerd.io/gc.ref.*` labels tie image →
//! manifest → config and layers → top snapshot, so garbage collection keeps exactly what the
//! image needs.
//!
//! Modules: [`reference`] (name normalization), [`oci`] (chain ids, manifests, labels,
//! config facts — pure), [`export`] (reading Docker's export as it streams), [`content`] (one
//! blob's ingest), `unpack`, `docker` (the import from Docker), `pause` (the sandbox image
//! from a registry).

mod content;
mod docker;
pub mod export;
pub mod oci;
mod pause;
pub mod reference;
mod unpack;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::StatSnapshotRequest;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::{
    CreateImageRequest, DeleteImageRequest, GetImageRequest, Image, InfoRequest,
    ReadContentRequest, UpdateImageRequest, UpdateRequest,
};
use containerd_client::types::Descriptor;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

pub use docker::ImportReport;
pub use pause::PauseReport;
pub use reference::{BadReference, normalize};

/// The snapshotter k3s uses by default.
pub const DEFAULT_SNAPSHOTTER: &str = "overlayfs";
/// The namespace the CRI (and so the kubelet) uses.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// k3s's sandbox image.
pub const DEFAULT_PAUSE_IMAGE: &str = "rancher/mirrored-pause:3.6";
/// How long a lease of an interrupted import keeps its content before containerd collects it.
const LEASE_EXPIRY: Duration = Duration::from_secs(3600);
/// Largest manifest or config read into memory.
const SMALL_BLOB_LIMIT: i64 = 16 * 1024 * 1024;

/// What went wrong, naming the image, digest, socket and step.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error(
        "cannot connect to containerd at {socket}: {source}. Is containerd running? (k3s runs \
         it at /run/k3s/containerd/containerd.sock; on the testbed `bash scripts/testbed-up` \
         starts it; otherwise `containerd --address {socket}`)"
    )]
    Connect {
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("containerd namespace {namespace:?} is not usable as a gRPC header value")]
    Namespace { namespace: String },
    #[error(
        "containerd at {socket} (namespace {namespace}): {step} for {subject} failed: {status}"
    )]
    Rpc {
        socket: PathBuf,
        namespace: String,
        step: &'static str,
        subject: String,
        status: Box<Status>,
    },
    #[error("Docker: {step} of image {image} failed: {source}")]
    Docker {
        image: String,
        step: &'static str,
        #[source]
        source: Box<bollard::errors::Error>,
    },
    #[error("image {image}: {why}")]
    Format { image: String, why: String },
    #[error(transparent)]
    Reference(#[from] BadReference),
    #[error("image {name} is not in containerd namespace {namespace}")]
    NotFound { name: String, namespace: String },
    #[error("registry: {step} of {reference} failed: {source}")]
    Registry {
        reference: String,
        step: &'static str,
        #[source]
        source: Box<oci_client::errors::OciDistributionError>,
    },
    #[error("{reference} is not a pause image: {why}; nothing was recorded under that name")]
    NotPause { reference: String, why: String },
    #[error("import of {image} cancelled; its lease was deleted and no image record was made")]
    Cancelled { image: String },
}

/// What `ctr images check` says about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageCheck {
    pub name: String,
    /// The image record's target (a manifest or an index).
    pub target: String,
    pub config: String,
    /// Blobs the image needs for this platform (manifest(s), config, layers) and how many are
    /// present.
    pub required: usize,
    pub present: usize,
    /// Every required blob is present.
    pub complete: bool,
    /// The snapshot of the top layer's chain id exists in the snapshotter.
    pub unpacked: bool,
    pub labels: BTreeMap<String, String>,
}

/// A lease: the header value every request of one import carries.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    id: String,
    header: AsciiMetadataValue,
}

/// A client of one containerd namespace and snapshotter.
#[derive(Debug, Clone)]
pub struct Containerd {
    channel: Channel,
    socket: PathBuf,
    namespace: String,
    namespace_header: AsciiMetadataValue,
    snapshotter: String,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A short random hex string for lease ids and ingest refs.
fn random_hex() -> String {
    hex::encode(rand::random::<[u8; 6]>())
}

impl Containerd {
    /// Connects to the containerd socket at `socket`; requests go to `namespace`, unpacking to
    /// `snapshotter`.
    pub async fn connect(
        socket: &Path,
        namespace: &str,
        snapshotter: &str,
    ) -> Result<Self, ContainerdError> {
        let namespace_header =
            MetadataValue::try_from(namespace).map_err(|_| ContainerdError::Namespace {
                namespace: namespace.to_string(),
            })?;
        let channel = containerd_client::connect(socket).await.map_err(|source| {
            ContainerdError::Connect {
                socket: socket.to_path_buf(),
                source,
            }
        })?;
        Ok(Self {
            channel,
            socket: socket.to_path_buf(),
            namespace: namespace.to_string(),
            namespace_header,
            snapshotter: snapshotter.to_string(),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn snapshotter(&self) -> &str {
        &self.snapshotter
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A request in this namespace, under `lease` if given.
    fn req<T>(&self, msg: T, lease: Option<&Lease>) -> Request<T> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        md.insert("containerd-namespace", self.namespace_header.clone());
        if let Some(l) = lease {
            md.insert("containerd-lease", l.header.clone());
        }
        r
    }

    fn rpc(
        &self,
        step: &'static str,
        subject: impl Into<String>,
        status: Status,
    ) -> ContainerdError {
        ContainerdError::Rpc {
            socket: self.socket.clone(),
            namespace: self.namespace.clone(),
            step,
            subject: subject.into(),
            status: Box::new(status),
        }
    }

    fn content(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone())
    }

    fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }

    fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone())
    }

    /// Creates a lease that expires on its own after [`LEASE_EXPIRY`] if never deleted.
    async fn create_lease(&self, what: &str) -> Result<Lease, ContainerdError> {
        let id = format!("unidesk-import-{}-{}", now_unix(), random_hex());
        let labels = HashMap::from([(
            oci::LABEL_GC_EXPIRE.to_string(),
            oci::rfc3339_utc(now_unix() + LEASE_EXPIRY.as_secs()),
        )]);
        let req = containerd_client::services::v1::CreateRequest {
            id: id.clone(),
            labels,
        };
        LeasesClient::new(self.channel.clone())
            .create(self.req(req, None))
            .await
            .map_err(|s| self.rpc("create lease", what, s))?;
        let header = MetadataValue::try_from(id.as_str())
            .map_err(|_| self.rpc("create lease", what, Status::internal("bad lease id")))?;
        Ok(Lease { id, header })
    }

    /// Deletes a lease; what it alone held becomes garbage.
    async fn delete_lease(&self, lease: &Lease) -> Result<(), ContainerdError> {
        let req = containerd_client::services::v1::DeleteRequest {
            id: lease.id.clone(),
            sync: false,
        };
        LeasesClient::new(self.channel.clone())
            .delete(self.req(req, None))
            .await
            .map(|_| ())
            .map_err(|s| self.rpc("delete lease", lease.id.clone(), s))
    }

    /// Adds a resource that already exists (content or a snapshot) to the lease so garbage
    /// collection cannot take it before the image record refers to it.
    async fn lease_resource(
        &self,
        lease: &Lease,
        id: &str,
        kind: &str,
    ) -> Result<(), ContainerdError> {
        let req = containerd_client::services::v1::AddResourceRequest {
            id: lease.id.clone(),
            resource: Some(containerd_client::services::v1::Resource {
                id: id.to_string(),
                r#type: kind.to_string(),
            }),
        };
        LeasesClient::new(self.channel.clone())
            .add_resource(self.req(req, None))
            .await
            .map(|_| ())
            .map_err(|s| self.rpc("add to lease", id, s))
    }

    /// The size of blob `digest` if it is in the content store (of this namespace).
    async fn blob_size(&self, digest: &str) -> Result<Option<u64>, ContainerdError> {
        let req = InfoRequest {
            digest: digest.to_string(),
        };
        match self.content().info(self.req(req, None)).await {
            Ok(r) => Ok(Some(
                r.into_inner().info.map_or(0, |i| i.size.max(0) as u64),
            )),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(self.rpc("content info", digest, s)),
        }
    }

    /// Sets labels on an existing blob (only those keys).
    async fn label_blob(
        &self,
        digest: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        let req = UpdateRequest {
            info: Some(containerd_client::services::v1::Info {
                digest: digest.to_string(),
                labels,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        };
        self.content()
            .update(self.req(req, None))
            .await
            .map(|_| ())
            .map_err(|s| self.rpc("label content", digest, s))
    }

    /// Reads a small blob (manifest, config) whole.
    async fn read_blob(&self, digest: &str) -> Result<Vec<u8>, ContainerdError> {
        let size = self
            .blob_size(digest)
            .await?
            .ok_or_else(|| self.rpc("read content", digest, Status::not_found("blob not found")))?;
        if size as i64 > SMALL_BLOB_LIMIT {
            return Err(ContainerdError::Format {
                image: digest.to_string(),
                why: format!("blob is {size} bytes, too large for a manifest or config"),
            });
        }
        let req = ReadContentRequest {
            digest: digest.to_string(),
            offset: 0,
            size: 0,
        };
        let mut stream = self
            .content()
            .max_decoding_message_size(64 * 1024 * 1024)
            .read(self.req(req, None))
            .await
            .map_err(|s| self.rpc("read content", digest, s))?
            .into_inner();
        let mut out = Vec::with_capacity(size as usize);
        while let Some(part) = stream
            .message()
            .await
            .map_err(|s| self.rpc("read content", digest, s))?
        {
            out.extend_from_slice(&part.data);
            if out.len() as i64 > SMALL_BLOB_LIMIT {
                break;
            }
        }
        let got = oci::sha256_digest(&out);
        if got != digest {
            return Err(ContainerdError::Format {
                image: digest.to_string(),
                why: format!("read back as {got}"),
            });
        }
        Ok(out)
    }

    /// Whether snapshot `key` exists in this snapshotter.
    async fn snapshot_exists(&self, key: &str) -> Result<bool, ContainerdError> {
        let req = StatSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
        };
        match self.snapshots().stat(self.req(req, None)).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(self.rpc("stat snapshot", key, s)),
        }
    }

    /// The image record `name` (normalized first).
    async fn get_image(&self, name: &str) -> Result<Option<Image>, ContainerdError> {
        let req = GetImageRequest {
            name: name.to_string(),
        };
        match self.images().get(self.req(req, None)).await {
            Ok(r) => Ok(r.into_inner().image),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(self.rpc("get image", name, s)),
        }
    }

    /// Creates image record `name` → `target` with the CRI labels, or points the existing one
    /// there (keeping its other labels).
    async fn put_image(
        &self,
        name: &str,
        target: Descriptor,
        lease: &Lease,
    ) -> Result<(), ContainerdError> {
        let image = Image {
            name: name.to_string(),
            labels: oci::cri_image_labels(),
            target: Some(target),
            created_at: None,
            updated_at: None,
        };
        let create = CreateImageRequest {
            image: Some(image.clone()),
            source_date_epoch: None,
        };
        match self.images().create(self.req(create, Some(lease))).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                let mut paths = vec!["target".to_string()];
                paths.extend(image.labels.keys().map(|k| format!("labels.{k}")));
                let update = UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask { paths }),
                    source_date_epoch: None,
                };
                self.images()
                    .update(self.req(update, Some(lease)))
                    .await
                    .map(|_| ())
                    .map_err(|s| self.rpc("update image", name, s))
            }
            Err(s) => Err(self.rpc("create image", name, s)),
        }
    }

    /// Deletes image record `name` (normalized first) if it exists; true when it did.
    pub async fn remove_image(&self, name: &str) -> Result<bool, ContainerdError> {
        let name = normalize(name)?;
        let req = DeleteImageRequest {
            name: name.clone(),
            sync: false,
            target: None,
        };
        match self.images().delete(self.req(req, None)).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(self.rpc("delete image", name, s)),
        }
    }

    /// Whether image record `name` (normalized first) exists.
    pub async fn has_image(&self, name: &str) -> Result<bool, ContainerdError> {
        Ok(self.get_image(&normalize(name)?).await?.is_some())
    }

    /// Resolves image `name` to its manifest for this platform: (target, manifest digest,
    /// manifest bytes' facts).
    async fn resolve(
        &self,
        name: &str,
    ) -> Result<(Image, Vec<String>, oci::Desc, Vec<oci::Desc>), ContainerdError> {
        let image = self
            .get_image(name)
            .await?
            .ok_or_else(|| ContainerdError::NotFound {
                name: name.to_string(),
                namespace: self.namespace.clone(),
            })?;
        let target = image.target.clone().unwrap_or_default();
        let mut chain = vec![target.digest.clone()];
        let mut digest = target.digest.clone();
        for _ in 0..4 {
            let bytes = self.read_blob(&digest).await?;
            let (_, kind) = oci::parse_manifest(&bytes).map_err(|why| ContainerdError::Format {
                image: name.to_string(),
                why: format!("{digest}: {why}"),
            })?;
            match kind {
                oci::ManifestKind::Image { config, layers } => {
                    return Ok((image, chain, config, layers));
                }
                oci::ManifestKind::Index { manifests } => {
                    let (_, entry) = oci::pick_platform(&manifests, oci::host_architecture())
                        .ok_or_else(|| ContainerdError::Format {
                            image: name.to_string(),
                            why: format!(
                                "index {digest} has no manifest for linux/{}",
                                oci::host_architecture()
                            ),
                        })?;
                    digest = entry.desc.digest.clone();
                    chain.push(digest.clone());
                }
            }
        }
        Err(ContainerdError::Format {
            image: name.to_string(),
            why: "indexes nested too deep".into(),
        })
    }

    /// Like `ctr images check`: are all blobs present (complete), and is the top snapshot
    /// there (unpacked)?
    pub async fn check(&self, name: &str) -> Result<ImageCheck, ContainerdError> {
        let name = normalize(name)?;
        let (image, manifests, config, layers) = self.resolve(&name).await?;
        let mut required: Vec<String> = manifests;
        required.push(config.digest.clone());
        required.extend(layers.iter().map(|l| l.digest.clone()));
        let mut present = 0;
        for d in &required {
            if self.blob_size(d).await?.is_some() {
                present += 1;
            }
        }
        let mut unpacked = false;
        if self.blob_size(&config.digest).await?.is_some() {
            let facts =
                oci::parse_config(&self.read_blob(&config.digest).await?).map_err(|why| {
                    ContainerdError::Format {
                        image: name.clone(),
                        why: format!("config {}: {why}", config.digest),
                    }
                })?;
            let chains = oci::chain_ids(&facts.diff_ids);
            unpacked = match chains.last() {
                Some(top) => self.snapshot_exists(top).await?,
                None => true,
            };
        }
        Ok(ImageCheck {
            target: image.target.map(|t| t.digest).unwrap_or_default(),
            config: config.digest,
            required: required.len(),
            present,
            complete: present == required.len(),
            unpacked,
            labels: image.labels.into_iter().collect(),
            name,
        })
    }

    /// The labels of image `name`'s config (`config.Labels`): which commit it was built from.
    pub async fn config_labels(
        &self,
        name: &str,
    ) -> Result<BTreeMap<String, String>, ContainerdError> {
        let name = normalize(name)?;
        let (_, _, config, _) = self.resolve(&name).await?;
        let bytes = self.read_blob(&config.digest).await?;
        let facts = oci::parse_config(&bytes).map_err(|why| ContainerdError::Format {
            image: name.clone(),
            why: format!("config {}: {why}", config.digest),
        })?;
        Ok(facts.labels)
    }

    /// The config bytes of image `name`.
    async fn config_bytes(&self, name: &str) -> Result<Vec<u8>, ContainerdError> {
        let (_, _, config, _) = self.resolve(name).await?;
        self.read_blob(&config.digest).await
    }

    /// Aborts ingests left open (best effort, after a cancel or failure).
    async fn abort_ingests(&self, refs: &HashSet<String>) {
        for r in refs {
            let req = containerd_client::services::v1::AbortRequest { r#ref: r.clone() };
            let _ = self.content().abort(self.req(req, None)).await;
        }
    }
}

fn descriptor(d: &oci::Desc) -> Descriptor {
    Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: i64::try_from(d.size).unwrap_or(i64::MAX),
        annotations: HashMap::new(),
    }
}
