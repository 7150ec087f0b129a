//! Free TCP ports on 127.0.0.1 for the processes a test starts.
//!
//! Ports are drawn at random below the kernel's ephemeral range (so outgoing
//! connections don't take them between the check and the child's bind), are
//! checked by binding them, and are never handed out twice by one test
//! process. Port 6379 (the shared Redis) is never used.
//!
//! Across test processes (nextest runs each test in a process of its own) a
//! port is reserved by an exclusive lock on a file named after it in
//! `$TMPDIR/ordo-testkit-ports/`, held until the test process exits. So a
//! port stays this test's while the service on it is killed and started
//! again on the same port: before the lock, another test could take the
//! freed port in between, and the restarted service then failed with
//! "address in use" while the other test's service answered its health
//! checks. A clash with a process outside the testkit is still possible;
//! [`crate::process`] retries on a new port when a child reports "address in
//! use" at its first start.

use std::{
    collections::{HashSet, VecDeque},
    fs::{File, OpenOptions},
    net::{Ipv4Addr, TcpListener},
    ops::Range,
    path::PathBuf,
    sync::{LazyLock, Mutex},
};

use rand::Rng;

/// Where ports are drawn from: below Linux's default ephemeral range (32768+).
const RANGE: Range<u16> = 20_000..32_000;
/// The shared Redis of the machine: never ours.
const SHARED_REDIS: u16 = 6379;

/// The ports this process handed out, and the locks that reserve the
/// latest [`HELD_LOCKS`] of them.
static HANDED_OUT: LazyLock<Mutex<(HashSet<u16>, VecDeque<File>)>> = LazyLock::new(Mutex::default);

/// Reservations held at once. A test uses a few dozen ports; a long run that
/// starts cluster after cluster (`ordo-chaos`, the benchmarks) would
/// otherwise hold one descriptor per port it ever used. A port handed out
/// this many ports ago belongs to a cluster long gone, and this process
/// still never hands it out again.
const HELD_LOCKS: usize = 512;

/// A port on 127.0.0.1 that nothing listens on right now and that no other
/// test process holds; it stays reserved for this process until it exits.
pub fn free_port() -> u16 {
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut rng = rand::rng();
    for _ in 0..10_000 {
        let port = rng.random_range(RANGE);
        if port == SHARED_REDIS || handed.0.contains(&port) {
            continue;
        }
        let Some(lock) = reserve(port) else { continue };
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            handed.0.insert(port);
            handed.1.extend(lock);
            if handed.1.len() > HELD_LOCKS {
                handed.1.pop_front();
            }
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in {RANGE:?}");
}

/// The directory of the reservation files.
fn reservations() -> PathBuf {
    std::env::temp_dir().join("ordo-testkit-ports")
}

/// Locks `port`'s reservation file: `None` when another process holds it;
/// `Some(None)` when no reservation can be made (no usable directory: the
/// bind check alone then decides, as before there were reservations).
fn reserve(port: u16) -> Option<Option<File>> {
    let dir = reservations();
    let open = std::fs::create_dir_all(&dir)
        .and_then(|()| OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(port.to_string())));
    let Ok(file) = open else { return Some(None) };
    // Closed on exec (Rust opens files O_CLOEXEC), so no child inherits it.
    file.try_lock().ok().map(|()| Some(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_handed_out_is_reserved_from_other_processes() {
        let port = free_port();
        // Another open file description of the same file: as another process would see it.
        let other =
            OpenOptions::new().write(true).open(reservations().join(port.to_string())).expect("the file exists");
        assert!(other.try_lock().is_err(), "port {port} is locked while this process holds it");
        assert!(reserve(port).is_none(), "and cannot be reserved again");
    }

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
