//! The coordinator's building blocks. Landed so far: the tenant cache, the durable clock, the
//! storage client pool and membership from the storage nodes' gossip.
//! The request paths, the gRPC service and the role itself come with the rest of the
//! coordinator issue.

pub mod clock;
pub mod membership;
pub mod storage_pool;
pub mod tenant_cache;
