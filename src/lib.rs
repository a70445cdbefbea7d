//! verigate: receives Sinch Verification callbacks, authenticates them, answers
//! allow/deny for verification requests, and records every event durably.

pub mod analytics;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod console;
pub mod decision;
pub mod error;
pub mod events;
pub mod metrics;
pub mod phone;
pub mod policy;
pub mod rng;
pub mod routes;
pub mod signature;
pub mod simulate;
pub mod startup;
pub mod store;
pub mod telemetry;
