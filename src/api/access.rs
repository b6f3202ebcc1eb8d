//! Access: bearer API keys with scopes, checked before any handler runs.
//!
//! Keys are configured as `name:scopes:sha256-hex` entries (`API_KEYS`,
//! or one per line in `API_KEYS_FILE`; `wallet keys new` makes one), so the
//! service never holds a key itself, only its SHA-256. A presented key is
//! hashed and compared with every configured hash in constant time.
//! Scopes: `read` (GET routes and /metrics), `write` (POST routes), `admin`
//! (implies both; reserved for administrative routes). `/health`, `/ready`,
//! `/docs` and `/openapi.json` stay open. With no keys configured the API
//! is open, and `serve` says so loudly at start-up.

use axum::extract::Request;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::problem::Problem;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Read,
    Write,
    Admin,
}

impl Scope {
    fn parse(text: &str) -> Option<Scope> {
        match text {
            "read" => Some(Scope::Read),
            "write" => Some(Scope::Write),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
struct ApiKey {
    name: String,
    scopes: Vec<Scope>,
    hash: [u8; 32],
}

impl ApiKey {
    fn allows(&self, needed: Scope) -> bool {
        self.scopes.contains(&needed) || self.scopes.contains(&Scope::Admin)
    }
}

/// The configured keys; empty means open mode.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: Vec<ApiKey>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("API key entry {entry}: {problem} (expected name:read+write+admin:<64 hex chars of sha256>)")]
pub struct KeyConfigError {
    entry: usize,
    problem: &'static str,
}

/// Most keys accepted: each request compares against all of them.
const MAX_KEYS: usize = 1000;

impl ApiKeys {
    /// Open mode: every request is allowed.
    pub fn open() -> Self {
        Self::default()
    }

    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn names(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.name.as_str()).collect()
    }

    /// Entries separated by commas or new lines; blank lines and lines
    /// starting with `#` are skipped.
    pub fn parse(spec: &str) -> Result<Self, KeyConfigError> {
        let mut keys = Vec::new();
        let entries = spec
            .split([',', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty() && !e.starts_with('#'));
        for (i, entry) in entries.enumerate() {
            let err = |problem| KeyConfigError { entry: i + 1, problem };
            let mut parts = entry.split(':');
            let (Some(name), Some(scopes), Some(hash), None) = (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(err("not three colon-separated fields"));
            };
            if name.is_empty() || name.len() > 64 {
                return Err(err("name must be 1-64 characters"));
            }
            let scopes: Option<Vec<Scope>> = scopes.split('+').map(Scope::parse).collect();
            let scopes = scopes.filter(|s| !s.is_empty()).ok_or_else(|| err("unknown scope"))?;
            let bytes = hex::decode(hash).map_err(|_| err("hash is not hex"))?;
            let hash: [u8; 32] = bytes.try_into().map_err(|_| err("hash is not 32 bytes"))?;
            keys.push(ApiKey {
                name: name.to_owned(),
                scopes,
                hash,
            });
            if keys.len() > MAX_KEYS {
                return Err(err("too many keys"));
            }
        }
        Ok(Self { keys })
    }

    /// The configuration entry for `key`.
    pub fn entry(name: &str, scopes: &str, key: &str) -> String {
        format!("{name}:{scopes}:{}", hex::encode(Sha256::digest(key.as_bytes())))
    }

    /// The key whose hash matches, comparing with every key in constant time.
    fn find(&self, presented: &str) -> Option<&ApiKey> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for key in &self.keys {
            let diff = key
                .hash
                .iter()
                .zip(digest.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 && found.is_none() {
                found = Some(key);
            }
        }
        found
    }
}

/// What a request needs, `None` for the open routes.
fn needed_scope(method: &Method, path: &str) -> Option<Scope> {
    let open = ["/health", "/ready", "/openapi.json"];
    if open.contains(&path) || path == "/docs" || path.starts_with("/docs/") {
        return None;
    }
    if method == Method::GET || method == Method::HEAD || method == Method::OPTIONS {
        Some(Scope::Read)
    } else if path.ends_with("/limits") {
        // Limits bound what every other key may do with a wallet.
        Some(Scope::Admin)
    } else {
        Some(Scope::Write)
    }
}

/// Who sent a request: the name of its key, or `None` when the route or
/// the service is open. `Err` is the answer: 401 without a valid key
/// (with `WWW-Authenticate: Bearer`), 403 without the scope. Called by the
/// gate (`gate.rs`) before anything reads the body.
pub(super) fn authenticate<'a>(keys: &'a ApiKeys, request: &Request) -> Result<Option<&'a str>, Response> {
    if keys.is_open() {
        return Ok(None);
    }
    let Some(needed) = needed_scope(request.method(), request.uri().path()) else {
        return Ok(None);
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme name is case-insensitive (RFC 9110).
        .and_then(|v| {
            v.get(..7)
                .filter(|s| s.eq_ignore_ascii_case("bearer "))
                .map(|_| &v[7..])
        })
        .map(str::trim);
    let Some(key) = presented.and_then(|p| keys.find(p)) else {
        let mut response = Problem::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "send a valid API key: Authorization: Bearer <key>",
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return Err(response);
    };
    if !key.allows(needed) {
        let scope = match needed {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        };
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
            format!("API key {:?} lacks the {scope} scope", key.name),
        )
        .into_response());
    }
    Ok(Some(key.name.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_and_keys_match_only_their_own_hash() {
        let spec = format!(
            "{}\n# comment\n{}",
            ApiKeys::entry("ci", "read+write", "secret-1"),
            ApiKeys::entry("ops", "admin", "secret-2")
        );
        let keys = ApiKeys::parse(&spec).unwrap();
        assert_eq!(keys.names(), vec!["ci", "ops"]);
        assert_eq!(keys.find("secret-1").unwrap().name, "ci");
        assert!(keys.find("secret-1 ").is_none());
        assert!(keys.find("secret-3").is_none());
        assert!(keys.find("secret-2").unwrap().allows(Scope::Write));
    }

    #[test]
    fn bad_entries_are_refused_with_their_number() {
        assert_eq!(ApiKeys::parse("a:read").unwrap_err().entry, 1);
        assert!(ApiKeys::parse(&format!("a:root:{}", "00".repeat(32))).is_err());
        assert!(ApiKeys::parse("a:read:zz").is_err());
        assert!(ApiKeys::parse(&format!("a:read:{}", "00".repeat(31))).is_err());
        assert!(ApiKeys::parse("").unwrap().is_open());
    }

    #[test]
    fn scopes_follow_the_method_and_open_routes_stay_open() {
        assert_eq!(needed_scope(&Method::GET, "/wallet/a"), Some(Scope::Read));
        assert_eq!(needed_scope(&Method::POST, "/wallet/a/deposit"), Some(Scope::Write));
        assert_eq!(needed_scope(&Method::PUT, "/wallet/a/limits"), Some(Scope::Admin));
        assert_eq!(needed_scope(&Method::GET, "/metrics"), Some(Scope::Read));
        for open in ["/health", "/ready", "/docs", "/docs/index.html", "/openapi.json"] {
            assert_eq!(needed_scope(&Method::GET, open), None);
        }
    }
}
