//! Herald: notification fanout over Server-Sent Events, across many nodes.
//!
//! # Layout
//!
//! - [`config`]: flags and environment (`herald --help`).
//! - [`channel`]: channel names, claim patterns, Redis key names.
//! - [`envelope`]: the pub/sub message format and stream ids.
//! - [`fetch`]: the node's own HTTP(S) GETs (JWKS, `--auth-url`).
//! - [`auth`]: finding and verifying tokens; minting demo tokens.
//! - [`app_auth`]: session cookies checked by the application (`--auth-url`).
//! - [`sse`]: SSE frame encoding and the resume [`sse::Cursor`].
//! - [`frame`]: a message validated and encoded once, shared by connections.
//! - [`broker`]: the pub/sub + history backbone ([`broker::memory`] embedded,
//!   [`broker::redis`] shared, [`broker::cluster`] sharded pub/sub on a Redis
//!   Cluster); knows nothing of connections.
//! - [`hub`]: local channel → connections table, refcounted subscriptions,
//!   encode-once fanout, slow-client cuts.
//! - [`control`]: the server API across nodes: disconnects, revocations.
//! - [`presence`]: this node's connection counts, reported to the broker.
//! - [`mailbox`]: a connection's bounded frame queue; the slow-client cut.
//! - [`session`]: one SSE connection: replay, live frames, heartbeats, expiry.
//! - [`publisher`]: the single publish path (HTTP, CLI, Rust apps).
//! - [`http`]: every route, on the public and the admin listener: auth,
//!   CORS, limits and the JSON errors.
//! - [`server`]: the HTTP/1.1 edge: accept loops and one connection driver
//!   that reads requests, hands them to the router and writes responses;
//!   it knows no route.
//! - [`metrics`]: metric names and handles.
//! - [`cli`]: the `herald publish` client.
//!
//! Dependencies point down this list's reverse: nothing below `http` knows
//! about HTTP, and the broker knows nothing of connections.

pub mod app_auth;
pub mod auth;
pub mod broker;
pub mod channel;
pub mod cli;
pub mod config;
pub mod control;
pub mod envelope;
pub mod fetch;
pub mod frame;
pub mod http;
pub mod hub;
pub mod mailbox;
pub mod metrics;
pub mod presence;
pub mod publisher;
pub mod server;
pub mod session;
pub mod sse;
mod sync;

mod node;

/// What the fuzz targets in `fuzz/` drive that is not otherwise public. Not
/// part of the API: it changes whenever the fuzz targets need it to.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::http::publish::parse_body as parse_publish_body;
}

pub use node::Node;
pub use publisher::{Message, Publisher};
