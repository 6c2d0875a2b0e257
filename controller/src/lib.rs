//! The unidesk controller: the WSS gateway agents dial, the agent registry, the egress
//! dialer, the job store and the operator CLI.

pub mod admin;
pub mod auth;
pub mod check;
pub mod cli;
pub mod config;
pub mod demo;
pub mod desired;
pub mod egress;
pub mod gateway;
pub mod gitserve;
pub mod hub;
pub mod init;
pub mod metrics;
pub mod pki;
pub mod serve;
pub mod store;
