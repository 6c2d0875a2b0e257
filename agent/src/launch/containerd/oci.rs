//! The image formats as data: chain ids, the manifest the import writes, the garbage-collection
//! labels that tie an image's content and snapshots together, what an image config says, and
//! whether a config is a pause image's. Pure functions.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Docker schema 2 manifest.
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config.
pub const MEDIA_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker uncompressed layer (what `docker save` holds).
pub const MEDIA_DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// OCI image manifest.
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Label keys containerd's garbage collector and the CRI read.
pub const LABEL_GC_EXPIRE: &str = "containerd.io/gc.expire";
pub const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";
pub const LABEL_CRI_IMAGE: &str = "io.cri-containerd.image";
pub const LABEL_CRI_PINNED: &str = "io.cri-containerd.pinned";

/// A content descriptor: media type, digest, size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desc {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub size: u64,
    pub digest: String,
}

/// The hex of a sha256 over `bytes`, as `sha256:<hex>`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The chain ids of a layer stack: the first is the first diff id, each next one is
/// `sha256("<previous chain id> <diff id>")`. Snapshots are named by chain id.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff in diff_ids {
        let next = match out.last() {
            None => diff.clone(),
            Some(prev) => sha256_digest(format!("{prev} {diff}").as_bytes()),
        };
        out.push(next);
    }
    out
}

#[derive(Serialize)]
struct ManifestOut<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    config: &'a Desc,
    layers: &'a [Desc],
}

/// The JSON of a Docker schema 2 manifest over `config` and `layers` (in stack order),
/// byte-for-byte the same for the same input, so a re-import finds it present.
pub fn docker_manifest(config: &Desc, layers: &[Desc]) -> Vec<u8> {
    let m = ManifestOut {
        schema_version: 2,
        media_type: MEDIA_DOCKER_MANIFEST,
        config,
        layers,
    };
    serde_json::to_vec(&m).unwrap_or_default()
}

/// Labels of a manifest blob: it refers to its config and each layer, so the garbage
/// collector keeps them while the manifest is kept.
pub fn manifest_gc_labels(config: &str, layers: &[Desc]) -> HashMap<String, String> {
    let mut labels = HashMap::new();
    labels.insert(
        "containerd.io/gc.ref.content.config".to_string(),
        config.to_string(),
    );
    for (i, l) in layers.iter().enumerate() {
        labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest.clone(),
        );
    }
    labels
}

/// Labels of an index blob that keeps the manifests the import wrote.
pub fn index_gc_labels(manifests: &[(usize, String)]) -> HashMap<String, String> {
    manifests
        .iter()
        .map(|(i, d)| (format!("containerd.io/gc.ref.content.m.{i}"), d.clone()))
        .collect()
}

/// The label key on a config blob that keeps the top snapshot of the unpacked image.
pub fn snapshot_gc_label(snapshotter: &str) -> String {
    format!("containerd.io/gc.ref.snapshot.{snapshotter}")
}

/// The labels of an image record the CRI sees and the kubelet never garbage-collects.
pub fn cri_image_labels() -> HashMap<String, String> {
    HashMap::from([
        (LABEL_CRI_IMAGE.to_string(), "managed".to_string()),
        (LABEL_CRI_PINNED.to_string(), "pinned".to_string()),
    ])
}

/// What the import needs from an image config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigFacts {
    pub diff_ids: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub entrypoint: Option<Vec<String>>,
    pub os: String,
    pub architecture: String,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    config: Option<RawRun>,
    rootfs: RawRootFs,
}

#[derive(Deserialize)]
struct RawRun {
    #[serde(rename = "Labels", default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct RawRootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// Reads an image config's layer diff ids, labels and entrypoint.
pub fn parse_config(bytes: &[u8]) -> Result<ConfigFacts, String> {
    let raw: RawConfig =
        serde_json::from_slice(bytes).map_err(|e| format!("not an image config: {e}"))?;
    let run = raw.config.unwrap_or(RawRun {
        labels: None,
        entrypoint: None,
    });
    Ok(ConfigFacts {
        diff_ids: raw.rootfs.diff_ids,
        labels: run.labels.unwrap_or_default(),
        entrypoint: run.entrypoint,
        os: raw.os,
        architecture: raw.architecture,
    })
}

/// The entrypoint a pause image must have.
pub const PAUSE_ENTRYPOINT: &str = "/pause";

/// Accepts a config only when its Entrypoint is exactly `["/pause"]`; otherwise says what
/// the entrypoint is.
pub fn judge_pause_config(bytes: &[u8]) -> Result<(), String> {
    let facts = parse_config(bytes)?;
    match facts.entrypoint.as_deref() {
        Some([only]) if only == PAUSE_ENTRYPOINT => Ok(()),
        Some(other) => Err(format!(
            "its config's Entrypoint is {} instead of [\"{PAUSE_ENTRYPOINT}\"]",
            serde_json::to_string(other).unwrap_or_default()
        )),
        None => Err(format!(
            "its config has no Entrypoint (a pause image's is [\"{PAUSE_ENTRYPOINT}\"])"
        )),
    }
}

/// A manifest or an index, as far as the pull needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestKind {
    Image { config: Desc, layers: Vec<Desc> },
    Index { manifests: Vec<IndexEntry> },
}

/// One entry of an index with its platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub desc: Desc,
    pub os: String,
    pub architecture: String,
}

#[derive(Deserialize)]
struct RawManifest {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Desc>,
    #[serde(default)]
    layers: Option<Vec<Desc>>,
    #[serde(default)]
    manifests: Option<Vec<RawIndexEntry>>,
}

#[derive(Deserialize)]
struct RawIndexEntry {
    #[serde(flatten)]
    desc: Desc,
    #[serde(default)]
    platform: Option<RawPlatform>,
}

#[derive(Deserialize)]
struct RawPlatform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
}

/// Reads a manifest or index (Docker or OCI) and says which it is, with its media type.
pub fn parse_manifest(bytes: &[u8]) -> Result<(String, ManifestKind), String> {
    let raw: RawManifest =
        serde_json::from_slice(bytes).map_err(|e| format!("not a manifest: {e}"))?;
    match (raw.config, raw.layers, raw.manifests) {
        (Some(config), Some(layers), None) => Ok((
            raw.media_type
                .unwrap_or_else(|| MEDIA_OCI_MANIFEST.to_string()),
            ManifestKind::Image { config, layers },
        )),
        (None, None, Some(list)) => Ok((
            raw.media_type
                .unwrap_or_else(|| MEDIA_OCI_INDEX.to_string()),
            ManifestKind::Index {
                manifests: list
                    .into_iter()
                    .map(|e| {
                        let p = e.platform.unwrap_or(RawPlatform {
                            os: String::new(),
                            architecture: String::new(),
                        });
                        IndexEntry {
                            desc: e.desc,
                            os: p.os,
                            architecture: p.architecture,
                        }
                    })
                    .collect(),
            },
        )),
        _ => Err("neither an image manifest (config and layers) nor an index (manifests)".into()),
    }
}

/// This machine's architecture in OCI terms.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "s390x" => "s390x",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// The entry of an index for linux on `arch`.
pub fn pick_platform<'a>(entries: &'a [IndexEntry], arch: &str) -> Option<(usize, &'a IndexEntry)> {
    entries
        .iter()
        .enumerate()
        .find(|(_, e)| e.os == "linux" && e.architecture == arch)
}

/// `unix_secs` as an RFC 3339 UTC time (`2024-01-02T03:04:05Z`), the form containerd's
/// `gc.expire` label takes.
pub fn rfc3339_utc(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// `bytes` for progress lines: KiB below one MiB, MiB above, one decimal.
pub fn human_size(bytes: u64) -> String {
    if bytes < 1024 * 1024 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        // Values checked against `docker image inspect` + Python for a real image.
        let diffs = vec![
            "sha256:ee9071bfdd5719528b012199efd2273c76cf72eedec13191fa52ab0417b2afa3".to_string(),
            "sha256:246340d76efa1f0fb2c436933722ae15e5d2bbc6256d1030c6eecdfc9f8b8ddf".to_string(),
        ];
        let chains = chain_ids(&diffs);
        assert_eq!(chains[0], diffs[0]);
        assert_eq!(
            chains[1],
            sha256_digest(format!("{} {}", diffs[0], diffs[1]).as_bytes())
        );
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn manifest_is_deterministic_docker_schema2_with_gc_labels() {
        let config = Desc {
            media_type: MEDIA_DOCKER_CONFIG.into(),
            size: 10,
            digest: d('c'),
        };
        let layers = vec![
            Desc {
                media_type: MEDIA_DOCKER_LAYER.into(),
                size: 1024,
                digest: d('a'),
            },
            Desc {
                media_type: MEDIA_DOCKER_LAYER.into(),
                size: 2048,
                digest: d('b'),
            },
        ];
        let bytes = docker_manifest(&config, &layers);
        assert_eq!(bytes, docker_manifest(&config, &layers));
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with(
            "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.docker.distribution.manifest.v2+json\""
        ));
        let (media, kind) = parse_manifest(&bytes).unwrap();
        assert_eq!(media, MEDIA_DOCKER_MANIFEST);
        assert_eq!(
            kind,
            ManifestKind::Image {
                config: config.clone(),
                layers: layers.clone()
            }
        );
        let labels = manifest_gc_labels(&config.digest, &layers);
        assert_eq!(labels["containerd.io/gc.ref.content.config"], d('c'));
        assert_eq!(labels["containerd.io/gc.ref.content.l.1"], d('b'));
        assert_eq!(
            snapshot_gc_label("overlayfs"),
            "containerd.io/gc.ref.snapshot.overlayfs"
        );
        assert_eq!(cri_image_labels()[LABEL_CRI_PINNED], "pinned");
    }

    #[test]
    fn pause_configs_are_judged_by_their_entrypoint() {
        let cfg = |ep: &str| {
            format!(
                r#"{{"architecture":"amd64","os":"linux","config":{{"Entrypoint":{ep}}},"rootfs":{{"type":"layers","diff_ids":[]}}}}"#
            )
        };
        assert!(judge_pause_config(cfg(r#"["/pause"]"#).as_bytes()).is_ok());
        let e = judge_pause_config(cfg(r#"["sleep","3600"]"#).as_bytes()).unwrap_err();
        assert!(e.contains(r#"["sleep","3600"]"#), "{e}");
        assert!(judge_pause_config(cfg(r#"["/pause","x"]"#).as_bytes()).is_err());
        assert!(
            judge_pause_config(cfg("null").as_bytes())
                .unwrap_err()
                .contains("no Entrypoint")
        );
        assert!(judge_pause_config(b"{}").is_err());
    }

    #[test]
    fn configs_give_diff_ids_and_labels() {
        let text = r#"{"os":"linux","architecture":"amd64","config":{"Labels":{"a":"b"}},"rootfs":{"type":"layers","diff_ids":["sha256:1"]}}"#;
        let f = parse_config(text.as_bytes()).unwrap();
        assert_eq!(f.diff_ids, vec!["sha256:1"]);
        assert_eq!(f.labels["a"], "b");
        assert_eq!(f.entrypoint, None);
    }

    #[test]
    fn indexes_are_recognised_and_a_platform_picked() {
        let text = format!(
            r#"{{"schemaVersion":2,"mediaType":"{MEDIA_DOCKER_LIST}","manifests":[
            {{"mediaType":"{MEDIA_DOCKER_MANIFEST}","size":1,"digest":"{}","platform":{{"os":"linux","architecture":"arm64"}}}},
            {{"mediaType":"{MEDIA_DOCKER_MANIFEST}","size":2,"digest":"{}","platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            d('1'),
            d('2')
        );
        let (media, kind) = parse_manifest(text.as_bytes()).unwrap();
        assert_eq!(media, MEDIA_DOCKER_LIST);
        let ManifestKind::Index { manifests } = kind else {
            panic!("not an index")
        };
        let (i, e) = pick_platform(&manifests, "amd64").unwrap();
        assert_eq!((i, e.desc.size), (1, 2));
        assert!(pick_platform(&manifests, "s390x").is_none());
        assert!(parse_manifest(b"{\"schemaVersion\":2}").is_err());
    }

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(128 * 1024 * 1024), "128.0 MiB");
    }
}
