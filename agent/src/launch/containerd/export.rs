//! Reading Docker's image export (`GET /images/{name}/get`) as it streams.
//!
//! Docker 20.10 writes the legacy archive: entries in name order, `<v1id>/VERSION`,
//! `<v1id>/json`, `<v1id>/layer.tar` (uncompressed; a symlink to another directory's
//! `layer.tar` when two layers are identical), `<config hex>.json`, then `manifest.json` and
//! `repositories`. Docker 25+ writes an OCI layout whose `blobs/sha256/<hex>` names are the
//! digests. Each directory's `json` comes before its `layer.tar`, and Docker derives the
//! directory name (the v1 id) from that json and the layer's chain id, so the reader knows which
//! layer a `layer.tar` is before reading it: present layers are skipped without being written,
//! and the others are written with their expected digest. A layer the reader cannot place is
//! written anyway and placed by its hash.
//!
//! The reader is blocking code (the `tar` crate reads a `std::io::Read`) on a blocking thread;
//! bytes come in through a bounded channel from the HTTP body and go out as at most
//! [`CHUNK`]-sized pieces through another bounded channel, so memory stays bounded whatever the
//! image size.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

/// Size of the pieces a layer is sent in.
pub const CHUNK: usize = 1024 * 1024;
/// Largest config or v1 json the reader holds in memory.
const SMALL_LIMIT: u64 = 16 * 1024 * 1024;

/// What an archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// `<v1id>/layer.tar`, a regular file.
    Layer { dir: String },
    /// `<v1id>/layer.tar` as a symlink to `<target>/layer.tar`.
    LayerLink { dir: String, target: String },
    /// `<v1id>/json`.
    V1Json { dir: String },
    /// `<hex>.json` at the top: the image config (its name is its digest).
    Config { digest: String },
    /// `blobs/sha256/<hex>` of an OCI layout.
    Blob { digest: String },
    /// Anything the import does not need (`VERSION`, directories, `manifest.json`, …).
    Other,
}

/// The kind of a tar entry, as far as [`classify`] cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Symlink,
    Other,
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Classifies an entry by path and kind; `link` is a symlink's target.
pub fn classify(path: &str, kind: Kind, link: Option<&str>) -> Entry {
    let path = path.trim_start_matches("./");
    if let Some((dir, file)) = path.split_once('/')
        && is_hex64(dir)
    {
        return match (file, kind) {
            ("layer.tar", Kind::File) => Entry::Layer { dir: dir.into() },
            ("layer.tar", Kind::Symlink) => {
                let target = link
                    .unwrap_or_default()
                    .trim_start_matches("../")
                    .trim_end_matches("/layer.tar");
                if is_hex64(target) {
                    Entry::LayerLink {
                        dir: dir.into(),
                        target: target.into(),
                    }
                } else {
                    Entry::Other
                }
            }
            ("json", Kind::File) => Entry::V1Json { dir: dir.into() },
            _ => Entry::Other,
        };
    }
    if let Some(hex) = path.strip_suffix(".json")
        && is_hex64(hex)
        && kind == Kind::File
    {
        return Entry::Config {
            digest: format!("sha256:{hex}"),
        };
    }
    if let Some(hex) = path.strip_prefix("blobs/sha256/")
        && is_hex64(hex)
        && kind == Kind::File
    {
        return Entry::Blob {
            digest: format!("sha256:{hex}"),
        };
    }
    Entry::Other
}

/// Splits a JSON object into its top-level keys and the raw text of each value, so values
/// keep their bytes (and key order inside them) exactly as written.
pub fn split_object(text: &str) -> Option<Vec<(String, &str)>> {
    let b = text.as_bytes();
    let mut i = 0;
    let ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    // Index just past the string starting at `i` (which is a quote).
    let string_end = |mut i: usize| -> Option<usize> {
        i += 1;
        while i < b.len() {
            match b[i] {
                b'\\' => i += 2,
                b'"' => return Some(i + 1),
                _ => i += 1,
            }
        }
        None
    };
    ws(&mut i);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut out = Vec::new();
    loop {
        ws(&mut i);
        match b.get(i)? {
            b'}' if out.is_empty() => return Some(out),
            b'"' => {}
            _ => return None,
        }
        let key_end = string_end(i)?;
        let key: String = serde_json::from_str(&text[i..key_end]).ok()?;
        i = key_end;
        ws(&mut i);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i += 1;
        ws(&mut i);
        let start = i;
        let mut depth = 0usize;
        loop {
            match b.get(i)? {
                b'"' => i = string_end(i)?,
                b'{' | b'[' => {
                    depth += 1;
                    i += 1;
                }
                b'}' | b']' if depth > 0 => {
                    depth -= 1;
                    i += 1;
                }
                b',' | b'}' if depth == 0 => break,
                _ => i += 1,
            }
        }
        out.push((key, text[start..i].trim_end()));
        match b[i] {
            b',' => i += 1,
            _ => {
                ws(&mut i);
                return (b
                    .get(i + 1..)
                    .is_some_and(|rest| rest.iter().all(u8::is_ascii_whitespace)))
                .then_some(out);
            }
        }
    }
}

/// Escapes as Go's `encoding/json` does by default (HTML-safe).
fn go_escape(s: &str) -> String {
    s.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
}

/// The v1 id Docker gives layer `index` (of `count`) with chain id `chain`, from the
/// directory's `json`: `sha256` of the json without `id` (and without `os` below the top
/// layer), `parent` as a digest, plus `layer_id` = the chain id, keys sorted
/// (moby `image/v1.CreateID`).
pub fn v1_id(json: &str, chain: &str, index: usize, count: usize) -> Option<String> {
    let mut map: BTreeMap<String, String> = split_object(json)?
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect();
    map.remove("id");
    if index + 1 != count {
        map.remove("os");
    }
    if let Some(parent) = map.get_mut("parent") {
        let hex: String = serde_json::from_str(parent).ok()?;
        *parent = format!("\"sha256:{hex}\"");
    }
    map.insert("layer_id".into(), format!("\"{chain}\""));
    let mut text = String::from("{");
    for (n, (k, v)) in map.iter().enumerate() {
        if n > 0 {
            text.push(',');
        }
        text.push_str(&go_escape(&serde_json::to_string(k).ok()?));
        text.push(':');
        text.push_str(v);
    }
    text.push('}');
    Some(hex::encode(Sha256::digest(text.as_bytes())))
}

/// Which layer (index into the stack) the directory `dir` holds, judged from its `json`.
pub fn identify(dir: &str, json: &str, chains: &[String]) -> Option<usize> {
    (0..chains.len())
        .rev()
        .find(|&i| v1_id(json, &chains[i], i, chains.len()).as_deref() == Some(dir))
}

/// What the reader knows before the export starts.
#[derive(Debug, Clone)]
pub struct Plan {
    pub image: String,
    pub diff_ids: Vec<String>,
    pub chains: Vec<String>,
    pub config_digest: String,
    /// Diff ids already in containerd: their bytes are read past, not sent.
    pub present: HashSet<String>,
    pub config_present: bool,
}

/// What the reader found, in archive order.
#[derive(Debug)]
pub enum Event {
    /// A layer's bytes follow as [`Event::Chunk`]s, then [`Event::LayerEnd`]. `index` is the
    /// stack position when the reader could tell it.
    LayerStart {
        dir: String,
        index: Option<usize>,
        size: u64,
    },
    Chunk(Vec<u8>),
    /// The layer's sha256 as read, or its expected digest when it was placed (containerd checks
    /// it on commit).
    LayerEnd {
        digest: String,
    },
    /// A layer already in containerd, read past.
    LayerSkipped {
        index: usize,
        size: u64,
    },
    /// A `layer.tar` symlink: `dir` holds the same layer as `target`.
    LayerLink {
        dir: String,
        target: String,
    },
    /// The image config's bytes (checked against its digest).
    Config(Vec<u8>),
}

/// A `std::io::Read` over byte chunks arriving on a channel (the HTTP body of the export).
pub struct ChannelReader {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
}

impl ChannelReader {
    pub fn new(rx: mpsc::Receiver<std::io::Result<Bytes>>) -> Self {
        Self {
            rx,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

/// Why the reader stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading the export failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Format(String),
    /// The consumer went away (cancelled or failed); not an error of the export itself.
    #[error("the import stopped reading the export")]
    Closed,
}

/// Reads the archive from `input`, sending what it finds to `out`. Blocking.
pub fn read_export(
    input: impl Read,
    plan: &Plan,
    out: &mpsc::Sender<Event>,
) -> Result<(), ReadError> {
    let send = |ev: Event| out.blocking_send(ev).map_err(|_| ReadError::Closed);
    let diff_set: HashSet<&str> = plan.diff_ids.iter().map(String::as_str).collect();
    // Directory → layer index, from each directory's json.
    let mut placed: BTreeMap<String, usize> = BTreeMap::new();
    let mut archive = tar::Archive::new(input);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let header = entry.header();
        let kind = match header.entry_type() {
            t if t.is_file() => Kind::File,
            t if t.is_symlink() => Kind::Symlink,
            _ => Kind::Other,
        };
        let size = header.size()?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let link = entry.link_name()?.map(|l| l.to_string_lossy().into_owned());
        match classify(&path, kind, link.as_deref()) {
            Entry::V1Json { dir } => {
                let json = read_small(&mut entry, size, &path)?;
                if let Some(i) = identify(&dir, &String::from_utf8_lossy(&json), &plan.chains) {
                    placed.insert(dir, i);
                }
            }
            Entry::Layer { dir } => {
                let index = placed.get(&dir).copied();
                let known = index.map(|i| plan.diff_ids[i].clone());
                match (index, &known) {
                    (Some(i), Some(d)) if plan.present.contains(d) => {
                        send(Event::LayerSkipped { index: i, size })?;
                    }
                    _ => {
                        let known = index.map(|i| plan.diff_ids[i].clone());
                        stream_layer(&mut entry, dir, index, known, size, &send)?
                    }
                }
            }
            Entry::Blob { digest } if diff_set.contains(digest.as_str()) => {
                let index = plan.diff_ids.iter().position(|d| *d == digest);
                match index {
                    Some(i) if plan.present.contains(&digest) => {
                        send(Event::LayerSkipped { index: i, size })?;
                    }
                    _ => stream_layer(
                        &mut entry,
                        digest.clone(),
                        index,
                        Some(digest.clone()),
                        size,
                        &send,
                    )?,
                }
            }
            Entry::Config { digest } | Entry::Blob { digest }
                if digest == plan.config_digest && !plan.config_present =>
            {
                let bytes = read_small(&mut entry, size, &path)?;
                let got = super::oci::sha256_digest(&bytes);
                if got != plan.config_digest {
                    return Err(ReadError::Format(format!(
                        "the config {path} has digest {got}, not {}",
                        plan.config_digest
                    )));
                }
                send(Event::Config(bytes))?;
            }
            Entry::LayerLink { dir, target } => send(Event::LayerLink { dir, target })?,
            _ => {}
        }
    }
    Ok(())
}

fn read_small(entry: &mut impl Read, size: u64, path: &str) -> Result<Vec<u8>, ReadError> {
    if size > SMALL_LIMIT {
        return Err(ReadError::Format(format!(
            "{path} is {size} bytes, more than a config or layer json should be"
        )));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    entry.take(SMALL_LIMIT).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Sends one layer's bytes. A layer whose digest is `known` is not hashed here: it is written
/// with that expected digest and containerd refuses the commit if the bytes differ (on two
/// cores the CPU a second hash would take is better left to containerd).
fn stream_layer(
    entry: &mut impl Read,
    dir: String,
    index: Option<usize>,
    known: Option<String>,
    size: u64,
    send: &impl Fn(Event) -> Result<(), ReadError>,
) -> Result<(), ReadError> {
    send(Event::LayerStart { dir, index, size })?;
    let mut hasher = Sha256::new();
    let mut left = size;
    while left > 0 {
        let want = (CHUNK as u64).min(left) as usize;
        let mut buf = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            let n = entry.read(&mut buf[filled..])?;
            if n == 0 {
                return Err(ReadError::Format(
                    "the export ended in the middle of a layer".into(),
                ));
            }
            filled += n;
        }
        if known.is_none() {
            hasher.update(&buf);
        }
        left -= want as u64;
        send(Event::Chunk(buf))?;
    }
    let digest = known.unwrap_or_else(|| format!("sha256:{}", hex::encode(hasher.finalize())));
    send(Event::LayerEnd { digest })
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "26d74a4d4f146b983deb713eb0c70b07f6da8b3cd75f0c7b2db0451f1cb53b62";

    #[test]
    fn entries_are_classified_by_name_and_kind() {
        assert_eq!(
            classify(&format!("{H}/layer.tar"), Kind::File, None),
            Entry::Layer { dir: H.into() }
        );
        let other = "e083f985355d8f4f0791d2ae0bb913cabe8189c9c622c5efabebdeb4513f758c";
        assert_eq!(
            classify(
                &format!("{H}/layer.tar"),
                Kind::Symlink,
                Some(&format!("../{other}/layer.tar"))
            ),
            Entry::LayerLink {
                dir: H.into(),
                target: other.into()
            }
        );
        assert_eq!(
            classify(&format!("{H}/json"), Kind::File, None),
            Entry::V1Json { dir: H.into() }
        );
        assert_eq!(
            classify(&format!("{H}/VERSION"), Kind::File, None),
            Entry::Other
        );
        assert_eq!(classify(&format!("{H}/"), Kind::Other, None), Entry::Other);
        assert_eq!(
            classify(&format!("{H}.json"), Kind::File, None),
            Entry::Config {
                digest: format!("sha256:{H}")
            }
        );
        assert_eq!(
            classify(&format!("blobs/sha256/{H}"), Kind::File, None),
            Entry::Blob {
                digest: format!("sha256:{H}")
            }
        );
        assert_eq!(classify("manifest.json", Kind::File, None), Entry::Other);
        assert_eq!(classify("repositories", Kind::File, None), Entry::Other);
        assert_eq!(classify("abc/layer.tar", Kind::File, None), Entry::Other);
    }

    #[test]
    fn objects_split_into_raw_values() {
        let parts = split_object(r#" {"b":{"z":1,"a":[1,"}"]},"a":"x\"y", "c":null } "#).unwrap();
        assert_eq!(
            parts,
            vec![
                ("b".to_string(), r#"{"z":1,"a":[1,"}"]}"#),
                ("a".to_string(), r#""x\"y""#),
                ("c".to_string(), "null"),
            ]
        );
        assert_eq!(split_object("{}").unwrap(), vec![]);
        assert!(split_object("[1]").is_none());
        assert!(split_object(r#"{"a":1"#).is_none());
        assert!(split_object(r#"{"a":1} x"#).is_none());
    }

    // A real `docker save` of Docker 20.10 (the testbed's): the four layer directories' json
    // and the image's diff ids; layer 3 is identical to layer 1 (its layer.tar is a symlink).
    const DIFFS: [&str; 4] = [
        "sha256:ee9071bfdd5719528b012199efd2273c76cf72eedec13191fa52ab0417b2afa3",
        "sha256:246340d76efa1f0fb2c436933722ae15e5d2bbc6256d1030c6eecdfc9f8b8ddf",
        "sha256:10a6aa8ea5d641fc1ae58cb671c84c5bd7948e8394f84e78989019d24eee05ab",
        "sha256:246340d76efa1f0fb2c436933722ae15e5d2bbc6256d1030c6eecdfc9f8b8ddf",
    ];
    const CC: &str = r#""container_config":{"Hostname":"","Domainname":"","User":"","AttachStdin":false,"AttachStdout":false,"AttachStderr":false,"Tty":false,"OpenStdin":false,"StdinOnce":false,"Env":null,"Cmd":null,"Image":"","Volumes":null,"WorkingDir":"","Entrypoint":null,"OnBuild":null,"Labels":null}"#;

    #[test]
    fn layer_directories_are_placed_from_their_json() {
        let chains = super::super::oci::chain_ids(&DIFFS.map(String::from));
        let base = "f21f766552f2781dbd6226b358d821965dee2b9c1e63be5321cc326bd5ebd6b8";
        let second = "e083f985355d8f4f0791d2ae0bb913cabe8189c9c622c5efabebdeb4513f758c";
        let json0 =
            format!(r#"{{"id":"{base}","created":"1970-01-01T00:00:00Z",{CC},"os":"linux"}}"#);
        let json1 = format!(
            r#"{{"id":"{second}","parent":"{base}","created":"1970-01-01T00:00:00Z",{CC},"os":"linux"}}"#
        );
        let json2 = format!(
            r#"{{"id":"{H}","parent":"{second}","created":"1970-01-01T00:00:00Z",{CC},"os":"linux"}}"#
        );
        let top = "eae2d78bcc156d349c79072985c6062224947e650a59aa3d144740d21f3cc827";
        let json3 = format!(
            r#"{{"id":"{top}","parent":"{H}","created":"2026-11-26T08:06:11.887992738Z","container":"aeca7022a9a5f50d7fa7d41469dcef6ba84ef74ba710bb3a40881f1d49ce6547","container_config":{{"Hostname":"","Domainname":"","User":"","AttachStdin":false,"AttachStdout":false,"AttachStderr":false,"Tty":false,"OpenStdin":false,"StdinOnce":false,"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/bin/sh","-c","echo hi \u003e /same \u0026\u0026 touch -d @0 /same"],"Image":"sha256:1344a9207c86ab249947158d9b959f5b6ff042e9feb2b977abcd97618749b5db","Volumes":null,"WorkingDir":"","Entrypoint":null,"OnBuild":null,"Labels":null}},"docker_version":"20.10.24+dfsg1","config":{{"Hostname":"","Domainname":"","User":"","AttachStdin":false,"AttachStdout":false,"AttachStderr":false,"Tty":false,"OpenStdin":false,"StdinOnce":false,"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":null,"Image":"sha256:1344a9207c86ab249947158d9b959f5b6ff042e9feb2b977abcd97618749b5db","Volumes":null,"WorkingDir":"","Entrypoint":null,"OnBuild":null,"Labels":null}},"architecture":"amd64","os":"linux"}}"#
        );
        assert_eq!(identify(base, &json0, &chains), Some(0));
        assert_eq!(identify(second, &json1, &chains), Some(1));
        assert_eq!(identify(H, &json2, &chains), Some(2));
        assert_eq!(identify(top, &json3, &chains), Some(3));
        assert_eq!(identify(top, &json2, &chains), None);
    }

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, path, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn the_reader_streams_unplaced_layers_and_checks_the_config() {
        let layer = vec![7u8; CHUNK + 5];
        let layer_digest = super::super::oci::sha256_digest(&layer);
        let config = br#"{"rootfs":{"diff_ids":[]}}"#.to_vec();
        let config_digest = super::super::oci::sha256_digest(&config);
        let config_hex = config_digest.trim_start_matches("sha256:").to_string();
        let archive = tar_of(&[
            (&format!("{H}/layer.tar"), &layer),
            (&format!("{config_hex}.json"), &config),
            ("manifest.json", b"[]"),
        ]);
        let plan = Plan {
            image: "x".into(),
            diff_ids: vec![layer_digest.clone()],
            chains: vec![layer_digest.clone()],
            config_digest: config_digest.clone(),
            present: HashSet::new(),
            config_present: false,
        };
        let (tx, mut rx) = mpsc::channel(64);
        read_export(&archive[..], &plan, &tx).unwrap();
        drop(tx);
        let mut events = Vec::new();
        while let Ok(e) = rx.try_recv() {
            events.push(e);
        }
        assert!(
            matches!(&events[0], Event::LayerStart { index: None, size, .. } if *size == layer.len() as u64)
        );
        assert!(matches!(&events[1], Event::Chunk(b) if b.len() == CHUNK));
        assert!(matches!(&events[2], Event::Chunk(b) if b.len() == 5));
        assert!(matches!(&events[3], Event::LayerEnd { digest } if *digest == layer_digest));
        assert!(matches!(&events[4], Event::Config(c) if *c == config));
        assert_eq!(events.len(), 5);

        // A config whose bytes do not match its name is refused.
        let bad = tar_of(&[(&format!("{config_hex}.json"), b"{}")]);
        let (tx, _rx) = mpsc::channel(64);
        assert!(matches!(
            read_export(&bad[..], &plan, &tx),
            Err(ReadError::Format(_))
        ));
    }
}
