//! What the registry says about an operation, and one version of the whole
//! registry (a [`Catalog`]).

use std::{collections::BTreeMap, fmt, sync::Arc, time::Duration};

use ordo_core::duration;
use ordo_proto::v1::{OperationInfo, OperationKind};
use serde::{Deserialize, Serialize};

/// How the harmonizer routes an operation's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Quick pure work, answered inline by the stateless service.
    Stateless,
    /// Stream work run concurrently by stateful workers, released in order.
    Stateful,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Stateless => "stateless",
            Kind::Stateful => "stateful",
        }
    }

    pub fn wire(self) -> OperationKind {
        match self {
            Kind::Stateless => OperationKind::Stateless,
            Kind::Stateful => OperationKind::Stateful,
        }
    }
}

/// Where a remote operation runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A gRPC server of `ordo.v1.Operation/Invoke`; the `http://host:port`
    /// URI to connect to (written `grpc://host:port` in the registry).
    Grpc(String),
    /// An HTTP URL each event is POSTed to.
    Http(String),
}

impl Endpoint {
    /// Parses `grpc://host:port`, `http://…` or `https://…`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some(rest) = text.strip_prefix("grpc://") {
            let authority = rest.trim_end_matches('/');
            if authority.is_empty() || authority.contains('/') {
                return Err(format!("endpoint {text:?}: grpc:// takes host:port only"));
            }
            return Ok(Endpoint::Grpc(format!("http://{authority}")));
        }
        if let Some(rest) = text.strip_prefix("http://").or_else(|| text.strip_prefix("https://")) {
            if rest.is_empty() || rest.starts_with('/') {
                return Err(format!("endpoint {text:?} has no host"));
            }
            return Ok(Endpoint::Http(text.to_owned()));
        }
        Err(format!("endpoint {text:?} must start with grpc://, http:// or https://"))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Grpc(uri) => write!(f, "grpc://{}", uri.trim_start_matches("http://")),
            Endpoint::Http(url) => f.write_str(url),
        }
    }
}

/// The registry's definition of one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationSpec {
    pub name: String,
    pub kind: Kind,
    pub description: String,
    /// Where it runs; `None`: in-process (compiled into a worker, or the
    /// stateless service).
    pub endpoint: Option<Endpoint>,
    /// How long one call may take in the worker (a timeout is retried).
    pub timeout: Option<Duration>,
    /// Calls run at once per worker.
    pub concurrency: Option<u32>,
    /// Attempts before FAILED is released in the event's place (default:
    /// the harmonizer's --max-attempts).
    pub attempts: Option<u32>,
    /// Default gap timeout of streams using it: `Some(None)` is `off`;
    /// `None`: the harmonizer's --gap-timeout.
    pub gap_timeout: Option<Option<Duration>>,
}

impl OperationSpec {
    /// An operation with nothing but a name and a kind.
    pub fn new(name: impl Into<String>, kind: Kind) -> Self {
        Self {
            name: name.into(),
            kind,
            description: String::new(),
            endpoint: None,
            timeout: None,
            concurrency: None,
            attempts: None,
            gap_timeout: None,
        }
    }

    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// The wire description (without the workers serving it).
    pub fn info(&self) -> OperationInfo {
        let description = if !self.description.is_empty() {
            self.description.clone()
        } else {
            match (self.kind, &self.endpoint) {
                (Kind::Stateless, _) => "answered inline by the stateless service".into(),
                (Kind::Stateful, None) => "run concurrently by stateful workers, released in order".into(),
                (Kind::Stateful, Some(endpoint)) => format!("remote operation at {endpoint}, released in order"),
            }
        };
        OperationInfo {
            name: self.name.clone(),
            kind: self.kind.wire() as i32,
            description,
            endpoint: self.endpoint.as_ref().map(ToString::to_string).unwrap_or_default(),
            timeout_ms: self.timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0),
            attempts: self.attempts.unwrap_or(0),
            concurrency: self.concurrency.unwrap_or(0),
            gap_timeout: match self.gap_timeout {
                None => String::new(),
                Some(None) => "off".into(),
                Some(Some(d)) => duration::format(d),
            },
            workers: Vec::new(),
        }
    }

    /// The fields as `key = value` lines (for `show` and `diff`).
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![("kind", self.kind.as_str().to_owned())];
        if !self.description.is_empty() {
            out.push(("description", self.description.clone()));
        }
        if let Some(endpoint) = &self.endpoint {
            out.push(("endpoint", endpoint.to_string()));
        }
        if let Some(timeout) = self.timeout {
            out.push(("timeout", duration::format(timeout)));
        }
        if let Some(concurrency) = self.concurrency {
            out.push(("concurrency", concurrency.to_string()));
        }
        if let Some(attempts) = self.attempts {
            out.push(("attempts", attempts.to_string()));
        }
        if let Some(gap) = self.gap_timeout {
            out.push(("gap_timeout", gap.map(duration::format).unwrap_or_else(|| "off".into())));
        }
        out
    }
}

/// One version of the registry: every operation by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    /// 0 for the built-in catalog of a service that has no published
    /// version (or was told to ignore them); published versions count from 1.
    pub version: u64,
    /// When it was published (Unix ms; 0 for built-in).
    pub published_unix_ms: u64,
    pub operations: BTreeMap<String, Arc<OperationSpec>>,
}

impl Catalog {
    /// The built-in catalog (version 0).
    pub fn builtin(operations: impl IntoIterator<Item = OperationSpec>) -> Self {
        Self::new(0, 0, operations)
    }

    pub fn new(version: u64, published_unix_ms: u64, operations: impl IntoIterator<Item = OperationSpec>) -> Self {
        let operations = operations.into_iter().map(|op| (op.name.clone(), Arc::new(op))).collect();
        Self { version, published_unix_ms, operations }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<OperationSpec>> {
        self.operations.get(name)
    }

    /// Names, comma-separated (for "unknown operation" messages).
    pub fn names(&self) -> String {
        self.operations.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

/// The JSON shape of a version as stored in Redis. Durations are strings in
/// the registry file's syntax, so a stored version reads like its file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredVersion {
    pub published_unix_ms: u64,
    /// The file as published, for `ordo registry show`.
    #[serde(default)]
    pub source: String,
    pub operations: Vec<StoredOperation>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredOperation {
    pub name: String,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gap_timeout: Option<String>,
}

impl From<&OperationSpec> for StoredOperation {
    fn from(op: &OperationSpec) -> Self {
        Self {
            name: op.name.clone(),
            kind: op.kind,
            description: op.description.clone(),
            endpoint: op.endpoint.as_ref().map(ToString::to_string),
            timeout: op.timeout.map(duration::format),
            concurrency: op.concurrency,
            attempts: op.attempts,
            gap_timeout: op.gap_timeout.map(|g| g.map(duration::format).unwrap_or_else(|| "off".into())),
        }
    }
}

impl TryFrom<StoredOperation> for OperationSpec {
    type Error = String;

    fn try_from(op: StoredOperation) -> Result<Self, String> {
        Ok(Self {
            endpoint: op.endpoint.as_deref().map(Endpoint::parse).transpose()?,
            timeout: op.timeout.as_deref().map(duration::parse).transpose()?,
            gap_timeout: op.gap_timeout.as_deref().map(parse_gap_timeout).transpose()?,
            name: op.name,
            kind: op.kind,
            description: op.description,
            concurrency: op.concurrency,
            attempts: op.attempts,
        })
    }
}

/// `off` or `0` (never), else a duration.
pub fn parse_gap_timeout(text: &str) -> Result<Option<Duration>, String> {
    match text.trim() {
        "off" | "0" => Ok(None),
        other => duration::parse(other).map(|d| (!d.is_zero()).then_some(d)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print_back() {
        assert_eq!(Endpoint::parse("grpc://127.0.0.1:50070"), Ok(Endpoint::Grpc("http://127.0.0.1:50070".into())));
        assert_eq!(Endpoint::parse("grpc://h:1").map(|e| e.to_string()), Ok("grpc://h:1".into()));
        assert_eq!(Endpoint::parse("http://h:8080/op").map(|e| e.to_string()), Ok("http://h:8080/op".into()));
        assert!(Endpoint::parse("ftp://h").is_err());
        assert!(Endpoint::parse("grpc://").is_err());
        assert!(Endpoint::parse("grpc://h:1/path").is_err());
        assert!(Endpoint::parse("http:///x").is_err());
    }

    #[test]
    fn stored_operations_round_trip() {
        let op = OperationSpec {
            endpoint: Some(Endpoint::Http("http://h/x".into())),
            timeout: Some(Duration::from_millis(1500)),
            concurrency: Some(4),
            attempts: Some(2),
            gap_timeout: Some(None),
            ..OperationSpec::new("x", Kind::Stateful)
        };
        let back = OperationSpec::try_from(StoredOperation::from(&op));
        assert_eq!(back, Ok(op));
    }
}
