//! The node's local fanout: channel → connections, with refcounted broker
//! subscriptions.
//!
//! One dispatch task receives every message the broker delivers, validates
//! and encodes it once into a shared [`Frame`], and `try_send`s an `Arc` of it
//! into each subscribed connection's bounded queue. A full queue marks that
//! connection slow and cuts it; nobody else waits. A channel with more
//! connections than [`FANOUT_CHUNK`] is reached a chunk at a time, the task
//! yielding in between, so a unicast never queues behind a whole broadcast
//! (order holds within each channel, not across). The first connection on a
//! channel subscribes the broker, the last one to leave unsubscribes it.
//!
//! The state sits behind a std mutex that is never held across an `.await`;
//! broker (un)subscribe requests are queued while it is held, so the broker
//! sees them in the same order as the refcount changes.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt as _;
use tokio::sync::{mpsc, watch};

use crate::broker::{Broker, BrokerError, Delivery, History};
use crate::channel::Channel;
use crate::envelope::StreamId;
use crate::frame::Frame;
use crate::mailbox::{Mailbox, MailboxRef};
use crate::metrics::{self, CloseReason};

/// Extra attempts at a history read while refilling after a reconnect.
const REFILL_RETRIES: usize = 3;
const REFILL_RETRY_DELAY: Duration = Duration::from_millis(250);
/// Channels whose history one refill round trip reads.
const REFILL_BATCH: usize = 512;

/// A connection refused by a limit.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitError {
    /// `--max-connections` reached (503).
    #[error("node is at its connection limit")]
    Node,
    /// `--max-connections-per-user` reached (429).
    #[error("too many connections for this user")]
    User,
    /// The node is draining (503; the client retries another node).
    #[error("node is draining")]
    Draining,
}

/// Limits and sizes the hub enforces.
#[derive(Debug, Clone)]
pub(crate) struct HubConfig {
    /// Connections per node.
    pub(crate) max_connections: usize,
    /// Connections per user per node.
    pub(crate) max_connections_per_user: usize,
    /// Pending frames per connection before it is cut as slow.
    pub(crate) queue_capacity: usize,
    /// Largest accepted `data`.
    pub(crate) max_payload: usize,
    /// Idle time before a heartbeat comment.
    pub(crate) heartbeat: Duration,
    /// `--max-connection-age`: each connection is retired after this, ±10 %.
    pub(crate) max_connection_age: Option<Duration>,
}

/// Cheap clonable handle to the node's fanout.
#[derive(Clone)]
pub(crate) struct Hub {
    shared: Arc<Shared>,
}

struct Shared {
    /// Channel and user tables. Never held across `.await`.
    state: Mutex<State>,
    broker: Arc<dyn Broker>,
    config: HubConfig,
    next_id: AtomicU64,
    /// Set by [`Hub::drain`]: over how many ms this node's clients should
    /// spread their reconnects (see [`DRAIN_RECONNECTS_PER_SEC`]).
    drain_spread_ms: AtomicU64,
}

/// A draining node asks its clients to come back at about this rate at
/// most (spread by their `retry:`), so the nodes that take them are not
/// hit by all of them at once: at 100,000 connections on 7 nodes, one
/// node's 14,000 clients returning within a few seconds tipped the rest
/// into a reconnect storm (`load/compare --only scale`).
pub(crate) const DRAIN_RECONNECTS_PER_SEC: u64 = 1_000;

#[derive(Default)]
struct State {
    channels: HashMap<Channel, Subscribers>,
    /// Connections per user, for the per-user limit.
    users: HashMap<Arc<str>, usize>,
    /// Every connection, for the sweep and the drain.
    mailboxes: HashMap<u64, MailboxRef>,
    /// Set by [`Hub::drain`]; new connections are refused.
    draining: bool,
    /// Channels whose local count changed since presence last looked
    /// ([`Hub::presence_changes`]), so a report costs the changes, not a
    /// scan of every channel.
    presence_dirty: HashSet<Channel>,
}

/// The broker's answer to a subscription, shared by every connection that
/// arrives while it is pending.
type Answer = watch::Receiver<Option<Result<(), String>>>;

struct Subscribers {
    /// The channel's canonical handle: frames and connections share it, so
    /// comparing them is a pointer check.
    channel: Channel,
    links: HashMap<u64, Link>,
    /// `None` once the subscription is live (most of the time: the watch is
    /// dropped then, as it costs more memory than the rest of the entry).
    pending: Option<Answer>,
    /// Tells this entry apart from an earlier one for the same channel.
    generation: u64,
    /// Newest id dispatched on this node: where a gap refill starts.
    last_id: StreamId,
}

/// A connection as the hub sees it: where its frames go.
type Link = MailboxRef;

impl Hub {
    /// A hub over `broker`; run [`Hub::dispatch_from`] to feed it.
    pub(crate) fn new(broker: Arc<dyn Broker>, config: HubConfig) -> Hub {
        Hub {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                broker,
                config,
                next_id: AtomicU64::new(1),
                drain_spread_ms: AtomicU64::new(0),
            }),
        }
    }

    /// The broker behind this hub.
    pub(crate) fn broker(&self) -> &Arc<dyn Broker> {
        &self.shared.broker
    }

    /// The limits this hub enforces.
    pub(crate) fn config(&self) -> &HubConfig {
        &self.shared.config
    }

    fn state(&self) -> MutexGuard<'_, State> {
        crate::sync::lock(&self.shared.state)
    }

    /// Registers a connection of `user` on `channels`, subscribing the broker
    /// to channels that had no local connection. Its token expires at
    /// `expires_at_ms`.
    pub(crate) fn connect(
        &self,
        user: &str,
        mut channels: Vec<Channel>,
        expires_at_ms: u64,
    ) -> Result<Subscription, LimitError> {
        let config = &self.shared.config;
        let retire_at_ms = config.max_connection_age.map_or(u64::MAX, |age| {
            crate::envelope::now_ms() + jittered_age(age)
        });
        let mailbox = Arc::new(Mailbox::new(
            config.queue_capacity,
            expires_at_ms,
            retire_at_ms,
        ));
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut live = Vec::with_capacity(channels.len());
        let user: Arc<str> = {
            let mut state = self.state();
            if state.draining {
                return Err(LimitError::Draining);
            }
            if state.mailboxes.len() >= config.max_connections {
                return Err(LimitError::Node);
            }
            let user = match state.users.get_key_value(user) {
                Some((_, &n)) if n >= config.max_connections_per_user => {
                    return Err(LimitError::User)
                }
                Some((key, _)) => key.clone(),
                None => Arc::from(user),
            };
            *state.users.entry(user.clone()).or_insert(0) += 1;
            state.mailboxes.insert(id, mailbox.clone());
            for channel in &mut channels {
                let subscribers = state
                    .channels
                    .entry(channel.clone())
                    .or_insert_with(|| self.subscribe(channel));
                *channel = subscribers.channel.clone();
                subscribers.links.insert(id, mailbox.clone());
                if let Some(answer) = &subscribers.pending {
                    live.push(answer.clone());
                }
                state.presence_dirty.insert(channel.clone());
            }
            let m = metrics::get();
            m.connections.set(state.mailboxes.len() as f64);
            m.subscribed_channels.set(state.channels.len() as f64);
            user
        };
        metrics::get().opened.increment(1);
        Ok(Subscription {
            hub: self.clone(),
            id,
            user,
            channels,
            mailbox,
            live,
        })
    }

    /// Starts a broker subscription for a channel entering the table. The
    /// request is queued now (under the state lock); a task waits for it to
    /// go live so every connection on the channel can wait on the answer.
    fn subscribe(&self, channel: &Channel) -> Subscribers {
        let generation = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut request = self.shared.broker.subscribe(channel);
        let pending = match (&mut request).now_or_never() {
            // The embedded broker answers at once: nothing to wait for.
            Some(Ok(())) => None,
            Some(Err(e)) => Some(watch::channel(Some(Err(e.to_string()))).1),
            None => {
                let (done, answer) = watch::channel(None);
                let hub = Arc::downgrade(&self.shared);
                let channel = channel.clone();
                tokio::spawn(async move {
                    let result = request.await.map_err(|e| e.to_string());
                    let live = result.is_ok();
                    let _ = done.send(Some(result));
                    if let (true, Some(shared)) = (live, hub.upgrade()) {
                        Hub { shared }.mark_live(&channel, generation);
                    }
                });
                Some(answer)
            }
        };
        Subscribers {
            channel: channel.clone(),
            links: HashMap::new(),
            pending,
            generation,
            last_id: StreamId::ZERO,
        }
    }

    /// Drops the pending answer of a subscription that went live, unless
    /// the entry was replaced meanwhile.
    fn mark_live(&self, channel: &Channel, generation: u64) {
        if let Some(subscribers) = self.state().channels.get_mut(channel) {
            if subscribers.generation == generation {
                subscribers.pending = None;
            }
        }
    }

    fn disconnect(&self, id: u64, user: &Arc<str>, channels: &[Channel]) {
        let mut state = self.state();
        for channel in channels {
            let emptied = state.channels.get_mut(channel).is_some_and(|subscribers| {
                subscribers.links.remove(&id);
                subscribers.links.is_empty()
            });
            if emptied {
                state.channels.remove(channel);
                self.shared.broker.unsubscribe(channel);
            }
            state.presence_dirty.insert(channel.clone());
        }
        if let Some(count) = state.users.get_mut(user) {
            *count -= 1;
            if *count == 0 {
                state.users.remove(user);
            }
        }
        state.mailboxes.remove(&id);
        let m = metrics::get();
        m.connections.set(state.mailboxes.len() as f64);
        m.subscribed_channels.set(state.channels.len() as f64);
    }

    /// Notes that a connection starts reading `channel` at `id`, so a refill
    /// after a broker reconnect starts no later than that.
    pub(crate) fn note_position(&self, channel: &Channel, id: StreamId) {
        if let Some(subscribers) = self.state().channels.get_mut(channel) {
            subscribers.last_id = subscribers.last_id.max(id);
        }
    }

    /// Number of open connections.
    pub(crate) fn connection_count(&self) -> usize {
        self.state().mailboxes.len()
    }

    /// Whether [`Hub::drain`] was called.
    pub(crate) fn is_draining(&self) -> bool {
        self.state().draining
    }

    /// Starts draining: new connections are refused, and every open one
    /// ends its stream with a `retry:` (after what is already queued).
    pub(crate) fn drain(&self) {
        let mut state = self.state();
        state.draining = true;
        let spread = state.mailboxes.len() as u64 * 1000 / DRAIN_RECONNECTS_PER_SEC;
        self.shared.drain_spread_ms.store(spread, Ordering::Relaxed);
        for mailbox in state.mailboxes.values() {
            mailbox.shut_down();
        }
    }

    /// Raises heartbeat and expiry flags on every connection, about four
    /// times per heartbeat interval (at most once a second), until the hub
    /// is dropped. One task for all connections instead of two timers
    /// each: no timer-wheel work per delivery.
    pub(crate) async fn sweep(self) {
        let heartbeat = self.shared.config.heartbeat;
        let period = (heartbeat / 4).clamp(Duration::from_millis(25), Duration::from_secs(1));
        let heartbeat_ms = heartbeat.as_millis() as u64;
        let shared = Arc::downgrade(&self.shared);
        drop(self);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let now = crate::envelope::now_ms();
            let hub = Hub { shared };
            for mailbox in hub.state().mailboxes.values() {
                mailbox.sweep(now, heartbeat_ms);
            }
        }
    }

    /// Fans out one validated frame to every local connection of its
    /// channel: at once for a small channel; for one with more than
    /// [`FANOUT_CHUNK`] connections (or one still fanning out an earlier
    /// frame, so each connection gets a channel's frames in order) it
    /// queues a job on `fanouts`, which [`Hub::dispatch_from`] works off a
    /// chunk at a time.
    fn dispatch(&self, mut frame: Frame, fanouts: &mut Fanouts) {
        let mut state = self.state();
        let Some(subscribers) = state.channels.get_mut(&frame.channel) else {
            return;
        };
        frame.channel = subscribers.channel.clone();
        let frame = Arc::new(frame);
        if let Some(id) = frame.id {
            subscribers.last_id = subscribers.last_id.max(id);
        }
        if subscribers.links.len() > FANOUT_CHUNK || fanouts.has(&frame.channel) {
            let links = subscribers.links.values().cloned().collect();
            drop(state);
            fanouts.jobs.push_back(Fanout {
                frame,
                links,
                next: 0,
            });
            return;
        }
        for link in subscribers.links.values() {
            deliver(link, &frame);
        }
    }

    /// Closes every local connection of `channel`.
    fn cut_channel(&self, channel: &Channel) {
        if let Some(subscribers) = self.state().channels.get(channel) {
            for link in subscribers.links.values() {
                link.kill();
            }
        }
    }

    /// Runs the dispatch loop until the broker's sender is dropped. What
    /// arrives on the control channel goes to `control` (the node's
    /// [`crate::control`] task), never to a connection.
    ///
    /// Large fanouts go out [`FANOUT_CHUNK`] connections at a time, yielding
    /// in between, so the node's other work (a unicast arriving meanwhile,
    /// reads, accepts) never waits behind a whole 100,000-way broadcast.
    pub(crate) async fn dispatch_from(
        self,
        mut deliveries: mpsc::UnboundedReceiver<Delivery>,
        control: mpsc::Sender<Bytes>,
    ) {
        let max_payload = self.shared.config.max_payload;
        let mut fanouts = Fanouts::default();
        loop {
            let delivery = if fanouts.jobs.is_empty() {
                deliveries.recv().await
            } else if fanouts.jobs.len() < MAX_FANOUTS {
                // What arrived meanwhile first, then the next chunk.
                match deliveries.try_recv() {
                    Ok(delivery) => Some(delivery),
                    Err(mpsc::error::TryRecvError::Empty) => {
                        fanouts.push_chunk();
                        tokio::task::yield_now().await;
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                }
            } else {
                // Bounded: a node that falls this far behind finishes its
                // fanouts before it reads more (its queue is the broker's).
                fanouts.push_chunk();
                tokio::task::yield_now().await;
                continue;
            };
            let Some(delivery) = delivery else {
                fanouts.finish();
                return;
            };
            match delivery {
                Delivery::Message { channel, payload } if channel.is_control() => {
                    if control.try_send(payload).is_err() {
                        tracing::warn!("control queue full; dropped a control message");
                    }
                }
                Delivery::Message { channel, payload } => {
                    metrics::get().received.increment(1);
                    if let Some(frame) = Frame::decode(channel, &payload, max_payload) {
                        self.dispatch(frame, &mut fanouts);
                    }
                }
                Delivery::Resubscribed => self.refill(&mut fanouts).await,
            }
        }
    }

    /// After the broker lost its subscriptions, replays each active
    /// channel's history after the newest id this node dispatched, so what
    /// was published meanwhile is not lost. Connections drop what they
    /// already have (ids at or below their position).
    ///
    /// This runs on the dispatch task (what arrives meanwhile must go out
    /// after the replay, or connections would skip the replayed ids), so
    /// it reads [`REFILL_BATCH`] channels per round trip: one read per
    /// channel took a node holding 14,000 users' channels over 30 s under
    /// load, delivering nothing meanwhile.
    async fn refill(&self, fanouts: &mut Fanouts) {
        let started = Instant::now();
        let active: Vec<(Channel, StreamId)> = self
            .state()
            .channels
            .iter()
            .map(|(c, s)| (c.clone(), s.last_id))
            .collect();
        let max_payload = self.shared.config.max_payload;
        let mut refilled = 0usize;
        for batch in active.chunks(REFILL_BATCH) {
            for (channel, read) in self.read_for_refill(batch).await {
                match read {
                    Ok(History::Entries(entries)) => {
                        for (_, payload) in entries {
                            if let Some(frame) =
                                Frame::decode(channel.clone(), &payload, max_payload)
                            {
                                refilled += 1;
                                self.dispatch(frame, fanouts);
                            }
                        }
                    }
                    // What was missed cannot be replayed here: cut the
                    // channel's connections so each resumes by cursor and
                    // gets `herald.reset` (or its replay, once Redis
                    // answers).
                    Ok(History::Gap) => {
                        tracing::warn!(
                            "history no longer covers a gap after reconnect; cutting its connections"
                        );
                        self.cut_channel(&channel);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "refill after reconnect failed; cutting the channel's connections");
                        self.cut_channel(&channel);
                    }
                }
            }
        }
        tracing::info!(
            channels = active.len(),
            refilled,
            elapsed = ?started.elapsed(),
            "refilled channels after broker reconnect"
        );
    }

    /// The history after each position of `batch`. Redis may still be
    /// loading its data right after a restart: the reads that failed are
    /// tried a few times more before giving up on them.
    async fn read_for_refill(
        &self,
        batch: &[(Channel, StreamId)],
    ) -> Vec<(Channel, Result<History, BrokerError>)> {
        let broker = &self.shared.broker;
        let mut done = Vec::with_capacity(batch.len());
        let mut pending: Vec<(Channel, StreamId)> = batch.to_vec();
        for attempt in 0..=REFILL_RETRIES {
            if attempt > 0 {
                tokio::time::sleep(REFILL_RETRY_DELAY).await;
            }
            let answers = broker.histories_after(&pending).await;
            let mut failed = Vec::new();
            for ((channel, after), answer) in pending.into_iter().zip(answers) {
                match answer {
                    Err(_) if attempt < REFILL_RETRIES => failed.push((channel, after)),
                    answer => done.push((channel, answer)),
                }
            }
            if failed.is_empty() {
                break;
            }
            pending = failed;
        }
        done
    }
}

/// Connections a large fanout reaches before the dispatch task yields.
/// Small, because a unicast arriving meanwhile waits behind the tasks the
/// last chunks woke, and on a node sharing its cores each of those waits
/// many times its own CPU time; not too small, because every other task
/// (reconnects, replays) also runs between two chunks and the broadcast
/// finishes later. `herald-load scale`, 100,000 connections on 7 nodes, one
/// run each, p99 in the steady phase (and during the rolling restart):
/// 512: unicast 133 ms (477), broadcast 1.04 s (1.40); 64: 42 ms (210),
/// 1.01 s (1.55); 16: 70 ms (185), 1.10 s (1.88).
const FANOUT_CHUNK: usize = 64;
/// Fanouts in progress before the dispatch task stops reading new frames.
const MAX_FANOUTS: usize = 16;

/// Pushes `frame` into one connection's queue, cutting it if it is full.
fn deliver(link: &Link, frame: &Arc<Frame>) {
    if link.is_killed() {
        return;
    }
    if !link.push(frame.clone()) {
        link.cut_slow();
    }
}

/// One frame on its way to a large channel's connections, as they were
/// when it arrived.
struct Fanout {
    frame: Arc<Frame>,
    links: Vec<Link>,
    /// The first connection not yet reached.
    next: usize,
}

/// The dispatch task's fanouts in progress, oldest first.
#[derive(Default)]
struct Fanouts {
    jobs: std::collections::VecDeque<Fanout>,
}

impl Fanouts {
    /// Whether a frame of `channel` is still going out (a later one must
    /// wait behind it).
    fn has(&self, channel: &Channel) -> bool {
        self.jobs.iter().any(|job| job.frame.channel == *channel)
    }

    /// Reaches the next [`FANOUT_CHUNK`] connections of the oldest fanout.
    fn push_chunk(&mut self) {
        let Some(job) = self.jobs.front_mut() else {
            return;
        };
        let end = (job.next + FANOUT_CHUNK).min(job.links.len());
        for link in &job.links[job.next..end] {
            deliver(link, &job.frame);
        }
        job.next = end;
        if end == job.links.len() {
            self.jobs.pop_front();
        }
    }

    /// Completes every fanout (the broker is gone: nothing new comes).
    fn finish(&mut self) {
        while !self.jobs.is_empty() {
            self.push_chunk();
        }
    }
}

// --- Server API: `POST /disconnect`, `GET /presence` ----------------------

impl Hub {
    /// Ends every local connection of `user` (its `user:` channel) with
    /// `last` (the `herald.disconnected` event) as its final frame; returns
    /// how many it ended. Connections already ending are not counted again.
    pub(crate) fn close_user(&self, user: &Channel, last: Bytes) -> usize {
        let state = self.state();
        let Some(subscribers) = state.channels.get(user) else {
            return 0;
        };
        let frame = Arc::new(Frame {
            channel: subscribers.channel.clone(),
            id: None,
            ts: None,
            body: last,
        });
        subscribers
            .links
            .values()
            .filter(|link| link.disconnect(frame.clone()))
            .count()
    }

    /// For presence: the channels whose local count changed since the last
    /// call (or [`Hub::presence_all`]), each with its count now, 0 for one
    /// no longer held.
    pub(crate) fn presence_changes(&self) -> Vec<(Channel, usize)> {
        let mut state = self.state();
        let dirty = std::mem::take(&mut state.presence_dirty);
        dirty
            .into_iter()
            .map(|channel| {
                let count = state.channels.get(&channel).map_or(0, |s| s.links.len());
                (channel, count)
            })
            .collect()
    }

    /// For presence: every channel held here with its count (covering, and
    /// so forgetting, the changes not yet taken).
    pub(crate) fn presence_all(&self) -> Vec<(Channel, usize)> {
        let mut state = self.state();
        state.presence_dirty = HashSet::new();
        state
            .channels
            .values()
            .map(|s| (s.channel.clone(), s.links.len()))
            .collect()
    }

    /// For presence: these channels are to be reported again (their report
    /// failed); the next [`Hub::presence_changes`] reads their counts anew.
    pub(crate) fn presence_retry(&self, channels: impl IntoIterator<Item = Channel>) {
        self.state().presence_dirty.extend(channels);
    }
}

/// One connection's membership in the hub. Dropping it unregisters the
/// connection and, for channels it was the last local subscriber of,
/// unsubscribes the broker.
pub(crate) struct Subscription {
    hub: Hub,
    id: u64,
    user: Arc<str>,
    channels: Vec<Channel>,
    /// Frames for this connection, and how the hub cuts it.
    pub(crate) mailbox: MailboxRef,
    /// Answers still pending when this connection joined.
    live: Vec<Answer>,
}

impl Subscription {
    /// The channels of this connection.
    pub(crate) fn channels(&self) -> &[Channel] {
        &self.channels
    }

    /// Waits until every channel's broker subscription is live.
    pub(crate) async fn wait_live(&mut self, timeout: Duration) -> Result<(), BrokerError> {
        let wait = async {
            for live in &mut self.live {
                let answer = live
                    .wait_for(Option::is_some)
                    .await
                    .map_err(|_| BrokerError::Closed)?;
                if let Some(Err(e)) = answer.as_ref() {
                    return Err(BrokerError::Unavailable(e.clone()));
                }
            }
            Ok(())
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| BrokerError::Unavailable("subscription timed out".into()))?
    }

    /// Over how many ms the clients of this draining node should spread
    /// their reconnects (0 before a drain).
    pub(crate) fn drain_spread_ms(&self) -> u64 {
        self.hub.shared.drain_spread_ms.load(Ordering::Relaxed)
    }

    /// Counts the close of this connection under `reason` (the hub's slow
    /// cut wins over the caller's view).
    pub(crate) fn close_reason(&self, reason: CloseReason) -> CloseReason {
        if self.mailbox.is_slow() {
            CloseReason::Slow
        } else {
            reason
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.disconnect(self.id, &self.user, &self.channels);
    }
}

/// A connection's maximum age in ms, spread ±10 % so that connections
/// opened together (a ramp, a node's clients coming back) do not all
/// reconnect together.
fn jittered_age(age: Duration) -> u64 {
    let ms = age.as_millis().min(u128::from(u64::MAX / 2)) as u64;
    let spread = ms / 10;
    rand::random_range(ms - spread..=ms + spread)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::broker::{BoxFuture, Store as _};

    fn message(channel: &Channel, id: u64) -> Delivery {
        let data = serde_json::value::to_raw_value(&id).expect("a number");
        let id = StreamId { ms: id, seq: 0 };
        let payload = crate::envelope::encode(Some(id), None, &data, crate::envelope::now_ms());
        Delivery::Message {
            channel: channel.clone(),
            payload: Bytes::from(payload),
        }
    }

    /// The memory broker, recording how the refill asks for history and
    /// failing the first read of one channel.
    struct RecordingReads {
        inner: MemoryBroker,
        /// Single reads (`history_after`).
        singles: AtomicU64,
        /// The size of each batched read (`histories_after`).
        batches: Mutex<Vec<usize>>,
        /// A channel whose next read fails.
        fail_once: Mutex<Option<Channel>>,
    }

    impl crate::broker::Store for RecordingReads {
        fn publish<'a>(
            &'a self,
            channel: &'a Channel,
            event: Option<&'a str>,
            data: &'a serde_json::value::RawValue,
        ) -> BoxFuture<'a, Result<StreamId, BrokerError>> {
            self.inner.publish(channel, event, data)
        }
        fn history_after<'a>(
            &'a self,
            channel: &'a Channel,
            after: StreamId,
            limit: usize,
        ) -> BoxFuture<'a, Result<History, BrokerError>> {
            self.singles.fetch_add(1, Ordering::SeqCst);
            self.inner.history_after(channel, after, limit)
        }
        fn histories_after<'a>(
            &'a self,
            reads: &'a [(Channel, StreamId)],
        ) -> BoxFuture<'a, Vec<Result<History, BrokerError>>> {
            crate::sync::lock(&self.batches).push(reads.len());
            Box::pin(async move {
                let mut answers = Vec::new();
                for (channel, after) in reads {
                    let fail = {
                        let mut fail_once = crate::sync::lock(&self.fail_once);
                        let fail = fail_once.as_ref() == Some(channel);
                        if fail {
                            *fail_once = None;
                        }
                        fail
                    };
                    answers.push(if fail {
                        Err(BrokerError::Unavailable("loading".into()))
                    } else {
                        self.inner.history_after(channel, *after, usize::MAX).await
                    });
                }
                answers
            })
        }
        fn tip<'a>(&'a self, channel: &'a Channel) -> BoxFuture<'a, Result<StreamId, BrokerError>> {
            self.inner.tip(channel)
        }
        fn history_before<'a>(
            &'a self,
            channel: &'a Channel,
            before: Option<StreamId>,
            limit: usize,
        ) -> BoxFuture<'a, Result<crate::broker::Page, BrokerError>> {
            self.inner.history_before(channel, before, limit)
        }
        fn revoke<'a>(
            &'a self,
            user: &'a Channel,
            before: u64,
            ttl: Duration,
        ) -> BoxFuture<'a, Result<(), BrokerError>> {
            self.inner.revoke(user, before, ttl)
        }
        fn revoked_before<'a>(
            &'a self,
            user: &'a Channel,
        ) -> BoxFuture<'a, Result<Option<u64>, BrokerError>> {
            self.inner.revoked_before(user)
        }
        fn report_presence<'a>(
            &'a self,
            node: &'a str,
            changes: &'a [(Channel, usize)],
            ttl: Duration,
        ) -> BoxFuture<'a, Result<bool, BrokerError>> {
            self.inner.report_presence(node, changes, ttl)
        }
        fn presence<'a>(
            &'a self,
            channel: &'a Channel,
        ) -> BoxFuture<'a, Result<crate::broker::Presence, BrokerError>> {
            self.inner.presence(channel)
        }
    }

    impl Broker for RecordingReads {
        fn subscribe(&self, channel: &Channel) -> BoxFuture<'static, Result<(), BrokerError>> {
            self.inner.subscribe(channel)
        }
        fn unsubscribe(&self, channel: &Channel) {
            self.inner.unsubscribe(channel)
        }
        fn is_connected(&self) -> bool {
            self.inner.is_connected()
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_refill_reads_its_channels_in_batches_and_misses_none() {
        let (deliveries, mut incoming) = mpsc::unbounded_channel();
        let users: Vec<Channel> = (0..2 * REFILL_BATCH + 10)
            .map(|i| Channel::parse(&format!("user:u{i}")).expect("valid"))
            .collect();
        let broker = Arc::new(RecordingReads {
            inner: MemoryBroker::new(deliveries.clone(), 16, Duration::from_secs(60)),
            singles: AtomicU64::new(0),
            batches: Mutex::new(Vec::new()),
            fail_once: Mutex::new(Some(users[3].clone())),
        });
        let hub = Hub::new(
            broker.clone(),
            HubConfig {
                max_connections: 10_000,
                max_connections_per_user: 4,
                queue_capacity: 16,
                max_payload: 1024,
                heartbeat: Duration::from_secs(60),
                max_connection_age: None,
            },
        );
        let mut subs = Vec::new();
        for (i, user) in users.iter().enumerate() {
            let mut sub = hub
                .connect(&format!("u{i}"), vec![user.clone()], u64::MAX)
                .expect("room");
            sub.wait_live(Duration::from_secs(5)).await.expect("live");
            subs.push(sub);
        }
        // Published while "disconnected": in history, but their live copies
        // are thrown away before the dispatch task runs.
        for n in 1..=2 {
            let data = serde_json::value::to_raw_value(&n).expect("a number");
            for user in &users {
                broker
                    .inner
                    .publish(user, None, &data)
                    .await
                    .expect("stored");
            }
        }
        let mut dropped = 0;
        while let Ok(Delivery::Message { .. }) = incoming.try_recv() {
            dropped += 1;
        }
        assert_eq!(dropped, 2 * users.len());
        deliveries.send(Delivery::Resubscribed).expect("open");
        let (control, _control) = mpsc::channel(1);
        tokio::spawn(hub.clone().dispatch_from(incoming, control));
        for sub in &subs {
            let mut got = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while got.len() < 2 {
                match sub.mailbox.try_pop() {
                    Some(frame) => got.push(String::from_utf8_lossy(&frame.body).into_owned()),
                    None => {
                        assert!(Instant::now() < deadline, "a channel was not refilled");
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            assert!(
                got[0].ends_with("data: 1\n\n") && got[1].ends_with("data: 2\n\n"),
                "replayed whole and in order: {got:?}"
            );
        }
        assert_eq!(
            broker.singles.load(Ordering::SeqCst),
            0,
            "one read per channel"
        );
        // Three batches, and the one read that failed once more (after the
        // batch it was in: which one depends on the table's order).
        let mut batches = crate::sync::lock(&broker.batches).clone();
        batches.sort_unstable();
        assert_eq!(batches, [1, 10, REFILL_BATCH, REFILL_BATCH]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_unicast_does_not_wait_behind_a_large_fanout() {
        let (deliveries, incoming) = mpsc::unbounded_channel();
        let broker = Arc::new(MemoryBroker::new(
            deliveries.clone(),
            16,
            Duration::from_secs(60),
        ));
        let hub = Hub::new(
            broker,
            HubConfig {
                max_connections: 10_000,
                max_connections_per_user: 4,
                queue_capacity: 16,
                max_payload: 1024,
                heartbeat: Duration::from_secs(60),
                max_connection_age: None,
            },
        );
        let broadcast = Channel::parse("broadcast").expect("valid");
        let alice = Channel::parse("user:alice").expect("valid");
        let mut many = Vec::new();
        for i in 0..4 * FANOUT_CHUNK {
            let mut sub = hub
                .connect(&format!("u{i}"), vec![broadcast.clone()], u64::MAX)
                .expect("room");
            sub.wait_live(Duration::from_secs(5)).await.expect("live");
            many.push(sub);
        }
        let mut one = hub
            .connect("alice", vec![alice.clone()], u64::MAX)
            .expect("room");
        one.wait_live(Duration::from_secs(5)).await.expect("live");

        // A broadcast and then a unicast, both waiting when dispatch starts.
        deliveries.send(message(&broadcast, 1)).expect("open");
        deliveries.send(message(&alice, 2)).expect("open");
        deliveries.send(message(&broadcast, 3)).expect("open");
        let (control, _control) = mpsc::channel(1);
        let task = tokio::spawn(hub.clone().dispatch_from(incoming, control));
        while one.mailbox.try_pop().is_none() {
            tokio::task::yield_now().await;
        }
        let id_of = |frame: Arc<Frame>| frame.id.map_or(0, |i| i.ms);
        let mut seen: Vec<Vec<u64>> = many
            .iter()
            .map(|sub| sub.mailbox.try_pop().map(id_of).into_iter().collect())
            .collect();
        let reached = seen.iter().filter(|ids| !ids.is_empty()).count();
        assert!(
            reached < many.len(),
            "the unicast waited until the broadcast reached all {reached}"
        );
        // Then every connection gets both broadcasts, in order.
        for _ in 0..1_000 {
            if seen.iter().all(|ids| ids.len() == 2) {
                break;
            }
            tokio::task::yield_now().await;
            for (sub, ids) in many.iter().zip(seen.iter_mut()) {
                ids.extend(std::iter::from_fn(|| sub.mailbox.try_pop()).map(id_of));
            }
        }
        assert!(seen.iter().all(|ids| ids == &[1, 3]), "each gets 1 then 3");
        drop(deliveries);
        task.abort();
    }

    #[test]
    fn ages_spread_over_ten_percent_either_side() {
        let ages: Vec<u64> = (0..2_000)
            .map(|_| jittered_age(Duration::from_secs(60)))
            .collect();
        assert!(ages.iter().all(|&ms| (54_000..=66_000).contains(&ms)));
        let low = ages.iter().filter(|&&ms| ms < 57_000).count();
        let high = ages.iter().filter(|&&ms| ms > 63_000).count();
        assert!(
            low > 200 && high > 200,
            "spread, not clustered: {low} {high}"
        );
        assert_eq!(jittered_age(Duration::ZERO), 0);
    }
}
