//! The wire protocol between the unidesk controller and its agents.
//!
//! This crate owns the frame types ([`frame`]), their versioned postcard codec ([`codec`]),
//! validated identifiers ([`ids`]) and the state machines that make the link dependable:
//! exactly-once event delivery ([`delivery`]) and launch-id idempotency ([`launches`]).
//!
//! It must not do I/O: no sockets, files, tasks or clocks. Time is always an argument.

pub mod codec;
pub mod delivery;
pub mod frame;
pub mod ids;
pub mod launches;
pub mod tunnel;

pub use codec::{DecodeError, EncodeError, MAX_FRAME_BYTES, PROTOCOL_VERSION, Wire};
pub use frame::*;
pub use ids::{AgentId, IdError, LaunchId, RunId, Secret};
