//! Herald on a Redis Cluster with sharded pub/sub (`--redis-cluster`).
//!
//! Each test starts its own 6-process cluster (3 masters + 3 replicas, see
//! `common::cluster`) and real `herald` nodes pointed at all six seeds.
//! Users are picked so their channels live on every shard. Apps that
//! publish straight to Redis are played by a plain RESP client running the
//! shipped publish script with `ARGV[5] = SPUBLISH` on the slot's master.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::cluster::Cluster;
use common::resp::{pubsub_key, Resp, RespValue, PUBLISH_SCRIPT};
use common::{get, metric, publish_ok, token, wait_until, Event, Node, Sse, WAIT};
use hyper::StatusCode;
use serde_json::{json, Value};

/// The probe interval the nodes run with: a silent shard is noticed fast.
const PROBE: &str = "300ms";

/// A node on `cluster`, once `/readyz` says every shard is connected.
async fn cluster_node(cluster: &Cluster) -> Node {
    let node = start_node(cluster);
    wait_ready(&node).await;
    node
}

fn start_node(cluster: &Cluster) -> Node {
    let urls = cluster.urls();
    Node::start(&[
        "--redis-url",
        &urls,
        "--redis-cluster",
        "--redis-probe-interval",
        PROBE,
    ])
}

async fn wait_ready(node: &Node) {
    let ready = wait_until(Duration::from_secs(30), || async {
        get(&node.admin_url("/readyz")).await.status == StatusCode::OK
    })
    .await;
    assert!(
        ready,
        "node never became ready\nstderr:\n{}",
        node.stderr_tail()
    );
}

/// `n` user ids per master, so every shard carries some users.
async fn users_on_every_shard(cluster: &Cluster, n: usize) -> BTreeMap<u16, Vec<String>> {
    let masters = cluster.masters().await;
    let mut by_master: BTreeMap<u16, Vec<String>> =
        masters.keys().map(|port| (*port, Vec::new())).collect();
    for i in 0.. {
        if by_master.values().all(|users| users.len() >= n) {
            break;
        }
        let user = format!("u{i}");
        let owner = cluster.owner(&pubsub_key(&format!("user:{user}"))).await;
        let users = by_master.get_mut(&owner).expect("owner is a master");
        if users.len() < n {
            users.push(user);
        }
    }
    by_master
}

/// The data of the application messages among `events`.
fn data(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.is_message())
        .map(|e| e.data().to_string())
        .collect()
}

/// Runs the shipped publish script on the master owning `channel`'s slot,
/// as an app service would (`EVALSHA`, `ARGV[5] = SPUBLISH`).
async fn evalsha_spublish(cluster: &Cluster, channel: &str, data_json: &str) -> RespValue {
    let pubsub = pubsub_key(channel);
    let history = format!("{pubsub}:h");
    let mut redis = Resp::connect(cluster.owner(&pubsub).await).await;
    let sha = redis
        .call_ok(&["SCRIPT", "LOAD", PUBLISH_SCRIPT])
        .await
        .text();
    redis
        .call_ok(&[
            "EVALSHA", &sha, "2", &history, &pubsub, "", data_json, "1000", "86400", "SPUBLISH",
        ])
        .await
}

fn cluster_publisher(cluster: &Cluster) -> herald::Publisher {
    herald::Publisher::redis_cluster(
        herald::broker::redis::RedisConfig {
            url: cluster.urls(),
            prefix: "herald".into(),
            history_size: 1000,
            history_ttl: Duration::from_secs(86_400),
            probe_interval: Duration::from_secs(5),
        },
        65_536,
    )
    .expect("a cluster publisher")
}

/// `PUBSUB SHARDCHANNELS herald:{*` on the master on `port`.
async fn shard_channels(port: u16) -> BTreeSet<String> {
    Resp::connect(port)
        .await
        .call_ok(&["PUBSUB", "SHARDCHANNELS", "herald:{*"])
        .await
        .array()
        .iter()
        .map(RespValue::text)
        .collect()
}

#[tokio::test]
async fn users_on_every_node_get_what_is_published_through_any_path() {
    let cluster = Cluster::start().await;
    let nodes = [
        cluster_node(&cluster).await,
        cluster_node(&cluster).await,
        cluster_node(&cluster).await,
    ];
    let by_master = users_on_every_shard(&cluster, 2).await;
    let users: Vec<String> = by_master.values().flatten().cloned().collect();
    let mut streams = Vec::new();
    for (i, user) in users.iter().enumerate() {
        streams.push(Sse::open(&nodes[i % 3], &token(user)).await);
    }

    // Each master holds exactly the channels of its slots.
    for master in by_master.keys() {
        let mut expected = BTreeSet::new();
        for key in users
            .iter()
            .map(|u| pubsub_key(&format!("user:{u}")))
            .chain([pubsub_key("broadcast")])
        {
            if cluster.owner(&key).await == *master {
                expected.insert(key);
            }
        }
        assert_eq!(
            shard_channels(*master).await,
            expected,
            "master {master} holds exactly its slots' channels"
        );
    }

    let publisher = cluster_publisher(&cluster);
    for (i, user) in users.iter().enumerate() {
        let channel = format!("user:{user}");
        publish_ok(&nodes[(i + 1) % 3], &channel, json!(format!("http {user}"))).await;
        evalsha_spublish(
            &cluster,
            &channel,
            &json!(format!("script {user}")).to_string(),
        )
        .await;
        publisher
            .publish(herald::Message::new(
                channel.clone(),
                None,
                &Value::String(format!("rust {user}")),
            ))
            .await
            .expect("publish through herald::Publisher");
    }
    publish_ok(&nodes[2], "broadcast", json!("to everyone")).await;

    for (user, sse) in users.iter().zip(&mut streams) {
        let seen = sse
            .collect_until(WAIT, |e| e.is_message() && e.data() == "to everyone")
            .await;
        assert_eq!(
            data(&seen),
            [
                format!("http {user}"),
                format!("script {user}"),
                format!("rust {user}"),
                "to everyone".to_string()
            ],
            "{user} gets its own messages, once, in order, and nobody else's"
        );
    }

    // The last local connection gone, each master forgets the channel.
    drop(streams);
    for master in by_master.keys() {
        let broadcast_here = cluster.owner(&pubsub_key("broadcast")).await == *master;
        let gone = wait_until(WAIT, || async {
            let left = shard_channels(*master).await;
            left.iter().all(|key| key == &pubsub_key("broadcast"))
                && left.len() == usize::from(broadcast_here)
        })
        .await;
        assert!(
            gone,
            "master {master} still holds {:?}",
            shard_channels(*master).await
        );
    }
    for node in &nodes {
        assert_eq!(metric(node, "herald_redis_shards").await, 3.0);
    }
}
