//! Herald: notification fanout over Server-Sent Events, across many nodes.
//!
//! # Layout
//!
//! - [`config`]: flags and environment (`herald --help`).
//! - `channel`: channel names, claim patterns, Redis key names.
//! - `envelope`: the pub/sub message format and stream ids.
//! - `fetch`: the node's own HTTP(S) GETs (JWKS, `--auth-url`).
//! - [`auth`]: finding and verifying tokens; minting demo tokens.
//! - `app_auth`: session cookies checked by the application (`--auth-url`).
//! - `sse`: SSE frame encoding and the resume `sse::Cursor`.
//! - `frame`: a message validated and encoded once, shared by connections.
//! - [`broker`]: the pub/sub + history backbone (`broker::memory` embedded,
//!   [`broker::redis`] shared, `broker::cluster` sharded pub/sub on a Redis
//!   Cluster); knows nothing of connections.
//! - `hub`: local channel → connections table, refcounted subscriptions,
//!   encode-once fanout, slow-client cuts.
//! - `control`: the server API across nodes: disconnects, revocations.
//! - `presence`: this node's connection counts, reported to the broker.
//! - `mailbox`: a connection's bounded frame queue; the slow-client cut.
//! - `session`: one SSE connection: replay, live frames, heartbeats, expiry.
//! - `publisher`: the single publish path (HTTP, CLI, Rust apps).
//! - `http`: every route, on the public and the admin listener: auth,
//!   CORS, limits and the JSON errors.
//! - `server`: the HTTP/1.1 edge: accept loops and one connection driver
//!   that reads requests, hands them to the router and writes responses;
//!   it knows no route.
//! - `metrics`: metric names and handles.
//! - [`cli`]: the `herald publish` client.
//!
//! Dependencies point down this list's reverse: nothing below `http` knows
//! about HTTP, and the broker knows nothing of connections.
//!
//! # The public API
//!
//! What the README documents, and nothing else: [`Node`] (a node inside your
//! own binary), [`Publisher`] with [`Message`], [`StreamId`] and
//! [`PublishError`] (publishing and the server API from a Rust app),
//! [`broker::redis::RedisConfig`] and [`broker::redis::PUBLISH_SCRIPT`],
//! [`auth::mint`] for tokens, and the `herald` binary's [`config`] and
//! [`cli`]. Every other module is private to the crate, so the
//! `unreachable_pub` lint flags any item marked `pub` that nobody outside
//! can reach; `fuzzing` re-exports what the fuzz targets drive.

mod app_auth;
pub mod auth;
pub mod broker;
mod channel;
pub mod cli;
pub mod config;
mod control;
mod envelope;
mod fetch;
mod frame;
mod http;
mod hub;
mod mailbox;
mod metrics;
mod presence;
mod publisher;
mod server;
mod session;
mod sse;
mod sync;

mod node;

/// What the fuzz targets in `fuzz/` and the property tests drive that is
/// not otherwise public. Not part of the API: it changes whenever they need
/// it to.
#[doc(hidden)]
pub mod fuzzing {
    use std::sync::Arc;
    use std::time::Duration;

    pub use crate::channel::Channel;
    pub use crate::envelope::{
        encode as encode_envelope, now_ms, valid_event_name, Envelope, MAX_CLOCK_SKEW_MS,
    };
    pub use crate::frame::Frame;
    pub use crate::http::publish::parse_body as parse_publish_body;
    pub use crate::http::ApiError;
    pub use crate::server::request::{
        body_too_large, parse_head, BodyFraming, Chunked, Head, Refusal, MAX_HEAD,
    };
    pub use crate::sse::{encode_cursor, encode_message, position_in, Cursor};

    /// A publisher over a fresh embedded broker, for its checks; call it
    /// inside a tokio runtime (the broker's sweeper is spawned on it).
    pub fn embedded_publisher(history_size: usize, max_payload: usize) -> crate::Publisher {
        let (deliveries, _) = tokio::sync::mpsc::unbounded_channel();
        let broker = crate::broker::memory::MemoryBroker::new(
            deliveries,
            history_size,
            Duration::from_secs(60),
        );
        crate::Publisher::new(Arc::new(broker), max_payload)
    }
}

pub use envelope::StreamId;
pub use node::Node;
pub use publisher::{Message, PublishError, Publisher};
