//! The operation registry and event validation: everything an event must
//! pass before anything is dispatched.

use std::collections::BTreeMap;

use ordo_core::latency::{self, Latency};
use ordo_proto::v1::{Event, OperationInfo, OperationKind};

use crate::error::Error;

/// The attribute naming the stateless operation `callback` calls.
const CALL_ATTRIBUTE: &str = "call";
const MAX_ATTRIBUTES: usize = 64;
const MAX_ATTRIBUTE_BYTES: usize = 4096;
const MAX_STREAM_ID_BYTES: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Stateless,
    Stateful,
}

#[derive(Debug, Clone)]
pub struct Registry {
    ops: BTreeMap<String, Route>,
    max_payload: usize,
}

impl Registry {
    pub fn new(stateless: &[String], stateful: &[String], max_payload: usize) -> Self {
        let ops = stateless
            .iter()
            .map(|op| (op.clone(), Route::Stateless))
            .chain(stateful.iter().map(|op| (op.clone(), Route::Stateful)))
            .collect();
        Self { ops, max_payload }
    }

    pub fn list(&self) -> Vec<OperationInfo> {
        self.ops
            .iter()
            .map(|(name, route)| OperationInfo {
                name: name.clone(),
                kind: match route {
                    Route::Stateless => OperationKind::Stateless,
                    Route::Stateful => OperationKind::Stateful,
                } as i32,
                description: match route {
                    Route::Stateless => "answered inline by the stateless service",
                    Route::Stateful => "run concurrently by stateful workers, released in order",
                }
                .into(),
            })
            .collect()
    }

    /// Checks everything that can be checked without state; returns the route.
    pub fn validate(&self, event: &Event) -> Result<Route, Error> {
        if event.stream_id.is_empty() {
            return Err(Error::MissingStreamId);
        }
        if event.stream_id.len() > MAX_STREAM_ID_BYTES {
            return Err(Error::MalformedAttributes(format!("stream_id is longer than {MAX_STREAM_ID_BYTES} bytes")));
        }
        let route = *self.ops.get(&event.operation).ok_or_else(|| Error::UnknownOperation {
            name: event.operation.clone(),
            known: self.ops.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
        if event.payload.len() > self.max_payload {
            return Err(Error::PayloadTooLarge { size: event.payload.len(), limit: self.max_payload });
        }
        if event.attributes.len() > MAX_ATTRIBUTES {
            return Err(Error::MalformedAttributes(format!("more than {MAX_ATTRIBUTES} attributes")));
        }
        for (key, value) in &event.attributes {
            if key.is_empty() {
                return Err(Error::MalformedAttributes("an attribute has an empty name".into()));
            }
            if key.len() + value.len() > MAX_ATTRIBUTE_BYTES {
                return Err(Error::MalformedAttributes(format!(
                    "attribute {key:?} is longer than {MAX_ATTRIBUTE_BYTES} bytes"
                )));
            }
        }
        if let Some(text) = event.attributes.get(latency::ATTRIBUTE) {
            Latency::parse(text).map_err(|e| Error::MalformedAttributes(e.to_string()))?;
        }
        if let Some(call) = event.attributes.get(CALL_ATTRIBUTE)
            && self.ops.get(call) != Some(&Route::Stateless)
        {
            return Err(Error::MalformedAttributes(format!(
                "attribute call={call:?} does not name a stateless operation"
            )));
        }
        Ok(route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        Registry::new(&["echo".into()], &["async-echo".into()], 8)
    }

    fn event(stream: &str, op: &str) -> Event {
        Event { stream_id: stream.into(), operation: op.into(), ..Default::default() }
    }

    #[test]
    fn routes_known_operations() {
        assert_eq!(registry().validate(&event("s", "echo")).ok(), Some(Route::Stateless));
        assert_eq!(registry().validate(&event("s", "async-echo")).ok(), Some(Route::Stateful));
    }

    #[test]
    fn rejects_each_bad_input_with_its_error() {
        let r = registry();
        assert!(matches!(r.validate(&event("", "echo")), Err(Error::MissingStreamId)));
        assert!(matches!(r.validate(&event("s", "nope")), Err(Error::UnknownOperation { .. })));
        let mut big = event("s", "echo");
        big.payload = vec![0; 9].into();
        assert!(matches!(r.validate(&big), Err(Error::PayloadTooLarge { size: 9, limit: 8 })));
        let mut bad_latency = event("s", "async-echo");
        bad_latency.attributes.insert("latency".into(), "exp:banana".into());
        assert!(matches!(r.validate(&bad_latency), Err(Error::MalformedAttributes(_))));
        let mut bad_call = event("s", "async-echo");
        bad_call.attributes.insert("call".into(), "async-echo".into());
        assert!(matches!(r.validate(&bad_call), Err(Error::MalformedAttributes(_))));
        let mut empty_key = event("s", "echo");
        empty_key.attributes.insert(String::new(), "x".into());
        assert!(matches!(r.validate(&empty_key), Err(Error::MalformedAttributes(_))));
    }
}
