//! A storage node's side of listing (`ListKeys`; API.md `GET /v1/key-value?prefix=`): one page
//! of a tenant's records whose keys start with a prefix, in key order, after a given key. The
//! coordinator merges the pages of every node (docs/coordinator.md, "Listing").
//!
//! Invariants: records come in strictly increasing key order, all of the tenant and prefix
//! and after `start_after`; tombstones are included (a coordinator needs them to see that a key
//! another replica still holds was deleted); `more` is true exactly when a matching record
//! follows the last one sent. A page holds at most `limit` records and stops after about
//! [`MAX_PAGE_BYTES`] of values, so its memory is bounded whatever the tenant's size.

use bytes::Bytes;

use crate::engine::{Engine, EngineError};
use crate::limits::{check_key, check_storage_tenant};
use crate::rpc::storage as pb;

use super::convert::record_to_proto;
use super::errors::{StorageError, invalid};

/// Records per page, at most.
pub const MAX_LIMIT: u32 = 1000;
/// Values per page, about (a page ends after the record that reaches it).
pub const MAX_PAGE_BYTES: usize = 4 << 20;

/// A checked `ListKeys` request.
pub struct ListKeys {
    tenant: String,
    prefix: Bytes,
    /// The first key the page may hold (`start_after` followed by a NUL: keys hold no NUL).
    from: Vec<u8>,
    limit: usize,
    keys_only: bool,
}

impl ListKeys {
    pub fn parse(req: pb::ListKeysRequest) -> Result<ListKeys, StorageError> {
        check_storage_tenant(&req.tenant_id).map_err(|e| invalid(e.to_string()))?;
        if req.prefix.len() > crate::limits::MAX_KEY_BYTES {
            return Err(invalid("prefix is longer than a key may be"));
        }
        if req.limit == 0 || req.limit > MAX_LIMIT {
            return Err(invalid(format!("limit must be 1..={MAX_LIMIT}")));
        }
        let from = if req.start_after.is_empty() {
            Vec::new()
        } else {
            check_key(&req.start_after).map_err(|e| invalid(format!("start_after: {e}")))?;
            let mut from = req.start_after.to_vec();
            from.push(0);
            from
        };
        Ok(ListKeys {
            tenant: req.tenant_id,
            prefix: req.prefix,
            from,
            limit: req.limit as usize,
            keys_only: req.keys_only,
        })
    }

    /// The namespace listed.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The page (blocking: it reads tables).
    pub fn run(&self, engine: &Engine) -> Result<pb::ListKeysResponse, EngineError> {
        let mut records = Vec::new();
        let mut bytes = 0;
        let mut scan = engine.scan_prefix(&self.tenant, &self.prefix, &self.from)?;
        while let Some(item) = scan.next() {
            let r = item?;
            let mut record = record_to_proto(&r);
            if self.keys_only {
                if let Some(pb::record::Payload::Value(v)) = &mut record.payload {
                    *v = Bytes::new();
                }
            }
            bytes += r.value.as_ref().map_or(0, Bytes::len) + r.key.len();
            records.push(record);
            if records.len() == self.limit || bytes >= MAX_PAGE_BYTES {
                // One more read says whether the node holds more (its error is the page's).
                let more = match scan.next() {
                    None => false,
                    Some(Ok(_)) => true,
                    Some(Err(e)) => return Err(e),
                };
                return Ok(pb::ListKeysResponse {
                    records,
                    more,
                    tenant_deleted: false,
                });
            }
        }
        Ok(pb::ListKeysResponse {
            records,
            more: false,
            tenant_deleted: false,
        })
    }
}
