//! A real Redis Cluster for the sharded pub/sub tests: six `redis-server`
//! processes (3 masters + 3 replicas) on free ports, joined with
//! `redis-cli --cluster create`, plus the few cluster questions tests ask
//! (who owns a slot, who replicates whom). Dropping it kills its processes
//! by PID (each is a [`Redis`]).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::resp::{Resp, RespValue};
use super::{wait_until, Redis};

/// A failover is decided after this much silence; short, so tests that
/// kill a master finish quickly.
const NODE_TIMEOUT_MS: &str = "1000";

/// How long the cluster may take to form or to settle after a change.
const SETTLE: Duration = Duration::from_secs(30);

/// Six cluster-enabled servers; `create` joins them.
pub(crate) struct Cluster {
    nodes: Vec<Redis>,
}

impl Cluster {
    /// A formed cluster: every node reports `cluster_state:ok` and every
    /// replica is in sync with its master.
    pub(crate) async fn start() -> Cluster {
        let cluster = Cluster::unformed();
        cluster.create().await;
        cluster
    }

    /// Six servers that do not know each other yet (no slots assigned).
    pub(crate) fn unformed() -> Cluster {
        let nodes = (0..6)
            .map(|_| {
                Redis::launch(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    NODE_TIMEOUT_MS,
                ])
            })
            .collect();
        Cluster { nodes }
    }

    /// Starts a seventh server and joins it as an empty master; returns its
    /// port once every node knows it.
    pub(crate) async fn add_master(&mut self) -> u16 {
        let node = Redis::launch(&[
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            NODE_TIMEOUT_MS,
        ]);
        let port = node.port();
        let existing = format!("127.0.0.1:{}", self.nodes[0].port());
        let output = Command::new("redis-cli")
            .args([
                "--cluster",
                "add-node",
                &format!("127.0.0.1:{port}"),
                &existing,
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster add-node");
        assert!(
            output.status.success(),
            "redis-cli --cluster add-node failed:\n{}",
            String::from_utf8_lossy(&output.stdout)
        );
        self.nodes.push(node);
        let id = Cluster::node_id(port).await;
        let known = wait_until(SETTLE, || async {
            let info = Resp::connect(port)
                .await
                .call_ok(&["CLUSTER", "INFO"])
                .await
                .text();
            if !info.contains("cluster_state:ok") {
                return false;
            }
            for port in self.live_ports() {
                let nodes = Resp::connect(port)
                    .await
                    .call_ok(&["CLUSTER", "NODES"])
                    .await
                    .text();
                if !nodes.contains(&id) {
                    return false;
                }
            }
            true
        })
        .await;
        assert!(known, "the new master never joined every node's view");
        port
    }

    /// Joins the servers (`--cluster-replicas 1`) and waits until the
    /// cluster is ok everywhere and every replica has synced.
    pub(crate) async fn create(&self) {
        let addrs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        self.wait_settled().await;
    }

    /// Waits until every live node says `cluster_state:ok`, agrees on who
    /// owns every slot, and every replica's link to its master is up.
    pub(crate) async fn wait_settled(&self) {
        let settled = wait_until(SETTLE, || async {
            let mut maps = Vec::new();
            for port in self.live_ports() {
                let mut redis = Resp::connect(port).await;
                let info = redis.call_ok(&["CLUSTER", "INFO"]).await.text();
                if !info.contains("cluster_state:ok") {
                    return false;
                }
                let replication = redis.call_ok(&["INFO", "replication"]).await.text();
                if replication.contains("role:slave")
                    && !replication.contains("master_link_status:up")
                {
                    return false;
                }
                maps.push(slot_owners(&redis.call_ok(&["CLUSTER", "SLOTS"]).await));
            }
            maps.windows(2).all(|w| w[0] == w[1]) && maps.first().is_some_and(|m| m.len() == 3)
        })
        .await;
        assert!(
            settled,
            "the redis cluster did not settle within {SETTLE:?}"
        );
    }

    /// The nodes still running.
    fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(Redis::port)
            .collect()
    }

    /// Seed URLs for `--redis-url`, comma-separated.
    pub(crate) fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(Redis::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Any live node, to ask cluster questions.
    async fn any(&self) -> Resp {
        let port = *self.live_ports().first().expect("a live cluster node");
        Resp::connect(port).await
    }

    /// Master port → its slot ranges, as a live node sees it.
    pub(crate) async fn masters(&self) -> BTreeMap<u16, Vec<(i64, i64)>> {
        let reply = self.any().await.call_ok(&["CLUSTER", "SLOTS"]).await;
        slot_owners(&reply)
    }

    /// The slot of `key`.
    pub(crate) async fn slot(&self, key: &str) -> i64 {
        self.any()
            .await
            .call_ok(&["CLUSTER", "KEYSLOT", key])
            .await
            .int()
    }

    /// The port of the master owning `key`'s slot.
    pub(crate) async fn owner(&self, key: &str) -> u16 {
        let slot = self.slot(key).await;
        self.masters()
            .await
            .into_iter()
            .find(|(_, ranges)| ranges.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .map(|(port, _)| port)
            .unwrap_or_else(|| panic!("no master owns slot {slot}"))
    }

    /// The port of a replica of the master on `master`.
    pub(crate) async fn replica_of(&self, master: u16) -> u16 {
        let mut redis = Resp::connect(master).await;
        let id = redis.call_ok(&["CLUSTER", "MYID"]).await.text();
        let replicas = redis.call_ok(&["CLUSTER", "REPLICAS", &id]).await;
        let line = replicas
            .array()
            .first()
            .unwrap_or_else(|| panic!("master {master} has no replica"))
            .text();
        // `<id> <ip:port@cport> ...`
        line.split_whitespace()
            .nth(1)
            .and_then(|addr| addr.split('@').next()?.rsplit(':').next()?.parse().ok())
            .unwrap_or_else(|| panic!("bad CLUSTER REPLICAS line {line:?}"))
    }

    /// The node id of the server on `port`.
    pub(crate) async fn node_id(port: u16) -> String {
        Resp::connect(port)
            .await
            .call_ok(&["CLUSTER", "MYID"])
            .await
            .text()
    }

    /// SIGKILLs the server on `port`.
    pub(crate) fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no cluster node on {port}"));
        node.kill();
    }

    /// Waits until a live node reports `port` as the master of some slots.
    pub(crate) async fn wait_master(&self, port: u16) {
        let promoted = wait_until(SETTLE, || async {
            self.masters().await.contains_key(&port)
        })
        .await;
        assert!(promoted, "{port} never became a master");
    }
}

/// `CLUSTER SLOTS` → master port → slot ranges.
fn slot_owners(reply: &RespValue) -> BTreeMap<u16, Vec<(i64, i64)>> {
    let mut owners: BTreeMap<u16, Vec<(i64, i64)>> = BTreeMap::new();
    for range in reply.array() {
        let parts = range.array();
        let port = parts[2].array()[1].int() as u16;
        owners
            .entry(port)
            .or_default()
            .push((parts[0].int(), parts[1].int()));
    }
    for ranges in owners.values_mut() {
        ranges.sort_unstable();
    }
    owners
}
