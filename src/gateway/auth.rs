//! Authentication (API.md, "Authentication and tenants").
//!
//! - `token`: `Authorization: Bearer <jwt>`, HS256 with the shared secret, claims `sub` (the
//!   tenant), `role` (`tenant` | `admin`), `exp` (required, checked with no leeway). The tenant of
//!   a key-value call is `sub`; a `tenant_id` in the request that differs is 403.
//! - `none`: no token; the tenant comes from the body's `tenant_id`, the query's `tenant_id`, or
//!   `X-Tenant-ID`, in that order; admin endpoints are open (development only).

use std::time::Duration;

use axum::http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, AuthMode};

use super::errors::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenRole {
    Tenant,
    Admin,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: TokenRole,
    pub exp: u64,
}

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A verified token.
    Token(Claims),
    /// `auth = none`: anybody.
    Anonymous,
}

pub struct Auth {
    mode: AuthMode,
    decoding: Option<DecodingKey>,
    validation: Validation,
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the auth secret file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("auth mode token needs a secret ([gateway.auth] secret or secret_file)")]
    Missing,
}

/// The HS256 secret from config: `secret`, else the trimmed contents of `secret_file`.
pub fn secret(config: &AuthConfig) -> Result<Vec<u8>, SecretError> {
    if let Some(s) = config.secret.as_deref().filter(|s| !s.is_empty()) {
        return Ok(s.as_bytes().to_vec());
    }
    match &config.secret_file {
        Some(path) => std::fs::read_to_string(path)
            .map(|s| s.trim().as_bytes().to_vec())
            .map_err(|source| SecretError::File {
                path: path.display().to_string(),
                source,
            }),
        None => Err(SecretError::Missing),
    }
}

/// Mints a token for `tenant`, valid for `ttl`.
pub fn issue(
    secret: &[u8],
    tenant: &str,
    role: TokenRole,
    ttl: Duration,
) -> anyhow::Result<String> {
    let exp = crate::wallclock::now_secs().saturating_add(ttl.as_secs());
    let claims = Claims {
        sub: tenant.to_owned(),
        role,
        exp,
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )?)
}

impl Auth {
    pub fn new(config: &AuthConfig) -> Result<Auth, SecretError> {
        let decoding = match config.mode {
            AuthMode::Token => Some(DecodingKey::from_secret(&secret(config)?)),
            AuthMode::None => None,
        };
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Auth {
            mode: config.mode,
            decoding,
            validation,
        })
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Verifies the caller (401 for a missing, malformed, wrongly signed or expired token).
    pub fn caller(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let Some(key) = &self.decoding else {
            return Ok(Caller::Anonymous);
        };
        let header = headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token>"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| ApiError::unauthorized("expected Authorization: Bearer <token>"))?;
        jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map(|data| Caller::Token(data.claims))
            .map_err(|e| ApiError::unauthorized(format!("invalid token: {e}")))
    }

    /// The tenant of a key-value call. `from_request` is the tenant the request names, in the
    /// documented order (body, query, header) as the handler found it.
    pub fn tenant(&self, caller: &Caller, from_request: Option<&str>) -> Result<String, ApiError> {
        match caller {
            Caller::Token(claims) => match from_request {
                Some(t) if t != claims.sub => Err(ApiError::forbidden(format!(
                    "the token is for tenant {:?}, not {t:?}",
                    claims.sub
                ))),
                _ => Ok(claims.sub.clone()),
            },
            Caller::Anonymous => from_request.map(str::to_owned).ok_or_else(|| {
                ApiError::invalid(
                    "no tenant: give tenant_id in the body or query, or an X-Tenant-ID header",
                )
            }),
        }
    }

    /// Admin endpoints: an admin token (or `auth = none`).
    pub fn require_admin(&self, caller: &Caller) -> Result<(), ApiError> {
        match caller {
            Caller::Anonymous => Ok(()),
            Caller::Token(c) if c.role == TokenRole::Admin => Ok(()),
            Caller::Token(_) => Err(ApiError::forbidden("this endpoint needs an admin token")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn token_auth() -> Auth {
        Auth::new(&AuthConfig {
            mode: AuthMode::Token,
            secret: Some("s3cret".into()),
            secret_file: None,
        })
        .expect("auth")
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            axum::http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
        );
        h
    }

    #[test]
    fn tokens_verify_and_bind_the_tenant() {
        let auth = token_auth();
        let t = issue(
            b"s3cret",
            "acme",
            TokenRole::Tenant,
            Duration::from_secs(60),
        )
        .expect("t");
        let caller = auth.caller(&bearer(&t)).expect("valid");
        assert_eq!(auth.tenant(&caller, None).expect("tenant"), "acme");
        assert_eq!(auth.tenant(&caller, Some("acme")).expect("same"), "acme");
        assert_eq!(
            auth.tenant(&caller, Some("other")).expect_err("x").code,
            "FORBIDDEN"
        );
        assert_eq!(
            auth.require_admin(&caller).expect_err("x").code,
            "FORBIDDEN"
        );
        let admin = issue(b"s3cret", "ops", TokenRole::Admin, Duration::from_secs(60)).expect("t");
        assert!(
            auth.require_admin(&auth.caller(&bearer(&admin)).expect("ok"))
                .is_ok()
        );
    }

    #[test]
    fn the_secret_comes_from_config_else_from_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("secret");
        std::fs::write(&file, "  from-file\n").expect("write");
        let config = |secret: Option<&str>, secret_file: Option<std::path::PathBuf>| AuthConfig {
            mode: AuthMode::Token,
            secret: secret.map(Into::into),
            secret_file,
        };
        assert_eq!(
            secret(&config(Some("inline"), Some(file.clone()))).expect("inline"),
            b"inline"
        );
        assert_eq!(
            secret(&config(None, Some(file.clone()))).expect("file"),
            b"from-file"
        );
        assert_eq!(
            secret(&config(Some(""), Some(file))).expect("empty falls back"),
            b"from-file"
        );
        assert!(matches!(
            secret(&config(None, Some(dir.path().join("missing")))),
            Err(SecretError::File { .. })
        ));
        assert!(matches!(
            secret(&config(None, None)),
            Err(SecretError::Missing)
        ));
    }

    #[test]
    fn bad_tokens_are_unauthorized() {
        let auth = token_auth();
        let wrong = issue(b"other", "acme", TokenRole::Admin, Duration::from_secs(60)).expect("t");
        let expired = issue(b"s3cret", "acme", TokenRole::Admin, Duration::ZERO).expect("t");
        std::thread::sleep(Duration::from_millis(1100));
        for headers in [
            HeaderMap::new(),
            bearer("garbage"),
            bearer(&wrong),
            bearer(&expired),
        ] {
            assert_eq!(
                auth.caller(&headers).expect_err("refused").code,
                "UNAUTHORIZED"
            );
        }
    }
}
