//! One SSE connection from `herald.ready` to its end, independent of HTTP.
//!
//! [`Session::start`] subscribes, replays history after the client's cursor
//! and builds the opening bytes; the session then yields chunks of bytes:
//! live frames (several queued ones coalesced into one write), heartbeats,
//! and a last frame when the token expires, the connection reaches its
//! maximum age or the node drains.
//!
//! No duplicate, no gap: the subscription goes live *before* history is read,
//! and each connection keeps its position per channel, dropping any frame at
//! or below it. A replayed message that also arrives live is sent once.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::json;

use crate::auth::Claims;
use crate::broker::{BrokerError, History};
use crate::channel::Channel;
use crate::envelope::{now_ms, StreamId};
use crate::frame::Frame;
use crate::hub::{Hub, LimitError, Subscription};
use crate::mailbox::{MailboxRef, Wake};
use crate::metrics::{self, CloseReason};
use crate::sse::{self, Cursor};

/// Stop coalescing queued frames into one chunk past this many bytes.
const MAX_CHUNK: usize = 64 * 1024;
/// How long a new connection waits for its broker subscriptions.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings a session needs from the node.
#[derive(Debug, Clone)]
pub(crate) struct SessionConfig {
    /// This node's id, reported in `herald.ready`.
    pub(crate) node_id: String,
    /// The `retry:` hint.
    pub(crate) retry: Duration,
    /// Most entries replayed per channel (the history size).
    pub(crate) replay_limit: usize,
}

/// Why a session could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    /// A connection limit.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// The broker could not subscribe or read history.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// A running SSE connection.
pub(crate) struct Session {
    subscription: Subscription,
    /// Position per channel, parallel to `subscription.channels()`; the
    /// cursor is encoded from these.
    positions: Vec<StreamId>,
    /// The opening bytes (retry, replay, reset, ready), sent first.
    opening: Option<Bytes>,
    retry: Duration,
    /// Set once the session has decided to end (and why).
    ended: Option<CloseReason>,
}

impl Session {
    /// Subscribes `claims.sub` to `channels`, replays after `last_event_id`
    /// and prepares the opening bytes.
    pub(crate) async fn start(
        hub: &Hub,
        config: &SessionConfig,
        claims: &Claims,
        channels: Vec<Channel>,
        last_event_id: Option<&str>,
    ) -> Result<Session, StartError> {
        let expires_at_ms = claims.exp.saturating_mul(1000);
        let mut subscription = hub.connect(&claims.sub, channels, expires_at_ms)?;
        subscription.wait_live(SUBSCRIBE_TIMEOUT).await?;
        let broker = hub.broker().clone();
        let resume = last_event_id.map(Cursor::decode);
        let channels = subscription.channels().to_vec();

        let mut positions = Vec::with_capacity(channels.len());
        let mut replay = Vec::new();
        let mut reset = Vec::new();
        for channel in &channels {
            let from = match &resume {
                Some(Ok(cursor)) => cursor.get(channel),
                _ => None,
            };
            let history = match from {
                Some(after) => {
                    broker
                        .history_after(channel, after, config.replay_limit)
                        .await?
                }
                None => History::Gap,
            };
            match history {
                History::Entries(entries) => {
                    positions.push(from.unwrap_or_default());
                    replay.extend(entries.into_iter().map(|(id, p)| (id, channel.clone(), p)));
                }
                History::Gap => {
                    // A channel new to this cursor starts live; one whose
                    // history cannot cover the cursor (or any channel of a
                    // malformed cursor) starts live after a reset.
                    if from.is_some() || matches!(resume, Some(Err(_))) {
                        reset.push(channel.as_str().to_owned());
                    }
                    positions.push(broker.tip(channel).await?);
                }
            }
        }
        for (channel, position) in channels.iter().zip(&positions) {
            hub.note_position(channel, *position);
        }

        let mut session = Session {
            subscription,
            positions,
            opening: None,
            retry: config.retry,
            ended: None,
        };

        let m = metrics::get();
        let mut opening = BytesMut::new();
        opening.put_slice(&sse::encode_retry(config.retry.as_millis() as u64));
        // Merge channels by id: in order within each channel, and roughly in
        // publish time across channels (each stream numbers its own ids).
        replay.sort_by_key(|(id, _, _)| *id);
        let max_payload = hub.config().max_payload;
        let now = now_ms();
        let mut replayed = 0;
        for (_, channel, payload) in replay {
            if let Some(frame) = Frame::decode(channel, &payload, max_payload) {
                replayed += u64::from(session.append(&frame, &mut opening, now));
            }
        }
        m.replayed.increment(replayed);
        m.delivered.increment(replayed);
        if !reset.is_empty() {
            m.resets.increment(1);
            let data = json!({ "channels": reset });
            opening.put_slice(&sse::encode_control("herald.reset", &data, None));
        }
        let ready = json!({
            "node": config.node_id,
            "user": claims.sub,
            "channels": channels.iter().map(Channel::as_str).collect::<Vec<_>>(),
        });
        let cursor = session.cursor();
        opening.put_slice(&sse::encode_control("herald.ready", &ready, Some(&cursor)));
        session.opening = Some(opening.freeze());
        Ok(session)
    }

    /// The current cursor text.
    fn cursor(&self) -> String {
        let channels = self.subscription.channels().iter().map(Channel::as_str);
        sse::encode_cursor(channels.zip(self.positions.iter().copied()))
    }

    /// Appends `frame` unless this connection already has it; returns
    /// whether it was appended.
    /// Metrics are the caller's: it counts once per chunk.
    fn append(&mut self, frame: &Frame, out: &mut BytesMut, now_ms: u64) -> bool {
        let Some(slot) = self
            .subscription
            .channels()
            .iter()
            .position(|c| *c == frame.channel)
        else {
            return false;
        };
        if let Some(id) = frame.id {
            if id <= self.positions[slot] {
                return false;
            }
            self.positions[slot] = id;
            out.put_slice(b"id: ");
            let channels = self.subscription.channels().iter().map(Channel::as_str);
            sse::write_cursor(out, channels.zip(self.positions.iter().copied()));
            out.put_u8(b'\n');
        }
        out.put_slice(&frame.body);
        if let Some(ts) = frame.ts {
            metrics::get()
                .lag
                .record(now_ms.saturating_sub(ts) as f64 / 1000.0);
        }
        true
    }

    /// The connection's mailbox (a blocked write waits on its kill).
    pub(crate) fn mailbox(&self) -> &MailboxRef {
        &self.subscription.mailbox
    }

    /// The next chunk to write, or `None` when the stream ends.
    pub(crate) async fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(opening) = self.opening.take() {
            return Some(opening);
        }
        if self.ended.is_some() {
            return None;
        }
        let mailbox = self.subscription.mailbox.clone();
        loop {
            match mailbox.next().await {
                Wake::Frame(frame) => {
                    let now = now_ms();
                    // Room for the frame, its cursor line, and a little more.
                    let mut out = BytesMut::with_capacity(frame.body.len() + 256);
                    let mut delivered = u64::from(self.append(&frame, &mut out, now));
                    // Coalesce what is already queued into the same write.
                    while out.len() < MAX_CHUNK {
                        let Some(frame) = mailbox.try_pop() else {
                            break;
                        };
                        delivered += u64::from(self.append(&frame, &mut out, now));
                    }
                    metrics::get().delivered.increment(delivered);
                    if !out.is_empty() {
                        mailbox.wrote();
                        return Some(out.freeze());
                    }
                }
                Wake::Heartbeat => return Some(Bytes::from_static(sse::HEARTBEAT)),
                Wake::Expired => {
                    self.ended = Some(CloseReason::Expired);
                    return Some(sse::encode_control("herald.expired", &json!({}), None));
                }
                Wake::Shutdown => {
                    self.ended = Some(CloseReason::Shutdown);
                    let spread = self.subscription.drain_spread_ms();
                    return Some(sse::encode_retry(drain_retry(self.retry, spread)));
                }
                Wake::Aged => {
                    self.ended = Some(CloseReason::MaxAge);
                    return Some(sse::encode_retry(jittered(self.retry)));
                }
                Wake::Killed => {
                    self.ended = Some(CloseReason::Error);
                    return None;
                }
                Wake::Disconnected => {
                    self.ended = Some(CloseReason::Disconnected);
                    return None;
                }
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let reason = self.ended.unwrap_or(CloseReason::Client);
        metrics::get().closed(self.subscription.close_reason(reason));
    }
}

/// The drain's `retry:`: as [`jittered`], but spread over at least
/// `spread_ms` when the node has many clients to send elsewhere.
fn drain_retry(retry: Duration, spread_ms: u64) -> u64 {
    let base = retry.as_millis().max(100) as u64;
    rand::random_range(base / 2..=(base * 2).max(spread_ms))
}

/// The last `retry:` of a draining node or an old connection: between half
/// and twice the normal hint, so clients come back spread out instead of
/// all at once.
fn jittered(retry: Duration) -> u64 {
    let base = retry.as_millis().max(100) as u64;
    rand::random_range(base / 2..=base * 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_drain_spreads_its_clients_reconnects() {
        let retry = Duration::from_secs(2);
        let small: Vec<u64> = (0..1_000).map(|_| drain_retry(retry, 20)).collect();
        assert!(small.iter().all(|ms| (1_000..=4_000).contains(ms)));
        // 14,000 clients at 1,000/s: spread over 14 s, evenly.
        let large: Vec<u64> = (0..1_000).map(|_| drain_retry(retry, 14_000)).collect();
        assert!(large.iter().all(|ms| (1_000..=14_000).contains(ms)));
        let late = large.iter().filter(|&&ms| ms > 10_000).count();
        assert!(late > 150, "spread to the end of the window: {late}");
    }
}
