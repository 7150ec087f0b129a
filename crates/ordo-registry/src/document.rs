//! The registry file: TOML, one `[[operation]]` table per operation.
//!
//! ```toml
//! [[operation]]
//! name = "shout"                      # required: [A-Za-z0-9._-], at most 128 bytes
//! kind = "stateful"                   # required: stateful or stateless
//! description = "upper-cases text"    # optional
//! endpoint = "grpc://127.0.0.1:50070" # optional, stateful only: grpc://host:port or an http(s):// URL
//! timeout = "5s"                      # optional: one call, enforced by the worker
//! concurrency = 64                    # optional: calls at once per worker
//! attempts = 3                        # optional: default the harmonizer's --max-attempts
//! gap_timeout = "10s"                 # optional: default gap timeout of its streams, or "off"
//! ```
//!
//! Every error names the line and column it is about, and nothing is
//! published unless the whole file is valid.

use std::{collections::HashMap, fmt, ops::Range};

use ordo_core::duration;
use serde::Deserialize;
use toml::Spanned;

use crate::spec::{Endpoint, Kind, OperationSpec, parse_gap_timeout};

/// Longest operation name.
pub const MAX_NAME_BYTES: usize = 128;
/// Largest per-operation concurrency.
pub const MAX_CONCURRENCY: i64 = 65_536;
/// Most attempts an operation may ask for.
pub const MAX_ATTEMPTS: i64 = 100;

/// Why a registry file was refused, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct DocumentError {
    /// 1-based; 0 when the error has no position.
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for DocumentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.message)
        } else {
            write!(f, "line {}, column {}: {}", self.line, self.column, self.message)
        }
    }
}

/// Line and column (1-based) of byte `offset` in `text`.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn error_at(text: &str, span: Range<usize>, message: impl Into<String>) -> DocumentError {
    let (line, column) = position(text, span.start);
    DocumentError { line, column, message: message.into() }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    operation: Vec<Spanned<RawOperation>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOperation {
    name: Spanned<String>,
    kind: Spanned<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    endpoint: Option<Spanned<String>>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    concurrency: Option<Spanned<i64>>,
    #[serde(default)]
    attempts: Option<Spanned<i64>>,
    #[serde(default)]
    gap_timeout: Option<Spanned<String>>,
}

/// Parses and checks a registry file; the operations in file order.
pub fn parse(text: &str) -> Result<Vec<OperationSpec>, DocumentError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let message = e.message().trim().to_owned();
        match e.span() {
            Some(span) => error_at(text, span, message),
            None => DocumentError { line: 0, column: 0, message },
        }
    })?;
    if raw.operation.is_empty() {
        return Err(DocumentError {
            line: 0,
            column: 0,
            message: "the file defines no operation (add [[operation]] tables)".into(),
        });
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::with_capacity(raw.operation.len());
    for table in raw.operation {
        let op = table.into_inner();
        let name_span = op.name.span();
        let name = op.name.into_inner();
        check_name(&name).map_err(|m| error_at(text, name_span.clone(), m))?;
        let (line, _) = position(text, name_span.start);
        if let Some(first) = seen.insert(name.clone(), line) {
            return Err(error_at(
                text,
                name_span,
                format!("operation {name:?} is defined twice (first on line {first})"),
            ));
        }
        let kind = match op.kind.get_ref().as_str() {
            "stateful" => Kind::Stateful,
            "stateless" => Kind::Stateless,
            other => {
                return Err(error_at(
                    text,
                    op.kind.span(),
                    format!("kind {other:?} is not one of \"stateful\", \"stateless\""),
                ));
            }
        };
        let endpoint = match op.endpoint {
            None => None,
            Some(endpoint) if kind == Kind::Stateless => {
                return Err(error_at(
                    text,
                    endpoint.span(),
                    "a stateless operation has no endpoint: remote operations are kind \"stateful\" (run by workers)",
                ));
            }
            Some(endpoint) => {
                Some(Endpoint::parse(endpoint.get_ref()).map_err(|m| error_at(text, endpoint.span(), m))?)
            }
        };
        let timeout = match op.timeout {
            None => None,
            Some(t) => {
                let parsed = duration::parse(t.get_ref()).map_err(|m| error_at(text, t.span(), m))?;
                if parsed.is_zero() {
                    return Err(error_at(text, t.span(), "timeout must be positive"));
                }
                Some(parsed)
            }
        };
        let concurrency = bounded(text, op.concurrency, "concurrency", MAX_CONCURRENCY)?;
        let attempts = bounded(text, op.attempts, "attempts", MAX_ATTEMPTS)?;
        let gap_timeout = match op.gap_timeout {
            None => None,
            Some(g) => Some(parse_gap_timeout(g.get_ref()).map_err(|m| error_at(text, g.span(), m))?),
        };
        out.push(OperationSpec {
            name,
            kind,
            description: op.description.unwrap_or_default(),
            endpoint,
            timeout,
            concurrency,
            attempts,
            gap_timeout,
        });
    }
    Ok(out)
}

/// The rule for operation names: 1 to [`MAX_NAME_BYTES`] bytes of letters, digits, `.`, `_`, `-`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("name must not be empty".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!("name is {} bytes, longer than {MAX_NAME_BYTES}", name.len()));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("name {name:?} contains {bad:?}: use letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}

fn bounded(text: &str, value: Option<Spanned<i64>>, what: &str, max: i64) -> Result<Option<u32>, DocumentError> {
    let Some(value) = value else { return Ok(None) };
    let n = *value.get_ref();
    if !(1..=max).contains(&n) {
        return Err(error_at(text, value.span(), format!("{what} must be between 1 and {max}, not {n}")));
    }
    Ok(u32::try_from(n).ok())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const GOOD: &str = r#"
[[operation]]
name = "echo"
kind = "stateless"

[[operation]]
name = "shout"
kind = "stateful"
description = "upper-cases"
endpoint = "grpc://127.0.0.1:50070"
timeout = "2s"
concurrency = 8
attempts = 2
gap_timeout = "off"
"#;

    #[test]
    fn a_good_file_parses_in_order() {
        let ops = parse(GOOD).expect("valid");
        assert_eq!(ops.len(), 2);
        assert_eq!((ops[0].name.as_str(), ops[0].kind), ("echo", Kind::Stateless));
        let shout = &ops[1];
        assert_eq!(shout.endpoint, Some(Endpoint::Grpc("http://127.0.0.1:50070".into())));
        assert_eq!(shout.timeout, Some(Duration::from_secs(2)));
        assert_eq!((shout.concurrency, shout.attempts, shout.gap_timeout), (Some(8), Some(2), Some(None)));
    }

    fn line_of(text: &str) -> (usize, String) {
        let error = parse(text).expect_err("refused");
        (error.line, error.to_string())
    }

    #[test]
    fn every_error_points_at_its_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("[[operation]]\nname = \"a\"\nkind = \"stateful\"\ntimeout = \"fast\"\n", 4, "fast"),
            ("[[operation]]\nname = \"a\"\nkind = \"sideways\"\n", 3, "sideways"),
            (
                "[[operation]]\nname = \"a\"\nkind = \"stateful\"\n\n[[operation]]\nname = \"a\"\nkind = \"stateful\"\n",
                6,
                "twice",
            ),
            ("[[operation]]\nname = \"a b\"\nkind = \"stateful\"\n", 2, "contains"),
            ("[[operation]]\nname = \"a\"\nkind = \"stateful\"\nconcurrency = 0\n", 4, "concurrency"),
            ("[[operation]]\nname = \"a\"\nkind = \"stateful\"\nattempts = 1000\n", 4, "attempts"),
            ("[[operation]]\nname = \"a\"\nkind = \"stateless\"\nendpoint = \"grpc://h:1\"\n", 4, "stateless"),
            ("[[operation]]\nname = \"a\"\nkind = \"stateful\"\nendpoint = \"ftp://h\"\n", 4, "grpc://"),
            ("[[operation]]\nname = \"a\"\nkind = \"stateful\"\ncolour = \"red\"\n", 4, "colour"),
            ("[[operation]]\nname = \"a\"\nkind = \"stateful\"\ngap_timeout = \"soon\"\n", 4, "soon"),
            ("[[operation]]\nname = \"a\"\nkind = \"stateful\"\n\n[oops\n", 5, ""),
        ];
        for (text, line, mentions) in cases {
            let (at, message) = line_of(text);
            assert_eq!(at, *line, "{message}\nfor:\n{text}");
            assert!(message.contains(mentions), "{message:?} should mention {mentions:?}");
        }
    }

    #[test]
    fn missing_fields_and_empty_files_are_refused() {
        let (_, message) = line_of("[[operation]]\nname = \"a\"\n");
        assert!(message.contains("kind"), "{message}");
        let (_, message) = line_of("# nothing\n");
        assert!(message.contains("no operation"), "{message}");
    }

    #[test]
    fn positions_are_one_based() {
        assert_eq!(position("ab\ncd", 0), (1, 1));
        assert_eq!(position("ab\ncd", 4), (2, 2));
        assert_eq!(position("ab", 99), (1, 3));
    }
}
