//! The strict JSON reading shared by `deploy.json` and `config.json`: a size limit checked
//! before parsing, duplicate keys refused, every unknown field, wrong type and bad value
//! reported with its JSON path (`services[2].commitId`).
//!
//! It owns the generic walk only; what a document may contain is decided by the module that
//! owns that document. It must not do I/O.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// A JSON document that breaks the structural rules, with the path of the bad input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    /// The document is larger than its limit; it was not parsed.
    #[error("{document} is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        document: &'static str,
        size: usize,
        limit: usize,
    },
    /// The bytes are not JSON.
    #[error("{document} is not valid JSON: {why}")]
    Syntax { document: &'static str, why: String },
    /// A key the contract does not define.
    #[error("{document}: unknown field {path} (allowed here: {allowed})")]
    UnknownField {
        document: &'static str,
        path: String,
        allowed: String,
    },
    /// The same key twice in one object; JSON parsers disagree on which one wins.
    #[error("{document}: duplicate key {path}")]
    DuplicateKey {
        document: &'static str,
        path: String,
    },
    /// A value of the wrong JSON type.
    #[error("{document}: {path} must be {expected}, found {found}")]
    WrongType {
        document: &'static str,
        path: String,
        expected: &'static str,
        found: String,
    },
    /// A required key is absent.
    #[error("{document}: missing required field {path}")]
    Missing {
        document: &'static str,
        path: String,
    },
    /// A value of the right type that breaks a rule.
    #[error("{document}: {path}={value:?} is not valid: {why}")]
    Invalid {
        document: &'static str,
        path: String,
        value: String,
        why: String,
    },
}

impl DocumentError {
    /// The JSON path of the bad input (`$` for the whole document), if the error has one.
    pub fn path(&self) -> Option<&str> {
        match self {
            DocumentError::TooLarge { .. } | DocumentError::Syntax { .. } => None,
            DocumentError::UnknownField { path, .. }
            | DocumentError::DuplicateKey { path, .. }
            | DocumentError::WrongType { path, .. }
            | DocumentError::Missing { path, .. }
            | DocumentError::Invalid { path, .. } => Some(path),
        }
    }
}

/// A parsed JSON value that keeps object keys in order and duplicates visible.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Node>),
    Object(Vec<(String, Node)>),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        serde_json::Number::from_f64(v)
            .map(Node::Number)
            .ok_or_else(|| E::custom("number is not finite"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        Ok(Node::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
        Ok(Node::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some((key, value)) = map.next_entry::<String, Node>()? {
            entries.push((key, value));
        }
        Ok(Node::Object(entries))
    }
}

/// Parses `bytes` into a [`Node`] after checking the size limit.
pub(crate) fn parse(
    document: &'static str,
    bytes: &[u8],
    limit: usize,
) -> Result<Node, DocumentError> {
    if bytes.len() > limit {
        return Err(DocumentError::TooLarge {
            document,
            size: bytes.len(),
            limit,
        });
    }
    serde_json::from_slice(bytes).map_err(|e| DocumentError::Syntax {
        document,
        why: e.to_string(),
    })
}

/// Appends an object key to a JSON path.
pub(crate) fn field_path(parent: &str, key: &str) -> String {
    // Keys that are not plain identifiers are quoted so the path stays unambiguous.
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '$');
    match (parent.is_empty(), plain) {
        (true, true) => key.to_owned(),
        (false, true) => format!("{parent}.{key}"),
        (_, false) => format!("{parent}[{key:?}]"),
    }
}

/// Appends an array index to a JSON path.
pub(crate) fn index_path(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

/// Shows a path, naming the root `$`.
fn shown(path: &str) -> String {
    if path.is_empty() {
        "$".to_owned()
    } else {
        path.to_owned()
    }
}

/// One value of a document together with where it sits.
#[derive(Clone)]
pub(crate) struct Cursor<'a> {
    document: &'static str,
    node: &'a Node,
    path: String,
}

impl<'a> Cursor<'a> {
    /// A cursor over the whole document.
    pub(crate) fn root(document: &'static str, node: &'a Node) -> Self {
        Cursor {
            document,
            node,
            path: String::new(),
        }
    }

    /// The JSON path of this value (`$` for the root).
    pub(crate) fn path(&self) -> String {
        shown(&self.path)
    }

    fn wrong_type(&self, expected: &'static str) -> DocumentError {
        let found = match self.node {
            Node::Null => "null".to_owned(),
            Node::Bool(b) => format!("boolean {b}"),
            Node::Number(n) => format!("number {n}"),
            Node::String(s) => format!("string {:?}", truncate(s)),
            Node::Array(_) => "an array".to_owned(),
            Node::Object(_) => "an object".to_owned(),
        };
        DocumentError::WrongType {
            document: self.document,
            path: self.path(),
            expected,
            found,
        }
    }

    /// A value error at this path.
    pub(crate) fn invalid(&self, value: &str, why: impl Into<String>) -> DocumentError {
        DocumentError::Invalid {
            document: self.document,
            path: self.path(),
            value: truncate(value),
            why: why.into(),
        }
    }

    /// This value as a string.
    pub(crate) fn str(&self) -> Result<&'a str, DocumentError> {
        match self.node {
            Node::String(s) => Ok(s),
            _ => Err(self.wrong_type("a string")),
        }
    }

    /// This value as a non-empty string.
    pub(crate) fn non_empty_str(&self) -> Result<&'a str, DocumentError> {
        let s = self.str()?;
        if s.trim().is_empty() {
            return Err(self.invalid(s, "it must not be empty"));
        }
        Ok(s)
    }

    /// This value as a non-negative integer.
    pub(crate) fn u64(&self) -> Result<u64, DocumentError> {
        match self.node {
            Node::Number(n) => n
                .as_u64()
                .ok_or_else(|| self.wrong_type("a non-negative integer")),
            _ => Err(self.wrong_type("a non-negative integer")),
        }
    }

    /// This value as an array of element cursors.
    pub(crate) fn array(&self) -> Result<Vec<Cursor<'a>>, DocumentError> {
        match self.node {
            Node::Array(items) => Ok(items
                .iter()
                .enumerate()
                .map(|(i, node)| Cursor {
                    document: self.document,
                    node,
                    path: index_path(&self.path, i),
                })
                .collect()),
            _ => Err(self.wrong_type("an array")),
        }
    }

    /// This value as an object whose keys are free (a map), duplicates refused.
    pub(crate) fn map(&self) -> Result<Vec<(&'a str, Cursor<'a>)>, DocumentError> {
        let Node::Object(entries) = self.node else {
            return Err(self.wrong_type("an object"));
        };
        let mut out: Vec<(&'a str, Cursor<'a>)> = Vec::with_capacity(entries.len());
        for (key, node) in entries {
            let path = field_path(&self.path, key);
            if out.iter().any(|(k, _)| *k == key.as_str()) {
                return Err(DocumentError::DuplicateKey {
                    document: self.document,
                    path,
                });
            }
            out.push((
                key.as_str(),
                Cursor {
                    document: self.document,
                    node,
                    path,
                },
            ));
        }
        Ok(out)
    }

    /// This value as an object with a fixed set of keys: unknown and duplicate keys refused.
    pub(crate) fn object(&self, allowed: &[&'static str]) -> Result<Fields<'a>, DocumentError> {
        let entries = self.map()?;
        for (key, at) in &entries {
            if !allowed.contains(key) {
                return Err(DocumentError::UnknownField {
                    document: self.document,
                    path: at.path(),
                    allowed: allowed.join(", "),
                });
            }
        }
        Ok(Fields {
            document: self.document,
            path: self.path.clone(),
            entries,
        })
    }
}

/// The checked keys of one object.
pub(crate) struct Fields<'a> {
    document: &'static str,
    path: String,
    entries: Vec<(&'a str, Cursor<'a>)>,
}

impl<'a> Fields<'a> {
    /// The value of an optional key.
    pub(crate) fn optional(&self, key: &str) -> Option<&Cursor<'a>> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, at)| at)
    }

    /// The value of a required key.
    pub(crate) fn required(&self, key: &str) -> Result<&Cursor<'a>, DocumentError> {
        self.optional(key).ok_or_else(|| DocumentError::Missing {
            document: self.document,
            path: field_path(&self.path, key),
        })
    }

    /// A required non-empty string.
    pub(crate) fn required_str(&self, key: &str) -> Result<&'a str, DocumentError> {
        self.required(key)?.non_empty_str()
    }

    /// An optional non-empty string.
    pub(crate) fn optional_str(&self, key: &str) -> Result<Option<&'a str>, DocumentError> {
        self.optional(key).map(Cursor::non_empty_str).transpose()
    }
}

/// Cuts long input so an error message stays readable.
fn truncate(s: &str) -> String {
    const MAX: usize = 120;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(MAX).collect();
        out.push('…');
        out
    }
}

/// Checks a repository URL: `https://host/…`, `http://host/…` or `file:///abs/path`, with no
/// credentials, whitespace or control characters.
pub(crate) fn check_repo_url(url: &str) -> Result<(), &'static str> {
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("it must not contain whitespace or control characters");
    }
    if let Some(rest) = url.strip_prefix("file://") {
        if !rest.starts_with('/') || rest.len() < 2 {
            return Err("a file URL must name an absolute path (file:///path)");
        }
        return Ok(());
    }
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or("it must be an https://, http:// or file:// URL")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err("the URL has no host");
    }
    if authority.contains('@') {
        return Err("credentials must not be written into the URL");
    }
    Ok(())
}

/// Checks a repository-relative path: not empty, not absolute, no `..`, no backslash.
pub(crate) fn check_repo_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("it must not be empty");
    }
    if path.starts_with('/') {
        return Err("it must be relative to the repository root");
    }
    if path.contains('\\') || path.chars().any(char::is_control) {
        return Err("it must use '/' separators and no control characters");
    }
    if path.split('/').any(|part| part == "..") {
        return Err("it must not contain '..'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_dotted_with_indexes() {
        assert_eq!(field_path("", "services"), "services");
        assert_eq!(index_path("services", 2), "services[2]");
        assert_eq!(
            field_path("services[2]", "commitId"),
            "services[2].commitId"
        );
        assert_eq!(field_path("nodes", "a b"), "nodes[\"a b\"]");
    }

    #[test]
    fn duplicate_keys_are_refused_with_their_path() {
        let node = parse("t.json", br#"{"a":{"b":1,"b":2}}"#, 1024).unwrap();
        let root = Cursor::root("t.json", &node);
        let fields = root.object(&["a"]).unwrap();
        let a = fields.required("a").unwrap();
        let err = a.object(&["b"]).err().unwrap();
        assert_eq!(err.path(), Some("a.b"));
        assert_eq!(err.to_string(), "t.json: duplicate key a.b");
    }

    #[test]
    fn size_is_checked_before_parsing() {
        let err = parse("t.json", b"not json at all", 4).unwrap_err();
        assert_eq!(err.to_string(), "t.json is 15 bytes, over the 4-byte limit");
    }

    #[test]
    fn repo_urls() {
        assert!(check_repo_url("https://github.com/pikasTech/unidesk").is_ok());
        assert!(check_repo_url("http://127.0.0.1:8080/web.git").is_ok());
        assert!(check_repo_url("file:///srv/git/web.git").is_ok());
        assert!(check_repo_url("ssh://git@github.com/x").is_err());
        assert!(check_repo_url("https://user:tok@github.com/x").is_err());
        assert!(check_repo_url("https:///x").is_err());
        assert!(check_repo_url("file://relative").is_err());
        assert!(check_repo_url("https://github.com/a b").is_err());
    }

    #[test]
    fn repo_paths() {
        assert!(check_repo_path("src/Dockerfile").is_ok());
        assert!(check_repo_path(".").is_ok());
        assert!(check_repo_path("/etc/passwd").is_err());
        assert!(check_repo_path("a/../../b").is_err());
        assert!(check_repo_path("").is_err());
    }
}
