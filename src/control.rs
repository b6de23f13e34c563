//! The server API's cross-node side: `POST /disconnect` and revocations.
//!
//! A disconnect reaches every node as an envelope (event `disconnect`) on
//! the control channel ([`Channel::control`]), which every broker delivers
//! to every node like `broadcast`, so it needs nothing new from a broker.
//! Each node ends that user's local connections with `herald.disconnected`.
//!
//! A revocation ("log out everywhere") is stored in the broker for
//! `--revocation-ttl` ([`crate::broker::Store::revoke`]), so a node started
//! later refuses the old tokens too. Each node remembers what it read for
//! [`REVOCATION_RECHECK`] (and learns new revocations from the control
//! message at once), so a reconnecting browser costs at most one broker
//! read per user per recheck interval.
//!
//! A node cut off from the broker while a disconnect is sent misses the
//! message (its connections of that user stay open), but still learns of a
//! revocation within [`REVOCATION_RECHECK`] of its next authentication.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::auth::{unix_now, Claims};
use crate::broker::{Broker, BrokerError, Store};
use crate::channel::Channel;
use crate::envelope::{now_ms, Envelope};
use crate::hub::Hub;
use crate::metrics;
use crate::sse;

/// How long a node trusts what it read about a user's revocation.
pub(crate) const REVOCATION_RECHECK: Duration = Duration::from_secs(10);
/// Most users whose revocation state a node remembers; when full, entries
/// past their recheck are dropped, and if that is not enough, all.
const REVOCATION_CACHE: usize = 100_000;
/// Control messages waiting for the control task; beyond it they are
/// dropped (logged): each is a disconnect an operator can repeat.
pub(crate) const CONTROL_QUEUE: usize = 1024;
/// Largest control message accepted from the broker.
const MAX_CONTROL_PAYLOAD: usize = 4096;
/// Longest `reason` shown to the disconnected clients, in bytes.
pub(crate) const MAX_REASON_LEN: usize = 256;

/// The control channel's `disconnect` message.
#[derive(Debug, Serialize, Deserialize)]
struct Disconnect {
    /// The user's `sub`.
    user: String,
    /// Shown to the clients in `herald.disconnected`.
    reason: String,
    /// With a revocation: tokens issued before this (seconds) are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revoke_before: Option<u64>,
}

/// Why a token was refused by [`Control::check_revocation`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum RevocationError {
    /// The user was logged out after this token was issued.
    #[error("token revoked")]
    Revoked,
    /// The revocation state could not be read.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// user → (revocation cutoff if any, when this node read or learned it).
/// User → (revocation cutoff, 0 for none; when it was read, ms since the
/// epoch). Two words per user: a node holds one entry per user who
/// connected within the recheck interval, and up to [`REVOCATION_CACHE`].
type Known = HashMap<Box<str>, (u64, u64)>;

/// Cheap clonable handle to the node's control side.
#[derive(Clone)]
pub(crate) struct Control {
    shared: Arc<Shared>,
}

struct Shared {
    hub: Hub,
    /// How long a revocation lasts (`--revocation-ttl`).
    revocation_ttl: Duration,
    /// What this node knows of each user's revocation. A std mutex, never
    /// held across an `.await`.
    known: Mutex<Known>,
}

impl Control {
    /// The control side of the node whose hub is `hub`.
    pub(crate) fn new(hub: Hub, revocation_ttl: Duration) -> Control {
        Control {
            shared: Arc::new(Shared {
                hub,
                revocation_ttl,
                known: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn broker(&self) -> &Arc<dyn Broker> {
        self.shared.hub.broker()
    }

    fn known(&self) -> MutexGuard<'_, Known> {
        crate::sync::lock(&self.shared.known)
    }

    /// Remembers `user`'s revocation cutoff (the newest one wins).
    fn learn(&self, user: &str, cutoff: Option<u64>) {
        let mut known = self.known();
        if known.len() >= REVOCATION_CACHE && !known.contains_key(user) {
            let now = now_ms();
            known.retain(|_, (_, read)| fresh(*read, now));
            if known.len() >= REVOCATION_CACHE {
                known.clear();
            }
        }
        let entry = known.entry(user.into()).or_insert((0, 0));
        entry.0 = entry.0.max(cutoff.unwrap_or(0));
        entry.1 = now_ms();
    }

    /// Refuses a token issued before its user's revocation. A token
    /// without `iat` counts as issued at 0.
    pub(crate) async fn check_revocation(&self, claims: &Claims) -> Result<(), RevocationError> {
        let cached = self
            .known()
            .get(claims.sub.as_str())
            .filter(|(_, read)| fresh(*read, now_ms()))
            .map(|(cutoff, _)| (*cutoff > 0).then_some(*cutoff));
        let cutoff = match cached {
            Some(cutoff) => cutoff,
            None => {
                let user = Channel::user(&claims.sub)
                    .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
                let cutoff = self.broker().revoked_before(&user).await?;
                self.learn(&claims.sub, cutoff);
                cutoff
            }
        };
        match cutoff {
            Some(cutoff) if claims.iat.unwrap_or(0) < cutoff => Err(RevocationError::Revoked),
            _ => Ok(()),
        }
    }

    /// Ends `user`'s connections on every node with `herald.disconnected`
    /// (data `{"reason": reason}`); with `revoke`, also refuses their tokens
    /// issued before now on every node for `--revocation-ttl`. Returns how
    /// many connections it ended on this node.
    pub(crate) async fn disconnect(
        &self,
        user: &Channel,
        sub: &str,
        reason: &str,
        revoke: bool,
    ) -> Result<usize, BrokerError> {
        let revoke = revoke.then(|| (unix_now(), self.shared.revocation_ttl));
        if let Some((before, _)) = revoke {
            // This node refuses the old tokens before its connections close.
            self.learn(sub, Some(before));
        }
        let closed = self.close_local(user, reason);
        send_disconnect(self.broker().as_ref(), user, reason, revoke).await?;
        metrics::get().disconnects.increment(1);
        Ok(closed)
    }

    fn close_local(&self, user: &Channel, reason: &str) -> usize {
        let last = sse::encode_control("herald.disconnected", &json!({ "reason": reason }), None);
        self.shared.hub.close_user(user, last)
    }

    /// Carries out the control messages the hub hands over, until the hub
    /// drops its sender. Malformed ones are dropped and counted as invalid.
    pub(crate) async fn run(self, mut incoming: mpsc::Receiver<Bytes>) {
        while let Some(payload) = incoming.recv().await {
            match parse_disconnect(&payload) {
                Some((user, message)) => {
                    if message.revoke_before.is_some() {
                        self.learn(&message.user, message.revoke_before);
                    }
                    let closed = self.close_local(&user, &message.reason);
                    tracing::debug!(closed, "disconnect from the control channel");
                }
                None => {
                    metrics::get().invalid.increment(1);
                    tracing::warn!("dropped an invalid control message");
                }
            }
        }
    }
}

/// Stores `user`'s revocation (cutoff and TTL) if given, then tells every
/// node to disconnect the user: what `POST /disconnect` does beyond this
/// node, and all an app service does through [`crate::Publisher`].
pub(crate) async fn send_disconnect(
    store: &dyn Store,
    user: &Channel,
    reason: &str,
    revoke: Option<(u64, Duration)>,
) -> Result<(), BrokerError> {
    let sub = user
        .as_str()
        .strip_prefix("user:")
        .ok_or_else(|| BrokerError::Unavailable(format!("`{user}` is not a user channel")))?;
    if let Some((before, ttl)) = revoke {
        store.revoke(user, before, ttl).await?;
    }
    let message = Disconnect {
        user: sub.to_owned(),
        reason: reason.to_owned(),
        revoke_before: revoke.map(|(before, _)| before),
    };
    // Serialising strings and a number cannot fail.
    let data = serde_json::value::to_raw_value(&message)
        .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
    store
        .publish(&Channel::control(), Some("disconnect"), &data)
        .await
        .map(drop)
}

/// A control envelope → the user channel and the disconnect it asks for.
fn parse_disconnect(payload: &[u8]) -> Option<(Channel, Disconnect)> {
    let envelope = Envelope::parse(payload, MAX_CONTROL_PAYLOAD).ok()?;
    if envelope.event != Some("disconnect") {
        return None;
    }
    let data: &RawValue = envelope.data;
    let mut message: Disconnect = serde_json::from_str(data.get()).ok()?;
    let user = Channel::user(&message.user).ok()?;
    if message.reason.len() > MAX_REASON_LEN {
        message.reason = String::from("disconnected");
    }
    Some((user, message))
}

/// Whether a revocation state read at `read_ms` is recent enough to trust.
fn fresh(read_ms: u64, now_ms: u64) -> bool {
    now_ms.saturating_sub(read_ms) < REVOCATION_RECHECK.as_millis() as u64
}
