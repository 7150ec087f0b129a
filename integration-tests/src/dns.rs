//! A small authoritative DNS server in the test process, on a free UDP port
//! of 127.0.0.1, whose A/AAAA records a test changes while services resolve
//! them (`--dns-server`): the real resolver path of `dns://` peers (hickory
//! on the services' side, real DNS messages on the wire), without touching
//! the machine's resolver configuration.
//!
//! It answers every question about a name it holds with all its addresses
//! of the asked family (TTL 1 s), NOERROR with no answer for a held name
//! without addresses of that family, and NXDOMAIN for any other name.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
};

use anyhow::Context as _;
use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA},
    },
};
use tokio::net::UdpSocket;

type Zone = Arc<Mutex<HashMap<Name, Vec<IpAddr>>>>;

/// The server; it stops when dropped.
#[derive(Debug)]
pub struct DnsServer {
    addr: SocketAddr,
    zone: Zone,
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    /// Binds a free UDP port on 127.0.0.1 and starts answering.
    pub async fn start() -> anyhow::Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0").await.context("cannot bind a UDP port for the DNS server")?;
        let addr = socket.local_addr()?;
        let zone: Zone = Arc::default();
        let task = tokio::spawn(serve(socket, zone.clone()));
        Ok(Self { addr, zone, task })
    }

    /// `ip:port`, for `--dns-server`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the addresses of `name` (an empty list keeps the name, with no records).
    pub fn set(&self, name: &str, addresses: &[IpAddr]) -> anyhow::Result<()> {
        let name = fqdn(name)?;
        self.zone.lock().unwrap_or_else(PoisonError::into_inner).insert(name, addresses.to_vec());
        Ok(())
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `name` as an absolute, lower-case name (how questions are compared).
fn fqdn(name: &str) -> anyhow::Result<Name> {
    let mut name = Name::from_ascii(name).with_context(|| format!("{name:?} is not a DNS name"))?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

async fn serve(socket: UdpSocket, zone: Zone) {
    let mut buffer = vec![0u8; 4096];
    loop {
        let Ok((len, peer)) = socket.recv_from(&mut buffer).await else { return };
        let Ok(query) = Message::from_vec(&buffer[..len]) else { continue };
        let reply = answer(&query, &zone);
        if let Ok(bytes) = reply.to_vec() {
            let _ = socket.send_to(&bytes, peer).await;
        }
    }
}

fn answer(query: &Message, zone: &Zone) -> Message {
    let mut reply = Message::response(query.metadata.id, OpCode::Query);
    reply.metadata.message_type = MessageType::Response;
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    let zone = zone.lock().unwrap_or_else(PoisonError::into_inner);
    for question in &query.queries {
        reply.add_query(question.clone());
        let name = question.name().to_lowercase();
        let Some(addresses) = zone.get(&name) else {
            reply.metadata.response_code = ResponseCode::NXDomain;
            continue;
        };
        for ip in addresses {
            let rdata = match (question.query_type(), ip) {
                (RecordType::A, IpAddr::V4(v4)) => RData::A(A(*v4)),
                (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(*v6)),
                _ => continue,
            };
            reply.add_answer(Record::from_rdata(question.name().clone(), 1, rdata));
        }
    }
    reply
}
