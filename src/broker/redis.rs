//! The Redis backbone: any number of nodes share one Redis.
//!
//! - [`RedisStore`] publishes (the publish script: XADD + EXPIRE + PUBLISH,
//!   atomically) and reads history, through a deadpool-redis pool — or, for
//!   a Redis Cluster, through a cluster connection that routes each call by
//!   its channel's slot and publishes with `SPUBLISH`. App services get the
//!   same through [`crate::Publisher::redis`] and
//!   [`crate::Publisher::redis_cluster`].
//! - [`RedisBroker`] adds the node's single pub/sub connection, owned by one
//!   task that takes (un)subscribe commands over a channel. The `broadcast`
//!   and control channels are always subscribed. When the connection is
//!   lost — or silently stops delivering, which a periodic probe on the
//!   node's own channel catches — the task reconnects with capped, jittered
//!   exponential backoff, resubscribes everything, and tells the hub to
//!   refill each active channel's gap from history.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deadpool::managed::{self, Object, Pool, RecycleResult};
use deadpool_redis::Runtime;
use futures_util::StreamExt as _;
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::streams::StreamRangeReply;
use redis::RedisError;
use redis::{Script, Value};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    BoxFuture, Broker, BrokerError, Deliveries, Delivery, Entry, History, Page, Presence, Store,
};
use crate::channel::Channel;
use crate::config::BackboneArgs;
use crate::envelope::{self, StreamId};
use crate::metrics;

/// The publish script, shipped for apps in any language (see the README).
pub const PUBLISH_SCRIPT: &str = include_str!("publish.lua");
const HISTORY_SCRIPT: &str = include_str!("history.lua");

/// How long one Redis command (or a connect) may take before it counts as
/// failed; keeps a hung Redis from hanging requests.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Settings for the Redis backend.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` URL.
    pub url: String,
    /// Namespace for keys and channels.
    pub prefix: String,
    /// Entries kept per channel (`MAXLEN ~`).
    pub history_size: u32,
    /// Idle history expiry.
    pub history_ttl: Duration,
    /// How often the pub/sub connection is probed.
    pub probe_interval: Duration,
}

impl RedisConfig {
    /// The settings `--redis-url` and its companions name, if it is set
    /// (the same for `herald serve` and `herald publish`).
    pub fn from_flags(flags: &BackboneArgs, probe_interval: Duration) -> Option<RedisConfig> {
        Some(RedisConfig {
            url: flags.redis_url.clone()?,
            prefix: flags.channel_prefix.clone(),
            history_size: flags.history_size,
            history_ttl: flags.history_ttl,
            probe_interval,
        })
    }
}

/// `rediss://` uses rustls; its crypto comes from `ring` (pure Rust and
/// assembly, nothing to install). Installed once per process; an embedding
/// application that installed its own provider keeps it.
pub(super) fn install_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

pub(super) fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// deadpool-redis' manager PINGs a connection on every checkout: a second
/// round trip (and Redis command) per publish. A multiplexed connection needs
/// no such check; one that failed a command is discarded instead (`settle`).
struct Multiplexed(deadpool_redis::Manager);

impl managed::Manager for Multiplexed {
    type Type = MultiplexedConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<MultiplexedConnection, RedisError> {
        self.0.create().await
    }

    async fn recycle(
        &self,
        _: &mut MultiplexedConnection,
        _: &managed::Metrics,
    ) -> RecycleResult<RedisError> {
        Ok(())
    }
}

type Connection = Object<Multiplexed>;

/// Why a command failed.
enum Failure {
    /// The connection broke (and was dropped from the pool): worth one more
    /// try on a fresh connection, e.g. after Redis restarted.
    Broken(BrokerError),
    /// Anything else, a timeout included: a command that timed out reached
    /// Redis and may have run, and running a publish twice would deliver
    /// it twice.
    Failed(BrokerError),
}

/// The outcome of a command run under [`COMMAND_TIMEOUT`]; a connection
/// that timed out or broke is dropped from the pool rather than reused.
fn settle<T>(
    conn: Connection,
    result: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    what: &str,
) -> Result<T, Failure> {
    match result {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => {
            let message = unavailable(format!("{what}: {error}"));
            if error.is_timeout() {
                let _ = Object::take(conn);
                Err(Failure::Failed(message))
            } else if error.is_io_error() || error.is_unrecoverable_error() {
                let _ = Object::take(conn);
                Err(Failure::Broken(message))
            } else {
                Err(Failure::Failed(message))
            }
        }
        Err(_) => {
            let _ = Object::take(conn);
            Err(Failure::Failed(unavailable(format!("{what} timed out"))))
        }
    }
}

/// Most subscribes sent in one `SUBSCRIBE`.
const SUBSCRIBE_BATCH: usize = 512;

/// How many probe intervals a probe may stay out while other messages keep
/// arriving (the node is reading a backlog) before the connection is
/// given up as too far behind.
pub(super) const SLOW_PROBE_LIMIT: u32 = 6;

/// Channels per presence pipeline.
const PRESENCE_BATCH: usize = 500;
/// Most nodes a presence read asks (a bound on what the sorted set holds).
const MAX_PRESENCE_NODES: usize = 1024;

/// Runs every call at once, each on a clone of `conn` (the clones share
/// its socket) and each under [`COMMAND_TIMEOUT`]; the answers in order.
async fn run_all<C>(
    conn: &C,
    evals: &[Eval<'_>],
) -> Vec<Result<redis::RedisResult<Value>, tokio::time::error::Elapsed>>
where
    C: redis::aio::ConnectionLike + Clone + Send,
{
    futures_util::future::join_all(evals.iter().map(|eval| {
        let mut conn = conn.clone();
        async move { tokio::time::timeout(COMMAND_TIMEOUT, eval.run(&mut conn)).await }
    }))
    .await
}

/// What can be sent to Redis on a pooled connection.
pub(super) enum Request<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a redis::Pipeline),
    Script(&'a Eval<'a>),
}

/// A call of one of the store's scripts: `EVALSHA`, built as one command.
/// (`redis::ScriptInvocation` keeps every key and argument in a buffer of
/// its own and copies them all into a command again on each call: about
/// 1.5-2 k instructions per publish for nothing.)
pub(super) struct Eval<'a> {
    script: &'a Script,
    cmd: redis::Cmd,
}

impl<'a> Eval<'a> {
    /// `EVALSHA <sha> <keys>`; the keys and then the arguments follow with
    /// [`Eval::arg`]. `size` is about how many bytes they take.
    fn new(script: &'a Script, keys: usize, size: usize) -> Self {
        let mut cmd = redis::Cmd::with_capacity(keys + 8, size + 64);
        cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys);
        Eval { script, cmd }
    }

    fn arg(&mut self, arg: impl redis::ToRedisArgs) -> &mut Self {
        self.cmd.arg(arg);
        self
    }

    /// Runs the script; on `NOSCRIPT` (a Redis that restarted or flushed
    /// its scripts) loads it and runs it once more.
    async fn run<T: redis::FromRedisValue>(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> redis::RedisResult<T> {
        match self.cmd.query_async(conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.script.load_async(conn).await?;
                self.cmd.query_async(conn).await
            }
            result => result,
        }
    }
}

/// Where a store's commands go.
#[derive(Clone)]
enum Backend {
    /// One Redis, through a pool of multiplexed connections.
    Single(Pool<Multiplexed>),
    /// A Redis Cluster: one multiplexed connection per node, commands routed
    /// by slot, `MOVED`/`ASK` followed and the slot map refreshed by the
    /// `redis` crate.
    Cluster(Arc<LazyCluster>),
}

/// A cluster connection made on first use, so a store builds while the
/// cluster is down or still forming; a failed connect is retried by the
/// next call. Once made, the connection keeps itself current.
struct LazyCluster {
    client: redis::cluster::ClusterClient,
    connection: tokio::sync::Mutex<Option<ClusterConnection>>,
}

impl LazyCluster {
    async fn get(&self) -> Result<ClusterConnection, BrokerError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let connection = tokio::time::timeout(COMMAND_TIMEOUT, self.client.get_async_connection())
            .await
            .map_err(|_| unavailable("cluster connect timed out"))?
            .map_err(|e| unavailable(format!("cluster connect: {e}")))?;
        *slot = Some(connection.clone());
        Ok(connection)
    }
}

/// A cluster client for `--redis-url`'s comma-separated seed URLs, with
/// every connect and reply bounded by [`COMMAND_TIMEOUT`].
pub(super) fn cluster_client(
    urls: &str,
    configure: impl FnOnce(redis::cluster::ClusterClientBuilder) -> redis::cluster::ClusterClientBuilder,
) -> Result<redis::cluster::ClusterClient, BrokerError> {
    install_tls_provider();
    let seeds: Vec<&str> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if seeds.is_empty() {
        return Err(unavailable("--redis-url names no cluster node"));
    }
    let builder = redis::cluster::ClusterClientBuilder::new(seeds)
        .connection_timeout(COMMAND_TIMEOUT)
        .response_timeout(COMMAND_TIMEOUT)
        .retries(CLUSTER_RETRIES);
    configure(builder).build().map_err(unavailable)
}

/// How often a cluster command is retried (following `MOVED`/`ASK`, or
/// waiting out a failover) before it fails.
const CLUSTER_RETRIES: u32 = 6;

/// Publishing and history over a connection pool (or a cluster connection).
#[derive(Clone)]
pub(crate) struct RedisStore {
    backend: Backend,
    config: Arc<RedisConfig>,
    publish: Arc<Script>,
    history: Arc<Script>,
}

impl RedisStore {
    /// A store for `config`; connects lazily, so it builds with Redis down.
    pub(crate) fn new(config: RedisConfig) -> Result<Self, BrokerError> {
        install_tls_provider();
        // The redis crate would give up on an answer after 500 ms; under
        // load that is a publish that ran but reads as failed. Our own
        // COMMAND_TIMEOUT bounds every command instead, as on a cluster.
        let connection = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT));
        let manager = deadpool_redis::Manager::new_with_config(config.url.as_str(), connection)
            .map_err(unavailable)?;
        let pool = Pool::builder(Multiplexed(manager))
            .max_size(16)
            .wait_timeout(Some(COMMAND_TIMEOUT))
            .create_timeout(Some(COMMAND_TIMEOUT))
            .recycle_timeout(Some(COMMAND_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(unavailable)?;
        Ok(RedisStore {
            backend: Backend::Single(pool),
            config: Arc::new(config),
            publish: Arc::new(Script::new(PUBLISH_SCRIPT)),
            history: Arc::new(Script::new(HISTORY_SCRIPT)),
        })
    }

    /// A store on the Redis Cluster named by `config.url` (seed URLs,
    /// comma-separated): calls are routed by slot and the publish script
    /// publishes with `SPUBLISH`. Connects lazily, like [`RedisStore::new`].
    pub(crate) fn cluster(config: RedisConfig) -> Result<Self, BrokerError> {
        let client = cluster_client(&config.url, |b| b)?;
        Ok(RedisStore {
            backend: Backend::Cluster(Arc::new(LazyCluster {
                client,
                connection: tokio::sync::Mutex::new(None),
            })),
            config: Arc::new(config),
            publish: Arc::new(Script::new(PUBLISH_SCRIPT)),
            history: Arc::new(Script::new(HISTORY_SCRIPT)),
        })
    }

    /// The store's settings.
    pub(super) fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// The cluster connection of a cluster store (`None` for one Redis).
    pub(super) async fn cluster_connection(
        &self,
    ) -> Option<Result<ClusterConnection, BrokerError>> {
        match &self.backend {
            Backend::Single(_) => None,
            Backend::Cluster(cluster) => Some(cluster.get().await),
        }
    }

    /// Runs one request, once more on a fresh connection if the pooled one
    /// turned out broken (Redis restarted since it was opened).
    pub(super) async fn query<T: redis::FromRedisValue>(
        &self,
        request: Request<'_>,
        what: &str,
    ) -> Result<T, BrokerError> {
        let pool = match &self.backend {
            Backend::Single(pool) => pool,
            Backend::Cluster(cluster) => {
                let mut conn = cluster.get().await?;
                let result = match request {
                    Request::Cmd(cmd) => {
                        tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async(&mut conn)).await
                    }
                    Request::Pipe(pipe) => {
                        tokio::time::timeout(COMMAND_TIMEOUT, pipe.query_async(&mut conn)).await
                    }
                    Request::Script(eval) => {
                        tokio::time::timeout(COMMAND_TIMEOUT, eval.run(&mut conn)).await
                    }
                };
                return match result {
                    Ok(Ok(value)) => Ok(value),
                    Ok(Err(e)) => Err(unavailable(format!("{what}: {e}"))),
                    Err(_) => Err(unavailable(format!("{what} timed out"))),
                };
            }
        };
        let mut retried = false;
        loop {
            let mut conn = pool.get().await.map_err(unavailable)?;
            let result = match request {
                Request::Cmd(cmd) => {
                    tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async(&mut *conn)).await
                }
                Request::Pipe(pipe) => {
                    tokio::time::timeout(COMMAND_TIMEOUT, pipe.query_async(&mut *conn)).await
                }
                Request::Script(eval) => {
                    tokio::time::timeout(COMMAND_TIMEOUT, eval.run(&mut *conn)).await
                }
            };
            match settle(conn, result, what) {
                Ok(value) => return Ok(value),
                Err(Failure::Broken(_)) if !retried => retried = true,
                Err(Failure::Broken(e) | Failure::Failed(e)) => return Err(e),
            }
        }
    }

    /// Runs the publish script for `channel` (EVALSHA, loading it on NOSCRIPT).
    async fn run_publish(
        &self,
        channel: &Channel,
        event: Option<&str>,
        data: &str,
    ) -> Result<StreamId, BrokerError> {
        let prefix = &self.config.prefix;
        let size = 2 * (prefix.len() + channel.as_str().len()) + data.len() + 96;
        let mut eval = Eval::new(&self.publish, 2, size);
        eval.arg(channel.history_key(prefix))
            .arg(channel.pubsub_key(prefix))
            .arg(event.unwrap_or(""))
            .arg(data)
            .arg(self.config.history_size)
            .arg(self.config.history_ttl.as_secs().max(1));
        if matches!(self.backend, Backend::Cluster(_)) {
            // Sharded pub/sub: the message goes to its slot's shard only.
            eval.arg("SPUBLISH");
        }
        let id: String = self.query(Request::Script(&eval), "publish").await?;
        id.parse()
            .map_err(|_| unavailable("publish script returned a bad id"))
    }

    /// The history script's call for entries of `channel` after `after`,
    /// at most `limit` (it asks for one more: getting it means a gap).
    fn history_eval(&self, channel: &Channel, after: StreamId, limit: usize) -> Eval<'_> {
        let count = limit.saturating_add(1).min(i64::MAX as usize);
        let mut eval = Eval::new(&self.history, 1, 128);
        eval.arg(channel.history_key(&self.config.prefix))
            .arg(after.to_string())
            .arg(count);
        eval
    }

    async fn read_history(
        &self,
        channel: &Channel,
        after: StreamId,
        limit: usize,
    ) -> Result<History, BrokerError> {
        let eval = self.history_eval(channel, after, limit);
        let reply: Value = self.query(Request::Script(&eval), "history read").await?;
        parse_history(reply, after, limit).ok_or_else(|| unavailable("unexpected history reply"))
    }

    /// [`Store::histories_after`]: every read sent at once on one
    /// connection (a multiplexed connection, or the cluster's, writes them
    /// out together and matches the answers as they come), so it takes one
    /// pooled connection, not one per read in flight.
    async fn read_histories(
        &self,
        reads: &[(Channel, StreamId)],
    ) -> Vec<Result<History, BrokerError>> {
        let evals: Vec<Eval<'_>> = reads
            .iter()
            .map(|(channel, after)| self.history_eval(channel, *after, usize::MAX))
            .collect();
        let replies = match &self.backend {
            Backend::Single(pool) => match pool.get().await {
                Ok(conn) => {
                    let replies = run_all(&(*conn).clone(), &evals).await;
                    // As `settle`: a connection that broke or timed out is
                    // not handed out again.
                    if replies.iter().any(|r| match r {
                        Ok(Err(e)) => {
                            e.is_timeout() || e.is_io_error() || e.is_unrecoverable_error()
                        }
                        Ok(Ok(_)) => false,
                        Err(_) => true,
                    }) {
                        let _ = Object::take(conn);
                    }
                    replies
                }
                Err(error) => {
                    let error = unavailable(error);
                    return reads.iter().map(|_| Err(error.clone())).collect();
                }
            },
            Backend::Cluster(cluster) => match cluster.get().await {
                Ok(conn) => run_all(&conn, &evals).await,
                Err(error) => return reads.iter().map(|_| Err(error.clone())).collect(),
            },
        };
        replies
            .into_iter()
            .zip(reads)
            .map(|(reply, (_, after))| match reply {
                Ok(Ok(reply)) => parse_history(reply, *after, usize::MAX)
                    .ok_or_else(|| unavailable("unexpected history reply")),
                Ok(Err(e)) => Err(unavailable(format!("history read: {e}"))),
                Err(_) => Err(unavailable("history read timed out")),
            })
            .collect()
    }

    async fn read_tip(&self, channel: &Channel) -> Result<StreamId, BrokerError> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(channel.history_key(&self.config.prefix))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
        let reply: Value = self.query(Request::Cmd(&cmd), "tip read").await?;
        match reply {
            Value::Array(entries) => Ok(entries
                .into_iter()
                .filter_map(|e| parse_entry_id(&e))
                .next()
                .unwrap_or(StreamId::ZERO)),
            _ => Err(unavailable("unexpected XREVRANGE reply")),
        }
    }

    async fn read_before(
        &self,
        channel: &Channel,
        before: Option<StreamId>,
        limit: usize,
    ) -> Result<Page, BrokerError> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(channel.history_key(&self.config.prefix));
        match before {
            Some(before) => cmd.arg(format!("({before}")),
            None => cmd.arg("+"),
        };
        // One more than the page: its presence says whether there is more.
        cmd.arg("-").arg("COUNT").arg(limit.saturating_add(1));
        let reply: StreamRangeReply = self.query(Request::Cmd(&cmd), "history page").await?;
        let more = reply.ids.len() > limit;
        let entries = reply.ids.iter().take(limit).filter_map(entry_of).collect();
        Ok(Page { entries, more })
    }

    async fn write_revocation(
        &self,
        user: &Channel,
        before: u64,
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(user.revocation_key(&self.config.prefix))
            .arg(before)
            .arg("EX")
            .arg(ttl.as_secs().max(1));
        self.query::<()>(Request::Cmd(&cmd), "revoke").await
    }

    async fn read_revocation(&self, user: &Channel) -> Result<Option<u64>, BrokerError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(user.revocation_key(&self.config.prefix));
        // Anything but a number was not written by Herald: no revocation.
        let value: Option<String> = self.query(Request::Cmd(&cmd), "revocation read").await?;
        Ok(value.and_then(|v| v.parse().ok()))
    }

    async fn write_presence(
        &self,
        node: &str,
        changes: &[(Channel, usize)],
        ttl: Duration,
    ) -> Result<bool, BrokerError> {
        let prefix = &self.config.prefix;
        let table = presence_table_key(prefix, node);
        let ttl_ms = ttl.as_millis().clamp(1, i64::MAX as u128) as i64;
        // The first PEXPIRE answers whether the table was still there; the
        // commands of a batch all name one key, so they share a slot.
        let mut alive = true;
        let mut batches = changes.chunks(PRESENCE_BATCH).peekable();
        let first: &[(Channel, usize)] = batches.peek().copied().unwrap_or(&[]);
        for (i, batch) in std::iter::once(first).chain(batches.skip(1)).enumerate() {
            let mut pipe = redis::pipe();
            if i == 0 {
                pipe.pexpire(&table, ttl_ms);
            }
            for (channel, count) in batch {
                if *count == 0 {
                    pipe.hdel(&table, channel.as_str()).ignore();
                } else {
                    pipe.hset(&table, channel.as_str(), *count).ignore();
                }
            }
            pipe.pexpire(&table, ttl_ms).ignore();
            if i == 0 {
                let (found,): (i64,) = self.query(Request::Pipe(&pipe), "presence report").await?;
                alive = found == 1;
            } else {
                self.query::<()>(Request::Pipe(&pipe), "presence report")
                    .await?;
            }
        }
        // The live nodes, for readers; nodes gone for a minute are pruned.
        let now = envelope::now_ms() as i64;
        let nodes = presence_nodes_key(prefix);
        let mut pipe = redis::pipe();
        pipe.zadd(&nodes, node, now.saturating_add(ttl_ms))
            .ignore()
            .zrembyscore(&nodes, "-inf", now - 60_000)
            .ignore();
        self.query::<()>(Request::Pipe(&pipe), "presence report")
            .await?;
        Ok(alive)
    }

    async fn read_presence(&self, channel: &Channel) -> Result<Presence, BrokerError> {
        let prefix = &self.config.prefix;
        let mut live = redis::cmd("ZRANGEBYSCORE");
        live.arg(presence_nodes_key(prefix))
            .arg(format!("({}", envelope::now_ms()))
            .arg("+inf");
        let nodes: Vec<String> = self.query(Request::Cmd(&live), "presence read").await?;
        let mut presence = Presence::default();
        for node in nodes.iter().take(MAX_PRESENCE_NODES) {
            let mut cmd = redis::cmd("HGET");
            cmd.arg(presence_table_key(prefix, node))
                .arg(channel.as_str());
            let count: Option<String> = self.query(Request::Cmd(&cmd), "presence read").await?;
            // Anything but a count (someone else wrote the key) counts as 0.
            presence.add(count.and_then(|c| c.parse().ok()).unwrap_or(0));
        }
        Ok(presence)
    }
}

/// A node's presence table: `<prefix>:{presence:<node>}` (its own slot).
fn presence_table_key(prefix: &str, node: &str) -> String {
    format!("{prefix}:{{presence:{node}}}")
}

/// The live nodes: `<prefix>:{presence}:nodes`.
fn presence_nodes_key(prefix: &str) -> String {
    format!("{prefix}:{{presence}}:nodes")
}

/// Turns the history script's reply into [`History`]; `None` if malformed.
fn parse_history(reply: Value, after: StreamId, limit: usize) -> Option<History> {
    let Value::Array(parts) = reply else {
        return None;
    };
    let mut parts = parts.into_iter();
    match parts.next()? {
        Value::Int(0) => {
            // No stream: fine for a cursor that had seen nothing, a gap for
            // one that had (the history expired or Redis lost it).
            return Some(if after == StreamId::ZERO {
                History::Entries(Vec::new())
            } else {
                History::Gap
            });
        }
        Value::Int(1) => {}
        _ => return None,
    }
    let deleted: StreamId = text(parts.next()?)?.parse().ok()?;
    let last: StreamId = text(parts.next()?)?.parse().ok()?;
    let first: StreamId = text(parts.next()?)?.parse().ok()?;
    let trimmed = matches!(parts.next()?, Value::Int(1));
    let Value::Array(raw) = parts.next()? else {
        return None;
    };
    // A position before the first kept entry of a stream that lost entries
    // may have missed some: a gap. (When the position is itself the newest
    // trimmed entry this resets needlessly; Redis does not record trims
    // precisely enough to tell.)
    if deleted > after || after > last || (trimmed && after < first) {
        return Some(History::Gap);
    }
    let raw: StreamRangeReply = redis::from_redis_value(Value::Array(raw)).ok()?;
    let entries: Vec<Entry> = raw.ids.iter().filter_map(entry_of).collect();
    if entries.len() > limit {
        return Some(History::Gap);
    }
    Some(History::Entries(entries))
}

fn text(value: Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// The id of one stream entry `[id, fields]`.
fn parse_entry_id(entry: &Value) -> Option<StreamId> {
    let Value::Array(pair) = entry else {
        return None;
    };
    match pair.first()? {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// One stream entry (fields `e`: event, `d`: data, as the publish script
/// writes them) → its id and envelope JSON. Entries whose data is not JSON
/// are skipped (counted as invalid).
fn entry_of(entry: &redis::streams::StreamId) -> Option<Entry> {
    let id: StreamId = entry.id.parse().ok()?;
    let event = entry.get::<String>("e").filter(|e| !e.is_empty());
    let data = entry
        .get::<String>("d")
        .and_then(|d| RawValue::from_string(d).ok());
    let Some(data) = data else {
        // Not from the publish script (it checks data is JSON): skip it.
        metrics::get().invalid.increment(1);
        return None;
    };
    let payload = envelope::encode(Some(id), event.as_deref(), &data, id.ms);
    Some((id, Bytes::from(payload)))
}

impl Store for RedisStore {
    fn publish<'a>(
        &'a self,
        channel: &'a Channel,
        event: Option<&'a str>,
        data: &'a RawValue,
    ) -> BoxFuture<'a, Result<StreamId, BrokerError>> {
        Box::pin(self.run_publish(channel, event, data.get()))
    }

    fn history_after<'a>(
        &'a self,
        channel: &'a Channel,
        after: StreamId,
        limit: usize,
    ) -> BoxFuture<'a, Result<History, BrokerError>> {
        Box::pin(self.read_history(channel, after, limit))
    }

    fn histories_after<'a>(
        &'a self,
        reads: &'a [(Channel, StreamId)],
    ) -> BoxFuture<'a, Vec<Result<History, BrokerError>>> {
        Box::pin(self.read_histories(reads))
    }

    fn tip<'a>(&'a self, channel: &'a Channel) -> BoxFuture<'a, Result<StreamId, BrokerError>> {
        Box::pin(self.read_tip(channel))
    }

    fn history_before<'a>(
        &'a self,
        channel: &'a Channel,
        before: Option<StreamId>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Page, BrokerError>> {
        Box::pin(self.read_before(channel, before, limit))
    }

    fn revoke<'a>(
        &'a self,
        user: &'a Channel,
        before: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(self.write_revocation(user, before, ttl))
    }

    fn revoked_before<'a>(
        &'a self,
        user: &'a Channel,
    ) -> BoxFuture<'a, Result<Option<u64>, BrokerError>> {
        Box::pin(self.read_revocation(user))
    }

    fn report_presence<'a>(
        &'a self,
        node: &'a str,
        changes: &'a [(Channel, usize)],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        Box::pin(self.write_presence(node, changes, ttl))
    }

    fn presence<'a>(
        &'a self,
        channel: &'a Channel,
    ) -> BoxFuture<'a, Result<Presence, BrokerError>> {
        Box::pin(self.read_presence(channel))
    }
}

/// A subscription change, from the broker handle to its pub/sub task.
pub(super) enum Command {
    /// Start receiving the channel; the sender is told once it is live.
    Subscribe(Channel, oneshot::Sender<()>),
    /// Stop receiving the channel.
    Unsubscribe(Channel),
}

/// A node's Redis broker: [`RedisStore`] plus the pub/sub task (one
/// connection to one Redis, or sharded pub/sub on a Redis Cluster: see
/// [`super::cluster`]).
pub(crate) struct RedisBroker {
    store: RedisStore,
    commands: mpsc::UnboundedSender<Command>,
    /// True while the pub/sub connection is up and its probe comes back.
    connected: Arc<AtomicBool>,
    /// Stops the pub/sub task when the broker is dropped.
    stop: CancellationToken,
}

impl RedisBroker {
    /// Starts the pub/sub task; messages go to `deliveries`. Returns at
    /// once: with Redis down the node starts unready and keeps retrying.
    pub(crate) fn start(
        config: RedisConfig,
        node_id: &str,
        deliveries: Deliveries,
    ) -> Result<Self, BrokerError> {
        let client = redis::Client::open(config.url.as_str()).map_err(unavailable)?;
        let store = RedisStore::new(config)?;
        let probe_key = format!("{}:probe:{node_id}", store.config.prefix);
        Ok(RedisBroker::launch(store, deliveries, |store, subs| {
            PubSubTask {
                client,
                store,
                probe_key,
                subs,
            }
        }))
    }

    /// A broker over `store` whose pub/sub task `task` builds (the
    /// single-Redis one or the sharded cluster one).
    pub(super) fn launch<T: Sessions + 'static>(
        store: RedisStore,
        deliveries: Deliveries,
        task: impl FnOnce(RedisStore, Subscriptions) -> T,
    ) -> Self {
        let (commands, receiver) = mpsc::unbounded_channel();
        let connected = Arc::new(AtomicBool::new(false));
        let stop = CancellationToken::new();
        let subs = Subscriptions::new(receiver, deliveries, connected.clone());
        tokio::spawn(run_sessions(task(store.clone(), subs), stop.clone()));
        RedisBroker {
            store,
            commands,
            connected,
            stop,
        }
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Store for RedisBroker {
    fn publish<'a>(
        &'a self,
        channel: &'a Channel,
        event: Option<&'a str>,
        data: &'a RawValue,
    ) -> BoxFuture<'a, Result<StreamId, BrokerError>> {
        self.store.publish(channel, event, data)
    }

    fn history_after<'a>(
        &'a self,
        channel: &'a Channel,
        after: StreamId,
        limit: usize,
    ) -> BoxFuture<'a, Result<History, BrokerError>> {
        self.store.history_after(channel, after, limit)
    }

    fn histories_after<'a>(
        &'a self,
        reads: &'a [(Channel, StreamId)],
    ) -> BoxFuture<'a, Vec<Result<History, BrokerError>>> {
        self.store.histories_after(reads)
    }

    fn tip<'a>(&'a self, channel: &'a Channel) -> BoxFuture<'a, Result<StreamId, BrokerError>> {
        self.store.tip(channel)
    }

    fn history_before<'a>(
        &'a self,
        channel: &'a Channel,
        before: Option<StreamId>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Page, BrokerError>> {
        self.store.history_before(channel, before, limit)
    }

    fn revoke<'a>(
        &'a self,
        user: &'a Channel,
        before: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        self.store.revoke(user, before, ttl)
    }

    fn revoked_before<'a>(
        &'a self,
        user: &'a Channel,
    ) -> BoxFuture<'a, Result<Option<u64>, BrokerError>> {
        self.store.revoked_before(user)
    }

    fn report_presence<'a>(
        &'a self,
        node: &'a str,
        changes: &'a [(Channel, usize)],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        self.store.report_presence(node, changes, ttl)
    }

    fn presence<'a>(
        &'a self,
        channel: &'a Channel,
    ) -> BoxFuture<'a, Result<Presence, BrokerError>> {
        self.store.presence(channel)
    }
}

impl Broker for RedisBroker {
    fn subscribe(&self, channel: &Channel) -> BoxFuture<'static, Result<(), BrokerError>> {
        let (ack, live) = oneshot::channel();
        let sent = self.commands.send(Command::Subscribe(channel.clone(), ack));
        Box::pin(async move {
            sent.map_err(|_| BrokerError::Closed)?;
            live.await.map_err(|_| BrokerError::Closed)
        })
    }

    fn unsubscribe(&self, channel: &Channel) {
        let _ = self.commands.send(Command::Unsubscribe(channel.clone()));
    }

    fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

/// What a pub/sub task keeps across its sessions (connections): the
/// commands it takes, where messages go, and the channels it must hold.
/// Shared by the single-Redis task and the cluster one.
pub(super) struct Subscriptions {
    pub(super) commands: mpsc::UnboundedReceiver<Command>,
    pub(super) deliveries: Deliveries,
    /// Readiness: true while every subscription is live.
    connected: Arc<AtomicBool>,
    /// Channels this node needs; resubscribed after every reconnect.
    pub(super) desired: HashSet<Channel>,
    /// Subscribers waiting for the connection to come (back) up.
    pub(super) waiting: Vec<oneshot::Sender<()>>,
}

impl Subscriptions {
    /// Answers a subscriber once its subscribe went through (`done` is the
    /// command's outcome); otherwise it waits for the next (re)connect.
    /// Returns the outcome, for the session to end on a failure.
    pub(super) fn settle<T, E>(
        &mut self,
        done: Result<Result<(), E>, T>,
        ack: oneshot::Sender<()>,
    ) -> Result<Result<(), E>, T> {
        if matches!(done, Ok(Ok(()))) {
            let _ = ack.send(());
        } else {
            self.waiting.push(ack);
        }
        done
    }

    pub(super) fn new(
        commands: mpsc::UnboundedReceiver<Command>,
        deliveries: Deliveries,
        connected: Arc<AtomicBool>,
    ) -> Self {
        Subscriptions {
            commands,
            deliveries,
            connected,
            desired: HashSet::from([Channel::broadcast(), Channel::control()]),
            waiting: Vec::new(),
        }
    }

    pub(super) fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
        metrics::get()
            .redis_connected
            .set(if up { 1.0 } else { 0.0 });
    }

    /// Every subscription is live (again): readiness on, waiters told, and,
    /// after a reconnect (`session > 0`), the hub asked to refill each
    /// active channel from its stream after the last id it dispatched.
    /// `Err` when the hub is gone.
    pub(super) fn went_live(&mut self, session: u64, channels: usize) -> Result<(), ()> {
        self.set_connected(true);
        for ack in self.waiting.drain(..) {
            let _ = ack.send(());
        }
        if session > 0 {
            metrics::get().redis_reconnects.increment(1);
            tracing::info!(channels, "redis pub/sub reconnected; refilling gaps");
            return self.deliveries.send(Delivery::Resubscribed).map_err(drop);
        }
        tracing::info!(channels, "redis pub/sub subscribed");
        Ok(())
    }

    fn apply_offline(&mut self, command: Command) {
        match command {
            Command::Subscribe(channel, ack) => {
                self.desired.insert(channel);
                self.waiting.push(ack);
            }
            Command::Unsubscribe(channel) => {
                if !channel.is_permanent() {
                    self.desired.remove(&channel);
                }
            }
        }
    }
}

/// Why a live pub/sub session ended.
pub(super) enum Ended {
    /// The broker was dropped or the node is stopping.
    Stop,
    /// Connection lost, a command failed, or the probe went missing.
    Lost(String),
    /// Everything still answers, but the subscriptions must move (a Redis
    /// Cluster changed shape): reconnect at once, staying ready.
    Reshaped(String),
}

/// A pub/sub task: connects, subscribes, relays until the connection is
/// lost; [`run_sessions`] does the reconnecting around it.
pub(super) trait Sessions: Send {
    fn subscriptions(&mut self) -> &mut Subscriptions;

    /// One connection's life; also says whether it got subscribed.
    fn session(
        &mut self,
        number: u64,
        stop: &CancellationToken,
    ) -> impl std::future::Future<Output = (Ended, bool)> + Send;
}

/// Runs sessions until `stop`, reconnecting with capped, jittered backoff
/// and keeping the desired set current while disconnected.
pub(super) async fn run_sessions(mut task: impl Sessions, stop: CancellationToken) {
    let mut failures: u32 = 0;
    let mut sessions: u64 = 0;
    loop {
        let (ended, subscribed) = tokio::select! {
            _ = stop.cancelled() => return,
            attempt = task.session(sessions, &stop) => attempt,
        };
        if subscribed {
            sessions += 1;
            failures = 0;
        }
        match ended {
            Ended::Stop => return,
            Ended::Reshaped(reason) => {
                // Nothing is down: no backoff beyond a breath, so a burst
                // of changes cannot spin, and readiness stays on (the
                // refill after the new session covers the moment between).
                tracing::info!(%reason, "redis cluster changed shape; resubscribing");
            }
            Ended::Lost(reason) => {
                task.subscriptions().set_connected(false);
                if failures == 0 {
                    tracing::warn!(%reason, "redis pub/sub lost; reconnecting");
                } else {
                    tracing::debug!(%reason, failures, "redis pub/sub still down");
                }
                failures += 1;
            }
        }
        let delay = backoff(failures);
        let wake = Instant::now() + delay;
        // Keep taking commands while waiting, so the desired set stays
        // current and nothing queues up unboundedly.
        let subscriptions = task.subscriptions();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(wake) => break,
                command = subscriptions.commands.recv() => match command {
                    Some(command) => subscriptions.apply_offline(command),
                    None => return,
                },
            }
        }
    }
}

/// Owns the pub/sub connection. Everything about subscriptions happens on
/// this one task, so there is no lock and no reordering.
struct PubSubTask {
    client: redis::Client,
    store: RedisStore,
    /// This node's probe channel (outside Herald's channel namespace).
    probe_key: String,
    subs: Subscriptions,
}

impl Sessions for PubSubTask {
    fn subscriptions(&mut self) -> &mut Subscriptions {
        &mut self.subs
    }

    async fn session(&mut self, number: u64, stop: &CancellationToken) -> (Ended, bool) {
        match self.connect(number).await {
            Ok((sink, stream)) => (self.relay(sink, stream, stop).await, true),
            Err(ended) => (ended, false),
        }
    }
}

impl PubSubTask {
    async fn connect(
        &mut self,
        number: u64,
    ) -> Result<(redis::aio::PubSubSink, redis::aio::PubSubStream), Ended> {
        let prefix = self.store.config.prefix.clone();
        let connect = tokio::time::timeout(COMMAND_TIMEOUT, self.client.get_async_pubsub());
        let pubsub = match connect.await {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(e)) => return Err(Ended::Lost(e.to_string())),
            Err(_) => return Err(Ended::Lost("connect timed out".into())),
        };
        let (mut sink, stream) = pubsub.split();
        let mut keys: Vec<String> = self
            .subs
            .desired
            .iter()
            .map(|c| c.pubsub_key(&prefix))
            .collect();
        keys.push(self.probe_key.clone());
        match tokio::time::timeout(COMMAND_TIMEOUT, sink.subscribe(&keys)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Ended::Lost(e.to_string())),
            Err(_) => return Err(Ended::Lost("subscribe timed out".into())),
        }
        // Everything missed while down is in the streams: the hub reads
        // each active channel after the last id it dispatched.
        if self.subs.went_live(number, keys.len()).is_err() {
            return Err(Ended::Stop);
        }
        Ok((sink, stream))
    }

    async fn relay(
        &mut self,
        mut sink: redis::aio::PubSubSink,
        mut stream: redis::aio::PubSubStream,
        stop: &CancellationToken,
    ) -> Ended {
        let prefix = self.store.config.prefix.clone();
        let interval = self.store.config.probe_interval;
        let mut probe = tokio::time::interval_at(Instant::now() + interval, interval);
        // The probe sent last and not yet seen back.
        let mut outstanding: Option<(u64, Instant)> = None;
        let mut probe_seq: u64 = 0;
        // When anything last arrived: a connection still delivering is slow
        // (the node is behind on a backlog), not silent.
        let mut last_message = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ended::Stop,
                message = stream.next() => {
                    let Some(message) = message else {
                        return Ended::Lost("connection closed".into());
                    };
                    last_message = Instant::now();
                    let key = message.get_channel_name();
                    if key == self.probe_key {
                        let seen: Option<u64> = std::str::from_utf8(message.get_payload_bytes())
                            .ok()
                            .and_then(|s| s.parse().ok());
                        if outstanding.is_some_and(|(seq, _)| Some(seq) == seen) {
                            outstanding = None;
                        }
                        continue;
                    }
                    let Some(channel) = Channel::from_pubsub_key(&prefix, key) else {
                        metrics::get().invalid.increment(1);
                        continue;
                    };
                    let payload = Bytes::copy_from_slice(message.get_payload_bytes());
                    if self.subs.deliveries.send(Delivery::Message { channel, payload }).is_err() {
                        return Ended::Stop;
                    }
                }
                command = self.subs.commands.recv() => {
                    let Some(command) = command else { return Ended::Stop };
                    let mut command = command;
                    if let Command::Subscribe(channel, ack) = command {
                        // Every subscribe already queued goes out in one
                        // SUBSCRIBE: one round trip each made a node at a
                        // few thousand new connections per second wait
                        // on Redis channel by channel (and relay nothing
                        // meanwhile) until one took over COMMAND_TIMEOUT
                        // and the reconnect resubscribed everything.
                        let mut keys = Vec::new();
                        let mut acks = vec![ack];
                        let mut next = None;
                        let mut add = |channel: Channel, desired: &mut HashSet<Channel>| {
                            let key = channel.pubsub_key(&prefix);
                            if desired.insert(channel) {
                                keys.push(key);
                            }
                        };
                        add(channel, &mut self.subs.desired);
                        while acks.len() < SUBSCRIBE_BATCH {
                            match self.subs.commands.try_recv() {
                                Ok(Command::Subscribe(channel, ack)) => {
                                    add(channel, &mut self.subs.desired);
                                    acks.push(ack);
                                }
                                Ok(other) => {
                                    next = Some(other);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        let done = if keys.is_empty() {
                            Ok(Ok(()))
                        } else {
                            tokio::time::timeout(COMMAND_TIMEOUT, sink.subscribe(&keys)).await
                        };
                        let ok = matches!(done, Ok(Ok(())));
                        for ack in acks {
                            let _ = self.subs.settle(if ok { Ok(Ok::<(), ()>(())) } else { Err(()) }, ack);
                        }
                        match done {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => return Ended::Lost(e.to_string()),
                            Err(_) => return Ended::Lost("(un)subscribe timed out".into()),
                        }
                        match next {
                            Some(c) => command = c,
                            None => continue,
                        }
                    }
                    let result = match command {
                        Command::Subscribe(channel, ack) => {
                            // (Batched above; a subscribe that follows an
                            // unsubscribe in the queue is simply the next
                            // command.)
                            let key = channel.pubsub_key(&prefix);
                            let fresh = self.subs.desired.insert(channel);
                            let done = if fresh {
                                tokio::time::timeout(COMMAND_TIMEOUT, sink.subscribe(&key)).await
                            } else {
                                Ok(Ok(()))
                            };
                            self.subs.settle(done, ack)
                        }
                        Command::Unsubscribe(channel) => {
                            if !channel.is_permanent() && self.subs.desired.remove(&channel) {
                                let key = channel.pubsub_key(&prefix);
                                tokio::time::timeout(COMMAND_TIMEOUT, sink.unsubscribe(&key)).await
                            } else {
                                Ok(Ok(()))
                            }
                        }
                    };
                    match result {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Ended::Lost(e.to_string()),
                        Err(_) => return Ended::Lost("(un)subscribe timed out".into()),
                    }
                }
                _ = probe.tick() => {
                    if let Some((_, sent)) = outstanding {
                        // Silent: nothing at all since the probe went out.
                        // A busy node reading a backlog keeps receiving and
                        // gets longer, up to SLOW_PROBE_LIMIT probes:
                        // reconnecting would only add a resubscribe and a
                        // refill of every channel to its load.
                        let silent = last_message <= sent && sent.elapsed() >= interval / 2;
                        if silent || sent.elapsed() >= interval * SLOW_PROBE_LIMIT {
                            self.subs.set_connected(false);
                            return Ended::Lost(if silent {
                                "probe not delivered: pub/sub is silent".into()
                            } else {
                                "probe not delivered: pub/sub is too far behind".into()
                            });
                        }
                        continue;
                    }
                    probe_seq += 1;
                    outstanding = Some((probe_seq, Instant::now()));
                    // Sent from its own task so a slow Redis never stalls
                    // the relay; if it fails, the probe simply does not
                    // come back and the next tick ends this session.
                    let (store, key) = (self.store.clone(), self.probe_key.clone());
                    tokio::spawn(async move {
                        if let Err(e) = send_probe(&store, &key, probe_seq).await {
                            tracing::debug!(error = %e, "probe publish failed");
                        }
                    });
                }
            }
        }
    }
}

/// Publishes probe `seq` on `key` (with `SPUBLISH` on a cluster, so it
/// goes through the shard that owns the key's slot).
pub(super) async fn send_probe(store: &RedisStore, key: &str, seq: u64) -> Result<(), BrokerError> {
    let command = match store.backend {
        Backend::Single(_) => "PUBLISH",
        Backend::Cluster(_) => "SPUBLISH",
    };
    let mut cmd = redis::cmd(command);
    cmd.arg(key).arg(seq);
    store
        .query::<i64>(Request::Cmd(&cmd), "probe")
        .await
        .map(drop)
}

/// Capped exponential backoff with full jitter on the upper half.
pub(super) fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_MIN
        .saturating_mul(1 << failures.min(10))
        .min(BACKOFF_MAX);
    let half = exp / 2;
    half + Duration::from_millis(rand::random_range(0..=half.as_millis() as u64))
}
