//! Channel names, their validation, claim pattern matching and Redis names.
//!
//! Three kinds exist: `user:<sub>` (every connection of one user),
//! `broadcast` (every connection) and `topic:<name>` (connections that asked
//! for it and whose token allows it). A [`Channel`] is validated once, on the
//! way in, and is cheap to clone (`Arc<str>`) because the hub keys maps by it
//! and every frame carries one.

use std::fmt;
use std::sync::Arc;

/// Longest channel name accepted, in bytes, not counting the `user:` or
/// `topic:` prefix (so every valid `sub`, up to 256 bytes, has a channel).
pub(crate) const MAX_CHANNEL_LEN: usize = 256;

/// The name of Herald's own channel between nodes (disconnects,
/// revocations). [`Channel::parse`] refuses it, so no client can subscribe
/// to it or publish on it.
const CONTROL: &str = "herald.control";

/// A validated channel name.
#[derive(Clone, Eq, PartialOrd, Ord)]
pub struct Channel(Arc<str>);

impl std::hash::Hash for Channel {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // By content, consistent with `eq`.
        self.0.hash(state);
    }
}

impl PartialEq for Channel {
    /// The hub hands every connection and frame of a channel the same
    /// `Arc`, so the per-delivery comparison is usually a pointer check.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

/// Why a channel name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChannelError {
    /// Empty, too long, or with control characters.
    #[error("channel names are 1-256 bytes (after `user:`/`topic:`) without control characters")]
    Malformed,
    /// Not `user:`, `topic:` or `broadcast`.
    #[error("channel must be `user:<id>`, `topic:<name>` or `broadcast`")]
    UnknownKind,
}

impl Channel {
    /// The channel every connection listens to.
    pub fn broadcast() -> Self {
        Channel(Arc::from("broadcast"))
    }

    /// The nodes' control channel: like `broadcast`, every node always
    /// receives it; its messages are for the nodes, never for a client.
    pub fn control() -> Self {
        Channel(Arc::from(CONTROL))
    }

    /// Whether this is [`Channel::control`].
    pub fn is_control(&self) -> bool {
        &*self.0 == CONTROL
    }

    /// Whether a broker keeps this channel subscribed whether or not any
    /// local connection wants it (`broadcast` and the control channel).
    pub fn is_permanent(&self) -> bool {
        &*self.0 == "broadcast" || self.is_control()
    }

    /// The channel of one user.
    pub fn user(sub: &str) -> Result<Self, ChannelError> {
        Self::parse(&format!("user:{sub}"))
    }

    /// A topic channel.
    pub fn topic(name: &str) -> Result<Self, ChannelError> {
        Self::parse(&format!("topic:{name}"))
    }

    /// Validates a full channel name such as `user:42`.
    pub fn parse(name: &str) -> Result<Self, ChannelError> {
        if name.is_empty() || name.chars().any(char::is_control) {
            return Err(ChannelError::Malformed);
        }
        let suffix = match name
            .strip_prefix("user:")
            .or_else(|| name.strip_prefix("topic:"))
        {
            Some(suffix) => suffix,
            None if name == "broadcast" => name,
            None if name.len() > MAX_CHANNEL_LEN => return Err(ChannelError::Malformed),
            None => return Err(ChannelError::UnknownKind),
        };
        if suffix.is_empty() {
            return Err(ChannelError::UnknownKind);
        }
        if suffix.len() > MAX_CHANNEL_LEN {
            return Err(ChannelError::Malformed);
        }
        Ok(Channel(Arc::from(name)))
    }

    /// The full name, e.g. `topic:news`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Redis pub/sub channel: `<prefix>:{<channel>}`. The braces are a hash
    /// tag so the channel and its history stream share a cluster slot.
    pub fn pubsub_key(&self, prefix: &str) -> String {
        self.key(prefix, "")
    }

    /// Redis history stream: `<prefix>:{<channel>}:h`.
    pub fn history_key(&self, prefix: &str) -> String {
        self.key(prefix, ":h")
    }

    /// `<prefix>:{<channel>}<suffix>`, built without the formatting
    /// machinery: every publish makes two.
    fn key(&self, prefix: &str, suffix: &str) -> String {
        let mut key = String::with_capacity(prefix.len() + self.0.len() + suffix.len() + 3);
        key.push_str(prefix);
        key.push_str(":{");
        key.push_str(&self.0);
        key.push('}');
        key.push_str(suffix);
        key
    }

    /// Recovers the channel from a pub/sub key made by [`Channel::pubsub_key`].
    pub fn from_pubsub_key(prefix: &str, key: &str) -> Option<Self> {
        let inner = key
            .strip_prefix(prefix)?
            .strip_prefix(":{")?
            .strip_suffix('}')?;
        if inner == CONTROL {
            return Some(Self::control());
        }
        Self::parse(inner).ok()
    }

    /// Redis key of a user's revocation (on a `user:` channel):
    /// `<prefix>:{user:<id>}:revoked`, in the user channel's slot.
    pub fn revocation_key(&self, prefix: &str) -> String {
        format!("{prefix}:{{{}}}:revoked", self.0)
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Channel({})", self.0)
    }
}

/// Whether a claim pattern allows `name`: an exact match, or a trailing `*`
/// that matches any suffix (`orders.*` allows `orders.1`; `*` allows all).
pub(crate) fn pattern_allows(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// Whether any of `patterns` allows `name`.
pub(crate) fn any_pattern_allows(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| pattern_allows(p, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_validation() {
        assert!(Channel::parse("broadcast").is_ok());
        assert!(Channel::parse("user:42").is_ok());
        assert!(Channel::parse("topic:orders.1").is_ok());
        assert_eq!(Channel::parse("user:"), Err(ChannelError::UnknownKind));
        assert_eq!(Channel::parse("room:1"), Err(ChannelError::UnknownKind));
        assert_eq!(Channel::parse("user:a\nb"), Err(ChannelError::Malformed));
        assert_eq!(Channel::parse(""), Err(ChannelError::Malformed));
        let longest = format!("user:{}", "x".repeat(256));
        assert!(Channel::parse(&longest).is_ok());
        let long = format!("topic:{}", "x".repeat(257));
        assert_eq!(Channel::parse(&long), Err(ChannelError::Malformed));
    }

    #[test]
    fn redis_names_round_trip() {
        let c = Channel::parse("user:4{2}").expect("valid");
        assert_eq!(c.pubsub_key("herald"), "herald:{user:4{2}}");
        assert_eq!(c.history_key("herald"), "herald:{user:4{2}}:h");
        assert_eq!(
            Channel::from_pubsub_key("herald", &c.pubsub_key("herald")),
            Some(c)
        );
        assert_eq!(
            Channel::from_pubsub_key("other", "herald:{broadcast}"),
            None
        );
        let control = Channel::control();
        assert_eq!(
            Channel::from_pubsub_key("herald", &control.pubsub_key("herald")),
            Some(control.clone())
        );
        assert!(control.is_permanent() && Channel::broadcast().is_permanent());
        assert!(
            Channel::parse(control.as_str()).is_err(),
            "clients can neither subscribe to nor publish on the control channel"
        );
    }

    #[test]
    fn patterns() {
        assert!(pattern_allows("news", "news"));
        assert!(!pattern_allows("news", "news2"));
        assert!(pattern_allows("orders.*", "orders.1"));
        assert!(!pattern_allows("orders.*", "order"));
        assert!(pattern_allows("*", "anything"));
        assert!(!any_pattern_allows(&[], "news"));
    }
}
