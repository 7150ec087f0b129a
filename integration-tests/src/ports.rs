//! Free TCP ports on 127.0.0.1 for the processes a test starts.
//!
//! Ports are drawn at random below the kernel's ephemeral range (so outgoing
//! connections don't take them between the check and the child's bind), are
//! checked by binding them, and are never handed out twice by one test
//! process. Port 6379 (the shared Redis) is never used. A clash with another
//! test process is still possible; [`crate::process`] retries on a new port
//! when a child reports "address in use" at start-up.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, TcpListener},
    ops::Range,
    sync::{LazyLock, Mutex},
};

use rand::Rng;

/// Where ports are drawn from: below Linux's default ephemeral range (32768+).
const RANGE: Range<u16> = 20_000..32_000;
/// The shared Redis of the machine: never ours.
const SHARED_REDIS: u16 = 6379;

static HANDED_OUT: LazyLock<Mutex<HashSet<u16>>> = LazyLock::new(|| Mutex::new(HashSet::new()));

/// A port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut rng = rand::rng();
    for _ in 0..10_000 {
        let port = rng.random_range(RANGE);
        if port == SHARED_REDIS || handed.contains(&port) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            handed.insert(port);
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in {RANGE:?}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_bindable() {
        let ports: HashSet<u16> = (0..50).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 50);
        assert!(!ports.contains(&SHARED_REDIS));
        for port in ports {
            assert!(TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok());
        }
    }
}
