//! What a JetStream message says, decided without I/O: its key (from a
//! header or a subject token), the operation and the attributes of the event
//! it becomes, or why it cannot become one (then it is dead-lettered).

use std::collections::HashMap;

use ordo_core::limits::MAX_STREAM_ID_BYTES;

use crate::config::KeyFrom;

/// Header overriding `--operation` for one message.
pub const OPERATION_HEADER: &str = "Ordo-Operation";
/// Prefix of headers that set one attribute each (`Ordo-Attr-latency: fixed:5ms`).
pub const ATTRIBUTE_HEADER_PREFIX: &str = "Ordo-Attr-";

/// What an event needs from a message, apart from its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub key: String,
    pub operation: String,
    pub attributes: HashMap<String, String>,
}

/// How messages become events.
#[derive(Debug, Clone)]
pub struct Decoder {
    key: KeyFrom,
    operation: String,
    attributes: HashMap<String, String>,
    /// Room left for the key in a stream id (`<name>:<key>`).
    max_key_bytes: usize,
}

impl Decoder {
    pub fn new(key: KeyFrom, operation: String, attributes: HashMap<String, String>, source: &str) -> Self {
        Self { key, operation, attributes, max_key_bytes: MAX_STREAM_ID_BYTES.saturating_sub(source.len() + 1) }
    }

    /// `headers` are (name, value) pairs as the message carries them.
    pub fn decode<'a>(
        &self,
        subject: &str,
        headers: impl IntoIterator<Item = (&'a str, &'a str)> + Clone,
    ) -> Result<Incoming, String> {
        let key =
            match &self.key {
                KeyFrom::Header(name) => headers
                    .clone()
                    .into_iter()
                    .find(|(header, _)| header.eq_ignore_ascii_case(name))
                    .map(|(_, value)| value.to_owned())
                    .ok_or_else(|| format!("no {name} header: the key of each message comes from it"))?,
                KeyFrom::Subject(index) => subject.split('.').nth(*index).map(str::to_owned).ok_or_else(|| {
                    format!("subject {subject:?} has no token {index} (0-based) to take the key from")
                })?,
            };
        check_key(&key, self.max_key_bytes)?;
        let mut operation = self.operation.clone();
        let mut attributes = self.attributes.clone();
        for (name, value) in headers {
            if name.eq_ignore_ascii_case(OPERATION_HEADER) {
                operation = value.to_owned();
            } else if let Some(attribute) = strip_prefix_ignore_case(name, ATTRIBUTE_HEADER_PREFIX)
                && !attribute.is_empty()
            {
                attributes.insert(attribute.to_owned(), value.to_owned());
            }
        }
        Ok(Incoming { key, operation, attributes })
    }
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

/// A key names an Ordo stream and a sink subject (`<prefix>.<key>`): not
/// empty, within the stream id limit, and a valid run of subject tokens.
fn check_key(key: &str, max_bytes: usize) -> Result<(), String> {
    if key.is_empty() {
        return Err("empty key".into());
    }
    if key.len() > max_bytes {
        return Err(format!("key of {} bytes is longer than the limit of {max_bytes} bytes", key.len()));
    }
    if key.chars().any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>') {
        return Err(format!("key {key:?} has whitespace or a wildcard (it becomes a subject)"));
    }
    if key.split('.').any(str::is_empty) {
        return Err(format!("key {key:?} has an empty subject token (a leading, trailing or double dot)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder(key: KeyFrom) -> Decoder {
        Decoder::new(key, "async-echo".into(), HashMap::from([("latency".into(), "fixed:1ms".into())]), "src")
    }

    #[test]
    fn key_from_a_header_and_overrides_from_headers() {
        let incoming = decoder(KeyFrom::Header("Ordo-Key".into()))
            .decode(
                "orders.new",
                [("ordo-key", "acct-7"), ("Ordo-Operation", "async-upper"), ("Ordo-Attr-latency", "fixed:9ms")],
            )
            .expect("decodes");
        assert_eq!(incoming.key, "acct-7");
        assert_eq!(incoming.operation, "async-upper");
        assert_eq!(incoming.attributes.get("latency").map(String::as_str), Some("fixed:9ms"));
    }

    #[test]
    fn key_from_a_subject_token_and_defaults() {
        let incoming = decoder(KeyFrom::Subject(1)).decode("orders.acct-7.created", []).expect("decodes");
        assert_eq!(incoming.key, "acct-7");
        assert_eq!(incoming.operation, "async-echo");
        assert_eq!(incoming.attributes.get("latency").map(String::as_str), Some("fixed:1ms"));
    }

    #[test]
    fn a_missing_or_bad_key_says_why() {
        let by_header = decoder(KeyFrom::Header("Ordo-Key".into()));
        assert!(by_header.decode("orders", []).expect_err("refused").contains("no Ordo-Key header"));
        assert!(by_header.decode("orders", [("Ordo-Key", "")]).expect_err("refused").contains("empty"));
        assert!(by_header.decode("orders", [("Ordo-Key", "a b")]).expect_err("refused").contains("whitespace"));
        assert!(by_header.decode("orders", [("Ordo-Key", "a.*")]).expect_err("refused").contains("wildcard"));
        assert!(
            by_header.decode("orders", [("Ordo-Key", "a..b")]).expect_err("refused").contains("empty subject token")
        );
        let long = "k".repeat(MAX_STREAM_ID_BYTES);
        assert!(by_header.decode("orders", [("Ordo-Key", long.as_str())]).expect_err("refused").contains("limit"));
        assert!(decoder(KeyFrom::Subject(3)).decode("orders.a", []).expect_err("refused").contains("no token 3"));
        assert_eq!(by_header.decode("orders", [("Ordo-Key", "a.b")]).map(|i| i.key), Ok("a.b".to_owned()));
    }
}
