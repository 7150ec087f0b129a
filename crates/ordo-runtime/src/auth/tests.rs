//! Unit tests of token verification and minting. RSA key pairs are generated
//! here, once per test binary (generation is the slow part).

use std::{io::Write as _, path::PathBuf, sync::OnceLock};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::{
    pkcs8::{EncodePrivateKey as _, EncodePublicKey as _},
    traits::PublicKeyParts as _,
};
use serde_json::json;

use super::*;

/// One generated RSA key pair in the forms the flags take.
struct RsaKeys {
    private_pem: String,
    public_pem: String,
    /// The JWK of the public key (without `kid`).
    jwk: serde_json::Value,
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap_or_default()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

fn generate() -> RsaKeys {
    let key = rsa::PrivateKey::new(&mut getrandom::SysRng, 2048).expect("RSA key generation");
    let public = key.to_public_key();
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    RsaKeys {
        private_pem: pem("PRIVATE KEY", key.to_pkcs8_der().expect("PKCS#8").as_bytes()),
        public_pem: pem("PUBLIC KEY", public.to_public_key_der().expect("SPKI").as_bytes()),
        jwk: json!({"kty": "RSA", "use": "sig", "alg": "RS256", "n": b64(&public.n_bytes()), "e": b64(&public.e_bytes())}),
    }
}

fn rsa_a() -> &'static RsaKeys {
    static KEYS: OnceLock<RsaKeys> = OnceLock::new();
    KEYS.get_or_init(generate)
}

fn rsa_b() -> &'static RsaKeys {
    static KEYS: OnceLock<RsaKeys> = OnceLock::new();
    KEYS.get_or_init(generate)
}

/// A file with `content` that lives as long as the returned guard.
fn file(content: &str) -> (tempfile::NamedTempFile, PathBuf) {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(content.as_bytes()).expect("write");
    let path = file.path().to_path_buf();
    (file, path)
}

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

fn hs256_auth(args: AuthArgs) -> (tempfile::NamedTempFile, Auth) {
    let (guard, path) = file(&format!("{SECRET}\n"));
    let auth = Auth::from_args(&AuthArgs { hs256_secret_file: Some(path), ..args }).expect("auth loads");
    (guard, auth)
}

fn spec(write: &[&str], read: &[&str]) -> TokenSpec {
    TokenSpec {
        subject: "alice".into(),
        permissions: Permissions {
            write: write.iter().map(|s| (*s).to_owned()).collect(),
            read: read.iter().map(|s| (*s).to_owned()).collect(),
        },
        ttl: Duration::from_secs(3600),
        ..Default::default()
    }
}

/// Signs arbitrary claims (for tokens `mint` would never make).
fn sign(claims: &serde_json::Value, secret: &str) -> String {
    let key = EncodingKey::from_secret(secret.as_bytes()).expect("key");
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key).expect("encode")
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn unauthenticated_message(result: Result<Grant, Denied>) -> String {
    match result {
        Err(Denied::Unauthenticated(message)) => message,
        other => panic!("expected UNAUTHENTICATED, got {other:?}"),
    }
}

#[test]
fn globs_match_prefixes_exact_ids_and_inner_stars() {
    let cases = [
        ("orders-*", "orders-1", true),
        ("orders-*", "orders-", true),
        ("orders-*", "order-1", false),
        ("orders-*", "billing-1", false),
        ("*", "anything", true),
        ("*", "", true),
        ("audit", "audit", true),
        ("audit", "audit-2", false),
        ("audit", "audi", false),
        ("eu-*-orders", "eu-west-orders", true),
        ("eu-*-orders", "eu--orders", true),
        ("eu-*-orders", "eu-west-orders-x", false),
        ("*-orders", "a-orders-b-orders", true),
        ("a*b*c", "aXbYbZc", true),
        ("a*b*c", "aXbYbZ", false),
        ("**", "x", true),
        ("", "", true),
        ("", "x", false),
        ("ünï-*", "ünï-code", true),
    ];
    for (pattern, text, expected) in cases {
        assert_eq!(glob_match(pattern, text), expected, "{pattern:?} vs {text:?}");
    }
}

#[test]
fn hs256_token_from_mint_is_accepted_and_scoped() {
    let (guard, auth) = hs256_auth(AuthArgs::default());
    assert!(auth.is_on());
    let key = SigningKey::hs256_file(guard.path()).expect("secret reads");
    let token = mint(&key, &spec(&["orders-*"], &["orders-*", "audit"])).expect("mint");
    let grant = auth.verify(Some(&token)).expect("valid token");
    assert_eq!(grant.subject(), Some("alice"));
    assert!(grant.may_write("orders-1") && !grant.may_write("billing-1") && !grant.may_write("audit"));
    assert!(grant.may_read("audit") && grant.may_read("orders-9") && !grant.may_read("billing-1"));
    assert_eq!(grant.check_write("orders-1"), Ok(()));
    match grant.check_write("billing-1") {
        Err(Denied::PermissionDenied(message)) => {
            assert!(message.contains("\"billing-1\"") && message.contains("orders-*"), "{message}");
        }
        other => panic!("expected PERMISSION_DENIED, got {other:?}"),
    }
    assert!(matches!(grant.check_read("billing-1"), Err(Denied::PermissionDenied(_))));
}

#[test]
fn a_token_without_the_ordo_claim_may_do_nothing() {
    let (_guard, auth) = hs256_auth(AuthArgs::default());
    let token = sign(&json!({"sub": "bob", "exp": now() + 600}), SECRET);
    let grant = auth.verify(Some(&token)).expect("valid token");
    assert!(!grant.may_write("x") && !grant.may_read("x"));
    match grant.check_read("x") {
        Err(Denied::PermissionDenied(message)) => assert!(message.contains("read: none"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn wrong_secret_tampered_payload_and_garbage_are_unauthenticated() {
    let (_guard, auth) = hs256_auth(AuthArgs::default());
    let claims = json!({"sub": "alice", "exp": now() + 600, "ordo": {"write": ["*"]}});
    let forged = sign(&claims, "another-secret-another-secret-xx");
    assert!(unauthenticated_message(auth.verify(Some(&forged))).contains("signature"));

    // A valid token whose payload is swapped for one granting more.
    let genuine = sign(&json!({"sub": "alice", "exp": now() + 600, "ordo": {"write": ["orders-*"]}}), SECRET);
    let parts: Vec<&str> = genuine.split('.').collect();
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string());
    let tampered = format!("{}.{payload}.{}", parts[0], parts[2]);
    assert!(unauthenticated_message(auth.verify(Some(&tampered))).contains("signature"));

    assert!(unauthenticated_message(auth.verify(Some("not-a-jwt"))).contains("malformed"));
    assert!(unauthenticated_message(auth.verify(None)).contains("bearer token is required"));
    // `write` must be a list.
    let odd = sign(&json!({"exp": now() + 600, "ordo": {"write": "orders-*"}}), SECRET);
    assert!(unauthenticated_message(auth.verify(Some(&odd))).contains("malformed"));
}

#[test]
fn expired_and_not_yet_valid_tokens_are_unauthenticated_within_the_leeway() {
    let (_guard, auth) = hs256_auth(AuthArgs::default());
    let expired = sign(&json!({"exp": now() - LEEWAY_SECS - 60}), SECRET);
    assert!(unauthenticated_message(auth.verify(Some(&expired))).contains("expired"));
    // Clock skew within the leeway is tolerated.
    let skewed = sign(&json!({"exp": now() - 5}), SECRET);
    assert!(auth.verify(Some(&skewed)).is_ok());
    let early = sign(&json!({"exp": now() + 7200, "nbf": now() + 3600}), SECRET);
    assert!(unauthenticated_message(auth.verify(Some(&early))).contains("not valid yet"));
    let no_exp = sign(&json!({"sub": "alice"}), SECRET);
    assert!(unauthenticated_message(auth.verify(Some(&no_exp))).contains("no exp claim"));
}

#[test]
fn issuer_and_audience_are_required_when_configured() {
    let args = AuthArgs { issuer: Some("ordo-test".into()), audience: Some("ordo".into()), ..Default::default() };
    let (_guard, auth) = hs256_auth(args);
    let exp = now() + 600;
    let good = sign(&json!({"exp": exp, "iss": "ordo-test", "aud": ["other", "ordo"]}), SECRET);
    assert!(auth.verify(Some(&good)).is_ok());
    let wrong_iss = sign(&json!({"exp": exp, "iss": "evil", "aud": "ordo"}), SECRET);
    assert!(unauthenticated_message(auth.verify(Some(&wrong_iss))).contains("issuer"));
    let no_iss = sign(&json!({"exp": exp, "aud": "ordo"}), SECRET);
    assert!(unauthenticated_message(auth.verify(Some(&no_iss))).contains("no iss claim"));
    let wrong_aud = sign(&json!({"exp": exp, "iss": "ordo-test", "aud": "billing"}), SECRET);
    assert!(unauthenticated_message(auth.verify(Some(&wrong_aud))).contains("audience"));

    // `ordo token --issuer --audience` makes tokens these flags accept.
    let mut minted = spec(&["*"], &[]);
    (minted.issuer, minted.audience) = (Some("ordo-test".into()), Some("ordo".into()));
    let token = mint(&SigningKey::Hs256(SECRET.as_bytes().to_vec()), &minted).expect("mint");
    assert!(auth.verify(Some(&token)).is_ok());

    // Without --auth-audience, a token's aud is not checked.
    let (_guard, lenient) = hs256_auth(AuthArgs::default());
    assert!(lenient.verify(Some(&wrong_aud)).is_ok());
}

#[test]
fn rs256_tokens_verify_against_a_pem_public_key() {
    let keys = rsa_a();
    let (_public, public_path) = file(&keys.public_pem);
    let (_private, private_path) = file(&keys.private_pem);
    let auth = Auth::from_args(&AuthArgs { rs256_public_key_file: Some(public_path), ..Default::default() })
        .expect("auth loads");
    let key = SigningKey::rs256_file(&private_path, None).expect("private key reads");
    let token = mint(&key, &spec(&["orders-*"], &[])).expect("mint");
    assert!(auth.verify(Some(&token)).expect("valid").may_write("orders-7"));

    // Signed by another key pair: refused.
    let other = SigningKey::Rs256 { pem: rsa_b().private_pem.clone().into_bytes(), kid: None };
    let forged = mint(&other, &spec(&["*"], &[])).expect("mint");
    assert!(unauthenticated_message(auth.verify(Some(&forged))).contains("signature"));
    // An HS256 token is not accepted by an RS256-only service.
    let hs = sign(&json!({"exp": now() + 600}), SECRET);
    assert!(unauthenticated_message(auth.verify(Some(&hs))).contains("HS256 tokens are not accepted"));
}

#[test]
fn jwks_keys_are_chosen_by_kid() {
    let (a, b) = (rsa_a(), rsa_b());
    let mut jwk_a = a.jwk.clone();
    jwk_a["kid"] = json!("key-a");
    let mut jwk_b = b.jwk.clone();
    jwk_b["kid"] = json!("key-b");
    // An encryption key and an EC key are skipped, not errors.
    let mut enc = a.jwk.clone();
    enc["kid"] = json!("enc");
    enc["use"] = json!("enc");
    let jwks = json!({"keys": [jwk_a, jwk_b, enc]});
    let (_jwks, jwks_path) = file(&jwks.to_string());
    let auth = Auth::from_args(&AuthArgs { jwks_file: Some(jwks_path), ..Default::default() }).expect("JWKS loads");

    let signed_by_b = |kid: Option<&str>| {
        let key = SigningKey::Rs256 { pem: b.private_pem.clone().into_bytes(), kid: kid.map(str::to_owned) };
        mint(&key, &spec(&["b-*"], &[])).expect("mint")
    };
    assert!(auth.verify(Some(&signed_by_b(Some("key-b")))).expect("kid key-b verifies").may_write("b-1"));
    // The kid names key a, whose signature this is not.
    assert!(unauthenticated_message(auth.verify(Some(&signed_by_b(Some("key-a"))))).contains("signature"));
    assert!(unauthenticated_message(auth.verify(Some(&signed_by_b(Some("nope"))))).contains("no key with kid"));
    // Two signing keys: a token must say which.
    assert!(unauthenticated_message(auth.verify(Some(&signed_by_b(None)))).contains("without kid"));
    // The encryption key is not a verification key.
    assert!(unauthenticated_message(auth.verify(Some(&signed_by_b(Some("enc"))))).contains("no key with kid"));
}

#[test]
fn bearer_metadata_is_required_when_auth_is_on() {
    let (_guard, auth) = hs256_auth(AuthArgs::default());
    let token = mint(&SigningKey::Hs256(SECRET.as_bytes().to_vec()), &spec(&["*"], &[])).expect("mint");
    let mut metadata = MetadataMap::new();
    let status = Status::from(auth.authorize(&metadata).expect_err("no token"));
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    metadata.insert(AUTHORIZATION, format!("bearer {token}").parse().expect("ascii"));
    assert!(auth.authorize(&metadata).expect("lower-case scheme is fine").may_write("x"));
    metadata.insert(AUTHORIZATION, format!("Basic {token}").parse().expect("ascii"));
    assert!(matches!(auth.authorize(&metadata), Err(Denied::Unauthenticated(_))), "not bearer");
    metadata.insert(AUTHORIZATION, "Bearer".parse().expect("ascii"));
    assert!(matches!(auth.authorize(&metadata), Err(Denied::Unauthenticated(_))), "no token");

    // Auth off: no token needed, everything allowed.
    let grant = Auth::off().authorize(&MetadataMap::new()).expect("off");
    assert!(grant.may_write("anything") && grant.may_read("anything") && grant.subject().is_none());
    assert!(!Auth::from_args(&AuthArgs::default()).expect("off").is_on());
}

#[test]
fn bad_key_flags_are_configuration_errors() {
    let missing = AuthArgs { hs256_secret_file: Some("/nonexistent/secret".into()), ..Default::default() };
    assert!(Auth::from_args(&missing).expect_err("missing").contains("cannot read"));
    let (_empty, empty) = file("\n\n");
    let empty = AuthArgs { hs256_secret_file: Some(empty), ..Default::default() };
    assert!(Auth::from_args(&empty).expect_err("empty").contains("empty"));
    let (_bad, bad) = file("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n");
    let bad_pem = AuthArgs { rs256_public_key_file: Some(bad), ..Default::default() };
    assert!(Auth::from_args(&bad_pem).expect_err("bad PEM").contains("not an RSA public key"));
    let (_jwks, jwks) = file(r#"{"keys": []}"#);
    let empty_jwks = AuthArgs { jwks_file: Some(jwks), ..Default::default() };
    assert!(Auth::from_args(&empty_jwks).expect_err("no key").contains("no RS256 signing key"));
    let issuer_only = AuthArgs { issuer: Some("x".into()), ..Default::default() };
    assert!(Auth::from_args(&issuer_only).expect_err("no key").contains("need a key"));
}
