//! Feeds arbitrary bytes to both frame decoders and the tunnel header decoder. Decoding must
//! never panic, and whatever decodes must re-encode to bytes that decode to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unidesk_protocol::tunnel::{TunnelOpen, TunnelReply, decode_header};
use unidesk_protocol::{AgentFrame, ControllerFrame, Wire};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = AgentFrame::decode(data) {
        let again = frame.encode().expect("a decoded frame encodes");
        assert_eq!(AgentFrame::decode(&again).expect("round trip"), frame);
    }
    if let Ok(frame) = ControllerFrame::decode(data) {
        let again = frame.encode().expect("a decoded frame encodes");
        assert_eq!(ControllerFrame::decode(&again).expect("round trip"), frame);
    }
    let _ = decode_header::<TunnelOpen>(data);
    let _ = decode_header::<TunnelReply>(data);
});
