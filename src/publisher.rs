//! Publishing: the one path every publisher goes through (`POST /publish`,
//! `herald publish`, Rust apps), so validation and limits are the same
//! whichever way a message arrives.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::broker::{BrokerError, Page, Presence, Store};
use crate::channel::Channel;
use crate::envelope::{compact_json, valid_event_name, StreamId};
use crate::metrics;

/// One message to publish.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    /// Target: `user:<id>`, `broadcast` or `topic:<name>`.
    pub channel: String,
    /// Event name; `message` when absent.
    #[serde(default)]
    pub event: Option<String>,
    /// Any JSON value; a string is delivered as its text.
    pub data: Box<RawValue>,
}

impl Message {
    /// A message with JSON `data`.
    pub fn new(channel: impl Into<String>, event: Option<&str>, data: &serde_json::Value) -> Self {
        Message {
            channel: channel.into(),
            event: event.map(str::to_owned),
            // Serialising a Value cannot fail.
            data: serde_json::value::to_raw_value(data)
                .unwrap_or_else(|_| RawValue::from_string("null".into()).unwrap_or_default()),
        }
    }
}

/// Why a message was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A bad channel or event name (400).
    #[error("{0}")]
    Invalid(String),
    /// `data` over the size limit (413).
    #[error("data is {size} bytes; the limit is {limit}")]
    TooLarge {
        /// The data's size.
        size: usize,
        /// `--max-payload`.
        limit: usize,
    },
    /// The broker failed (503).
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// A message that passed validation.
#[derive(Debug)]
pub struct Checked {
    /// The target channel.
    pub channel: Channel,
    event: Option<String>,
    data: Box<RawValue>,
}

/// Publishes through a broker with the node's validation rules.
#[derive(Clone)]
pub struct Publisher {
    store: Arc<dyn Store>,
    max_payload: usize,
}

impl Publisher {
    /// A publisher into `store` (a node's broker, or a publish-only Redis
    /// store for apps), refusing data over `max_payload` bytes.
    pub(crate) fn new(store: Arc<dyn Store>, max_payload: usize) -> Self {
        Publisher { store, max_payload }
    }

    /// A publisher for app services that writes straight to Redis with the
    /// publish script, exactly as a node's `POST /publish` does. Connects
    /// lazily; `config` must match the nodes' prefix and history settings.
    pub fn redis(
        config: crate::broker::redis::RedisConfig,
        max_payload: usize,
    ) -> Result<Self, BrokerError> {
        let store = crate::broker::redis::RedisStore::new(config)?;
        Ok(Publisher::new(Arc::new(store), max_payload))
    }

    /// Like [`Publisher::redis`], for a Redis Cluster: `config.url` holds
    /// one or more seed URLs (comma-separated); each message goes to its
    /// channel's shard and is published there with `SPUBLISH`.
    pub fn redis_cluster(
        config: crate::broker::redis::RedisConfig,
        max_payload: usize,
    ) -> Result<Self, BrokerError> {
        let store = crate::broker::redis::RedisStore::cluster(config)?;
        Ok(Publisher::new(Arc::new(store), max_payload))
    }

    /// Validates a message without publishing it (public for the fuzz
    /// targets; apps call [`Publisher::publish`], which checks the same).
    #[doc(hidden)]
    pub fn check(&self, message: Message) -> Result<Checked, PublishError> {
        let channel = Channel::parse(&message.channel)
            .map_err(|e| PublishError::Invalid(format!("channel `{}`: {e}", message.channel)))?;
        if let Some(event) = &message.event {
            if !valid_event_name(event) {
                return Err(PublishError::Invalid(
                    "event names are 1-64 characters of A-Z a-z 0-9 _ . : -".into(),
                ));
            }
        }
        let size = message.data.get().len();
        if size > self.max_payload {
            return Err(PublishError::TooLarge {
                size,
                limit: self.max_payload,
            });
        }
        let raw = message.data.get();
        let data = if raw.bytes().any(|b| b.is_ascii_whitespace()) {
            RawValue::from_string(compact_json(raw)).unwrap_or(message.data)
        } else {
            message.data
        };
        Ok(Checked {
            channel,
            event: message.event,
            data,
        })
    }

    /// Publishes a validated message; returns its history id.
    pub(crate) async fn publish_checked(
        &self,
        message: &Checked,
    ) -> Result<StreamId, PublishError> {
        let id = self
            .store
            .publish(&message.channel, message.event.as_deref(), &message.data)
            .await?;
        metrics::get().published.increment(1);
        Ok(id)
    }

    /// Validates and publishes one message.
    pub async fn publish(&self, message: Message) -> Result<StreamId, PublishError> {
        let checked = self.check(message)?;
        self.publish_checked(&checked).await
    }

    /// `POST /disconnect` from an app service: every node closes `user`'s
    /// connections with `herald.disconnected` (data `{"reason": reason}`);
    /// with `revoke_for`, their tokens issued before now are refused for
    /// that long (use the nodes' `--revocation-ttl`).
    pub async fn disconnect(
        &self,
        user: &str,
        reason: &str,
        revoke_for: Option<std::time::Duration>,
    ) -> Result<(), PublishError> {
        let channel = Channel::user(user)
            .map_err(|e| PublishError::Invalid(format!("user `{user}`: {e}")))?;
        if reason.len() > crate::control::MAX_REASON_LEN {
            return Err(PublishError::Invalid(format!(
                "reason is at most {} bytes",
                crate::control::MAX_REASON_LEN
            )));
        }
        let revoke = revoke_for.map(|ttl| (crate::auth::unix_now(), ttl));
        crate::control::send_disconnect(self.store.as_ref(), &channel, reason, revoke).await?;
        Ok(())
    }

    /// `GET /presence` from an app service: connections and nodes on a
    /// channel across the cluster.
    pub async fn presence(&self, channel: &str) -> Result<Presence, PublishError> {
        let channel = Channel::parse(channel)
            .map_err(|e| PublishError::Invalid(format!("channel `{channel}`: {e}")))?;
        Ok(self.store.presence(&channel).await?)
    }

    /// `GET /history` from an app service: at most `limit` entries of
    /// `channel` older than `before`, newest first (envelope JSON each).
    pub async fn history(
        &self,
        channel: &str,
        before: Option<StreamId>,
        limit: usize,
    ) -> Result<Page, PublishError> {
        let channel = Channel::parse(channel)
            .map_err(|e| PublishError::Invalid(format!("channel `{channel}`: {e}")))?;
        Ok(self.store.history_before(&channel, before, limit).await?)
    }
}
