//! Peer discovery for the address lists (`--workers`, `--reassemblers`):
//! which endpoints a list stands for now, as a [`Peers`] watch.
//!
//! An entry is either a plain `host:port` (today's meaning: one peer, its
//! name resolved by the connection itself) or `dns://<name>:<port>`: every
//! A and AAAA record of `name` is a peer on `port`, and the name is resolved
//! again every `--dns-refresh`, so peers come and go with the records (a
//! Kubernetes headless Service lists one record per ready pod). The users of
//! a watch (the harmonizer's worker pool, the result sink) add a link for
//! each new endpoint and retire the links whose endpoint disappeared.
//!
//! Resolution uses the system's resolver configuration (`/etc/resolv.conf`)
//! unless `--dns-server` names one nameserver (tests, or an operator pinning
//! the cluster DNS). A failed lookup (timeout, SERVFAIL) keeps the addresses
//! last seen: a DNS hiccup must not retire every peer. A name that has no
//! records (NXDOMAIN, or no A/AAAA) stands for no peer.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use hickory_resolver::{
    Resolver, TokioResolver,
    config::{LookupIpStrategy, NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
};
use tokio::sync::watch;

/// The scheme that marks an entry as a DNS name to watch.
pub const DNS_SCHEME: &str = "dns://";

/// Flags of every service that dials peers from an address list.
#[derive(Debug, Clone, clap::Args)]
pub struct DiscoveryArgs {
    /// How often `dns://` peers (in --workers, --reassemblers) are resolved
    /// again; peers whose records appeared are added, those whose records
    /// disappeared are retired.
    #[arg(long, env = "ORDO_DNS_REFRESH", default_value = "5s", value_parser = parse_refresh)]
    pub dns_refresh: Duration,
    /// The nameserver (`ip:port`, UDP and TCP) that resolves `dns://` peers;
    /// default: the system's resolver configuration (/etc/resolv.conf).
    #[arg(long, env = "ORDO_DNS_SERVER")]
    pub dns_server: Option<SocketAddr>,
}

impl Default for DiscoveryArgs {
    fn default() -> Self {
        Self { dns_refresh: Duration::from_secs(5), dns_server: None }
    }
}

/// A positive duration (a zero refresh would spin).
fn parse_refresh(text: &str) -> Result<Duration, String> {
    let refresh = ordo_core::duration::parse(text)?;
    if refresh < Duration::from_millis(10) {
        return Err(format!("--dns-refresh {text:?} must be at least 10ms"));
    }
    Ok(refresh)
}

/// One entry of an address list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// `host:port` (or a full `http(s)://` URI): one endpoint, as given.
    Fixed(String),
    /// `dns://name:port`: one endpoint per address record of `name`.
    Dns { name: String, port: u16 },
}

impl Peer {
    /// Parses one entry; blanks around it are ignored.
    pub fn parse(entry: &str) -> Result<Self, String> {
        let entry = entry.trim();
        let Some(rest) = entry.strip_prefix(DNS_SCHEME) else {
            return Ok(Self::Fixed(entry.to_owned()));
        };
        let (name, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("{entry:?}: a dns:// peer needs a port (dns://<name>:<port>)"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| format!("{entry:?}: {port:?} is not a port (1-65535)"))?;
        let valid = |label: &str| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        let labels = name.strip_suffix('.').unwrap_or(name);
        if labels.is_empty() || labels.len() > 253 || !labels.split('.').all(valid) {
            return Err(format!("{entry:?}: {name:?} is not a DNS name"));
        }
        Ok(Self::Dns { name: name.to_owned(), port })
    }
}

/// Parses an address list (blank entries dropped).
pub fn parse_list(entries: &[String]) -> Result<Vec<Peer>, String> {
    entries.iter().filter(|entry| !entry.trim().is_empty()).map(|entry| Peer::parse(entry)).collect()
}

/// The endpoints an address list stands for now (`host:port` strings, in
/// the list's order, each DNS name's addresses sorted); changes whenever a
/// re-resolution changes it. When every sender is gone (a list without
/// `dns://` entries never changes) `changed()` returns an error: nothing
/// will change any more.
pub type Peers = watch::Receiver<Vec<String>>;

/// A list that never changes (tests, and lists without `dns://` entries).
pub fn fixed(endpoints: &[String]) -> Peers {
    watch::channel(endpoints.to_vec()).1
}

/// Why a list cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("{0}")]
    Entry(String),
    #[error("cannot read the system's DNS configuration: {0}")]
    SystemConfig(String),
}

/// Watches `entries`: the fixed ones as given, the `dns://` ones resolved
/// now and every `--dns-refresh` in a background task (until every
/// receiver is dropped). Must be called within a Tokio runtime. The first
/// value holds only the fixed entries; the first resolution follows at once.
pub fn watch(entries: &[String], args: &DiscoveryArgs) -> Result<Peers, DiscoveryError> {
    let peers = parse_list(entries).map_err(DiscoveryError::Entry)?;
    let targets: Vec<(String, u16)> = peers
        .iter()
        .filter_map(|peer| match peer {
            Peer::Dns { name, port } => Some((name.clone(), *port)),
            Peer::Fixed(_) => None,
        })
        .collect();
    let fixed: Vec<String> = peers
        .into_iter()
        .filter_map(|peer| match peer {
            Peer::Fixed(endpoint) => Some(endpoint),
            Peer::Dns { .. } => None,
        })
        .collect();
    if targets.is_empty() {
        return Ok(self::fixed(&fixed));
    }
    let resolver = resolver(args)?;
    let (tx, rx) = watch::channel(fixed.clone());
    tokio::spawn(follow(resolver, fixed, targets, args.dns_refresh, tx));
    Ok(rx)
}

/// The system's resolver, or one that asks only `--dns-server`.
fn resolver(args: &DiscoveryArgs) -> Result<TokioResolver, DiscoveryError> {
    let mut builder = match args.dns_server {
        Some(server) => {
            let mut nameserver = NameServerConfig::udp_and_tcp(server.ip());
            for connection in &mut nameserver.connections {
                connection.port = server.port();
            }
            Resolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![nameserver]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio().map_err(|error| DiscoveryError::SystemConfig(error.to_string()))?,
    };
    let options = builder.options_mut();
    // Every address is a peer: ask for A and AAAA, not one family as a fallback.
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    // Answers are never older than one refresh: the cache is cleared before
    // each round (see `follow`), this bounds what one round may reuse.
    options.positive_max_ttl = Some(args.dns_refresh);
    options.negative_max_ttl = Some(args.dns_refresh);
    builder.build().map_err(|error| DiscoveryError::SystemConfig(error.to_string()))
}

/// What a lookup says about a name: its addresses, or `None` when it could
/// not be told (keep what was known).
async fn lookup(resolver: &TokioResolver, name: &str) -> Option<BTreeSet<IpAddr>> {
    match resolver.lookup_ip(name).await {
        Ok(found) => Some(found.iter().collect()),
        Err(error) if error.is_no_records_found() || error.is_nx_domain() => Some(BTreeSet::new()),
        Err(error) => {
            tracing::warn!(name, %error, "DNS lookup failed; keeping the peers last resolved");
            None
        }
    }
}

async fn follow(
    resolver: TokioResolver,
    fixed: Vec<String>,
    targets: Vec<(String, u16)>,
    refresh: Duration,
    tx: watch::Sender<Vec<String>>,
) {
    let mut known: Vec<BTreeSet<IpAddr>> = vec![BTreeSet::new(); targets.len()];
    loop {
        // Re-resolved for real each round: records a pod left behind must
        // not live on in the cache for their TTL.
        resolver.clear_cache();
        for ((name, _), addresses) in targets.iter().zip(known.iter_mut()) {
            if let Some(found) = lookup(&resolver, name).await {
                *addresses = found;
            }
        }
        let mut endpoints = fixed.clone();
        for ((_, port), addresses) in targets.iter().zip(&known) {
            for ip in addresses {
                let endpoint = SocketAddr::new(*ip, *port).to_string();
                if !endpoints.contains(&endpoint) {
                    endpoints.push(endpoint);
                }
            }
        }
        tx.send_if_modified(|current| {
            if *current == endpoints {
                return false;
            }
            tracing::info!(peers = ?endpoints, "DNS peers changed");
            *current = endpoints;
            true
        });
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(refresh) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_fixed_addresses_or_dns_names_with_a_port() {
        assert_eq!(Peer::parse(" 127.0.0.1:50053 "), Ok(Peer::Fixed("127.0.0.1:50053".into())));
        assert_eq!(Peer::parse("worker:50053"), Ok(Peer::Fixed("worker:50053".into())));
        assert_eq!(
            Peer::parse("dns://stateful-worker-headless.ordo.svc.cluster.local:50053"),
            Ok(Peer::Dns { name: "stateful-worker-headless.ordo.svc.cluster.local".into(), port: 50053 })
        );
        assert_eq!(Peer::parse("dns://workers.:1"), Ok(Peer::Dns { name: "workers.".into(), port: 1 }));
        for bad in
            ["dns://workers", "dns://:50053", "dns://workers:0", "dns://workers:http", "dns://a..b:1", "dns://a b:1"]
        {
            let error = Peer::parse(bad).expect_err(bad);
            assert!(error.contains(bad), "the message names the entry: {error}");
        }
        let list = parse_list(&["a:1".into(), " ".into(), "dns://b:2".into()]).expect("valid");
        assert_eq!(list, vec![Peer::Fixed("a:1".into()), Peer::Dns { name: "b".into(), port: 2 }]);
    }

    #[test]
    fn the_refresh_must_be_positive() {
        assert_eq!(parse_refresh("5s"), Ok(Duration::from_secs(5)));
        assert!(parse_refresh("0").is_err());
        assert!(parse_refresh("1ms").is_err());
        assert!(parse_refresh("soon").is_err());
    }

    #[tokio::test]
    async fn a_list_without_dns_names_never_changes() {
        let mut peers = watch(&["a:1".into(), "b:2".into()], &DiscoveryArgs::default()).expect("valid");
        assert_eq!(*peers.borrow(), vec!["a:1".to_owned(), "b:2".to_owned()]);
        assert!(peers.changed().await.is_err(), "nothing will ever change");
        assert!(matches!(watch(&["dns://x".into()], &DiscoveryArgs::default()), Err(DiscoveryError::Entry(_))));
    }
}
