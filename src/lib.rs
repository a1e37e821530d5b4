//! keyrack as a library: everything but the command-line parsing, so that the binary, the
//! benchmarks and the tests build on the same code. See ARCHITECTURE.md for the map.

pub mod accounts;
pub mod app;
pub mod auth;
pub mod clock;
pub mod commands;
pub mod config;
pub mod crypto;
pub mod db;
pub mod domain;
pub mod fixtures;
pub mod healthcheck;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod operator;
pub mod phase;
pub mod progress;
pub mod status;
pub mod store;
pub mod usage;

/// How a command failed, and so its exit code (listed in `keyrack --help`).
#[derive(Debug)]
pub enum Failure {
    /// Exit 1: failure at run time.
    Runtime(String),
    /// Exit 2: usage or configuration error.
    Config(String),
    /// Exit 3: refused by a safety check.
    Refused(String),
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Runtime(_) => 1,
            Failure::Config(_) => 2,
            Failure::Refused(_) => 3,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Failure::Runtime(m) | Failure::Config(m) | Failure::Refused(m) => m,
        }
    }
}
