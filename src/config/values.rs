//! Values the sections share: node addresses, `host:port`, comma lists, parse errors.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::engine::SyncMode;

/// A value that does not parse: what it should look like, and what it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{expected}, not {got:?}")]
pub struct BadValue {
    pub expected: &'static str,
    pub got: String,
}

impl BadValue {
    pub(super) fn new(expected: &'static str, got: &str) -> Self {
        Self {
            expected,
            got: got.to_owned(),
        }
    }
}

/// A storage node's address as given to coordinators: `id@host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddress {
    pub id: String,
    pub host: String,
    pub port: u16,
}

impl FromStr for NodeAddress {
    type Err = BadValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || BadValue::new("storage node must look like id@host:port", s);
        let (id, addr) = s.split_once('@').ok_or_else(err)?;
        let (host, port) = split_host_port(addr).map_err(|_| err())?;
        if id.is_empty() {
            return Err(err());
        }
        Ok(Self {
            id: id.to_owned(),
            host,
            port,
        })
    }
}

impl fmt::Display for NodeAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}:{}", self.id, self.host, self.port)
    }
}

/// Splits `host:port` (host may be a name, an IPv4 address or a bracketed IPv6 address).
pub fn split_host_port(addr: &str) -> Result<(String, u16), BadValue> {
    let err = || BadValue::new("address must look like host:port", addr);
    let (host, port) = addr.rsplit_once(':').ok_or_else(err)?;
    let port: u16 = port.parse().map_err(|_| err())?;
    if host.is_empty() || port == 0 {
        return Err(err());
    }
    Ok((host.to_owned(), port))
}

macro_rules! serde_via_str {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                raw.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_via_str!(SyncMode);
serde_via_str!(NodeAddress);

/// Accepts a list either as a sequence or as one comma-separated string (env vars).
pub(super) fn list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    let items = match Raw::deserialize(d)? {
        Raw::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        Raw::Many(v) => v,
    };
    items
        .iter()
        .map(|s| s.parse::<T>().map_err(serde::de::Error::custom))
        .collect()
}

/// The HTTP (health/metrics) listener next to a gRPC listener: same host, port + 1000.
pub fn default_http_listen(listen: SocketAddr) -> SocketAddr {
    let port = match listen.port() {
        0 => 0,
        p => p.saturating_add(1000),
    };
    SocketAddr::new(listen.ip(), port)
}

/// Durations as humantime strings (`"2s"`, `"250ms"`, `"24h"`) in files and env vars.
pub(super) mod human_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let raw = String::deserialize(d)?;
        humantime::parse_duration(raw.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "{raw:?} is not a duration like \"250ms\", \"2s\" or \"24h\": {e}"
            ))
        })
    }
}
