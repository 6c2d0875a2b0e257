//! The header that opens each egress tunnel stream, and the controller's answer.
//!
//! The agent opens one multiplexed stream per client connection and writes a
//! [`TunnelOpen`]; the controller answers with a [`TunnelReply`] and, if it allowed the
//! target, splices the stream to the outbound TCP connection. Both messages travel as a
//! 2-byte big-endian length followed by the postcard body, so a reader knows where the
//! header ends and the spliced bytes begin.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The largest header either side accepts.
pub const MAX_TUNNEL_HEADER: usize = 1024;

/// Open a TCP connection to `host:port` on the controller's side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelOpen {
    pub host: String,
    pub port: u16,
}

/// The controller's answer to a [`TunnelOpen`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TunnelReply {
    /// Connected to this resolved address; bytes flow from now on.
    Connected { addr: String },
    /// Not allowed or not reachable; the stream closes.
    Refused { reason: String },
}

/// A tunnel header that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("tunnel header of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed tunnel header: {reason}")]
    Malformed { reason: String },
}

/// Encodes a header with its length prefix.
pub fn encode_header<T: Serialize>(header: &T) -> Result<Vec<u8>, HeaderError> {
    let body = postcard::to_stdvec(header).map_err(|e| HeaderError::Malformed {
        reason: e.to_string(),
    })?;
    let len = u16::try_from(body.len())
        .ok()
        .filter(|&l| usize::from(l) <= MAX_TUNNEL_HEADER)
        .ok_or(HeaderError::TooLarge {
            len: body.len(),
            max: MAX_TUNNEL_HEADER,
        })?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend(body);
    Ok(out)
}

/// Reads the length prefix; the caller then reads exactly that many bytes.
pub fn header_len(prefix: [u8; 2]) -> Result<usize, HeaderError> {
    let len = usize::from(u16::from_be_bytes(prefix));
    if len > MAX_TUNNEL_HEADER {
        return Err(HeaderError::TooLarge {
            len,
            max: MAX_TUNNEL_HEADER,
        });
    }
    Ok(len)
}

/// Decodes a header body (without its length prefix).
pub fn decode_header<T: DeserializeOwned>(body: &[u8]) -> Result<T, HeaderError> {
    match postcard::take_from_bytes::<T>(body) {
        Ok((header, [])) => Ok(header),
        Ok((_, rest)) => Err(HeaderError::Malformed {
            reason: format!("{} trailing bytes", rest.len()),
        }),
        Err(e) => Err(HeaderError::Malformed {
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let open = TunnelOpen {
            host: "github.com".into(),
            port: 443,
        };
        let bytes = encode_header(&open).unwrap();
        let len = header_len([bytes[0], bytes[1]]).unwrap();
        assert_eq!(len, bytes.len() - 2);
        assert_eq!(decode_header::<TunnelOpen>(&bytes[2..]).unwrap(), open);
    }

    #[test]
    fn oversized_and_garbage_headers_are_errors() {
        assert!(matches!(
            header_len([0xff, 0xff]),
            Err(HeaderError::TooLarge { len: 65535, .. })
        ));
        assert!(decode_header::<TunnelOpen>(&[0xff, 0xff, 0xff]).is_err());
        let long = TunnelOpen {
            host: "a".repeat(2000),
            port: 1,
        };
        assert!(matches!(
            encode_header(&long),
            Err(HeaderError::TooLarge { .. })
        ));
    }
}
