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
//! [`redis::RedisBroker`] (any number of nodes sharing Redis).

pub mod memory;
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
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a broker hands to the hub.
#[derive(Debug)]
pub enum Delivery {
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
pub type Deliveries = mpsc::UnboundedSender<Delivery>;

/// One history entry: its id and envelope payload.
pub type Entry = (StreamId, Bytes);

/// The result of reading history after a position.
#[derive(Debug)]
pub enum History {
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
#[derive(Debug, thiserror::Error)]
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
pub trait Store: Send + Sync + 'static {
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
}

/// The backbone a node publishes to and subscribes through.
pub trait Broker: Store {
    /// Starts receiving `channel`. The request is queued before this returns,
    /// so calls made in order take effect in order; the future resolves once
    /// the subscription is live (a message published after that is delivered).
    fn subscribe(&self, channel: &Channel) -> BoxFuture<'static, Result<(), BrokerError>>;

    /// Stops receiving `channel` (queued in order like [`Broker::subscribe`]).
    fn unsubscribe(&self, channel: &Channel);

    /// Whether the broker is connected (readiness).
    fn is_connected(&self) -> bool;
}
