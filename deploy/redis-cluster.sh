# shellcheck shell=bash
# How a local Redis Cluster is made from Debian's redis-server: sourced by
# deploy/cluster (`up --redis-cluster`) and load/compare (the cluster
# row), so both run the same topology. The caller starts the servers (and
# keeps their PIDs); this file only says how they are configured and joined.

# The redis-server flags of a cluster node, after its own --port and --dir.
# A short node timeout: a killed master's replica takes over in about 2 s.
REDIS_CLUSTER_FLAGS=(--cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000)

# redis_cluster_create LOG HOST:PORT...: joins freshly started nodes into
# one cluster with a replica for each master (six nodes: 3 masters, each
# with one replica; `redis-cli --cluster create` makes the first half the
# masters), then waits up to 30 s until every node reports
# cluster_state:ok. Output goes to LOG; returns non-zero on failure.
redis_cluster_create() {
  local log=$1 addr
  shift
  redis-cli --cluster create "$@" --cluster-replicas 1 --cluster-yes >>"$log" 2>&1 || return 1
  for addr in "$@"; do
    redis_cluster_wait_ok "${addr%:*}" "${addr##*:}" 30 || {
      echo "redis_cluster_create: $addr never reported cluster_state:ok" >>"$log"
      return 1
    }
  done
}

# redis_cluster_wait_ok HOST PORT SECONDS: polls CLUSTER INFO until it says
# cluster_state:ok.
redis_cluster_wait_ok() {
  local deadline=$((SECONDS + $3))
  until redis-cli -h "$1" -p "$2" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
}

# redis_cluster_masters HOST PORT: one line per master that serves slots,
# as seen from that node: "HOST:PORT SLOT-RANGE..." (e.g. "127.0.0.1:6380
# 0-5460"). Just after `--cluster create` the replicas-to-be still show as
# masters without slots: they are left out.
redis_cluster_masters() {
  redis-cli -h "$1" -p "$2" cluster nodes |
    awk '$3 ~ /master/ && $3 !~ /fail/ && NF >= 9 {
      addr = $2; sub(/@.*/, "", addr)
      line = addr
      for (i = 9; i <= NF; i++) if ($i !~ /^\[/) line = line " " $i
      print line
    }' | sort
}
