//! The operation registry and event validation: everything an event must
//! pass before anything is dispatched.

use std::collections::BTreeMap;

use std::time::Duration;

use ordo_core::{
    latency::Latency,
    limits::{
        self, CALL_ATTRIBUTE, GAP_TIMEOUT_ATTRIBUTE, LATENCY_ATTRIBUTE, MAX_ATTRIBUTE_BYTES, MAX_ATTRIBUTES,
        MAX_STREAM_ID_BYTES, echo,
    },
};
use ordo_proto::v1::{Event, OperationInfo, OperationKind};

use crate::{config::parse_gap_timeout, error::Error};

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
                ..Default::default()
            })
            .collect()
    }

    /// Checks everything that can be checked without state; returns the route.
    pub fn validate(&self, event: &Event) -> Result<Route, Error> {
        self.check(event).map(|checked| checked.route)
    }

    /// [`Registry::validate`], also returning the gap timeout the event asks
    /// for, parsed once.
    pub fn check(&self, event: &Event) -> Result<Checked, Error> {
        if event.stream_id.is_empty() {
            return Err(Error::MissingStreamId);
        }
        if event.stream_id.len() > MAX_STREAM_ID_BYTES {
            return Err(Error::StreamIdTooLong { len: event.stream_id.len(), limit: MAX_STREAM_ID_BYTES });
        }
        let route = *self.ops.get(&event.operation).ok_or_else(|| Error::UnknownOperation {
            name: echo(&event.operation),
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
                    "attribute {:?} is longer than {MAX_ATTRIBUTE_BYTES} bytes",
                    echo(key)
                )));
            }
        }
        if let Some(text) = event.attributes.get(LATENCY_ATTRIBUTE) {
            Latency::parse(text).map_err(|e| Error::MalformedAttributes(echo(&e.to_string())))?;
        }
        if let Some(call) = event.attributes.get(CALL_ATTRIBUTE)
            && self.ops.get(call) != Some(&Route::Stateless)
        {
            return Err(Error::MalformedAttributes(format!(
                "attribute call={:?} does not name a stateless operation",
                echo(call)
            )));
        }
        let gap_timeout = match event.attributes.get(GAP_TIMEOUT_ATTRIBUTE) {
            None => None,
            Some(text) => Some(parse_gap_timeout(text).map_err(|e| {
                Error::MalformedAttributes(format!("attribute {GAP_TIMEOUT_ATTRIBUTE}: {}", limits::echo(&e)))
            })?),
        };
        Ok(Checked { route, gap_timeout })
    }
}

/// What [`Registry::check`] learned of a valid event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    pub route: Route,
    /// The gap timeout its attribute `gap-timeout` asks for (`Some(None)`:
    /// `off`), or `None` when it has no such attribute.
    pub gap_timeout: Option<Option<Duration>>,
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
    fn messages_never_echo_more_than_the_limits() {
        let r = registry();
        let error = r.validate(&event("s", &"x".repeat(1 << 20))).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.len() < 500, "unknown operation message is {} bytes", error.len());
        let mut long_key = event("s", "echo");
        long_key.attributes.insert("k".repeat(1 << 20), String::new());
        let error = r.validate(&long_key).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.len() < 500, "attribute message is {} bytes", error.len());
    }

    #[test]
    fn gap_timeout_from_attribute_or_default() {
        let r = registry();
        let gap = |e: &Event| r.check(e).ok().map(|c| c.gap_timeout);
        assert_eq!(gap(&event("s", "echo")), Some(None), "no attribute: the service default applies");
        let mut off = event("s", "echo");
        off.attributes.insert("gap-timeout".into(), "off".into());
        assert_eq!(gap(&off), Some(Some(None)));
        let mut short = event("s", "echo");
        short.attributes.insert("gap-timeout".into(), "250ms".into());
        assert_eq!(gap(&short), Some(Some(Some(Duration::from_millis(250)))));
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
        let mut bad_gap = event("s", "echo");
        bad_gap.attributes.insert("gap-timeout".into(), "soon".into());
        assert!(matches!(r.validate(&bad_gap), Err(Error::MalformedAttributes(_))));
        let long = event(&"s".repeat(10_000), "echo");
        assert!(matches!(r.validate(&long), Err(Error::StreamIdTooLong { len: 10_000, .. })));
        let mut empty_key = event("s", "echo");
        empty_key.attributes.insert(String::new(), "x".into());
        assert!(matches!(r.validate(&empty_key), Err(Error::MalformedAttributes(_))));
    }
}
