//! The embedded broker: pub/sub and bounded history inside the process, so a
//! single node runs with no Redis at all.
//!
//! History mirrors what the Redis backend keeps in streams: ids in stream-id
//! form, at most `history_size` entries per channel, a channel's history
//! dropped once idle for `history_ttl`, and the largest trimmed id remembered
//! (Redis' `max-deleted-entry-id`) so a replay that would skip trimmed
//! entries is reported as a [`History::Gap`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::value::RawValue;

use super::{
    BoxFuture, Broker, BrokerError, Deliveries, Delivery, Entry, History, Page, Presence, Store,
};
use crate::channel::Channel;
use crate::envelope::{self, now_ms, StreamId};
use crate::sync::lock;

/// In-process broker for a single node.
#[derive(Clone)]
pub(crate) struct MemoryBroker {
    shared: Arc<Shared>,
}

struct Shared {
    /// Channel histories. A std mutex: it is never held across an `.await`,
    /// and every critical section is a few pointer moves.
    channels: Mutex<HashMap<Channel, Log>>,
    /// Live revocations: user channel → (cutoff, when it lapses). Bounded
    /// by [`MAX_REVOCATIONS`]; lapsed ones are dropped as it fills.
    revocations: Mutex<HashMap<Channel, (u64, Instant)>>,
    /// Presence entries; only channels with connections (a count of 0
    /// removes the entry).
    presence: Mutex<PresenceTable>,
    /// Where published messages go; sent under the lock so they arrive in id
    /// order.
    deliveries: Deliveries,
    history_size: usize,
    history_ttl: Duration,
}

/// Most revocations held at once (each lasts `--revocation-ttl`).
pub(crate) const MAX_REVOCATIONS: usize = 100_000;

/// Each node's count per channel, flat: one map entry per (channel, node)
/// and nothing allocated per entry, since a node holds one entry for every
/// user connected to it.
#[derive(Default)]
struct PresenceTable {
    /// Node ids seen and when each one's table lapses (ms), indexed by the
    /// keys of `counts` (a handful).
    nodes: Vec<(Box<str>, u64)>,
    /// (channel, node index) → count.
    counts: HashMap<(Channel, usize), usize>,
}

impl PresenceTable {
    /// Applies `node`'s changes and keeps it alive until `until`; `false`
    /// if its table had lapsed (its counts are dropped first).
    fn report(&mut self, node: &str, changes: &[(Channel, usize)], now: u64, until: u64) -> bool {
        let (index, alive) = match self.nodes.iter().position(|(n, _)| &**n == node) {
            Some(i) => (i, self.nodes[i].1 > now),
            None => {
                self.nodes.push((node.into(), 0));
                (self.nodes.len() - 1, false)
            }
        };
        if !alive {
            self.counts.retain(|(_, n), _| *n != index);
        }
        self.nodes[index].1 = until;
        for (channel, count) in changes {
            let key = (channel.clone(), index);
            if *count == 0 {
                self.counts.remove(&key);
            } else {
                self.counts.insert(key, *count);
            }
        }
        alive
    }

    fn sum(&self, channel: &Channel, now: u64) -> Presence {
        let mut presence = Presence::default();
        for (index, (_, until)) in self.nodes.iter().enumerate() {
            if *until > now {
                let count = self.counts.get(&(channel.clone(), index));
                presence.add(count.copied().unwrap_or(0));
            }
        }
        presence
    }
}

struct Log {
    entries: VecDeque<Entry>,
    /// Newest id ever assigned, so ids stay monotonic after trimming.
    last_id: StreamId,
    /// Newest id trimmed away; a replay from before it has a gap.
    max_deleted: Option<StreamId>,
    last_write: Instant,
}

impl MemoryBroker {
    /// A broker delivering into `deliveries`; spawns a task that drops idle
    /// histories (it ends when the broker is dropped).
    pub(crate) fn new(deliveries: Deliveries, history_size: usize, history_ttl: Duration) -> Self {
        let shared = Arc::new(Shared {
            channels: Mutex::new(HashMap::new()),
            revocations: Mutex::new(HashMap::new()),
            presence: Mutex::new(PresenceTable::default()),
            deliveries,
            history_size: history_size.max(1),
            history_ttl,
        });
        tokio::spawn(sweep_expired(Arc::downgrade(&shared)));
        MemoryBroker { shared }
    }

    fn channels(&self) -> MutexGuard<'_, HashMap<Channel, Log>> {
        lock(&self.shared.channels)
    }

    /// The live log of a channel, treating an idle-expired one as absent.
    fn live_log<'a>(
        &self,
        channels: &'a mut HashMap<Channel, Log>,
        channel: &Channel,
    ) -> Option<&'a mut Log> {
        let expired = channels
            .get(channel)
            .is_some_and(|log| log.last_write.elapsed() > self.shared.history_ttl);
        if expired {
            channels.remove(channel);
        }
        channels.get_mut(channel)
    }
}

async fn sweep_expired(shared: Weak<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let ttl = shared.history_ttl;
        lock(&shared.channels).retain(|_, log| log.last_write.elapsed() <= ttl);
    }
}

impl Store for MemoryBroker {
    fn publish<'a>(
        &'a self,
        channel: &'a Channel,
        event: Option<&'a str>,
        data: &'a RawValue,
    ) -> BoxFuture<'a, Result<StreamId, BrokerError>> {
        let result = (|| {
            let mut channels = self.channels();
            let fresh = self.live_log(&mut channels, channel).is_none();
            if fresh {
                channels.insert(
                    channel.clone(),
                    Log {
                        entries: VecDeque::new(),
                        last_id: StreamId::ZERO,
                        max_deleted: None,
                        last_write: Instant::now(),
                    },
                );
            }
            let log = channels.get_mut(channel).ok_or(BrokerError::Closed)?;
            let ts = now_ms();
            let id = log.last_id.next_after(ts);
            let payload = Bytes::from(envelope::encode(Some(id), event, data, ts));
            log.last_id = id;
            log.last_write = Instant::now();
            log.entries.push_back((id, payload.clone()));
            while log.entries.len() > self.shared.history_size {
                if let Some((old, _)) = log.entries.pop_front() {
                    log.max_deleted = Some(old);
                }
            }
            self.shared
                .deliveries
                .send(Delivery::Message {
                    channel: channel.clone(),
                    payload,
                })
                .map_err(|_| BrokerError::Closed)?;
            Ok(id)
        })();
        Box::pin(async move { result })
    }

    fn history_after<'a>(
        &'a self,
        channel: &'a Channel,
        after: StreamId,
        limit: usize,
    ) -> BoxFuture<'a, Result<History, BrokerError>> {
        let mut channels = self.channels();
        let history = match self.live_log(&mut channels, channel) {
            None if after == StreamId::ZERO => History::Entries(Vec::new()),
            None => History::Gap,
            Some(log) => {
                let trimmed_past = log.max_deleted.is_some_and(|d| d > after);
                if trimmed_past || after > log.last_id {
                    History::Gap
                } else {
                    let start = log.entries.partition_point(|(id, _)| *id <= after);
                    if log.entries.len() - start > limit {
                        History::Gap
                    } else {
                        History::Entries(log.entries.range(start..).cloned().collect())
                    }
                }
            }
        };
        drop(channels);
        Box::pin(async move { Ok(history) })
    }

    fn tip<'a>(&'a self, channel: &'a Channel) -> BoxFuture<'a, Result<StreamId, BrokerError>> {
        let mut channels = self.channels();
        let tip = self
            .live_log(&mut channels, channel)
            .map_or(StreamId::ZERO, |log| log.last_id);
        drop(channels);
        Box::pin(async move { Ok(tip) })
    }

    fn history_before<'a>(
        &'a self,
        channel: &'a Channel,
        before: Option<StreamId>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Page, BrokerError>> {
        let mut channels = self.channels();
        let mut page = Page::default();
        if let Some(log) = self.live_log(&mut channels, channel) {
            let end = before.map_or(log.entries.len(), |before| {
                log.entries.partition_point(|(id, _)| *id < before)
            });
            let start = end.saturating_sub(limit);
            page.entries = log.entries.range(start..end).rev().cloned().collect();
            page.more = start > 0;
        }
        drop(channels);
        Box::pin(async move { Ok(page) })
    }

    fn revoke<'a>(
        &'a self,
        user: &'a Channel,
        before: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        let mut revocations = lock(&self.shared.revocations);
        if revocations.len() >= MAX_REVOCATIONS {
            let now = Instant::now();
            revocations.retain(|_, (_, lapses)| *lapses > now);
        }
        let result = if revocations.len() >= MAX_REVOCATIONS && !revocations.contains_key(user) {
            Err(BrokerError::Unavailable(format!(
                "{MAX_REVOCATIONS} revocations are live already"
            )))
        } else {
            revocations.insert(user.clone(), (before, Instant::now() + ttl));
            Ok(())
        };
        drop(revocations);
        Box::pin(async move { result })
    }

    fn revoked_before<'a>(
        &'a self,
        user: &'a Channel,
    ) -> BoxFuture<'a, Result<Option<u64>, BrokerError>> {
        let cutoff = lock(&self.shared.revocations)
            .get(user)
            .filter(|(_, lapses)| *lapses > Instant::now())
            .map(|(cutoff, _)| *cutoff);
        Box::pin(async move { Ok(cutoff) })
    }

    fn report_presence<'a>(
        &'a self,
        node: &'a str,
        changes: &'a [(Channel, usize)],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        let now = now_ms();
        let until = now.saturating_add(ttl.as_millis() as u64);
        let alive = lock(&self.shared.presence).report(node, changes, now, until);
        Box::pin(async move { Ok(alive) })
    }

    fn presence<'a>(
        &'a self,
        channel: &'a Channel,
    ) -> BoxFuture<'a, Result<Presence, BrokerError>> {
        let presence = lock(&self.shared.presence).sum(channel, now_ms());
        Box::pin(async move { Ok(presence) })
    }
}

impl Broker for MemoryBroker {
    fn subscribe(&self, _channel: &Channel) -> BoxFuture<'static, Result<(), BrokerError>> {
        // Every publish is delivered to this node's hub, which keeps only the
        // channels it has connections for: subscribing is immediate.
        Box::pin(async { Ok(()) })
    }

    fn unsubscribe(&self, _channel: &Channel) {}

    fn is_connected(&self) -> bool {
        !self.shared.deliveries.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    fn data(n: u32) -> Box<RawValue> {
        RawValue::from_string(n.to_string()).expect("json")
    }

    #[tokio::test]
    async fn history_is_bounded_and_gaps_are_reported() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let broker = MemoryBroker::new(tx, 3, Duration::from_secs(60));
        let ch = Channel::parse("user:a").expect("valid");
        let mut ids = Vec::new();
        for n in 0..5 {
            ids.push(broker.publish(&ch, None, &data(n)).await.expect("publish"));
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
        for _ in 0..5 {
            assert!(matches!(rx.recv().await, Some(Delivery::Message { .. })));
        }
        assert_eq!(broker.tip(&ch).await.expect("tip"), ids[4]);
        match broker.history_after(&ch, ids[1], 10).await.expect("read") {
            History::Entries(e) => {
                assert_eq!(e.iter().map(|(id, _)| *id).collect::<Vec<_>>(), ids[2..])
            }
            History::Gap => panic!("ids[2..] are retained"),
        }
        assert!(matches!(
            broker.history_after(&ch, ids[0], 10).await,
            Ok(History::Gap)
        ));
        assert!(matches!(
            broker.history_after(&ch, ids[1], 2).await,
            Ok(History::Gap)
        ));
        let other = Channel::parse("user:b").expect("valid");
        assert!(
            matches!(broker.history_after(&other, StreamId::ZERO, 10).await, Ok(History::Entries(e)) if e.is_empty())
        );
        assert!(matches!(
            broker.history_after(&other, ids[0], 10).await,
            Ok(History::Gap)
        ));
    }

    #[tokio::test]
    async fn idle_history_expires() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let broker = MemoryBroker::new(tx, 10, Duration::from_millis(1));
        let ch = Channel::parse("topic:t").expect("valid");
        let id = broker.publish(&ch, None, &data(1)).await.expect("publish");
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(broker.tip(&ch).await.expect("tip"), StreamId::ZERO);
        assert!(matches!(
            broker.history_after(&ch, id, 10).await,
            Ok(History::Gap)
        ));
    }

    #[test]
    fn presence_counts_live_nodes_and_a_lapsed_node_starts_over() {
        let alice = Channel::parse("user:alice").expect("valid");
        let bob = Channel::parse("user:bob").expect("valid");
        let mut table = PresenceTable::default();
        let seen = |t: &PresenceTable, c: &Channel, now| {
            let p = t.sum(c, now);
            (p.connections, p.nodes)
        };
        assert!(!table.report("a", &[(alice.clone(), 2), (bob.clone(), 1)], 0, 10));
        assert!(!table.report("b", &[(alice.clone(), 3)], 0, 20));
        assert_eq!(seen(&table, &alice, 5), (5, 2));
        assert!(table.report("a", &[(bob.clone(), 0)], 5, 15), "still alive");
        assert_eq!(seen(&table, &bob, 5), (0, 0));
        // Node a's table lapses at 15: it no longer counts, and its next
        // report says so and drops what it had.
        assert_eq!(seen(&table, &alice, 16), (3, 1));
        assert!(!table.report("a", &[], 16, 30));
        assert_eq!(seen(&table, &alice, 17), (3, 1), "a's old count is gone");
    }
}
