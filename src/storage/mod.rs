//! The storage node: the engine served over gRPC (`service`), its side of anti-entropy
//! (`anti_entropy`), its side of cleanup (`cleanup`), range streaming to other nodes
//! (`streaming`, throttled by `throttle`), gossip of node health (`gossip`), health and metrics over HTTP (`http`), and
//! the data-directory lock (`datadir`), and named snapshots of the data (`snapshots`). Wired together by `roles::storage`.

pub mod anti_entropy;
pub mod background;
pub mod cleanup;
pub mod convert;
pub mod datadir;
pub mod dropped_tenants;
pub mod errors;
pub mod gossip;
mod gossip_transport;
pub mod http;
pub mod json_file;
pub mod listing;
pub mod repair_markers;
pub mod repaired_ranges;
pub mod ring_fence;
pub mod service;
pub mod snapshots;
pub mod stream_checkpoint;
pub mod streaming;
pub mod throttle;
