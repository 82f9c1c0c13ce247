//! Command-line tools for users of a running cluster (OPERATIONS.md, "Tools for users"): a
//! small client of the HTTP API (`pairdb kv`, `pairdb admin`) and a load generator
//! (`pairdb bench`). They talk to a gateway like any other client. `pairdb ring simulate`
//! ([`ring`]) needs no cluster: it runs the placement code on its own; nor does `pairdb cert`
//! ([`cert`]), which makes a cluster CA and node certificates.

pub mod bench;
pub mod cert;
pub mod client;
pub mod progress;
pub mod ring;
pub mod tables;
