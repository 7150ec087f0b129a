//! What a worker serves under a registry version (design: "what a worker
//! serves"), and how it runs an operation of a given version.

use std::sync::Arc;

use ordo_core::limits;
use ordo_proto::v1::Capabilities;
use ordo_registry::{Catalog, Endpoint, Kind, OperationSpec};

use crate::{
    args::OperationFilter,
    operation::{OpError, Operation, Operations},
};

/// How one operation of one registry version runs in this worker.
pub(crate) enum Target {
    /// Compiled into this worker.
    Native(Arc<dyn Operation>),
    /// Called over the network.
    Remote(Endpoint),
}

/// Whether this worker can run `spec` at all, ignoring the filter: a
/// stateful operation with an endpoint (any worker can call it) or one
/// compiled in.
fn target(spec: &OperationSpec, natives: &Operations) -> Option<Target> {
    if spec.kind != Kind::Stateful {
        return None;
    }
    match &spec.endpoint {
        Some(endpoint) => Some(Target::Remote(endpoint.clone())),
        None => natives.get(&spec.name).cloned().map(Target::Native),
    }
}

/// The operations of `catalog` this worker serves, by name.
pub(crate) fn served<'a>(
    catalog: &'a Catalog,
    natives: &Operations,
    filter: &OperationFilter,
) -> impl Iterator<Item = &'a Arc<OperationSpec>> {
    catalog.operations.values().filter(move |spec| filter.allows(&spec.name) && target(spec, natives).is_some())
}

/// The announcement of what this worker serves under `catalog`.
pub(crate) fn capabilities(
    catalog: &Catalog,
    natives: &Operations,
    filter: &OperationFilter,
    worker: &str,
    concurrency: usize,
) -> Capabilities {
    Capabilities {
        operations: served(catalog, natives, filter).map(|spec| spec.name.clone()).collect(),
        registry_version: catalog.version,
        concurrency: u32::try_from(concurrency).unwrap_or(u32::MAX),
        worker: worker.to_owned(),
    }
}

/// How to run `operation` as registry version `catalog` defines it. A
/// missing operation (or a stateless one) is a permanent error: the event
/// was accepted under a version that says so. One this worker does not
/// serve is transient: another worker of the pool may.
pub(crate) fn resolve(
    catalog: &Catalog,
    operation: &str,
    natives: &Operations,
    filter: &OperationFilter,
    worker: &str,
) -> Result<(Arc<OperationSpec>, Target), OpError> {
    // Only error paths quote the name: no allocation per event.
    let name = || limits::echo(operation);
    let version = catalog.version;
    let Some(spec) = catalog.get(operation) else {
        let name = name();
        return Err(OpError::permanent(format!("operation {name:?} is not in registry version {version}")));
    };
    if spec.kind != Kind::Stateful {
        let name = name();
        return Err(OpError::permanent(format!(
            "operation {name:?} is stateless in registry version {version}: the stateless service runs it, not a worker"
        )));
    }
    if !filter.allows(operation) {
        let name = name();
        return Err(OpError::transient(format!("worker {worker} does not serve operation {name:?} (--operations)")));
    }
    match target(spec, natives) {
        Some(target) => Ok((spec.clone(), target)),
        None => Err(OpError::transient(format!(
            "operation {:?} has no endpoint in registry version {version} and is not compiled into worker {worker}",
            name()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn natives() -> Operations {
        Operations::new().with_fn("native-a", "", |_, _| async { Ok(Bytes::new()) }).with_fn(
            "native-b",
            "",
            |_, _| async { Ok(Bytes::new()) },
        )
    }

    fn published() -> Catalog {
        let remote = |name: &str| OperationSpec {
            endpoint: Some(Endpoint::Grpc("http://127.0.0.1:1".into())),
            ..OperationSpec::new(name, Kind::Stateful)
        };
        Catalog::new(
            7,
            0,
            [
                OperationSpec::new("native-a", Kind::Stateful),
                // Compiled in, but this version does not list native-b.
                OperationSpec::new("elsewhere", Kind::Stateful),
                OperationSpec::new("echo", Kind::Stateless),
                remote("remote-x"),
                remote("remote-y"),
            ],
        )
    }

    fn names(catalog: &Catalog, filter: &OperationFilter) -> Vec<String> {
        capabilities(catalog, &natives(), filter, "w:1", 8).operations
    }

    #[test]
    fn a_worker_serves_its_native_and_every_remote_stateful_operation() {
        let caps = capabilities(&published(), &natives(), &OperationFilter::All, "w:1", 8);
        assert_eq!(caps.operations, ["native-a", "remote-x", "remote-y"]);
        assert_eq!((caps.registry_version, caps.concurrency, caps.worker.as_str()), (7, 8, "w:1"));
    }

    #[test]
    fn the_filter_narrows_what_is_served() {
        let filter = OperationFilter::parse("remote-y,native-a,native-b,echo,unknown");
        assert_eq!(names(&published(), &filter), ["native-a", "remote-y"]);
        assert_eq!(names(&published(), &OperationFilter::parse("nothing-here")), Vec::<String>::new());
    }

    #[test]
    fn the_built_in_catalog_is_the_native_operations_filtered() {
        let builtin = natives().catalog();
        assert_eq!(names(&builtin, &OperationFilter::All), ["native-a", "native-b"]);
        assert_eq!(names(&builtin, &OperationFilter::parse("native-b")), ["native-b"]);
        assert_eq!(capabilities(&builtin, &natives(), &OperationFilter::All, "w", 1).registry_version, 0);
    }

    #[test]
    fn resolving_tells_permanent_from_transient_misses() {
        let catalog = published();
        let all = OperationFilter::All;
        let resolve = |op: &str, filter: &OperationFilter| resolve(&catalog, op, &natives(), filter, "w:1");
        assert!(matches!(resolve("native-a", &all), Ok((_, Target::Native(_)))));
        assert!(matches!(resolve("remote-x", &all), Ok((_, Target::Remote(Endpoint::Grpc(_))))));
        let missing = resolve("native-b", &all).err().expect("not in version 7");
        assert!(!missing.transient && missing.message.contains("not in registry version 7"), "{missing}");
        let stateless = resolve("echo", &all).err().expect("stateless");
        assert!(!stateless.transient, "{stateless}");
        let elsewhere = resolve("elsewhere", &all).err().expect("not compiled in");
        assert!(elsewhere.transient && elsewhere.message.contains("not compiled into worker w:1"), "{elsewhere}");
        let filtered = resolve("remote-x", &OperationFilter::parse("remote-y")).err().expect("filtered out");
        assert!(filtered.transient && filtered.message.contains("--operations"), "{filtered}");
    }
}
