//! Registry versions in Redis (layout in `ordo_core::keys`): publish a file
//! as a new immutable version, read versions, pin, unpin, roll back. Every
//! change of what is active is one atomic command or script, so services
//! following the registry never see half a change.

use std::time::{SystemTime, UNIX_EPOCH};

use ordo_core::keys;
use ordo_runtime::redis_conn::RedisConn;

use crate::{
    document::{self, DocumentError},
    spec::{Catalog, OperationSpec, StoredOperation, StoredVersion},
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid registry file: {0}")]
    Document(#[from] DocumentError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("registry version {0} does not exist")]
    NotFound(u64),
    #[error("nothing to roll back to: the active version is {0}")]
    NothingToRollBack(u64),
    #[error("registry version {version} is unreadable: {why}")]
    Corrupt { version: u64, why: String },
}

/// Which versions exist and which is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct State {
    /// The newest version (0: none published).
    pub latest: u64,
    /// The version services follow (0: none).
    pub active: u64,
    /// The version every service uses instead, while set.
    pub pin: Option<u64>,
}

impl State {
    /// What a service that is not pinned itself uses.
    pub fn effective(&self) -> u64 {
        self.pin.unwrap_or(self.active)
    }
}

/// One line of `ordo registry list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub version: u64,
    pub published_unix_ms: u64,
    pub operations: usize,
}

/// A version as published, with its file.
#[derive(Debug, Clone)]
pub struct Published {
    pub catalog: Catalog,
    pub source: String,
}

const PUBLISH: &str = r"
local n = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[2] .. n, ARGV[1])
redis.call('SET', KEYS[3], n)
return n
";

const ROLLBACK: &str = r"
local active = tonumber(redis.call('GET', KEYS[1]) or '0')
if active <= 1 then return {active, 0} end
redis.call('SET', KEYS[1], active - 1)
return {active, active - 1}
";

fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

/// The registry in one Redis, a single node or a cluster (cheap to clone).
/// Every registry key has the `{registry}` hash tag, so on a cluster they
/// all live in one slot and each command and script keeps to it.
#[derive(Clone)]
pub struct Store {
    conn: RedisConn,
}

impl Store {
    pub fn new(conn: impl Into<RedisConn>) -> Self {
        Self { conn: conn.into() }
    }

    /// Checks `text` and publishes it as the next version, which becomes
    /// active. Nothing changes when the file is invalid.
    pub async fn publish(&self, text: &str) -> Result<u64, StoreError> {
        let operations = document::parse(text)?;
        let stored = StoredVersion {
            published_unix_ms: now_unix_ms(),
            source: text.to_owned(),
            operations: operations.iter().map(StoredOperation::from).collect(),
        };
        let json =
            serde_json::to_string(&stored).map_err(|e| StoreError::Corrupt { version: 0, why: e.to_string() })?;
        let version: u64 = redis::Script::new(PUBLISH)
            .key(keys::REGISTRY_SEQ)
            .key(keys::REGISTRY_VERSION_PREFIX)
            .key(keys::REGISTRY_ACTIVE)
            .arg(json)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(version)
    }

    pub async fn state(&self) -> Result<State, StoreError> {
        let (latest, active, pin): (Option<u64>, Option<u64>, Option<u64>) = redis::cmd("MGET")
            .arg(keys::REGISTRY_SEQ)
            .arg(keys::REGISTRY_ACTIVE)
            .arg(keys::REGISTRY_PIN)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(State { latest: latest.unwrap_or(0), active: active.unwrap_or(0), pin })
    }

    /// Version `version`, or `None` if it was never published.
    pub async fn get(&self, version: u64) -> Result<Option<Published>, StoreError> {
        if version == 0 {
            return Ok(None);
        }
        let json: Option<String> =
            redis::cmd("GET").arg(keys::registry_version(version)).query_async(&mut self.conn.clone()).await?;
        json.map(|json| decode(version, &json)).transpose()
    }

    /// Like [`Store::get`], but a missing version is an error.
    pub async fn require(&self, version: u64) -> Result<Published, StoreError> {
        self.get(version).await?.ok_or(StoreError::NotFound(version))
    }

    /// Every published version, oldest first.
    pub async fn list(&self) -> Result<Vec<Summary>, StoreError> {
        let latest = self.state().await?.latest;
        let mut out = Vec::new();
        // MGET in pages: a registry has few versions, but never unbounded replies.
        let mut from = 1;
        while from <= latest {
            let to = latest.min(from + 99);
            let keys: Vec<String> = (from..=to).map(keys::registry_version).collect();
            let jsons: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut self.conn.clone()).await?;
            for (version, json) in (from..=to).zip(jsons) {
                if let Some(json) = json {
                    let published = decode(version, &json)?;
                    out.push(Summary {
                        version,
                        published_unix_ms: published.catalog.published_unix_ms,
                        operations: published.catalog.operations.len(),
                    });
                }
            }
            from = to + 1;
        }
        Ok(out)
    }

    /// Every service uses `version` (until [`Store::unpin`]), whatever is
    /// published meanwhile.
    pub async fn pin(&self, version: u64) -> Result<(), StoreError> {
        self.require(version).await?;
        let () = redis::cmd("SET").arg(keys::REGISTRY_PIN).arg(version).query_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Services follow the active version again. Returns the pin removed.
    pub async fn unpin(&self) -> Result<Option<u64>, StoreError> {
        let old: Option<u64> = redis::cmd("GETDEL").arg(keys::REGISTRY_PIN).query_async(&mut self.conn.clone()).await?;
        Ok(old)
    }

    /// Makes the version before the active one active. Returns (from, to).
    pub async fn rollback(&self) -> Result<(u64, u64), StoreError> {
        let (from, to): (u64, u64) =
            redis::Script::new(ROLLBACK).key(keys::REGISTRY_ACTIVE).invoke_async(&mut self.conn.clone()).await?;
        if to == 0 {
            return Err(StoreError::NothingToRollBack(from));
        }
        Ok((from, to))
    }
}

fn decode(version: u64, json: &str) -> Result<Published, StoreError> {
    let corrupt = |why: String| StoreError::Corrupt { version, why };
    let stored: StoredVersion = serde_json::from_str(json).map_err(|e| corrupt(e.to_string()))?;
    let operations =
        stored.operations.into_iter().map(OperationSpec::try_from).collect::<Result<Vec<_>, _>>().map_err(corrupt)?;
    Ok(Published { catalog: Catalog::new(version, stored.published_unix_ms, operations), source: stored.source })
}
