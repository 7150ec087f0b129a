//! The stateless operations. Each is a pure function of the payload.

use bytes::Bytes;
use sha2::{Digest, Sha256};

pub struct Op {
    pub name: &'static str,
    pub description: &'static str,
    /// Output, or why the payload is not acceptable (a FAILED result).
    pub run: fn(&[u8]) -> Result<Bytes, String>,
}

pub const CATALOG: &[Op] = &[
    Op { name: "echo", description: "returns the payload unchanged", run: |p| Ok(Bytes::copy_from_slice(p)) },
    Op { name: "upper", description: "ASCII upper case of the payload", run: |p| Ok(p.to_ascii_uppercase().into()) },
    Op { name: "lower", description: "ASCII lower case of the payload", run: |p| Ok(p.to_ascii_lowercase().into()) },
    Op {
        name: "sha256",
        description: "hex SHA-256 digest of the payload",
        run: |p| Ok(hex::encode(Sha256::digest(p)).into()),
    },
    Op {
        name: "json-validate",
        description: "the payload if it is valid JSON; FAILED with the parse error otherwise",
        run: |p| match serde_json::from_slice::<serde_json::Value>(p) {
            Ok(_) => Ok(Bytes::copy_from_slice(p)),
            Err(error) => Err(format!("invalid JSON: {error}")),
        },
    },
];

pub fn find(name: &str) -> Option<&'static Op> {
    CATALOG.iter().find(|op| op.name == name)
}

pub fn names() -> Vec<&'static str> {
    CATALOG.iter().map(|op| op.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, payload: &[u8]) -> Result<Bytes, String> {
        (find(name).expect("known op").run)(payload)
    }

    #[test]
    fn each_operation_does_what_it_says() {
        assert_eq!(run("echo", b"aB"), Ok(Bytes::from_static(b"aB")));
        assert_eq!(run("upper", b"aB1"), Ok(Bytes::from_static(b"AB1")));
        assert_eq!(run("lower", b"aB1"), Ok(Bytes::from_static(b"ab1")));
        assert_eq!(
            run("sha256", b"abc"),
            Ok(Bytes::from_static(b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"))
        );
        assert_eq!(run("json-validate", br#"{"a":[1,2]}"#), Ok(Bytes::from_static(br#"{"a":[1,2]}"#)));
        assert!(run("json-validate", b"{nope").is_err_and(|e| e.contains("invalid JSON")));
        assert!(find("nope").is_none());
    }
}
