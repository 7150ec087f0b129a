//! `ordo token`: mints a bearer JWT for local use (HS256 with the services'
//! secret file, or RS256 with a PEM private key) and prints it on stdout;
//! and [`TokenFlag`], the `--token`/`ORDO_TOKEN` the client subcommands send
//! as `authorization: Bearer …`. The claim shape is `ordo_runtime::auth`'s.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use ordo_runtime::auth::{self, Permissions, SigningKey, TokenSpec};

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("key").required(true).args(["hs256_secret_file", "rs256_private_key_file"])))]
pub struct Args {
    /// Sign with HS256 and the secret in this file (the same file as the
    /// services' --auth-hs256-secret-file).
    #[arg(long, env = "ORDO_AUTH_HS256_SECRET_FILE", value_name = "FILE")]
    hs256_secret_file: Option<PathBuf>,
    /// Sign with RS256 and this PEM RSA private key (PKCS#1 or PKCS#8).
    #[arg(long, env = "ORDO_AUTH_RS256_PRIVATE_KEY_FILE", value_name = "FILE")]
    rs256_private_key_file: Option<PathBuf>,
    /// The `kid` header: which key of the services' JWKS file verifies it.
    #[arg(long, requires = "rs256_private_key_file")]
    kid: Option<String>,
    /// Who the token is for (the `sub` claim; shown in refusals and logs).
    #[arg(long)]
    sub: String,
    /// A stream-id glob the token may send events to (`*` matches any run of
    /// characters: `orders-*` is a prefix); repeatable.
    #[arg(long = "write", value_name = "GLOB")]
    write: Vec<String>,
    /// A stream-id glob whose released results the token may read; repeatable.
    #[arg(long = "read", value_name = "GLOB")]
    read: Vec<String>,
    /// How long the token is valid (e.g. 90s, 15m, 1h, 7d... as every duration flag).
    #[arg(long, default_value = "1h", value_parser = ordo_core::duration::parse)]
    ttl: Duration,
    /// The `iss` claim (what the services' --auth-issuer requires).
    #[arg(long, env = "ORDO_AUTH_ISSUER")]
    issuer: Option<String>,
    /// The `aud` claim (what the services' --auth-audience requires).
    #[arg(long, env = "ORDO_AUTH_AUDIENCE")]
    audience: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.write.is_empty() && args.read.is_empty() {
        anyhow::bail!("give at least one --write or --read glob: a token without either may do nothing");
    }
    if let Some(glob) = args.write.iter().chain(&args.read).find(|glob| glob.trim().is_empty()) {
        anyhow::bail!("empty glob {glob:?}: use `*` for every stream");
    }
    if args.ttl.as_secs() == 0 {
        anyhow::bail!("--ttl must be at least 1s");
    }
    let key = match (&args.hs256_secret_file, &args.rs256_private_key_file) {
        (Some(path), _) => SigningKey::hs256_file(path),
        (None, Some(path)) => SigningKey::rs256_file(path, args.kid.clone()),
        (None, None) => Err("--hs256-secret-file or --rs256-private-key-file is required".to_owned()),
    }
    .map_err(anyhow::Error::msg)?;
    let spec = TokenSpec {
        subject: args.sub,
        permissions: Permissions { write: args.write, read: args.read },
        ttl: args.ttl,
        issuer: args.issuer,
        audience: args.audience,
    };
    let token = auth::mint(&key, &spec).map_err(anyhow::Error::msg)?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

/// `--token`: the bearer token a client subcommand sends.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenFlag {
    /// Bearer token sent as `authorization: Bearer …` to services with
    /// authorization on (mint one with `ordo token`).
    #[arg(long, env = "ORDO_TOKEN", value_name = "JWT", hide_env_values = true)]
    token: Option<String>,
}

impl TokenFlag {
    /// `message` as a request carrying the token, if one was given.
    pub fn request<T>(&self, message: T) -> anyhow::Result<tonic::Request<T>> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = self.token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
            let value = format!("Bearer {token}")
                .parse()
                .context("--token holds characters a header cannot carry (a JWT is ASCII)")?;
            request.metadata_mut().insert(auth::AUTHORIZATION, value);
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_goes_in_the_authorization_metadata() {
        let flag = TokenFlag { token: Some(" abc.def.ghi\n".into()) };
        let request = flag.request(()).expect("ascii token");
        assert_eq!(request.metadata().get("authorization").and_then(|v| v.to_str().ok()), Some("Bearer abc.def.ghi"));
        let none = TokenFlag { token: None }.request(()).expect("no token");
        assert!(none.metadata().get("authorization").is_none());
        assert!(TokenFlag { token: Some("bad\u{7f}token".into()) }.request(()).is_err());
    }
}
