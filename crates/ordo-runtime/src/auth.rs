//! Authorization of client calls with bearer JWTs, designed once for the
//! harmonizer (`Process`, `Submit`) and the push-gateway (`Subscribe`, SSE),
//! plus the minting behind `ordo token`.
//!
//! A token is verified with HS256 (a shared secret in a file) or RS256 (a PEM
//! public key file, or a JWKS file whose key is chosen by the token's `kid`).
//! `exp` is required, `exp` and `nbf` are checked with [`LEEWAY_SECS`] of
//! clock skew, and `iss`/`aud` are required and checked when
//! `--auth-issuer`/`--auth-audience` are set. What a token may do is in its
//! `ordo` claim:
//!
//! ```json
//! {"sub": "alice", "exp": 1767225600,
//!  "ordo": {"write": ["orders-*"], "read": ["orders-*", "audit"]}}
//! ```
//!
//! `write` lists the stream ids the token may send events to (Process,
//! Submit), `read` those it may read released results of (Subscribe, SSE).
//! Each entry is a glob where `*` matches any run of characters (none
//! included) and every other character matches itself: `orders-*` is a
//! prefix, `*` is every stream, `audit` is exactly that stream. A token
//! without an `ordo` claim is valid but may do nothing.
//!
//! Outcomes: no token, a malformed, expired, not-yet-valid or badly signed
//! one, or a wrong issuer/audience → UNAUTHENTICATED (SSE: 401 with
//! `WWW-Authenticate: Bearer`); a valid token lacking the stream →
//! PERMISSION_DENIED (SSE: 403). With no key flag set, auth is off and every
//! call is allowed (logged once as a warning at start-up). Internal calls
//! (Work, Deliver, Follow, Execute…) are never token-checked: mTLS protects
//! them.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey, Header, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm, PublicKeyUse},
};
use serde::{Deserialize, Serialize};
use tonic::{Status, metadata::MetadataMap};

/// Clock skew tolerated on `exp` and `nbf`, in seconds (the usual 60 s).
pub const LEEWAY_SECS: u64 = 60;

/// The gRPC metadata key (and HTTP header) a token comes in.
pub const AUTHORIZATION: &str = "authorization";

/// The authorization flags of the services that check tokens (harmonizer and
/// push-gateway flatten it into their config). No key flag → auth off.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthArgs {
    /// Accept HS256 tokens signed with the secret in this file (its bytes,
    /// trailing whitespace trimmed; at least 32 bytes recommended).
    #[arg(long = "auth-hs256-secret-file", env = "ORDO_AUTH_HS256_SECRET_FILE", value_name = "FILE")]
    pub hs256_secret_file: Option<PathBuf>,
    /// Accept RS256 tokens signed by the private half of this PEM public key
    /// (`BEGIN PUBLIC KEY` or `BEGIN RSA PUBLIC KEY`).
    #[arg(long = "auth-rs256-public-key-file", env = "ORDO_AUTH_RS256_PUBLIC_KEY_FILE", value_name = "FILE")]
    pub rs256_public_key_file: Option<PathBuf>,
    /// Accept RS256 tokens signed by a key of this JWKS file (`{"keys":[…]}`),
    /// chosen by the token's `kid`.
    #[arg(long = "auth-jwks-file", env = "ORDO_AUTH_JWKS_FILE", value_name = "FILE")]
    pub jwks_file: Option<PathBuf>,
    /// Require this `iss` claim.
    #[arg(long = "auth-issuer", env = "ORDO_AUTH_ISSUER")]
    pub issuer: Option<String>,
    /// Require this value in the `aud` claim.
    #[arg(long = "auth-audience", env = "ORDO_AUTH_AUDIENCE")]
    pub audience: Option<String>,
}

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No usable token: UNAUTHENTICATED, HTTP 401.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid token that does not allow this: PERMISSION_DENIED, HTTP 403.
    #[error("{0}")]
    PermissionDenied(String),
}

impl From<Denied> for Status {
    fn from(denied: Denied) -> Self {
        match denied {
            Denied::Unauthenticated(message) => Status::unauthenticated(message),
            Denied::PermissionDenied(message) => Status::permission_denied(message),
        }
    }
}

fn unauthenticated(message: impl Into<String>) -> Denied {
    Denied::Unauthenticated(message.into())
}

/// Token verification for one service: off, or the keys and claims it checks.
#[derive(Clone, Default)]
pub struct Auth(Option<Arc<Verifier>>);

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("Auth(off)"),
            Some(verifier) => write!(f, "Auth({})", verifier.describe()),
        }
    }
}

struct Verifier {
    hs256: Option<DecodingKey>,
    rs256: Option<DecodingKey>,
    /// RS256 keys of the JWKS file, with their `kid`.
    jwks: Vec<(Option<String>, DecodingKey)>,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Verifier {
    fn describe(&self) -> String {
        let mut keys = Vec::new();
        if self.hs256.is_some() {
            keys.push("HS256 secret".to_owned());
        }
        if self.rs256.is_some() {
            keys.push("RS256 public key".to_owned());
        }
        if !self.jwks.is_empty() {
            keys.push(format!("JWKS with {} RS256 key(s)", self.jwks.len()));
        }
        keys.join(", ")
    }

    /// The key that must have signed a token with this header.
    fn key_for(&self, header: &Header) -> Result<&DecodingKey, Denied> {
        match header.alg {
            Algorithm::HS256 => self
                .hs256
                .as_ref()
                .ok_or_else(|| unauthenticated("HS256 tokens are not accepted here (no --auth-hs256-secret-file)")),
            Algorithm::RS256 => {
                if self.rs256.is_none() && self.jwks.is_empty() {
                    return Err(unauthenticated(
                        "RS256 tokens are not accepted here (no --auth-rs256-public-key-file or --auth-jwks-file)",
                    ));
                }
                match &header.kid {
                    Some(kid) => {
                        let found = self.jwks.iter().find(|(id, _)| id.as_deref() == Some(kid.as_str()));
                        match (found, &self.rs256) {
                            (Some((_, key)), _) => Ok(key),
                            // Without a JWKS the one public key is the key, whatever the kid says.
                            (None, Some(key)) if self.jwks.is_empty() => Ok(key),
                            _ => Err(unauthenticated(format!(
                                "no key with kid {:?} in the JWKS file",
                                ordo_core::limits::echo(kid)
                            ))),
                        }
                    }
                    None => match (&self.rs256, self.jwks.as_slice()) {
                        (Some(key), _) | (None, [(_, key)]) => Ok(key),
                        _ => Err(unauthenticated("an RS256 token without kid, and the JWKS file has several keys")),
                    },
                }
            }
            other => Err(unauthenticated(format!("tokens signed with {other:?} are not accepted (HS256, RS256)"))),
        }
    }

    fn verify(&self, token: &str) -> Result<Grant, Denied> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| unauthenticated(format!("malformed token: {e}")))?;
        let key = self.key_for(&header)?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &self.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // Not configured: a token's `aud` is not checked.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| self.rejection(&e))?;
        Ok(Grant::of(data.claims))
    }

    fn rejection(&self, error: &jsonwebtoken::errors::Error) -> Denied {
        let message = match error.kind() {
            ErrorKind::ExpiredSignature => "the token has expired (exp)".to_owned(),
            ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".to_owned(),
            ErrorKind::InvalidSignature => "the token's signature does not verify".to_owned(),
            ErrorKind::InvalidIssuer => {
                format!("the token's issuer (iss) is not {:?}", self.issuer.as_deref().unwrap_or_default())
            }
            ErrorKind::InvalidAudience => {
                format!(
                    "the token's audience (aud) does not include {:?}",
                    self.audience.as_deref().unwrap_or_default()
                )
            }
            ErrorKind::MissingRequiredClaim(claim) => format!("the token has no {claim} claim"),
            ErrorKind::InvalidAlgorithm => "the token's algorithm does not match its key".to_owned(),
            _ => format!("malformed token: {error}"),
        };
        unauthenticated(message)
    }
}

impl Auth {
    /// Every call allowed.
    pub fn off() -> Self {
        Self(None)
    }

    /// Loads the keys the flags name (auth off when none is given). The
    /// error says which file or flag is wrong, for the start-up message.
    pub fn from_args(args: &AuthArgs) -> Result<Self, String> {
        let hs256 = match &args.hs256_secret_file {
            Some(path) => {
                let secret = read_secret(path)?;
                Some(DecodingKey::from_secret(&secret).map_err(|e| format!("--auth-hs256-secret-file: {e}"))?)
            }
            None => None,
        };
        let rs256 = match &args.rs256_public_key_file {
            Some(path) => {
                let pem = read_file(path, "--auth-rs256-public-key-file")?;
                Some(DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                    format!("--auth-rs256-public-key-file {}: not an RSA public key in PEM: {e}", path.display())
                })?)
            }
            None => None,
        };
        let jwks = match &args.jwks_file {
            Some(path) => load_jwks(path)?,
            None => Vec::new(),
        };
        if hs256.is_none() && rs256.is_none() && jwks.is_empty() {
            if args.issuer.is_some() || args.audience.is_some() {
                return Err("--auth-issuer/--auth-audience need a key: --auth-hs256-secret-file, \
                     --auth-rs256-public-key-file or --auth-jwks-file"
                    .into());
            }
            return Ok(Self::off());
        }
        let (issuer, audience) = (args.issuer.clone(), args.audience.clone());
        Ok(Self(Some(Arc::new(Verifier { hs256, rs256, jwks, issuer, audience }))))
    }

    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// Says once, at start-up, whether calls are checked.
    pub fn log_startup(&self, service: &str) {
        match &self.0 {
            None => tracing::warn!(
                service,
                "authorization is off: any client may write and read every stream (set --auth-hs256-secret-file, \
                 --auth-rs256-public-key-file or --auth-jwks-file)"
            ),
            Some(verifier) => tracing::info!(
                service,
                keys = verifier.describe(),
                issuer = verifier.issuer.as_deref().unwrap_or("any"),
                audience = verifier.audience.as_deref().unwrap_or("any"),
                "authorization on: bearer tokens required"
            ),
        }
    }

    /// What the bearer token in `token` (the token itself, no `Bearer `)
    /// allows; with auth off, everything.
    pub fn verify(&self, token: Option<&str>) -> Result<Grant, Denied> {
        let Some(verifier) = &self.0 else { return Ok(Grant::everything()) };
        let token = token.ok_or_else(|| unauthenticated("a bearer token is required (authorization: Bearer …)"))?;
        verifier.verify(token)
    }

    /// What the `authorization: Bearer …` metadata of a gRPC call allows
    /// (`Denied` converts into the call's status).
    pub fn authorize(&self, metadata: &MetadataMap) -> Result<Grant, Denied> {
        if !self.is_on() {
            return Ok(Grant::everything());
        }
        let header =
            match metadata.get(AUTHORIZATION) {
                Some(value) => Some(value.to_str().map_err(|_| {
                    unauthenticated("the authorization metadata is not ASCII; expected Bearer <token>")
                })?),
                None => None,
            };
        self.verify(bearer(header)?)
    }
}

/// The token of an `authorization` value `Bearer <token>` (scheme in any
/// case); `None` when there is no value.
pub fn bearer(header: Option<&str>) -> Result<Option<&str>, Denied> {
    let Some(header) = header else { return Ok(None) };
    let (scheme, token) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(unauthenticated("the authorization value must be Bearer <token>"));
    }
    Ok(Some(token))
}

/// What one verified token allows.
#[derive(Debug, Clone)]
pub struct Grant {
    /// `None`: auth is off, everything is allowed.
    subject: Option<String>,
    write: Vec<String>,
    read: Vec<String>,
}

impl Grant {
    /// Auth off: every stream, both ways.
    pub fn everything() -> Self {
        Self { subject: None, write: vec!["*".into()], read: vec!["*".into()] }
    }

    fn of(claims: Claims) -> Self {
        let Permissions { write, read } = claims.ordo;
        Self { subject: Some(claims.sub.unwrap_or_default()), write, read }
    }

    /// The token's `sub` (empty when it has none); `None` with auth off.
    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }

    pub fn may_write(&self, stream: &str) -> bool {
        self.write.iter().any(|pattern| glob_match(pattern, stream))
    }

    pub fn may_read(&self, stream: &str) -> bool {
        self.read.iter().any(|pattern| glob_match(pattern, stream))
    }

    /// PERMISSION_DENIED unless the token may send events to `stream`.
    pub fn check_write(&self, stream: &str) -> Result<(), Denied> {
        if self.may_write(stream) { Ok(()) } else { Err(self.denied("write", stream, &self.write)) }
    }

    /// PERMISSION_DENIED unless the token may read `stream`'s results.
    pub fn check_read(&self, stream: &str) -> Result<(), Denied> {
        if self.may_read(stream) { Ok(()) } else { Err(self.denied("read", stream, &self.read)) }
    }

    fn denied(&self, what: &str, stream: &str, allowed: &[String]) -> Denied {
        let subject = self.subject.as_deref().unwrap_or_default();
        let allowed = if allowed.is_empty() { "none".to_owned() } else { ordo_core::limits::echo(&allowed.join(", ")) };
        Denied::PermissionDenied(format!(
            "the token of {subject:?} may not {what} stream {:?} (it may {what}: {allowed})",
            ordo_core::limits::echo(stream)
        ))
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters
/// (none included) and every other character only itself. Linear in
/// practice: on a mismatch only the last `*` is widened.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (pattern, text) = (pattern.as_bytes(), text.as_bytes());
    let (mut p, mut t) = (0, 0);
    // The position after the last `*` seen, and where in `text` it started matching.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p + 1, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((after, from)) = star {
            p = after;
            t = from + 1;
            star = Some((after, from + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// The claims read from a verified token (`exp`, `nbf`, `iss`, `aud` are
/// checked by the verification itself).
#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    ordo: Permissions,
}

/// The `ordo` claim: stream-id globs a token may write and read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permissions {
    #[serde(default)]
    pub write: Vec<String>,
    #[serde(default)]
    pub read: Vec<String>,
}

/// The key `ordo token` signs with.
#[derive(Debug, Clone)]
pub enum SigningKey {
    /// The shared secret (the same file as the services' `--auth-hs256-secret-file`).
    Hs256(Vec<u8>),
    /// A PEM RSA private key (PKCS#1 or PKCS#8), and the `kid` to put in the header.
    Rs256 { pem: Vec<u8>, kid: Option<String> },
}

impl SigningKey {
    /// HS256 with the secret in `path` (trimmed as the services trim it).
    pub fn hs256_file(path: &Path) -> Result<Self, String> {
        read_secret(path).map(Self::Hs256)
    }

    /// RS256 with the PEM private key in `path`.
    pub fn rs256_file(path: &Path, kid: Option<String>) -> Result<Self, String> {
        read_file(path, "the RS256 private key").map(|pem| Self::Rs256 { pem, kid })
    }
}

/// What a minted token says.
#[derive(Debug, Clone, Default)]
pub struct TokenSpec {
    pub subject: String,
    pub permissions: Permissions,
    /// How long it is valid from now.
    pub ttl: Duration,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

#[derive(Serialize)]
struct MintedClaims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    ordo: &'a Permissions,
}

/// A signed token for `spec`, valid from now for `spec.ttl`.
pub fn mint(key: &SigningKey, spec: &TokenSpec) -> Result<String, String> {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = MintedClaims {
        sub: &spec.subject,
        iat: now,
        exp: now.saturating_add(spec.ttl.as_secs().max(1)),
        iss: spec.issuer.as_deref(),
        aud: spec.audience.as_deref(),
        ordo: &spec.permissions,
    };
    let (header, key) = match key {
        SigningKey::Hs256(secret) => {
            (Header::new(Algorithm::HS256), EncodingKey::from_secret(secret).map_err(|e| e.to_string())?)
        }
        SigningKey::Rs256 { pem, kid } => {
            let key = EncodingKey::from_rsa_pem(pem).map_err(|e| format!("not an RSA private key in PEM: {e}"))?;
            let mut header = Header::new(Algorithm::RS256);
            header.kid = kid.clone();
            (header, key)
        }
    };
    jsonwebtoken::encode(&header, &claims, &key).map_err(|e| format!("cannot sign the token: {e}"))
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what}: cannot read {}: {e}", path.display()))
}

/// A secret file's bytes without trailing whitespace (editors and `echo`
/// add a newline that is not part of the secret).
fn read_secret(path: &Path) -> Result<Vec<u8>, String> {
    let mut secret = read_file(path, "the HS256 secret")?;
    while secret.last().is_some_and(u8::is_ascii_whitespace) {
        secret.pop();
    }
    if secret.is_empty() {
        return Err(format!("the HS256 secret file {} is empty", path.display()));
    }
    if secret.len() < 32 {
        tracing::warn!(path = %path.display(), bytes = secret.len(), "the HS256 secret is shorter than 32 bytes");
    }
    Ok(secret)
}

/// The RS256 keys of a JWKS file (other keys — EC, encryption keys — are
/// skipped; a file with no usable key is an error).
fn load_jwks(path: &Path) -> Result<Vec<(Option<String>, DecodingKey)>, String> {
    let text = read_file(path, "--auth-jwks-file")?;
    let set: JwkSet = serde_json::from_slice(&text)
        .map_err(|e| format!("--auth-jwks-file {}: not a JWKS ({{\"keys\":[…]}}): {e}", path.display()))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let rsa = matches!(jwk.algorithm, AlgorithmParameters::RSA(_));
        let alg_ok = matches!(jwk.common.key_algorithm, None | Some(KeyAlgorithm::RS256));
        let use_ok = !matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption));
        if !(rsa && alg_ok && use_ok) {
            continue;
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| {
            format!("--auth-jwks-file {}: key {:?}: {e}", path.display(), jwk.common.key_id.as_deref().unwrap_or(""))
        })?;
        keys.push((jwk.common.key_id.clone(), key));
    }
    if keys.is_empty() {
        return Err(format!("--auth-jwks-file {}: no RS256 signing key in it", path.display()));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests;
