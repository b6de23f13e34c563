//! The pub/sub + history backbone behind one trait.
//!
//! A [`Broker`] stores each published message in the channel's bounded
//! history (assigning its [`StreamId`]), delivers it to every node subscribed
//! to the channel, and reads history back for replay. It knows nothing of
//! connections: the hub tells it which channels this node needs, and it hands
//! every message it receives, as raw envelope bytes, to the [`Deliveries`]
//! sender it was built with.
//!
//! Implementations: [`memory::MemoryBroker`] (embedded, one node) and
//! [`redis::RedisBroker`] (any number of nodes sharing Redis, or a Redis
//! Cluster with sharded pub/sub: [`cluster`]).

pub(crate) mod cluster;
pub(crate) mod memory;
pub mod redis;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::channel::Channel;
use crate::envelope::StreamId;

/// A boxed future, so the trait stays object safe.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a broker hands to the hub.
#[derive(Debug)]
pub(crate) enum Delivery {
    /// A payload received on a channel (not yet validated).
    Message {
        /// The channel it arrived on.
        channel: Channel,
        /// The envelope JSON as received.
        payload: Bytes,
    },
    /// The broker lost and regained its subscriptions (Redis reconnect):
    /// the hub must refill every active channel's gap from history.
    Resubscribed,
}

/// The sending half the broker delivers into. Unbounded on purpose: its only
/// consumer (the hub's dispatch task) never waits on anything (every send to
/// a connection is a `try_send`), so the queue grows only while the CPU is
/// saturated, and the alternatives are worse: dropping loses messages and
/// blocking the Redis reader makes Redis cut the subscriber connection.
pub(crate) type Deliveries = mpsc::UnboundedSender<Delivery>;

/// One history entry: its id and envelope payload.
pub type Entry = (StreamId, Bytes);

/// The result of reading history after a position.
#[derive(Debug)]
pub(crate) enum History {
    /// Every entry after the position, oldest first (possibly none).
    Entries(Vec<Entry>),
    /// Entries after the position were trimmed or expired: replay would have
    /// a gap, so the client must refetch its state.
    Gap,
}

/// A page of history read newest first ([`Store::history_before`]).
#[derive(Debug, Default)]
pub struct Page {
    /// Entries, newest first.
    pub entries: Vec<Entry>,
    /// Whether older entries remain before the last one.
    pub more: bool,
}

/// Broker failures; all of them are transient from a client's view (503).
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// Redis unreachable or a command failed.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker has shut down.
    #[error("broker closed")]
    Closed,
}

/// Publishing and history: all a publisher needs (see [`Broker`] for
/// subscriptions).
pub(crate) trait Store: Send + Sync + 'static {
    /// Appends to the channel's history (trimmed to the history size, expiring
    /// after the history TTL) and publishes the envelope carrying the new id.
    /// `data` is JSON text.
    fn publish<'a>(
        &'a self,
        channel: &'a Channel,
        event: Option<&'a str>,
        data: &'a RawValue,
    ) -> BoxFuture<'a, Result<StreamId, BrokerError>>;

    /// Entries after `after`, at most `limit` (a larger backlog is a gap).
    fn history_after<'a>(
        &'a self,
        channel: &'a Channel,
        after: StreamId,
        limit: usize,
    ) -> BoxFuture<'a, Result<History, BrokerError>>;

    /// Every entry after each channel's position (no limit: a refill after
    /// a reconnect), answered in the order asked. Redis: the history script
    /// once per channel, all of them in flight at once on one connection,
    /// so many channels cost a few round trips rather than one each.
    /// Callers keep `reads` to a bounded batch: the answers are all held.
    fn histories_after<'a>(
        &'a self,
        reads: &'a [(Channel, StreamId)],
    ) -> BoxFuture<'a, Vec<Result<History, BrokerError>>> {
        Box::pin(async move {
            let mut answers = Vec::with_capacity(reads.len());
            for (channel, after) in reads {
                answers.push(self.history_after(channel, *after, usize::MAX).await);
            }
            answers
        })
    }

    /// The id of the channel's newest entry, [`StreamId::ZERO`] if none.
    fn tip<'a>(&'a self, channel: &'a Channel) -> BoxFuture<'a, Result<StreamId, BrokerError>>;

    /// At most `limit` entries older than `before` (all entries when
    /// `None`), newest first: one page of `GET /history`. Redis: one
    /// `XREVRANGE key (before - COUNT limit+1` on the channel's stream.
    fn history_before<'a>(
        &'a self,
        channel: &'a Channel,
        before: Option<StreamId>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Page, BrokerError>>;

    /// Refuses the tokens of `user` (a `user:` channel) issued before
    /// `before` (seconds since the epoch), for `ttl`. Redis: one
    /// `SET <prefix>:{user:<id>}:revoked <before> EX <ttl>`.
    fn revoke<'a>(
        &'a self,
        user: &'a Channel,
        before: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// The cutoff of `user`'s revocation while it lasts. Redis: one `GET`
    /// of the key [`Store::revoke`] sets.
    fn revoked_before<'a>(
        &'a self,
        user: &'a Channel,
    ) -> BoxFuture<'a, Result<Option<u64>, BrokerError>>;

    /// Applies node `node`'s changed connection counts (a count of 0
    /// removes the channel from its table) and keeps the node's table alive
    /// for `ttl` more. Returns `false` if the table had already lapsed (the
    /// node was cut off for longer than `ttl`, or Redis lost it): the caller
    /// then reports every count again. Redis: one hash per node,
    /// `<prefix>:{presence:<node>}` (channel → count: `HSET`/`HDEL`, then
    /// `PEXPIRE`), and the live nodes in the sorted set
    /// `<prefix>:{presence}:nodes` (node → lapses at, ms). So a node's cost
    /// is its changes plus three commands per refresh, not a write per
    /// channel it holds.
    fn report_presence<'a>(
        &'a self,
        node: &'a str,
        changes: &'a [(Channel, usize)],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, BrokerError>>;

    /// The channel's connections and nodes holding any, over every node
    /// whose table is still alive. Redis: the live nodes from the sorted
    /// set, then one `HGET` of each node's table.
    fn presence<'a>(&'a self, channel: &'a Channel)
        -> BoxFuture<'a, Result<Presence, BrokerError>>;
}

/// Cluster-wide presence on a channel ([`Store::presence`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Presence {
    /// Open connections, over all nodes.
    pub connections: usize,
    /// Nodes holding at least one of them.
    pub nodes: usize,
}

impl Presence {
    /// Adds one live node's count (a node with 0 holds none).
    pub(crate) fn add(&mut self, count: usize) {
        if count > 0 {
            self.connections = self.connections.saturating_add(count);
            self.nodes += 1;
        }
    }
}

/// The backbone a node publishes to and subscribes through.
pub(crate) trait Broker: Store {
    /// Starts receiving `channel`. The request is queued before this returns,
    /// so calls made in order take effect in order; the future resolves once
    /// the subscription is live (a message published after that is delivered).
    fn subscribe(&self, channel: &Channel) -> BoxFuture<'static, Result<(), BrokerError>>;

    /// Stops receiving `channel` (queued in order like [`Broker::subscribe`]).
    fn unsubscribe(&self, channel: &Channel);

    /// Whether the broker is connected (readiness).
    fn is_connected(&self) -> bool;
}
