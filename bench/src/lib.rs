//! Benchmarks of the transport and launch plane (issue 2; the harness of issue 9 grows here).
//!
//! The binaries in `src/bin/` drive the real controller and agent libraries on 127.0.0.1 and
//! print a markdown table; this library holds what they share: summary statistics
//! ([`stats`]), the report and the machine it ran on ([`report`]), a generated loopback setup
//! ([`setup`]), the byte source the tunnel carries ([`source`]) and the simulated agents of
//! the launch benchmark ([`sim_agent`]).
//!
//! Nothing here asserts a speed: figures are printed and written to `target/bench/`, and a
//! benchmark fails only when it cannot run.

pub mod report;
pub mod setup;
pub mod sim_agent;
pub mod source;
pub mod stats;
