//! pairdb: a distributed, multi-tenant key-value store in the Dynamo/Cassandra family.
//!
//! One binary runs as gateway, coordinator or storage node (see `roles`). The shared core
//! ([`ring`], [`vclock`], [`quorum`]) is pure and property-tested; everything with I/O sits
//! above it. The module map and the direction of dependencies are in `docs/architecture.md`.

pub mod cli;
pub mod config;
pub mod coordinator;
pub mod engine;
pub mod gateway;
pub mod idempotency;
pub mod limits;
pub mod meta;
pub mod metrics;
pub mod mux;
pub mod net;
pub mod priority;
pub mod quorum;
pub mod ring;
pub mod roles;
pub mod rpc;
pub mod shutdown;
pub mod storage;
pub mod telemetry;
pub mod tools;
pub mod vclock;
pub mod wallclock;
