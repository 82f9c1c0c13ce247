//! The input limits of STORAGE.md and API.md, and the validators every boundary shares.
//!
//! Pure: no I/O, no imports from the rest of the crate. The gateway checks a request with
//! these before forwarding it, the coordinator again at its gRPC boundary (coordinators are
//! reachable without the gateway), and the engine before anything touches its log. One
//! definition, so the three can never disagree on what is valid.

/// Longest user key.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest value.
pub const MAX_VALUE_BYTES: usize = 10 * 1024 * 1024;
/// Longest tenant id.
pub const MAX_TENANT_BYTES: usize = 256;
/// Longest node id.
pub const MAX_NODE_ID_BYTES: usize = 128;
/// Longest time to live of a value, in seconds: ten years (API.md).
pub const MAX_TTL_SECONDS: u64 = 10 * 365 * 86_400;

/// Why an input is outside the limits. `Display` is the message a client sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error(
        "tenant id must be 1..={MAX_TENANT_BYTES} bytes without ':', NUL or control characters"
    )]
    TenantId,
    #[error("key must not be empty")]
    EmptyKey,
    #[error("key is {len} bytes; the limit is {max}")]
    KeyTooLarge { len: usize, max: usize },
    #[error("key must not contain NUL bytes")]
    KeyHasNul,
    #[error("value is {len} bytes; the limit is {max}")]
    ValueTooLarge { len: usize, max: usize },
}

/// Tenant id: 1..=256 bytes, no ':', NUL or control characters.
pub fn check_tenant(tenant: &str) -> Result<(), LimitError> {
    if tenant.is_empty()
        || tenant.len() > MAX_TENANT_BYTES
        || tenant.chars().any(|c| c == ':' || c.is_control())
    {
        return Err(LimitError::TenantId);
    }
    Ok(())
}

/// The longest storage namespace of a tenant: its id, ':' and an incarnation.
pub const MAX_STORAGE_TENANT_BYTES: usize = MAX_TENANT_BYTES + 11;

/// The storage namespace of incarnation `incarnation` of tenant `tenant_id` (see
/// `meta::Tenant::storage_id`).
pub fn storage_tenant_id(tenant_id: &str, incarnation: u32) -> String {
    if incarnation <= 1 {
        tenant_id.to_owned()
    } else {
        format!("{tenant_id}:{incarnation}")
    }
}

/// The tenant id and incarnation of a storage namespace (`None` when it is none).
pub fn parse_storage_tenant(storage_id: &str) -> Option<(&str, u32)> {
    match storage_id.rsplit_once(':') {
        None => check_tenant(storage_id).ok().map(|()| (storage_id, 1)),
        Some((id, suffix)) => {
            // Canonical decimal only ("02" or "+2" would be a second name for one namespace).
            let n: u32 = suffix.parse().ok().filter(|n: &u32| *n >= 2)?;
            (check_tenant(id).is_ok() && n.to_string() == suffix).then_some((id, n))
        }
    }
}

/// A tenant namespace as storage nodes take it: a tenant id, or `id:N` for incarnation N >= 2.
pub fn check_storage_tenant(tenant: &str) -> Result<(), LimitError> {
    if tenant.len() > MAX_STORAGE_TENANT_BYTES || parse_storage_tenant(tenant).is_none() {
        return Err(LimitError::TenantId);
    }
    Ok(())
}

/// Key: 1..=1024 bytes.
pub fn check_key(key: &[u8]) -> Result<(), LimitError> {
    if key.is_empty() {
        return Err(LimitError::EmptyKey);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(LimitError::KeyTooLarge {
            len: key.len(),
            max: MAX_KEY_BYTES,
        });
    }
    Ok(())
}

/// A key as clients may send it (API.md): [`check_key`], and no NUL byte (keys travel as
/// JSON strings and path segments). The engine itself stores any bytes.
pub fn check_client_key(key: &[u8]) -> Result<(), LimitError> {
    check_key(key)?;
    if key.contains(&0) {
        return Err(LimitError::KeyHasNul);
    }
    Ok(())
}

/// Value: at most 10 MiB (empty values are allowed).
pub fn check_value_len(len: usize) -> Result<(), LimitError> {
    if len > MAX_VALUE_BYTES {
        return Err(LimitError::ValueTooLarge {
            len,
            max: MAX_VALUE_BYTES,
        });
    }
    Ok(())
}

/// A node id: 1..=128 letters, digits, '-', '_' or '.'.
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_NODE_ID_BYTES
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The longest snapshot name.
pub const MAX_SNAPSHOT_NAME_BYTES: usize = 64;

/// A snapshot name: 1..=64 letters, digits, '-', '_' or '.', not starting with '.'. It names a
/// directory under `<data-dir>/snapshots/`, so it can never leave it (no '/', no "..") nor
/// collide with the dot-prefixed work directories there.
pub fn valid_snapshot_name(name: &str) -> bool {
    // A node id's characters, shorter, and never a dot first.
    name.len() <= MAX_SNAPSHOT_NAME_BYTES && !name.starts_with('.') && valid_node_id(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_namespaces_name_one_incarnation_each() {
        assert_eq!(storage_tenant_id("acme", 1), "acme");
        assert_eq!(storage_tenant_id("acme", 3), "acme:3");
        assert_eq!(parse_storage_tenant("acme"), Some(("acme", 1)));
        assert_eq!(parse_storage_tenant("acme:3"), Some(("acme", 3)));
        for bad in ["acme:1", "acme:03", "acme:+3", "acme:x", "a:b:2", ":2", ""] {
            assert_eq!(parse_storage_tenant(bad), None, "{bad}");
            assert!(check_storage_tenant(bad).is_err(), "{bad}");
        }
        assert!(check_storage_tenant("acme:2").is_ok());
        assert!(
            check_tenant("acme:2").is_err(),
            "clients cannot name a namespace"
        );
    }

    #[test]
    fn limits_are_inclusive() {
        assert!(check_tenant("acme").is_ok());
        assert!(check_tenant(&"t".repeat(MAX_TENANT_BYTES)).is_ok());
        assert_eq!(
            check_tenant(&"t".repeat(MAX_TENANT_BYTES + 1)),
            Err(LimitError::TenantId)
        );
        for bad in ["", "a:b", "a\0b", "a\nb"] {
            assert_eq!(check_tenant(bad), Err(LimitError::TenantId), "{bad:?}");
        }
        assert_eq!(check_key(b""), Err(LimitError::EmptyKey));
        assert!(check_key(&[7; MAX_KEY_BYTES]).is_ok());
        assert!(matches!(
            check_key(&[7; MAX_KEY_BYTES + 1]),
            Err(LimitError::KeyTooLarge { len: 1025, .. })
        ));
        assert!(check_key(b"a\0b").is_ok());
        assert_eq!(check_client_key(b"a\0b"), Err(LimitError::KeyHasNul));
        assert_eq!(check_client_key(b""), Err(LimitError::EmptyKey));
        assert!(check_value_len(0).is_ok());
        assert!(check_value_len(MAX_VALUE_BYTES).is_ok());
        assert!(check_value_len(MAX_VALUE_BYTES + 1).is_err());
        assert!(valid_node_id("s-1.a_b"));
        assert!(!valid_node_id(""));
        assert!(!valid_node_id("s 1"));
        assert!(!valid_node_id(&"n".repeat(MAX_NODE_ID_BYTES + 1)));
    }
}
