//! The Redis Cluster backbone: sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`).
//!
//! Publishing, history reads and scripts go through
//! [`RedisStore::cluster`], routed by slot. Live delivery is one task, run
//! by the same reconnect loop as the single-Redis broker
//! (`run_sessions` in [`super::redis`]): a session is one RESP3 cluster
//! connection (one multiplexed connection per master, shard channels
//! subscribed where their slot lives) and the slot map it was built on.
//!
//! A change of the cluster's shape ends the session: the server's
//! `sunsubscribe` push (the slot moved away) or a slot map that differs
//! from the session's (the node stays ready and reconnects at once), a lost
//! shard connection or a shard whose probe stops coming back (a master
//! demoted by a failover keeps its subscribers but gets no more traffic;
//! these turn the node unready until it is back). The next session reads
//! the slot map again, subscribes every channel where it lives now (all at
//! once, pipelined), and the hub refills each active channel from its
//! stream after the last id it dispatched — the single-Redis refill — so
//! nothing acknowledged and replicated is lost and nothing is doubled.
//!
//! Readiness is per shard: each master gets its own probe channel (a key
//! hashed into one of its slots); the node is unready while a master that
//! holds one of its subscribed slots does not answer. A probe proves a
//! connection delivers, not that it still holds every channel: each probe
//! tick also counts the shard subscriptions on every master's connection
//! and resubscribes (ending the session as a change of shape) when one
//! holds fewer than it should.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use bytes::Bytes;
use futures_util::StreamExt as _;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, Slot};
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::redis::{
    cluster_client, send_probe, unavailable, Command, Ended, RedisBroker, RedisConfig, RedisStore,
    Sessions, Subscriptions, COMMAND_TIMEOUT, SLOW_PROBE_LIMIT,
};
use super::{BrokerError, Deliveries, Delivery};
use crate::channel::Channel;
use crate::metrics;

/// Redis Cluster's slot count.
const SLOTS: u32 = 16_384;

/// How many `SSUBSCRIBE`s are in flight at once while (re)subscribing a
/// session: enough to pipeline, few enough to keep memory flat.
const SUBSCRIBE_BATCH: usize = 256;

/// Starts a broker on the Redis Cluster named by `config.url` (seed URLs,
/// comma-separated). Returns at once: with the cluster down or still
/// forming the node starts unready and keeps retrying.
pub(crate) fn start(
    config: RedisConfig,
    node_id: &str,
    deliveries: Deliveries,
) -> Result<RedisBroker, BrokerError> {
    let store = RedisStore::cluster(config)?;
    let node_id = node_id.to_owned();
    Ok(RedisBroker::launch(store, deliveries, |store, subs| {
        ShardedTask {
            store,
            node_id,
            subs,
            topology: None,
            probe_tags: Vec::new(),
        }
    }))
}

/// Which master owns which slots, from `CLUSTER SLOTS`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Topology {
    /// Master address (`host:port`) → its slot ranges (inclusive).
    masters: BTreeMap<String, Vec<(u16, u16)>>,
}

impl Topology {
    /// Parses a `CLUSTER SLOTS` reply; `None` if malformed.
    fn parse(reply: Value) -> Option<Topology> {
        let Value::Array(ranges) = reply else {
            return None;
        };
        let mut masters: BTreeMap<String, Vec<(u16, u16)>> = BTreeMap::new();
        for range in ranges {
            let Value::Array(parts) = range else {
                return None;
            };
            let mut parts = parts.into_iter();
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (parts.next(), parts.next(), parts.next())
            else {
                return None;
            };
            let mut master = master.into_iter();
            let host = match master.next()? {
                Value::BulkString(b) => String::from_utf8(b).ok()?,
                Value::SimpleString(s) => s,
                _ => return None,
            };
            let Some(Value::Int(port)) = master.next() else {
                return None;
            };
            let range = (u16::try_from(start).ok()?, u16::try_from(end).ok()?);
            masters
                .entry(format!("{host}:{port}"))
                .or_default()
                .push(range);
        }
        for ranges in masters.values_mut() {
            ranges.sort_unstable();
        }
        Some(Topology { masters })
    }

    /// Whether every slot has a master (`cluster_state:ok` as far as
    /// routing goes); a forming cluster has holes.
    fn complete(&self) -> bool {
        let covered: u32 = self
            .masters
            .values()
            .flatten()
            .map(|(start, end)| u32::from(end.saturating_sub(*start)) + 1)
            .sum();
        covered >= SLOTS
    }

    /// The master that owns `slot`.
    fn owner(&self, slot: u16) -> Option<&str> {
        self.masters.iter().find_map(|(addr, ranges)| {
            ranges
                .iter()
                .any(|(start, end)| (*start..=*end).contains(&slot))
                .then_some(addr.as_str())
        })
    }
}

/// The slot of `key`, by the `redis` crate's hashing (hash tags included).
fn slot_of(key: &str) -> u16 {
    // `Slot` keeps its number to itself: a table built once maps it back.
    static NUMBERS: OnceLock<HashMap<Slot, u16>> = OnceLock::new();
    let numbers = NUMBERS.get_or_init(|| {
        (0..SLOTS as u16)
            .filter_map(|n| Some((Slot::new(n)?, n)))
            .collect()
    });
    numbers.get(&Slot::for_key(key)).copied().unwrap_or(0)
}

/// One master's probe: a key hashed into one of its slots.
struct Shard {
    addr: String,
    probe_key: String,
    /// The probe sent last and not yet seen back.
    outstanding: Option<(u64, Instant)>,
    up: bool,
}

/// The sharded pub/sub task; see the module doc.
struct ShardedTask {
    store: RedisStore,
    node_id: String,
    subs: Subscriptions,
    /// The slot map of the last session, to count shape changes.
    topology: Option<Topology>,
    /// For each slot, a probe name number that hashes to it (built on
    /// first use).
    probe_tags: Vec<Option<u32>>,
}

/// A live session's connection and what it was built on.
struct Session {
    conn: ClusterConnection,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
    topology: Topology,
    shards: Vec<Shard>,
    /// `SUNSUBSCRIBE`s this node sent whose confirmation push has not come
    /// back yet (by key): any other `sunsubscribe` is the server's.
    own_unsubscribes: HashMap<String, usize>,
}

impl Sessions for ShardedTask {
    fn subscriptions(&mut self) -> &mut Subscriptions {
        &mut self.subs
    }

    async fn session(&mut self, number: u64, stop: &CancellationToken) -> (Ended, bool) {
        let (ended, subscribed) = match self.connect(number).await {
            Ok(session) => (self.relay(session, stop).await, true),
            Err(ended) => (ended, false),
        };
        if matches!(ended, Ended::Lost(_)) {
            // Until the next session proves otherwise, no shard is known up.
            metrics::get().redis_shards.set(0.0);
        }
        (ended, subscribed)
    }
}

/// The slot map as the cluster sees it now.
async fn read_topology(store: &RedisStore) -> Result<Topology, BrokerError> {
    let mut conn = store
        .cluster_connection()
        .await
        .unwrap_or_else(|| Err(unavailable("not a cluster store")))?;
    let mut cmd = redis::cmd("CLUSTER");
    cmd.arg("SLOTS");
    let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
    let reply = tokio::time::timeout(COMMAND_TIMEOUT, conn.route_command(cmd, routing))
        .await
        .map_err(|_| unavailable("CLUSTER SLOTS timed out"))?
        .map_err(|e| unavailable(format!("CLUSTER SLOTS: {e}")))?;
    Topology::parse(reply).ok_or_else(|| unavailable("unexpected CLUSTER SLOTS reply"))
}

/// How many of `keys` each master should hold a shard subscription to.
fn expected_per_master(
    topology: &Topology,
    keys: impl Iterator<Item = String>,
) -> BTreeMap<&str, usize> {
    let mut expected = BTreeMap::new();
    for key in keys {
        if let Some(owner) = topology.owner(slot_of(&key)) {
            *expected.entry(owner).or_insert(0) += 1;
        }
    }
    expected
}

/// The `ssub=` count of a `CLIENT INFO` reply (Redis 7+); `None` if the
/// reply has none.
fn shard_subscriptions(reply: &Value) -> Option<usize> {
    let text = match reply {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?,
        Value::VerbatimString { text, .. } => text.as_str(),
        Value::SimpleString(text) => text.as_str(),
        _ => return None,
    };
    text.split_ascii_whitespace()
        .find_map(|field| field.strip_prefix("ssub="))?
        .parse()
        .ok()
}

/// The channel name of a push (`smessage`/`sunsubscribe`: first element).
fn push_key(data: &[Value]) -> Option<&[u8]> {
    match data.first()? {
        Value::BulkString(bytes) => Some(bytes),
        _ => None,
    }
}

impl ShardedTask {
    fn prefix(&self) -> &str {
        &self.store.config().prefix
    }

    /// A probe key for this node that hashes into the first of `ranges`.
    fn probe_key(&mut self, ranges: &[(u16, u16)]) -> Option<String> {
        let (slot, _) = ranges.first()?;
        if self.probe_tags.is_empty() {
            // Once per process: a tag for every slot. About 170k hashes
            // find them all (coupon collector); the bound is far beyond.
            let mut tags = vec![None; SLOTS as usize];
            let mut missing = SLOTS;
            for n in 0..64 * SLOTS {
                let entry = &mut tags[usize::from(slot_of(&self.probe_name(n)))];
                if entry.is_none() {
                    *entry = Some(n);
                    missing -= 1;
                    if missing == 0 {
                        break;
                    }
                }
            }
            self.probe_tags = tags;
        }
        let n = (*self.probe_tags.get(usize::from(*slot))?)?;
        Some(self.probe_name(n))
    }

    fn probe_name(&self, n: u32) -> String {
        format!("{}:probe:{{{}.{n}}}", self.prefix(), self.node_id)
    }

    async fn connect(&mut self, number: u64) -> Result<Session, Ended> {
        let topology = read_topology(&self.store)
            .await
            .map_err(|e| Ended::Lost(e.to_string()))?;
        if !topology.complete() {
            return Err(Ended::Lost("cluster slots not all assigned yet".into()));
        }
        let (push_sender, pushes) = mpsc::unbounded_channel();
        let client = cluster_client(&self.store.config().url, |b| {
            b.use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(push_sender)
        })
        .map_err(|e| Ended::Lost(e.to_string()))?;
        let conn = match tokio::time::timeout(COMMAND_TIMEOUT, client.get_async_connection()).await
        {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(Ended::Lost(format!("cluster pub/sub connect: {e}"))),
            Err(_) => return Err(Ended::Lost("cluster pub/sub connect timed out".into())),
        };
        let mut shards = Vec::with_capacity(topology.masters.len());
        for (addr, ranges) in &topology.masters {
            if let Some(probe_key) = self.probe_key(ranges) {
                shards.push(Shard {
                    addr: addr.clone(),
                    probe_key,
                    outstanding: None,
                    up: true,
                });
            }
        }
        let prefix = self.prefix().to_owned();
        let keys: Vec<String> = self
            .subs
            .desired
            .iter()
            .map(|c| c.pubsub_key(&prefix))
            .chain(shards.iter().map(|s| s.probe_key.clone()))
            .collect();
        let subscribed = keys.len();
        // One SSUBSCRIBE per key (several keys in one must share a slot),
        // pipelined on the per-master connections.
        let failed = futures_util::stream::iter(keys)
            .map(|key| {
                let mut conn = conn.clone();
                async move {
                    match tokio::time::timeout(COMMAND_TIMEOUT, conn.ssubscribe(&key)).await {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(e.to_string()),
                        Err(_) => Some("ssubscribe timed out".to_owned()),
                    }
                }
            })
            .buffer_unordered(SUBSCRIBE_BATCH)
            .filter_map(|failure| async move { failure });
        let failed = std::pin::pin!(failed).next().await;
        if let Some(failure) = failed {
            return Err(Ended::Lost(failure));
        }
        let m = metrics::get();
        m.redis_shards.set(shards.len() as f64);
        if self.topology.as_ref().is_some_and(|t| *t != topology) {
            m.redis_topology_changes.increment(1);
            tracing::info!(
                masters = topology.masters.len(),
                "redis cluster changed shape; resubscribed where the slots live now"
            );
        }
        self.topology = Some(topology.clone());
        if self.subs.went_live(number, subscribed).is_err() {
            return Err(Ended::Stop);
        }
        Ok(Session {
            conn,
            pushes,
            topology,
            shards,
            own_unsubscribes: HashMap::new(),
        })
    }

    async fn relay(&mut self, mut session: Session, stop: &CancellationToken) -> Ended {
        let prefix = self.prefix().to_owned();
        let interval = self.store.config().probe_interval;
        let mut probe = tokio::time::interval_at(Instant::now() + interval, interval);
        let mut probe_seq: u64 = 0;
        // When any push last arrived: every shard's pushes come through one
        // queue, so a relay still reading it is behind, not cut off.
        let mut last_push = Instant::now();
        // Slot maps read in the background, at most one at a time.
        let (maps, mut seen_maps) = mpsc::channel::<Topology>(1);
        let mut reading: Option<tokio::task::JoinHandle<()>> = None;
        // A slot map that differs from the session's, seen once.
        let mut changed: Option<Topology> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ended::Stop,
                push = session.pushes.recv() => {
                    let Some(push) = push else {
                        return Ended::Lost("cluster pub/sub closed".into());
                    };
                    last_push = Instant::now();
                    if let Some(ended) = self.on_push(&mut session, &prefix, push) {
                        return ended;
                    }
                }
                command = self.subs.commands.recv() => {
                    let Some(command) = command else { return Ended::Stop };
                    if let Some(ended) = self.on_command(&mut session, &prefix, command).await {
                        return ended;
                    }
                }
                map = seen_maps.recv() => {
                    let Some(map) = map else { continue };
                    if !map.complete() || map == session.topology {
                        changed = None;
                    } else if changed.as_ref() == Some(&map) {
                        return Ended::Reshaped("the slot map changed".into());
                    } else {
                        // Nodes may disagree for a moment while gossip
                        // spreads a change: act on a map seen twice.
                        changed = Some(map);
                    }
                }
                _ = probe.tick() => {
                    for shard in &mut session.shards {
                        if let Some((_, sent)) = shard.outstanding {
                            // Late while pushes keep coming: the relay is
                            // reading a backlog, and giving up would add a
                            // resubscribe and a refill to it. Up to
                            // SLOW_PROBE_LIMIT intervals, as with one Redis
                            // (a dead shard among live ones is found then).
                            let waited = sent.elapsed();
                            let moving = last_push > sent && waited < interval * SLOW_PROBE_LIMIT;
                            if waited < interval / 2 || moving {
                                continue;
                            }
                            // Down; probed again from the next tick, so it
                            // counts as up again once it answers.
                            shard.up = false;
                            shard.outstanding = None;
                            continue;
                        }
                        probe_seq += 1;
                        shard.outstanding = Some((probe_seq, Instant::now()));
                        // From its own task so a slow shard never stalls the
                        // relay; a failed probe just does not come back.
                        let (store, key, seq) =
                            (self.store.clone(), shard.probe_key.clone(), probe_seq);
                        tokio::spawn(async move {
                            if let Err(e) = send_probe(&store, &key, seq).await {
                                tracing::debug!(error = %e, "shard probe publish failed");
                            }
                        });
                    }
                    let up = session.shards.iter().filter(|s| s.up).count();
                    metrics::get().redis_shards.set(up as f64);
                    let silent = session.shards.iter().find(|s| {
                        !s.up && self.holds_subscribed_slots(&session.topology, &s.addr)
                    });
                    if let Some(down) = silent {
                        let reason = format!("shard {} does not answer its probe", down.addr);
                        return Ended::Lost(reason);
                    }
                    if let Some(missing) = self.missing_subscriptions(&mut session).await {
                        return Ended::Reshaped(missing);
                    }
                    if reading.as_ref().is_none_or(|r| r.is_finished()) {
                        let (store, maps) = (self.store.clone(), maps.clone());
                        reading = Some(tokio::spawn(async move {
                            match read_topology(&store).await {
                                Ok(map) => { let _ = maps.try_send(map); }
                                Err(e) => tracing::debug!(error = %e, "slot map read failed"),
                            }
                        }));
                    }
                }
            }
        }
    }

    /// Which master holds fewer shard subscriptions of this session than
    /// it should, if one does (a reason to resubscribe everything).
    ///
    /// The probes prove each master's connection delivers, not that every
    /// channel is still subscribed on it: while a cluster forms, the
    /// `redis` crate's slot refreshes can replace a master's connection and
    /// leave a channel subscribed nowhere, `broadcast` included, with no
    /// push to say so. `CLIENT INFO` on each master's connection (the one
    /// its subscriptions live on) counts them. Runs inline, between pushes
    /// and commands, so no (un)subscribe of ours is in flight; a master
    /// that does not answer is the probes' business.
    async fn missing_subscriptions(&self, session: &mut Session) -> Option<String> {
        let prefix = self.prefix();
        let keys = self
            .subs
            .desired
            .iter()
            .map(|c| c.pubsub_key(prefix))
            .chain(session.shards.iter().map(|s| s.probe_key.clone()));
        let expected = expected_per_master(&session.topology, keys);
        for (addr, want) in expected {
            let Some((host, port)) = addr.rsplit_once(':') else {
                continue;
            };
            let Ok(port) = port.parse() else { continue };
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: host.to_owned(),
                port,
            });
            let mut cmd = redis::cmd("CLIENT");
            cmd.arg("INFO");
            let reply =
                tokio::time::timeout(COMMAND_TIMEOUT, session.conn.route_command(cmd, routing));
            let Ok(Ok(reply)) = reply.await else { continue };
            let Some(held) = shard_subscriptions(&reply) else {
                continue;
            };
            if held < want {
                return Some(format!(
                    "{addr} holds {held} of this node's {want} shard subscriptions"
                ));
            }
        }
        None
    }

    /// Whether a desired channel (or `broadcast`) lives on `addr`.
    fn holds_subscribed_slots(&self, topology: &Topology, addr: &str) -> bool {
        let prefix = self.prefix();
        self.subs
            .desired
            .iter()
            .any(|c| topology.owner(slot_of(&c.pubsub_key(prefix))) == Some(addr))
    }

    /// Handles one push; `Some` ends the session.
    fn on_push(&mut self, session: &mut Session, prefix: &str, push: PushInfo) -> Option<Ended> {
        match push.kind {
            PushKind::SMessage => {
                let (Some(Value::BulkString(key)), Some(Value::BulkString(payload))) =
                    (push.data.first(), push.data.get(1))
                else {
                    metrics::get().invalid.increment(1);
                    return None;
                };
                if let Some(shard) = session
                    .shards
                    .iter_mut()
                    .find(|s| s.probe_key.as_bytes() == key.as_slice())
                {
                    let seen: Option<u64> = std::str::from_utf8(payload)
                        .ok()
                        .and_then(|s| s.parse().ok());
                    if shard.outstanding.is_some_and(|(seq, _)| Some(seq) == seen) {
                        shard.outstanding = None;
                        shard.up = true;
                    }
                    return None;
                }
                let channel = std::str::from_utf8(key)
                    .ok()
                    .and_then(|key| Channel::from_pubsub_key(prefix, key));
                let Some(channel) = channel else {
                    metrics::get().invalid.increment(1);
                    return None;
                };
                let payload = Bytes::copy_from_slice(payload);
                if self
                    .subs
                    .deliveries
                    .send(Delivery::Message { channel, payload })
                    .is_err()
                {
                    return Some(Ended::Stop);
                }
                None
            }
            PushKind::SUnsubscribe => {
                let key = push_key(&push.data)?;
                let key = String::from_utf8_lossy(key).into_owned();
                if let Some(count) = session.own_unsubscribes.get_mut(&key) {
                    *count -= 1;
                    if *count == 0 {
                        session.own_unsubscribes.remove(&key);
                    }
                    return None;
                }
                // The server dropped a subscription: its slot moved.
                Some(Ended::Reshaped(
                    "a subscribed slot moved to another shard".into(),
                ))
            }
            PushKind::Disconnection => Some(Ended::Lost("a shard connection was lost".into())),
            _ => None,
        }
    }

    /// Applies one (un)subscribe; `Some` ends the session.
    async fn on_command(
        &mut self,
        session: &mut Session,
        prefix: &str,
        command: Command,
    ) -> Option<Ended> {
        let result = match command {
            Command::Subscribe(channel, ack) => {
                let key = channel.pubsub_key(prefix);
                let done = if self.subs.desired.insert(channel) {
                    tokio::time::timeout(COMMAND_TIMEOUT, session.conn.ssubscribe(&key)).await
                } else {
                    Ok(Ok(()))
                };
                self.subs.settle(done, ack)
            }
            Command::Unsubscribe(channel) => {
                if !channel.is_permanent() && self.subs.desired.remove(&channel) {
                    let key = channel.pubsub_key(prefix);
                    *session.own_unsubscribes.entry(key.clone()).or_insert(0) += 1;
                    tokio::time::timeout(COMMAND_TIMEOUT, session.conn.sunsubscribe(&key)).await
                } else {
                    Ok(Ok(()))
                }
            }
        };
        match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(Ended::Lost(e.to_string())),
            Err(_) => Some(Ended::Lost("(un)subscribe timed out".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology(masters: &[(&str, u16, u16)]) -> Topology {
        let mut map: BTreeMap<String, Vec<(u16, u16)>> = BTreeMap::new();
        for (addr, start, end) in masters {
            map.entry(addr.to_string())
                .or_default()
                .push((*start, *end));
        }
        Topology { masters: map }
    }

    #[test]
    fn client_info_gives_the_shard_subscription_count() {
        let line = "id=7 addr=127.0.0.1:50000 laddr=127.0.0.1:7000 fd=9 name= age=3 \
                    idle=0 flags=P db=0 sub=0 psub=0 ssub=12 multi=-1 qbuf=0 cmd=client|info\n";
        let bulk = Value::BulkString(line.as_bytes().to_vec());
        assert_eq!(shard_subscriptions(&bulk), Some(12));
        let verbatim = Value::VerbatimString {
            format: redis::VerbatimFormat::Text,
            text: line.to_owned(),
        };
        assert_eq!(shard_subscriptions(&verbatim), Some(12));
        // Redis 6 has no ssub field; an error or a number is no count.
        let old = Value::BulkString(b"id=7 sub=0 psub=0 multi=-1".to_vec());
        assert_eq!(shard_subscriptions(&old), None);
        assert_eq!(shard_subscriptions(&Value::Int(3)), None);
        let garbage = Value::BulkString(b"ssub=many".to_vec());
        assert_eq!(shard_subscriptions(&garbage), None);
    }

    #[test]
    fn each_key_is_expected_on_the_master_of_its_slot() {
        let map = topology(&[("a:1", 0, 8191), ("b:2", 8192, 16383)]);
        let keys = ["herald:{broadcast}", "herald:user:{x}", "herald:user:{y}"];
        let expected = expected_per_master(&map, keys.iter().map(|k| k.to_string()));
        for key in keys {
            assert!(map.owner(slot_of(key)).is_some());
        }
        let total: usize = expected.values().sum();
        assert_eq!(total, keys.len());
        for (addr, count) in &expected {
            let here = keys
                .iter()
                .filter(|k| map.owner(slot_of(k)) == Some(*addr))
                .count();
            assert_eq!(*count, here, "{addr}");
        }
        // A key whose slot has no master (a forming cluster) is expected
        // nowhere rather than miscounted.
        let partial = topology(&[("a:1", 0, 100)]);
        let outside = (0..)
            .map(|n| format!("herald:user:{{{n}}}"))
            .find(|k| slot_of(k) > 100)
            .expect("some key hashes past slot 100");
        assert!(expected_per_master(&partial, std::iter::once(outside)).is_empty());
    }
}
