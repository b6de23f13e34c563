//! A message as connections write it: validated and encoded once per node,
//! then shared (behind an `Arc`) by every connection it goes to.
//!
//! Both ways a message reaches a connection come through here: live from
//! the broker (the hub's dispatch) and from history (a session's replay), so
//! a payload is checked and counted the same way whichever way it came.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::channel::Channel;
use crate::envelope::{Envelope, StreamId};
use crate::metrics;
use crate::sse;

/// One message, encoded once per node and shared by every connection.
#[derive(Debug)]
pub struct Frame {
    /// The channel it was published on.
    pub channel: Channel,
    /// Its history id; `None` for live-only messages.
    pub id: Option<StreamId>,
    /// Publish time (ms), for the lag metric.
    pub ts: Option<u64>,
    /// `event:` and `data:` lines plus the blank line.
    pub body: Bytes,
}

impl Frame {
    /// Validates and encodes a payload; `None` (counted, logged) if invalid.
    pub fn decode(channel: Channel, payload: &[u8], max_payload: usize) -> Option<Frame> {
        match Envelope::parse(payload, max_payload) {
            Ok(envelope) => Some(Frame {
                channel,
                id: envelope.id,
                ts: envelope.ts,
                body: sse::encode_message(&envelope),
            }),
            Err(error) => {
                metrics::get().invalid.increment(1);
                warn_rate_limited(&channel, &error);
                None
            }
        }
    }
}

/// Logs invalid payloads at most once a second, so a flood of garbage on
/// Redis cannot flood the logs too.
fn warn_rate_limited(channel: &Channel, error: &dyn std::fmt::Display) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = crate::envelope::now_ms();
    let last = LAST.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= 1000
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        // Channel names may carry user ids: debug level only.
        tracing::warn!(%error, "dropped an invalid message");
        tracing::debug!(%channel, "invalid message channel");
    }
}
