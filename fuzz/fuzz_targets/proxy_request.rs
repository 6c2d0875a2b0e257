//! Feeds arbitrary bytes to the agent's egress proxy request parser (`parse_head`). It must
//! never panic; whatever parses must be bounded by the input and the head limit, name a
//! usable port and a non-empty host, and a forwarded head must itself be a complete
//! origin-form HTTP/1.x request that ends the exchange (`Connection: close`).
//!
//! The parser is compiled from the agent's own source file: it depends only on `httparse`
//! and `thiserror`, so this target does not build the agent crate (Docker, Kubernetes and
//! Git clients) under the fuzzer's instrumentation. The invariants are that file's own
//! `assert_parse_invariants` (compiled in with `--cfg fuzzing`), which its property tests
//! check too.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code, unreachable_pub)]
#[path = "../../agent/src/egress/request.rs"]
mod request;

fuzz_target!(|data: &[u8]| request::assert_parse_invariants(data));
