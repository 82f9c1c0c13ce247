//! Engine records to and from their protobuf form. The ring hash is always recomputed from
//! (tenant, key), never trusted from the wire.

use super::errors::StorageError;
use bytes::Bytes;

use crate::engine::Record;
use crate::rpc::storage as pb;
use crate::vclock::Version;

use super::errors::invalid;

pub fn record_from_proto(r: pb::Record) -> Result<Record, StorageError> {
    let version = r
        .version
        .as_ref()
        .map(Version::from)
        .ok_or_else(|| invalid("record without a version"))?;
    let expires_at_ms = (r.expires_at_ms != 0).then_some(r.expires_at_ms);
    match r.payload {
        Some(pb::record::Payload::Value(v)) => {
            Ok(Record::put(r.tenant_id, r.key, version, v).expiring(expires_at_ms))
        }
        Some(pb::record::Payload::Tombstone(_)) if expires_at_ms.is_some() => {
            Err(invalid("a tombstone cannot expire"))
        }
        Some(pb::record::Payload::Tombstone(_)) => {
            Ok(Record::tombstone(r.tenant_id, r.key, version))
        }
        None => Err(invalid("record without a value or tombstone")),
    }
}

pub fn record_to_proto(r: &Record) -> pb::Record {
    pb::Record {
        tenant_id: r.tenant.clone(),
        key: r.key.clone(),
        version: Some((&r.version).into()),
        payload: Some(match &r.value {
            Some(v) => pb::record::Payload::Value(v.clone()),
            None => pb::record::Payload::Tombstone(pb::Tombstone {}),
        }),
        ring_hash: r.ring_hash,
        expires_at_ms: r.expires_at_ms.unwrap_or(0),
    }
}

/// Bytes a record adds to a stream (for progress reports).
pub fn wire_size(r: &Record) -> u64 {
    (r.tenant.len() + r.key.len() + r.value.as_ref().map_or(0, Bytes::len) + 32) as u64
}
