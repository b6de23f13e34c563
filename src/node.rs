//! A node: binds its listeners, wires broker → hub → routes, runs until its
//! shutdown future resolves, then drains.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app_auth::AppAuth;
use crate::auth::{self, Verifier};
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::{RedisBroker, RedisConfig};
use crate::broker::Broker;
use crate::config::ServeConfig;
use crate::control::Control;
use crate::http::{admin_router, body_limit, public_router, AppShared, AppState};
use crate::hub::{Hub, HubConfig};
use crate::publisher::Publisher;
use crate::server::EdgeConfig;
use crate::session::SessionConfig;

/// A bound, ready-to-run node.
pub struct Node {
    config: ServeConfig,
    state: AppState,
    public: TcpListener,
    admin: TcpListener,
    demo_token: Option<String>,
}

impl Node {
    /// Loads keys, starts the broker and binds both listeners; fails with a
    /// clear message on bad configuration or a taken address.
    pub async fn bind(config: ServeConfig) -> anyhow::Result<Node> {
        let prometheus = crate::metrics::install();
        crate::metrics::get();

        let keys = &config.keys;
        let demo_secret = (keys.jwt_secret.is_empty()
            && keys.jwt_public_key.is_empty()
            && config.jwt_jwks_url.is_none())
        .then(|| format!("{:032x}", rand::random::<u128>()));
        let verifier = Arc::new(match &config.jwt_jwks_url {
            Some(url) => Verifier::with_jwks(keys, url, config.jwt_jwks_refresh)?,
            None => Verifier::new(keys, demo_secret.as_deref())?,
        });
        tokio::spawn(verifier.clone().keep_jwks_fresh());
        let demo_token = match &demo_secret {
            Some(secret) => Some(auth::mint(
                secret,
                "demo",
                vec!["*".into()],
                vec!["user:demo".into(), "broadcast".into(), "topic:*".into()],
                Duration::from_secs(24 * 3600),
            )?),
            None => None,
        };

        let public = listen(config.listen)
            .with_context(|| format!("cannot listen on {} (--listen)", config.listen))?;
        let admin = listen(config.admin_listen).with_context(|| {
            format!("cannot listen on {} (--admin-listen)", config.admin_listen)
        })?;

        let node_id = format!("{:08x}", rand::random::<u32>());
        let (deliveries, incoming) = mpsc::unbounded_channel();
        let backbone = &config.backbone;
        let broker: Arc<dyn Broker> =
            match RedisConfig::from_flags(backbone, config.redis_probe_interval) {
                Some(redis) if backbone.redis_cluster => Arc::new(
                    crate::broker::cluster::start(redis, &node_id, deliveries)
                        .context("--redis-url")?,
                ),
                Some(redis) => Arc::new(
                    RedisBroker::start(redis, &node_id, deliveries).context("--redis-url")?,
                ),
                None => Arc::new(MemoryBroker::new(
                    deliveries,
                    backbone.history_size as usize,
                    backbone.history_ttl,
                )),
            };
        let hub = Hub::new(
            broker.clone(),
            HubConfig {
                max_connections: config.max_connections,
                max_connections_per_user: config.max_connections_per_user,
                queue_capacity: config.queue_capacity as usize,
                max_payload: config.backbone.max_payload,
                heartbeat: config.heartbeat,
                max_connection_age: config.max_connection_age,
            },
        );
        let control = Control::new(hub.clone(), config.revocation_ttl);
        let (control_tx, control_rx) = mpsc::channel(crate::control::CONTROL_QUEUE);
        tokio::spawn(hub.clone().dispatch_from(incoming, control_tx));
        tokio::spawn(control.clone().run(control_rx));
        tokio::spawn(crate::presence::report(hub.clone(), node_id.clone()));
        tokio::spawn(hub.clone().sweep());

        let state = AppState::new(AppShared {
            hub,
            verifier,
            session: Arc::new(SessionConfig {
                node_id,
                retry: config.retry,
                replay_limit: config.backbone.history_size as usize,
            }),
            cookie_name: Arc::from(config.cookie_name.as_str()),
            allow_query_token: config.allow_query_token,
            publisher: Publisher::new(broker, config.backbone.max_payload),
            prometheus,
            cors: crate::http::cors::Cors::new(&config.cors_origins),
            control,
            app_auth: match &config.auth_url {
                Some(url) => Some(Arc::new(
                    AppAuth::new(url, config.auth_timeout, config.auth_cache_ttl)
                        .context("--auth-url")?,
                )),
                None => None,
            },
        });
        Ok(Node {
            config,
            state,
            public,
            admin,
            demo_token,
        })
    }

    /// The bound public address.
    pub fn public_addr(&self) -> SocketAddr {
        self.public.local_addr().unwrap_or(self.config.listen)
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.config.admin_listen)
    }

    /// This node's id (in `herald.ready`).
    pub fn id(&self) -> &str {
        &self.state.session.node_id
    }

    /// The demo token, when the node generated its own secret.
    pub fn demo_token(&self) -> Option<&str> {
        self.demo_token.as_deref()
    }

    /// Serves until `shutdown` resolves, then drains: readiness goes 503, the
    /// public listener stops accepting, every stream gets a jittered `retry:`
    /// and ends; returns once all connections closed or `--drain-timeout`
    /// passed.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Node {
            config,
            state,
            public,
            admin,
            ..
        } = self;
        let tracker = TaskTracker::new();
        let public_stop = CancellationToken::new();
        let admin_stop = CancellationToken::new();
        // The descriptors this process may open, as the binary left them.
        let open_files =
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(u64::MAX, |(soft, _)| soft);
        let edge = EdgeConfig {
            max_body: body_limit(config.backbone.max_payload),
            max_http_connections: config.max_http_connections as usize,
            max_sockets: crate::config::sockets_within(open_files),
        };
        let public_task = tokio::spawn(crate::server::serve(
            public,
            public_router(state.clone()),
            edge.clone(),
            public_stop.clone(),
            tracker.clone(),
        ));
        let admin_task = tokio::spawn(crate::server::serve(
            admin,
            admin_router(state.clone()),
            edge,
            admin_stop.clone(),
            TaskTracker::new(),
        ));

        shutdown.await;
        tracing::info!(connections = state.hub.connection_count(), "draining");
        // Readiness turns 503 here, before any stream is ended.
        state.hub.drain();
        public_stop.cancel();
        let _ = public_task.await;
        tracker.close();
        if tokio::time::timeout(config.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("drain timeout passed with connections still open");
        }
        admin_stop.cancel();
        let _ = admin_task.await;
        Ok(())
    }
}

/// Connections the kernel may hold for a listener before it accepts them
/// (capped by `net.core.somaxconn`). The standard library's 128 — what
/// `TcpListener::bind` uses — overflows when thousands of clients
/// reconnect at once (a node restarting, a ramp): the kernel then drops
/// their handshakes, they retry after a timeout, and a node that was
/// merely busy for a moment stays behind. 4096 absorbs ~2 s of a 2,000/s
/// reconnect storm.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as
/// `TcpListener::bind` sets it, so a restarted node gets its port back).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
