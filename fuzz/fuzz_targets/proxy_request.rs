//! Feeds arbitrary bytes to the agent's egress proxy request parser (`parse_head`). It must
//! never panic; whatever parses must be bounded by the input and the head limit, name a
//! usable port and a non-empty host, and a forwarded head must itself be a complete
//! origin-form HTTP/1.x request that ends the exchange (`Connection: close`).
//!
//! The parser is compiled from the agent's own source file: it depends only on `httparse`
//! and `thiserror`, so this target does not build the agent crate (Docker, Kubernetes and
//! Git clients) under the fuzzer's instrumentation.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code, unreachable_pub)]
#[path = "../../agent/src/egress/request.rs"]
mod request;

use request::{MAX_HEAD, MAX_HEADERS, ProxyRequest, parse_head};

fuzz_target!(|data: &[u8]| {
    let Ok(Some((request, len))) = parse_head(data) else {
        return;
    };
    assert!(len <= data.len() && len <= MAX_HEAD, "head length {len}");
    match request {
        ProxyRequest::Connect { host, port } => {
            assert!(port != 0 && !host.is_empty() && host.len() <= 253);
        }
        ProxyRequest::Forward { host, port, head } => {
            assert!(port != 0 && !host.is_empty() && host.len() <= 253);
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS + 2];
            let mut again = httparse::Request::new(&mut headers);
            let status = again.parse(&head).expect("the forwarded head parses");
            assert_eq!(status, httparse::Status::Complete(head.len()));
            assert!(again.path.is_some_and(|p| p.starts_with('/')));
            assert!(head.ends_with(b"Connection: close\r\n\r\n"));
        }
    }
});
