//! Herald: notification fanout over Server-Sent Events, across many nodes.
//!
//! # Layout
//!
//! - [`config`]: flags and environment (`herald --help`).
//! - [`channel`]: channel names, claim patterns, Redis key names.
//! - [`envelope`]: the pub/sub message format and stream ids.
//! - [`auth`]: finding and verifying tokens; minting demo tokens.
//! - [`sse`]: SSE frame encoding and the resume [`sse::Cursor`].
//! - [`frame`]: a message validated and encoded once, shared by connections.
//! - [`broker`]: the pub/sub + history backbone ([`broker::memory`] embedded,
//!   [`broker::redis`] shared); knows nothing of connections.
//! - [`hub`]: local channel → connections table, refcounted subscriptions,
//!   encode-once fanout, slow-client cuts.
//! - [`mailbox`]: a connection's bounded frame queue; the slow-client cut.
//! - [`session`]: one SSE connection: replay, live frames, heartbeats, expiry.
//! - [`publisher`]: the single publish path (HTTP, CLI, Rust apps).
//! - [`http`]: routes, on the public and the admin listener.
//! - [`server`]: accept loops and per-connection tasks.
//! - [`metrics`]: metric names and handles.
//! - [`cli`]: the `herald publish` client.
//!
//! Dependencies point down this list's reverse: nothing below `http` knows
//! about HTTP, and the broker knows nothing of connections.

pub mod auth;
pub mod broker;
pub mod channel;
pub mod cli;
pub mod config;
pub mod envelope;
pub mod frame;
pub mod http;
pub mod hub;
pub mod mailbox;
pub mod metrics;
pub mod publisher;
pub mod server;
pub mod session;
pub mod sse;

mod node;

/// What the fuzz targets in `fuzz/` drive that is not otherwise public. Not
/// part of the API: it changes whenever the fuzz targets need it to.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::http::publish::parse_body as parse_publish_body;
}

pub use node::Node;
pub use publisher::{Message, Publisher};
