//! Validated identifiers that cross the wire: agent ids, launch ids and run ids.
//!
//! Each is checked when it is made and when it is decoded, so a run id can be used as a
//! directory name and a launch id as a file name without further checks. The rule is the
//! DNS label rule (RFC 1123): `[a-z0-9-]`, 1 to 63 characters, no leading or trailing `-`.
//! That makes `unidesk-ci-e2e-<runId>` style names valid and rules out `..`, `/` and NUL.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {why}")]
pub struct IdError {
    /// Which identifier kind was being checked (`agent id`, `run id`, …).
    pub kind: &'static str,
    /// The refused input, as given.
    pub value: String,
    /// What rule it broke.
    pub why: &'static str,
}

/// Checks `value` against the DNS label rule and says which part is broken.
pub fn check_label(kind: &'static str, value: &str) -> Result<(), IdError> {
    let fail = |why| {
        Err(IdError {
            kind,
            value: value.chars().take(80).collect(),
            why,
        })
    };
    if value.is_empty() {
        return fail("it is empty");
    }
    if value.len() > 63 {
        return fail("it is longer than 63 characters");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return fail("only lower-case letters, digits and '-' are allowed");
    }
    if value.starts_with('-') || value.ends_with('-') {
        return fail("it must not start or end with '-'");
    }
    Ok(())
}

macro_rules! label_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check_label($kind, &value)?;
                Ok(Self(value))
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
    };
}

label_id!(
    /// The name of one agent (one node), e.g. `d601`.
    AgentId,
    "agent id"
);
label_id!(
    /// The idempotency key of one launch: the same id delivered twice runs once.
    LaunchId,
    "launch id"
);
label_id!(
    /// The name of one run directory on an agent (`runs/<runId>/`).
    RunId,
    "run id"
);

/// A credential. Its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value; call only where it is hashed or sent.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_accept_dns_names_and_refuse_path_tricks() {
        for good in ["a", "d601", "run-20261126-1", "x".repeat(63).as_str()] {
            assert!(RunId::new(good).is_ok(), "{good}");
        }
        let cases = [
            ("", "empty"),
            ("..", "only lower-case"),
            ("a/b", "only lower-case"),
            ("A", "only lower-case"),
            ("-a", "start or end"),
            ("a-", "start or end"),
            ("a\0b", "only lower-case"),
        ];
        for (bad, why) in cases {
            let err = RunId::new(bad).expect_err(bad);
            assert!(err.to_string().contains(why), "{bad}: {err}");
            assert!(err.to_string().starts_with("invalid run id"), "{err}");
        }
        let long = "x".repeat(64);
        assert!(RunId::new(long).is_err());
    }

    #[test]
    fn decoding_checks_the_rule_too() {
        let bytes = postcard::to_stdvec(&"../etc".to_string()).unwrap();
        let err = postcard::from_bytes::<RunId>(&bytes).unwrap_err();
        assert!(matches!(err, postcard::Error::SerdeDeCustom), "{err:?}");
    }

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
