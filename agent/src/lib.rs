//! The unidesk agent: dials out to the controller, serves the loopback egress proxy and runs
//! typed launches, writing every event to its run directory before sending it.

pub mod atomic;
pub mod config;
pub mod conn;
pub mod egress;
pub mod events;
pub mod launch;
pub mod logging;
pub mod manual;
pub mod metrics;
pub mod notify;
pub mod pem;
pub mod rundir;
pub mod service;
