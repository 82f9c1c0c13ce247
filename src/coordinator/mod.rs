//! The coordinator's building blocks. Landed so far: the tenant cache. The request paths, the
//! gRPC service and the role itself come with the rest of the coordinator issue.

pub mod tenant_cache;
