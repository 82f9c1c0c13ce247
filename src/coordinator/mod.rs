//! The coordinator's building blocks. Landed so far: the tenant cache and the durable clock.
//! The request paths, the gRPC service and the role itself come with the rest of the
//! coordinator issue.

pub mod clock;
pub mod tenant_cache;
