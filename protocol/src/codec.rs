//! Encoding and decoding of frames: a two-byte big-endian protocol version, then the postcard
//! body. One WebSocket binary message holds exactly one frame.
//!
//! Decoding never panics and never allocates more than the input allows: the input is
//! bounded by [`MAX_FRAME_BYTES`] before postcard sees it, and postcard's collections grow
//! only as far as the bytes actually present.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::frame::{AgentFrame, ControllerFrame};

/// The wire version this build speaks. Any change to a frame type bumps it.
///
/// 2: `Hello` carries `session_proof`, binding it to its TLS connection.
pub const PROTOCOL_VERSION: u16 = 2;

/// The largest frame either side accepts (4 MiB). Log lines and tunnel chunks are far smaller.
pub const MAX_FRAME_BYTES: usize = 4 << 20;

/// A frame that could not be decoded. The connection that sent it is closed with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {len} bytes is shorter than the 2-byte version header")]
    TooShort { len: usize },
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame speaks protocol version {got}, this side speaks version {want}")]
    Version { got: u16, want: u16 },
    #[error("malformed {what} frame body: {reason}")]
    Body { what: &'static str, reason: String },
    #[error("{count} trailing bytes after a complete {what} frame")]
    Trailing { what: &'static str, count: usize },
}

/// A frame that cannot be encoded (only when it would exceed [`MAX_FRAME_BYTES`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{what} frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("cannot serialize {what} frame: {reason}")]
    Serialize { what: &'static str, reason: String },
}

/// A frame type that travels on the wire.
pub trait Wire: Serialize + DeserializeOwned {
    /// Name used in error messages.
    const WHAT: &'static str;

    /// Encodes `self` with the version header.
    fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = PROTOCOL_VERSION.to_be_bytes().to_vec();
        let out = postcard::to_extend(self, std::mem::take(&mut out)).map_err(|e| {
            EncodeError::Serialize {
                what: Self::WHAT,
                reason: e.to_string(),
            }
        })?;
        if out.len() > MAX_FRAME_BYTES {
            return Err(EncodeError::TooLarge {
                what: Self::WHAT,
                len: out.len(),
                max: MAX_FRAME_BYTES,
            });
        }
        Ok(out)
    }

    /// Decodes one frame, checking size, version and that nothing trails it.
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_FRAME_BYTES {
            return Err(DecodeError::TooLarge {
                len: bytes.len(),
                max: MAX_FRAME_BYTES,
            });
        }
        let Some((header, body)) = bytes.split_first_chunk::<2>() else {
            return Err(DecodeError::TooShort { len: bytes.len() });
        };
        let got = u16::from_be_bytes(*header);
        if got != PROTOCOL_VERSION {
            return Err(DecodeError::Version {
                got,
                want: PROTOCOL_VERSION,
            });
        }
        let (frame, rest) =
            postcard::take_from_bytes::<Self>(body).map_err(|e| DecodeError::Body {
                what: Self::WHAT,
                reason: e.to_string(),
            })?;
        if !rest.is_empty() {
            return Err(DecodeError::Trailing {
                what: Self::WHAT,
                count: rest.len(),
            });
        }
        Ok(frame)
    }
}

impl Wire for AgentFrame {
    const WHAT: &'static str = "agent";
}

impl Wire for ControllerFrame {
    const WHAT: &'static str = "controller";
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::frame::*;
    use crate::ids::*;

    fn launch() -> ControllerFrame {
        ControllerFrame::Launch(Launch {
            launch_id: LaunchId::new("l-1").unwrap(),
            run_id: RunId::new("r-1").unwrap(),
            deadline_unix_ms: 1_800_000_000_000,
            spec: LaunchSpec::Probe(ProbeSpec { echo_lines: 3 }),
        })
    }

    /// Golden bytes: a change here is a wire change and must bump [`PROTOCOL_VERSION`].
    #[test]
    fn golden_launch_bytes() {
        let bytes = launch().encode().unwrap();
        assert_eq!(
            bytes,
            [
                0, 2, // version
                2, // ControllerFrame::Launch
                3, b'l', b'-', b'1', 3, b'r', b'-', b'1', // ids
                128, 160, 241, 194, 177, 52, // deadline varint
                0, 3, // LaunchSpec::Probe { echo_lines: 3 }
            ]
        );
        assert_eq!(ControllerFrame::decode(&bytes).unwrap(), launch());
    }

    /// Golden bytes of a Hello (protocol version 2): the session proof is 32 raw bytes after
    /// the credential. A change here is a wire change and must bump [`PROTOCOL_VERSION`].
    #[test]
    fn golden_hello_bytes() {
        let hello = AgentFrame::Hello(Hello {
            agent_id: AgentId::new("a").unwrap(),
            agent_version: "v".into(),
            capabilities: vec![Capability::Probe],
            credential: Secret::new("s"),
            session_proof: [7; 32],
        });
        let bytes = hello.encode().unwrap();
        let mut want = vec![
            0, 2, // version
            0, // AgentFrame::Hello
            1, b'a', // agent id
            1, b'v', // agent version
            1, 0, // capabilities: [Probe]
            1, b's', // credential
        ];
        want.extend([7; 32]); // session proof, fixed length, no length prefix
        assert_eq!(bytes, want);
        assert_eq!(AgentFrame::decode(&bytes).unwrap(), hello);
    }

    #[test]
    fn hello_proof_binds_secret_and_session() {
        let secret = Secret::new("right");
        let session = [1u8; 32];
        let hello = Hello {
            agent_id: AgentId::new("a").unwrap(),
            agent_version: "v".into(),
            capabilities: vec![],
            credential: secret.clone(),
            session_proof: Hello::session_proof(&secret, &session),
        };
        assert!(hello.proves_session(&session));
        // Another connection's keying material: a replay.
        assert!(!hello.proves_session(&[2u8; 32]));
        // The proof made with another secret does not pass with this one.
        let forged = Hello {
            session_proof: Hello::session_proof(&Secret::new("other"), &session),
            ..hello.clone()
        };
        assert!(!forged.proves_session(&session));
        // RFC 4231 test case 2 pins the HMAC-SHA256 construction itself.
        let rfc = Hello::session_proof(&Secret::new("Jefe"), b"what do ya want for nothing?");
        assert_eq!(
            rfc.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    /// Appended variants keep the indexes of the earlier ones: a CI launch is
    /// `LaunchSpec` variant 3 and the CI run files follow `StepLog` in `RunFile`.
    #[test]
    fn ci_variants_are_appended() {
        let spec = LaunchSpec::Ci(CiRunSpec {
            repo_url: "https://h/r".into(),
            manifest_commit: "a".repeat(40),
            desired_ref: "master".into(),
            manifest_path: "deploy.json".into(),
            script_path: "scripts/ci/dev-e2e.sh".into(),
            environment: "dev".into(),
            timeout_ms: 1000,
            keep_namespace: true,
            code_queue: CiImageSpec {
                service_id: "code-queue".into(),
                repo_url: "https://h/r".into(),
                commit: "b".repeat(40),
                dockerfile: "Dockerfile".into(),
                context: ".".into(),
                image: "i:ci".into(),
                build_base: None,
                build_timeout_ms: 1,
            },
        });
        let frame = ControllerFrame::Launch(Launch {
            launch_id: LaunchId::new("l-1").unwrap(),
            run_id: RunId::new("r-1").unwrap(),
            deadline_unix_ms: 1_800_000_000_000,
            spec,
        });
        let bytes = frame.encode().unwrap();
        assert_eq!(bytes[17], 3, "LaunchSpec::Ci index");
        assert_eq!(ControllerFrame::decode(&bytes).unwrap(), frame);
        for (file, index) in [
            (RunFile::LauncherLog, 3u8),
            (RunFile::RunnerLog, 4),
            (RunFile::PipelineRun, 5),
            (RunFile::ScriptResult, 6),
        ] {
            let q = ControllerFrame::Query {
                query_id: 1,
                query: Query::ReadRun {
                    run_id: RunId::new("r").unwrap(),
                    file,
                    max_bytes: 1,
                },
            };
            let bytes = q.encode().unwrap();
            // version(2) Query(1) id(1) ReadRun(1) run id(2) file(1) max(1)
            assert_eq!(bytes[7], index, "{file:?}");
            assert_eq!(ControllerFrame::decode(&bytes).unwrap(), q);
        }
    }

    /// The live-state and dry-run queries and replies are appended: `Query::LiveState` and
    /// `Query::DryRunManifest` are Query variants 2 and 3, `Reply::LiveState` and
    /// `Reply::DryRun` are Reply variants 3 and 4, so `Facts`, `ReadRun`, `RunFile` and
    /// `Error` keep their encodings.
    #[test]
    fn live_state_and_dry_run_variants_are_appended() {
        let live = Query::LiveState {
            services: vec![
                LiveTarget {
                    service_id: "web".into(),
                    lookup: LiveLookup::Compose {
                        project: Some("unidesk".into()),
                        service: "web".into(),
                    },
                },
                LiveTarget {
                    service_id: "api".into(),
                    lookup: LiveLookup::K3s {
                        namespace: "unidesk-dev".into(),
                        deployments: vec![K3sDeployment {
                            name: "api-dev".into(),
                            container: "api".into(),
                        }],
                    },
                },
            ],
        };
        let dry = Query::DryRunManifest {
            manifest: "apiVersion: v1\nkind: ConfigMap\n".into(),
        };
        for (query, index) in [(live, 2u8), (dry, 3)] {
            let frame = ControllerFrame::Query { query_id: 7, query };
            let bytes = frame.encode().unwrap();
            // version(2) Query(1) id(1) then the Query variant.
            assert_eq!(bytes[2], 5, "ControllerFrame::Query index");
            assert_eq!(bytes[4], index, "{frame:?}");
            assert_eq!(ControllerFrame::decode(&bytes).unwrap(), frame);
        }
        let replies = [
            (
                Reply::LiveState {
                    services: vec![
                        LiveService {
                            service_id: "web".into(),
                            observed: Ok(Some("a".repeat(40))),
                        },
                        LiveService {
                            service_id: "idle".into(),
                            observed: Ok(None),
                        },
                        LiveService {
                            service_id: "api".into(),
                            observed: Err("GET Deployment unidesk-dev/api-dev failed".into()),
                        },
                    ],
                },
                3u8,
            ),
            (
                Reply::DryRun {
                    api_server: "https://127.0.0.1:6443".into(),
                    objects: vec![
                        DryRunObject {
                            document: 0,
                            object: "ConfigMap/c".into(),
                            namespace: Some("unidesk-dev".into()),
                            result: Ok(()),
                        },
                        DryRunObject {
                            document: 1,
                            object: "Deployment/d".into(),
                            namespace: Some("unidesk-dev".into()),
                            result: Err("spec.selector: Required value".into()),
                        },
                    ],
                },
                4,
            ),
        ];
        for (reply, index) in replies {
            let frame = AgentFrame::Reply { query_id: 7, reply };
            let bytes = frame.encode().unwrap();
            assert_eq!(bytes[2], 5, "AgentFrame::Reply index");
            assert_eq!(bytes[4], index, "{frame:?}");
            assert_eq!(AgentFrame::decode(&bytes).unwrap(), frame);
        }
        // The earlier variants keep their indexes.
        let error = AgentFrame::Reply {
            query_id: 7,
            reply: Reply::Error { reason: "r".into() },
        };
        assert_eq!(error.encode().unwrap()[4], 2, "Reply::Error index");
        let facts = ControllerFrame::Query {
            query_id: 7,
            query: Query::Facts,
        };
        assert_eq!(facts.encode().unwrap()[4], 0, "Query::Facts index");
    }

    #[test]
    fn wrong_version_is_named() {
        let mut bytes = launch().encode().unwrap();
        bytes[1] = 9;
        let err = ControllerFrame::decode(&bytes).unwrap_err();
        assert_eq!(err, DecodeError::Version { got: 9, want: 2 });
        assert_eq!(
            err.to_string(),
            "frame speaks protocol version 9, this side speaks version 2"
        );
        // A version-1 peer (a Hello without its session proof) is named as such.
        bytes[1] = 1;
        let err = ControllerFrame::decode(&bytes).unwrap_err();
        assert_eq!(err, DecodeError::Version { got: 1, want: 2 });
    }

    #[test]
    fn truncated_trailing_and_oversized_frames_are_errors() {
        let bytes = launch().encode().unwrap();
        for cut in 0..bytes.len() {
            assert!(
                ControllerFrame::decode(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            ControllerFrame::decode(&long).unwrap_err(),
            DecodeError::Trailing {
                what: "controller",
                count: 1
            }
        );
        let huge = vec![0u8; MAX_FRAME_BYTES + 1];
        assert!(matches!(
            ControllerFrame::decode(&huge),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn length_bomb_is_refused_without_allocating() {
        // AgentFrame::Tunnel with a declared length of u32::MAX and 3 bytes of data.
        let bytes = [0, 2, 6, 0xff, 0xff, 0xff, 0xff, 0x0f, 1, 2, 3];
        assert!(matches!(
            AgentFrame::decode(&bytes),
            Err(DecodeError::Body { .. })
        ));
    }

    #[test]
    fn unknown_variant_is_refused() {
        let bytes = [0, 2, 99];
        let err = AgentFrame::decode(&bytes).unwrap_err();
        assert!(
            err.to_string().starts_with("malformed agent frame body"),
            "{err}"
        );
    }

    fn arb_event() -> impl Strategy<Value = AgentFrame> {
        (any::<u64>(), any::<u64>(), ".{0,40}", any::<bool>()).prop_map(|(seq, t, line, step)| {
            AgentFrame::Event(Event {
                launch_id: LaunchId::new("launch-a").unwrap(),
                seq,
                time_unix_ms: t,
                body: EventBody::Log {
                    step: step.then_some(Step::Build),
                    line,
                },
            })
        })
    }

    proptest! {
        #[test]
        fn event_round_trips(frame in arb_event()) {
            let bytes = frame.encode().unwrap();
            prop_assert_eq!(AgentFrame::decode(&bytes).unwrap(), frame);
        }

        #[test]
        fn tunnel_round_trips(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let frame = ControllerFrame::Tunnel(data);
            let bytes = frame.encode().unwrap();
            prop_assert_eq!(ControllerFrame::decode(&bytes).unwrap(), frame);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = AgentFrame::decode(&data);
            let _ = ControllerFrame::decode(&data);
        }

        #[test]
        fn versioned_arbitrary_bodies_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut bytes = PROTOCOL_VERSION.to_be_bytes().to_vec();
            bytes.extend(data);
            if let Ok(frame) = AgentFrame::decode(&bytes) {
                // Whatever decodes must encode back to a frame that decodes the same.
                let again = frame.encode().unwrap();
                prop_assert_eq!(AgentFrame::decode(&again).unwrap(), frame);
            }
        }
    }
}
