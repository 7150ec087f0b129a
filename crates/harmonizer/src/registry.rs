//! The operation registry and event validation: everything an event must
//! pass before anything is dispatched.
//!
//! The operations come from the registry version in use
//! ([`ordo_registry::Follower`]: `--registry-pin`, else the registry's pin,
//! else its active version, else the built-in catalog of `--stateless-ops`
//! and `--stateful-ops`, version 0). An event is checked against the
//! version current when it arrives and keeps that version's definition of
//! its operation ([`Checked::spec`], [`Checked::version`]) until it is
//! settled, whatever is published meanwhile.

use std::{sync::Arc, time::Duration};

use ordo_core::{
    latency::Latency,
    limits::{
        self, CALL_ATTRIBUTE, GAP_TIMEOUT_ATTRIBUTE, LATENCY_ATTRIBUTE, MAX_ATTRIBUTE_BYTES, MAX_ATTRIBUTES,
        MAX_SEQUENCE, MAX_STREAM_ID_BYTES, echo,
    },
};
use ordo_proto::v1::{Event, OperationInfo};
use ordo_registry::{Catalog, Follower, Kind, OperationSpec};

use crate::{config::parse_gap_timeout, error::Error};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Stateless,
    Stateful,
}

impl From<Kind> for Route {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::Stateless => Route::Stateless,
            Kind::Stateful => Route::Stateful,
        }
    }
}

/// The harmonizer's built-in catalog (version 0): its `--stateless-ops`
/// and `--stateful-ops`.
pub fn builtin(stateless: &[String], stateful: &[String]) -> Catalog {
    Catalog::builtin(
        stateless
            .iter()
            .map(|op| OperationSpec::new(op.clone(), Kind::Stateless))
            .chain(stateful.iter().map(|op| OperationSpec::new(op.clone(), Kind::Stateful))),
    )
}

#[derive(Clone)]
pub struct Registry {
    follower: Follower,
    max_payload: usize,
    /// `--gap-timeout`: streams whose event and operation say nothing.
    gap_timeout: Option<Duration>,
}

impl Registry {
    pub fn new(follower: Follower, max_payload: usize, gap_timeout: Option<Duration>) -> Self {
        Self { follower, max_payload, gap_timeout }
    }

    /// The registry version in use now.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.follower.current()
    }

    /// True when the version in use is pinned.
    pub fn pinned(&self) -> bool {
        self.follower.pinned()
    }

    /// The operations of the version in use (without their workers).
    pub fn list(&self) -> Vec<OperationInfo> {
        self.catalog().operations.values().map(|spec| spec.info()).collect()
    }

    /// Checks everything that can be checked without state; returns the route.
    pub fn validate(&self, event: &Event) -> Result<Route, Error> {
        self.check(event).map(|checked| checked.route)
    }

    /// [`Registry::validate`] against the version in use, also returning the
    /// operation's definition and version (kept with the event until it is
    /// settled) and the gap timeout it asks for, parsed once.
    pub fn check(&self, event: &Event) -> Result<Checked, Error> {
        check(&self.catalog(), event, self.max_payload, self.gap_timeout)
    }
}

/// [`Registry::check`] against `catalog`.
fn check(
    catalog: &Catalog,
    event: &Event,
    max_payload: usize,
    default_gap: Option<Duration>,
) -> Result<Checked, Error> {
    if event.stream_id.is_empty() {
        return Err(Error::MissingStreamId);
    }
    if event.stream_id.len() > MAX_STREAM_ID_BYTES {
        return Err(Error::StreamIdTooLong { len: event.stream_id.len(), limit: MAX_STREAM_ID_BYTES });
    }
    if event.sequence > MAX_SEQUENCE {
        return Err(Error::SequenceTooLarge(event.sequence));
    }
    let spec = catalog
        .get(&event.operation)
        .ok_or_else(|| Error::UnknownOperation { name: echo(&event.operation), known: catalog.names() })?
        .clone();
    if event.payload.len() > max_payload {
        return Err(Error::PayloadTooLarge { size: event.payload.len(), limit: max_payload });
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
        && catalog.get(call).map(|op| op.kind) != Some(Kind::Stateless)
    {
        return Err(Error::MalformedAttributes(format!(
            "attribute call={:?} does not name a stateless operation",
            echo(call)
        )));
    }
    let attribute = match event.attributes.get(GAP_TIMEOUT_ATTRIBUTE) {
        None => None,
        Some(text) => Some(parse_gap_timeout(text).map_err(|e| {
            Error::MalformedAttributes(format!("attribute {GAP_TIMEOUT_ATTRIBUTE}: {}", limits::echo(&e)))
        })?),
    };
    Ok(Checked {
        route: spec.kind.into(),
        gap_timeout: attribute.or(spec.gap_timeout).unwrap_or(default_gap),
        gap_from_attribute: attribute.is_some(),
        version: catalog.version,
        spec,
    })
}

/// What [`Registry::check`] learned of a valid event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub route: Route,
    /// The gap timeout of the event's stream (`None`: off): its attribute
    /// `gap-timeout`, else its operation's `gap_timeout`, else `--gap-timeout`.
    pub gap_timeout: Option<Duration>,
    /// Whether the event set it with its `gap-timeout` attribute (which also
    /// changes the gap timeout of a stream already open).
    pub gap_from_attribute: bool,
    /// The operation as defined in the version the event was checked under.
    pub spec: Arc<OperationSpec>,
    /// That version (0: the built-in operations).
    pub version: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_GAP: Option<Duration> = Some(Duration::from_secs(10));

    /// The built-in catalog of `--stateless-ops echo --stateful-ops async-echo`,
    /// with payloads up to 8 bytes.
    struct Fixed(Catalog);

    impl Fixed {
        fn check(&self, event: &Event) -> Result<Checked, Error> {
            check(&self.0, event, 8, DEFAULT_GAP)
        }
        fn validate(&self, event: &Event) -> Result<Route, Error> {
            self.check(event).map(|c| c.route)
        }
    }

    fn registry() -> Fixed {
        Fixed(builtin(&["echo".into()], &["async-echo".into()]))
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
    fn sequences_above_2_pow_53_minus_1_are_invalid() {
        let at = |sequence: u64| Event { sequence, ..event("s", "echo") };
        assert_eq!(registry().validate(&at(MAX_SEQUENCE)).ok(), Some(Route::Stateless), "the largest one is valid");
        for sequence in [MAX_SEQUENCE + 1, u64::MAX] {
            match registry().validate(&at(sequence)) {
                Err(error @ Error::SequenceTooLarge(_)) => {
                    let status = tonic::Status::from(error);
                    assert_eq!(status.code(), tonic::Code::InvalidArgument);
                    assert!(status.message().contains("9007199254740991"), "{}", status.message());
                }
                other => panic!("sequence {sequence}: {other:?}"),
            }
        }
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
        let gap = |e: &Event| r.check(e).ok().map(|c| (c.gap_timeout, c.gap_from_attribute));
        assert_eq!(gap(&event("s", "echo")), Some((DEFAULT_GAP, false)), "no attribute: the service default applies");
        let mut off = event("s", "echo");
        off.attributes.insert("gap-timeout".into(), "off".into());
        assert_eq!(gap(&off), Some((None, true)));
        let mut short = event("s", "echo");
        short.attributes.insert("gap-timeout".into(), "250ms".into());
        assert_eq!(gap(&short), Some((Some(Duration::from_millis(250)), true)));
    }

    /// Published version 4: `slow` (stateful, remote, its own attempts,
    /// timeout and gap timeout), `quiet` (gaps off), `echo` (stateless).
    fn published() -> Catalog {
        Catalog::new(
            4,
            1_700_000_000_000,
            [
                OperationSpec {
                    endpoint: Some(ordo_registry::Endpoint::Grpc("http://127.0.0.1:50070".into())),
                    timeout: Some(Duration::from_secs(40)),
                    attempts: Some(5),
                    gap_timeout: Some(Some(Duration::from_secs(3))),
                    ..OperationSpec::new("slow", Kind::Stateful)
                },
                OperationSpec { gap_timeout: Some(None), ..OperationSpec::new("quiet", Kind::Stateful) },
                OperationSpec::new("echo", Kind::Stateless),
            ],
        )
    }

    #[test]
    fn gap_timeout_precedence_is_attribute_then_operation_then_flag() {
        let catalog = published();
        let gap = |e: &Event| check(&catalog, e, 8, DEFAULT_GAP).ok().map(|c| (c.gap_timeout, c.gap_from_attribute));
        assert_eq!(gap(&event("s", "slow")), Some((Some(Duration::from_secs(3)), false)), "the operation's default");
        assert_eq!(gap(&event("s", "quiet")), Some((None, false)), "the operation turns gaps off");
        assert_eq!(gap(&event("s", "echo")), Some((DEFAULT_GAP, false)), "the operation says nothing: the flag");
        let mut attributed = event("s", "slow");
        attributed.attributes.insert("gap-timeout".into(), "250ms".into());
        assert_eq!(gap(&attributed), Some((Some(Duration::from_millis(250)), true)), "the attribute wins");
        let mut off = event("s", "slow");
        off.attributes.insert("gap-timeout".into(), "off".into());
        assert_eq!(gap(&off), Some((None, true)));
    }

    #[test]
    fn an_event_is_checked_against_a_published_version_and_keeps_its_spec() {
        let catalog = published();
        let checked = check(&catalog, &event("s", "slow"), 8, DEFAULT_GAP).expect("slow is in version 4");
        assert_eq!((checked.route, checked.version), (Route::Stateful, 4));
        assert_eq!(checked.spec.attempts, Some(5));
        assert!(Arc::ptr_eq(&checked.spec, catalog.get("slow").expect("slow")), "the catalog's own definition");
        // Operations of the built-in catalog are not in version 4 (a version is the whole set).
        match check(&catalog, &event("s", "async-echo"), 8, DEFAULT_GAP) {
            Err(Error::UnknownOperation { known, .. }) => assert_eq!(known, "echo, quiet, slow"),
            other => panic!("expected NOT_FOUND, got {other:?}"),
        }
        // `call` must name a stateless operation of the same version.
        let mut call = event("s", "slow");
        call.attributes.insert("call".into(), "echo".into());
        assert!(check(&catalog, &call, 8, DEFAULT_GAP).is_ok());
        call.attributes.insert("call".into(), "quiet".into());
        assert!(matches!(check(&catalog, &call, 8, DEFAULT_GAP), Err(Error::MalformedAttributes(_))));
        call.attributes.insert("call".into(), "upper".into());
        assert!(matches!(check(&catalog, &call, 8, DEFAULT_GAP), Err(Error::MalformedAttributes(_))));
    }

    #[tokio::test]
    async fn the_registry_checks_and_lists_the_version_its_follower_holds() {
        let conn = ordo_runtime::redis_conn::lazy("redis://127.0.0.1:1").expect("a lazy connection");
        let registry = Registry::new(Follower::fixed(conn, published()), 8, DEFAULT_GAP);
        assert_eq!(registry.check(&event("s", "slow")).map(|c| c.version).ok(), Some(4));
        assert!(registry.pinned());
        let list = registry.list();
        let names: Vec<&str> = list.iter().map(|op| op.name.as_str()).collect();
        assert_eq!(names, ["echo", "quiet", "slow"]);
        let slow = &list[2];
        assert_eq!(
            (slow.endpoint.as_str(), slow.timeout_ms, slow.attempts, slow.gap_timeout.as_str()),
            ("grpc://127.0.0.1:50070", 40_000, 5, "3s")
        );
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
