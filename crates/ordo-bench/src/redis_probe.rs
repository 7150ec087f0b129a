//! A read-only look at the benchmark's private redis-server: `INFO memory`
//! (`used_memory`), `DBSIZE` and `MEMORY USAGE <key> SAMPLES 0`, spoken in
//! RESP over one plain TCP connection (the testkit's redis-server has no
//! TLS and no password). Workload (d) uses it for Redis memory per stream.
//!
//! Every reply is parsed, never trusted: a malformed, oversized or
//! unexpected reply is an error, and every command has a time limit.

use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpStream,
};

/// Longest wait for a connection or one reply.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest bulk string accepted (`INFO` is a few KiB).
const MAX_BULK: usize = 16 * 1024 * 1024;
/// Largest array accepted, and how deep arrays may nest.
const MAX_ARRAY: usize = 1024;
const MAX_DEPTH: usize = 4;
/// Longest header line (`+…`, `-…`, `:…`, `$n`, `*n`).
const MAX_LINE: usize = 64 * 1024;

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    /// `None` is the null bulk string (`$-1`).
    Bulk(Option<Vec<u8>>),
    /// `None` is the null array (`*-1`).
    Array(Option<Vec<Reply>>),
}

/// `host:port` of a `redis://host:port[/db]` URL without credentials.
pub fn address_of(url: &str) -> anyhow::Result<String> {
    let Some(rest) = url.strip_prefix("redis://") else {
        bail!("only plain redis:// URLs can be probed, not {url:?}");
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || authority.contains('@') {
        bail!("no host:port without credentials in {url:?}");
    }
    if authority.contains(':') { Ok(authority.to_owned()) } else { Ok(format!("{authority}:6379")) }
}

/// One connection to a redis-server.
#[derive(Debug)]
pub struct RedisProbe {
    conn: BufReader<TcpStream>,
}

impl RedisProbe {
    /// Connects to `url` (`redis://host:port`).
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let address = address_of(url)?;
        let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(&address))
            .await
            .with_context(|| format!("connecting to Redis at {address} timed out"))?
            .with_context(|| format!("cannot connect to Redis at {address}"))?;
        Ok(Self { conn: BufReader::new(stream) })
    }

    /// Sends one command and reads its reply (an error reply is an error).
    pub async fn command(&mut self, args: &[&str]) -> anyhow::Result<Reply> {
        let name = args.first().copied().unwrap_or_default();
        let exchange = async {
            self.conn.get_mut().write_all(&encode(args)).await?;
            read_reply(&mut self.conn, 0).await
        };
        let reply =
            tokio::time::timeout(TIMEOUT, exchange).await.with_context(|| format!("Redis {name} timed out"))??;
        if let Reply::Error(message) = reply {
            bail!("Redis {name}: {message}");
        }
        Ok(reply)
    }

    /// `used_memory` of `INFO memory`, bytes.
    pub async fn used_memory(&mut self) -> anyhow::Result<u64> {
        let Reply::Bulk(Some(text)) = self.command(&["INFO", "memory"]).await? else {
            bail!("INFO memory did not answer a bulk string");
        };
        info_field(&String::from_utf8_lossy(&text), "used_memory")
            .context("no used_memory in INFO memory")?
            .parse()
            .context("used_memory is not a number")
    }

    /// Keys in the current database.
    pub async fn dbsize(&mut self) -> anyhow::Result<u64> {
        match self.command(&["DBSIZE"]).await? {
            Reply::Integer(n) => u64::try_from(n).context("negative DBSIZE"),
            other => bail!("DBSIZE answered {other:?}"),
        }
    }

    /// Bytes `key` takes (`MEMORY USAGE key SAMPLES 0`: every element
    /// counted); `None` when the key does not exist.
    pub async fn memory_usage(&mut self, key: &str) -> anyhow::Result<Option<u64>> {
        match self.command(&["MEMORY", "USAGE", key, "SAMPLES", "0"]).await? {
            Reply::Integer(n) => Ok(Some(u64::try_from(n).context("negative MEMORY USAGE")?)),
            Reply::Bulk(None) | Reply::Array(None) => Ok(None),
            other => bail!("MEMORY USAGE answered {other:?}"),
        }
    }
}

/// A command as a RESP array of bulk strings.
fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The value of `field:` in `INFO` text.
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| line.strip_prefix(field)?.strip_prefix(':')).map(str::trim)
}

async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R) -> anyhow::Result<String> {
    let mut line = Vec::new();
    let n = (&mut *reader).take(MAX_LINE as u64 + 2).read_until(b'\n', &mut line).await?;
    if n == 0 {
        bail!("Redis closed the connection");
    }
    let Some(line) = line.strip_suffix(b"\r\n") else {
        bail!("a RESP line without CRLF (or longer than {MAX_LINE} bytes)");
    };
    String::from_utf8(line.to_vec()).context("a RESP line that is not UTF-8")
}

fn length(text: &str, max: usize) -> anyhow::Result<Option<usize>> {
    let n: i64 = text.parse().with_context(|| format!("bad RESP length {text:?}"))?;
    match n {
        -1 => Ok(None),
        n if n < 0 => bail!("bad RESP length {n}"),
        n => {
            let n = usize::try_from(n).context("RESP length")?;
            if n > max {
                bail!("RESP length {n} over the limit {max}");
            }
            Ok(Some(n))
        }
    }
}

/// Reads one reply; arrays nest at most [`MAX_DEPTH`] deep.
fn read_reply<'a, R: AsyncBufRead + Unpin + Send>(
    reader: &'a mut R,
    depth: usize,
) -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<Reply>> + Send + 'a>> {
    Box::pin(async move {
        let line = read_line(reader).await?;
        let Some(kind) = line.chars().next() else { bail!("an empty RESP line") };
        let rest = &line[kind.len_utf8()..];
        Ok(match kind {
            '+' => Reply::Simple(rest.to_owned()),
            '-' => Reply::Error(rest.to_owned()),
            ':' => Reply::Integer(rest.parse().with_context(|| format!("bad RESP integer {rest:?}"))?),
            '$' => match length(rest, MAX_BULK)? {
                None => Reply::Bulk(None),
                Some(n) => {
                    let mut data = vec![0u8; n + 2];
                    reader.read_exact(&mut data).await?;
                    if !data.ends_with(b"\r\n") {
                        bail!("a RESP bulk string without CRLF");
                    }
                    data.truncate(n);
                    Reply::Bulk(Some(data))
                }
            },
            '*' => match length(rest, MAX_ARRAY)? {
                None => Reply::Array(None),
                Some(n) => {
                    if depth >= MAX_DEPTH {
                        bail!("RESP arrays nested deeper than {MAX_DEPTH}");
                    }
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(read_reply(reader, depth + 1).await?);
                    }
                    Reply::Array(Some(items))
                }
            },
            other => bail!("unknown RESP type {other:?}"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> anyhow::Result<Reply> {
        let mut reader = bytes;
        read_reply(&mut reader, 0).await
    }

    #[tokio::test]
    async fn parses_every_reply_kind() {
        assert_eq!(parse(b"+OK\r\n").await.ok(), Some(Reply::Simple("OK".into())));
        assert_eq!(parse(b"-ERR no\r\n").await.ok(), Some(Reply::Error("ERR no".into())));
        assert_eq!(parse(b":-42\r\n").await.ok(), Some(Reply::Integer(-42)));
        assert_eq!(parse(b"$5\r\nab\r\nc\r\n").await.ok(), Some(Reply::Bulk(Some(b"ab\r\nc".to_vec()))));
        assert_eq!(parse(b"$-1\r\n").await.ok(), Some(Reply::Bulk(None)));
        assert_eq!(
            parse(b"*2\r\n:1\r\n*1\r\n$0\r\n\r\n").await.ok(),
            Some(Reply::Array(Some(vec![Reply::Integer(1), Reply::Array(Some(vec![Reply::Bulk(Some(vec![]))]))])))
        );
    }

    #[tokio::test]
    async fn refuses_malformed_replies() {
        for bad in [
            &b""[..],
            b"+OK\n",
            b"?x\r\n",
            b":one\r\n",
            b"$3\r\nab\r\n",
            b"$4\r\nabcdXY",
            b"$-2\r\n",
            b"$99999999999\r\n",
            b"*1\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
        ] {
            assert!(parse(bad).await.is_err(), "{:?} parsed", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn encodes_commands_and_reads_info_and_urls() {
        assert_eq!(encode(&["INFO", "memory"]), b"*2\r\n$4\r\nINFO\r\n$6\r\nmemory\r\n");
        let info = "# Memory\r\nused_memory:1234\r\nused_memory_human:1.21K\r\n";
        assert_eq!(info_field(info, "used_memory"), Some("1234"));
        assert_eq!(info_field(info, "used_memory_rss"), None);
        assert_eq!(address_of("redis://127.0.0.1:7001").ok().as_deref(), Some("127.0.0.1:7001"));
        assert_eq!(address_of("redis://localhost/0").ok().as_deref(), Some("localhost:6379"));
        assert!(address_of("rediss://127.0.0.1:7001").is_err());
        assert!(address_of("redis://user:pw@127.0.0.1:7001").is_err());
    }

    #[tokio::test]
    async fn asks_a_real_redis_server() {
        let redis = integration_tests::RedisServer::start().await.expect("redis-server starts");
        let mut probe = RedisProbe::connect(&redis.url()).await.expect("connects");
        assert_eq!(probe.dbsize().await.ok(), Some(0));
        let before = probe.used_memory().await.expect("used_memory");
        assert!(before > 0);
        let value = "x".repeat(10_000);
        assert_eq!(probe.command(&["SET", "k", &value]).await.ok(), Some(Reply::Simple("OK".into())));
        assert_eq!(probe.dbsize().await.ok(), Some(1));
        let usage = probe.memory_usage("k").await.expect("MEMORY USAGE").expect("k exists");
        assert!(usage >= 10_000, "{usage}");
        assert_eq!(probe.memory_usage("missing").await.ok(), Some(None));
        assert!(probe.used_memory().await.expect("used_memory") >= before + 10_000);
        assert!(probe.command(&["NOSUCHCOMMAND"]).await.is_err());
        // The connection is still usable after an error reply.
        assert_eq!(probe.dbsize().await.ok(), Some(1));
    }
}
