//! Black-box tests: the real service on a random loopback port, a real sled database in a
//! temp folder, callbacks signed with Sinch's scheme. One binary, so one link step.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod adaptive;
mod analytics;
mod authentication;
mod callbacks;
mod concurrency;
mod console;
mod contract;
mod crash;
mod disk_full;
mod durability;
mod errors;
mod helpers;
mod hostile;
mod migration;
mod monitoring;
mod openapi;
mod operations;
mod policy;
mod policy_plugin;
mod postgres;
mod replicas;
mod restarts;
mod simulate;
mod store_contract;
