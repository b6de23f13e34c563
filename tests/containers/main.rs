//! Every way Herald ships to run in containers, really run with podman:
//! `deploy/Containerfile`'s image, `deploy/compose.yaml` and
//! `deploy/compose.cluster.yaml` under podman-compose, and `deploy/kubernetes/` validated against Kubernetes'
//! schemas and played with `podman kube play`.
//!
//! The machine has no container network and no image registry, so every
//! container uses the host's network (each test passes free ports through
//! the environment, as a user would pass real ones) and every image is made
//! locally (`podman.rs`). Each test removes what it started when it ends,
//! pass or fail. Nothing waits by sleeping: every wait polls with a
//! deadline.

#[path = "../common/mod.rs"]
mod common;

mod podman;

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::time::Instant;

use common::{bearer, parse_listening, publisher_token, request, token, Sse, SECRET, WAIT};
use podman::{herald_image, podman, Compose, Container};

/// How long a container may take to print Herald's listening line.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The uid and gid `deploy/Containerfile` declares for Herald.
const HERALD_UID: &str = "10001";

/// The drain budget the tests give a node: short, so a node that ignored
/// SIGTERM (and was killed by `podman stop` after its longer timeout)
/// shows.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Polls `logs()` until it holds Herald's listening line; returns
/// (public URL, admin URL) as the node printed them. Panics with the log if
/// the line does not come within `START_TIMEOUT`.
async fn wait_listening(logs: impl Fn() -> String) -> (String, String) {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let text = logs();
        if let Some((public, admin, _)) = text.lines().find_map(parse_listening) {
            return (public, admin);
        }
        assert!(
            Instant::now() < deadline,
            "no listening line within {START_TIMEOUT:?}; log:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `POST <base>/publish` as the all-powerful publisher; asserts 200.
async fn publish_via(base: &str, channel: &str, data: Value) -> String {
    let auth = bearer(&publisher_token());
    let body = json!({ "channel": channel, "event": "notice", "data": data });
    let reply = request(
        Method::POST,
        &format!("{base}/publish"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        Bytes::from(body.to_string()),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "publish {body}: {}",
        reply.text()
    );
    reply.json()["id"].as_str().expect("publish id").to_string()
}

/// Opens `<base>/events` as `sub`, waits for `herald.ready`, publishes to
/// the user through `publish_base` and asserts the stream delivers it.
/// Returns the open stream.
async fn stream_and_publish(base: &str, publish_base: &str, sub: &str) -> Sse {
    let auth = bearer(&token(sub));
    let mut sse = Sse::connect(&format!("{base}/events"), &[("authorization", &auth)])
        .await
        .unwrap_or_else(|r| panic!("GET {base}/events: {} {}", r.status, r.text()));
    sse.wait_ready(WAIT).await;
    let text = format!("hello {sub}");
    publish_via(publish_base, &format!("user:{sub}"), json!(text)).await;
    let event = sse.next_data(WAIT).await.expect("the published message");
    assert_eq!((event.name(), event.data()), ("notice", text.as_str()));
    sse
}

/// `127.0.0.1:<port>` is listening on every address (0.0.0.0) in the
/// network namespace of process `pid`, per the kernel's socket table.
fn listens_on_all_addresses(pid: &str, port: u16) -> bool {
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).expect("read net/tcp");
    let wanted = format!("00000000:{port:04X}");
    // Fields: sl, local_address, rem_address, st (0A = LISTEN), ...
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&wanted.as_str()) && fields.get(3) == Some(&"0A")
    })
}

/// The `Uid:` / `Gid:` / `CapEff:` lines of `/proc/<pid>/status`.
fn process_status(pid: &str, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn the_image_serves_as_an_unprivileged_user_and_drains_on_podman_stop() {
    let image = herald_image();

    // What the image declares, for every runtime that reads it.
    let config: Value = serde_json::from_str(&podman(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config}}",
        image,
    ]))
    .expect("image config is JSON");
    assert_eq!(config["User"], format!("{HERALD_UID}:{HERALD_UID}"));
    assert_eq!(config["StopSignal"], "SIGTERM");
    let env: Vec<&str> = config["Env"]
        .as_array()
        .expect("Env")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for wanted in [
        "HERALD_LISTEN=0.0.0.0:8080",
        "HERALD_ADMIN_LISTEN=0.0.0.0:9180",
    ] {
        assert!(env.contains(&wanted), "image env {env:?} lacks {wanted}");
    }

    let version = podman(&["run", "--rm", image, "--version"]);
    assert_eq!(
        version.trim(),
        format!("herald {}", env!("CARGO_PKG_VERSION"))
    );

    // Run it the way deploy/kubernetes/ does: read-only root, no
    // capabilities, no privilege gain. Host networking, so the listeners
    // move to free ports, still on every address.
    let (port, admin_port) = (common::free_port(), common::free_port());
    let listen = format!("HERALD_LISTEN=0.0.0.0:{port}");
    let admin_listen = format!("HERALD_ADMIN_LISTEN=0.0.0.0:{admin_port}");
    let secret = format!("HERALD_JWT_SECRET={SECRET}");
    let drain = format!("HERALD_DRAIN_TIMEOUT={}s", DRAIN_TIMEOUT.as_secs());
    let container = Container::run(&[
        "--read-only",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        "--env",
        &listen,
        "--env",
        &admin_listen,
        "--env",
        &secret,
        "--env",
        &drain,
        image,
    ]);
    let (public, admin) = wait_listening(|| container.logs()).await;
    assert_eq!(public, format!("http://0.0.0.0:{port}"));
    assert_eq!(admin, format!("http://0.0.0.0:{admin_port}"));

    let pid = container.inspect("{{.State.Pid}}");
    assert!(
        listens_on_all_addresses(&pid, port) && listens_on_all_addresses(&pid, admin_port),
        "herald should listen on 0.0.0.0:{port} and 0.0.0.0:{admin_port}"
    );
    let uid = format!("{HERALD_UID} {HERALD_UID} {HERALD_UID} {HERALD_UID}");
    assert_eq!(
        process_status(&pid, "Uid:"),
        uid,
        "herald's real/effective uids"
    );
    assert_eq!(process_status(&pid, "Gid:"), uid, "herald's gids");
    assert_eq!(process_status(&pid, "CapEff:"), "0000000000000000");
    assert_eq!(
        podman(&["exec", &container.name, "id", "-u"]).trim(),
        HERALD_UID,
        "a shell in the container is the unprivileged user too"
    );

    let ready = common::get(&format!("http://127.0.0.1:{admin_port}/readyz")).await;
    assert_eq!(ready.status, StatusCode::OK, "/readyz: {}", ready.text());
    let base = format!("http://127.0.0.1:{port}");
    let mut sse = stream_and_publish(&base, &base, "in-a-container").await;

    // podman stop sends the image's STOPSIGNAL and kills only after its own
    // timeout, far beyond the drain budget: a clean exit 0 within the
    // budget is the drain, not the kill.
    let started = std::time::Instant::now();
    podman(&["stop", "--time", "60", &container.name]);
    let took = started.elapsed();
    let frames = sse
        .read_to_end(WAIT)
        .await
        .expect("the drain ends the open stream");
    assert!(
        frames.iter().any(|f| f.retry.is_some()),
        "the drain tells the client when to reconnect: {frames:?}"
    );
    assert_eq!(container.inspect("{{.State.ExitCode}}"), "0");
    assert!(
        took < DRAIN_TIMEOUT,
        "podman stop took {took:?}, more than the {DRAIN_TIMEOUT:?} drain budget"
    );
}

/// `GET /readyz` on 127.0.0.1:`port` answers 200; false while nothing
/// listens there yet (the `common` client treats that as a failure).
async fn ready(port: u16) -> bool {
    if tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        return false;
    }
    common::get(&format!("http://127.0.0.1:{port}/readyz"))
        .await
        .status
        == StatusCode::OK
}

#[tokio::test]
async fn compose_runs_three_nodes_behind_nginx_and_down_leaves_nothing() {
    let herald = herald_image();
    let tools = podman::tools_image();
    let nodes: Vec<(u16, u16)> = (0..3)
        .map(|_| (common::free_port(), common::free_port()))
        .collect();
    let nginx_port = common::free_port();
    let mut env = vec![
        ("HERALD_JWT_SECRET", SECRET.to_string()),
        ("HERALD_IMAGE", herald.to_string()),
        ("REDIS_IMAGE", tools.to_string()),
        ("NGINX_IMAGE", tools.to_string()),
        ("NGINX_PORT", nginx_port.to_string()),
        ("REDIS_PORT", common::free_port().to_string()),
    ];
    let names = [
        ("HERALD1_PORT", "HERALD1_ADMIN_PORT"),
        ("HERALD2_PORT", "HERALD2_ADMIN_PORT"),
        ("HERALD3_PORT", "HERALD3_ADMIN_PORT"),
    ];
    for ((public, admin), (public_var, admin_var)) in nodes.iter().zip(names) {
        env.push((public_var, public.to_string()));
        env.push((admin_var, admin.to_string()));
    }
    let compose = Compose::new(&env);

    // The cluster without the monitoring services, whose images no
    // registry here serves.
    compose.run(&[
        "up",
        "--detach",
        "--no-build",
        "redis",
        "herald1",
        "herald2",
        "herald3",
        "nginx",
    ]);
    for (_, admin) in &nodes {
        assert!(
            common::wait_until(START_TIMEOUT, || ready(*admin)).await,
            "node with admin port {admin} never became ready"
        );
    }
    // The compose file's healthchecks (what `depends_on: service_healthy`
    // waits for under Docker; podman 4.3 runs them only when asked).
    for service in ["redis", "herald1", "herald2", "herald3"] {
        podman(&["healthcheck", "run", &compose.container(service)]);
    }
    assert!(
        common::wait_until(START_TIMEOUT, || async {
            tokio::net::TcpStream::connect(("127.0.0.1", nginx_port))
                .await
                .is_ok()
        })
        .await,
        "nginx never listened on {nginx_port}"
    );

    // Through nginx, as a browser would; and one client on each node, so a
    // publish through nginx is seen to reach the whole cluster over Redis.
    let through_nginx = format!("http://127.0.0.1:{nginx_port}");
    let _nginx_stream = stream_and_publish(&through_nginx, &through_nginx, "behind-nginx").await;
    let mut direct = Vec::new();
    for (i, (public, _)) in nodes.iter().enumerate() {
        let auth = bearer(&token(&format!("on-node-{i}")));
        let url = format!("http://127.0.0.1:{public}/events");
        let mut sse = Sse::connect(&url, &[("authorization", &auth)])
            .await
            .unwrap_or_else(|r| panic!("GET {url}: {} {}", r.status, r.text()));
        sse.wait_ready(WAIT).await;
        direct.push(sse);
    }
    publish_via(&through_nginx, "broadcast", json!("to everyone")).await;
    for sse in &mut direct {
        let event = sse.next_data(WAIT).await.expect("the broadcast");
        assert_eq!(event.data(), "to everyone");
    }

    // stop drains every node (exit 0, not killed); down removes it all.
    compose.run(&["stop"]);
    for service in ["herald1", "herald2", "herald3"] {
        let code = podman(&[
            "inspect",
            "--format",
            "{{.State.ExitCode}}",
            &compose.container(service),
        ]);
        assert_eq!(code.trim(), "0", "{service} exit code after compose stop");
    }
    compose.run(&["down"]);
    assert_eq!(
        podman::containers_labelled(&compose.label()),
        Vec::<String>::new(),
        "containers left after down"
    );
}

/// A free port whose cluster bus port (+10000) is free too, for a Redis
/// Cluster node of `deploy/compose.cluster.yaml`.
fn free_cluster_port() -> u16 {
    for _ in 0..100 {
        let port = common::free_port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free port with a free cluster bus port");
}

/// `redis-cli`-like: one command to 127.0.0.1:`port`, its reply.
fn redis_query<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> T {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("redis url");
    let mut conn = client.get_connection().expect("connect to a cluster node");
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query(&mut conn)
        .unwrap_or_else(|e| panic!("{args:?} on {port}: {e}"))
}

#[tokio::test]
async fn compose_cluster_runs_three_nodes_on_a_redis_cluster_with_sharded_pubsub() {
    let herald = herald_image();
    let tools = podman::tools_image();
    let nodes: Vec<(u16, u16)> = (0..3)
        .map(|_| (common::free_port(), common::free_port()))
        .collect();
    let redis_ports: Vec<u16> = (0..6).map(|_| free_cluster_port()).collect();
    let nginx_port = common::free_port();
    let mut env = vec![
        ("HERALD_JWT_SECRET", SECRET.to_string()),
        ("HERALD_IMAGE", herald.to_string()),
        ("REDIS_IMAGE", tools.to_string()),
        ("NGINX_IMAGE", tools.to_string()),
        ("NGINX_PORT", nginx_port.to_string()),
        ("HERALD_LOG", "herald=debug".to_string()),
    ];
    let redis_vars = [
        "REDIS0_PORT",
        "REDIS1_PORT",
        "REDIS2_PORT",
        "REDIS3_PORT",
        "REDIS4_PORT",
        "REDIS5_PORT",
    ];
    for (var, port) in redis_vars.iter().zip(&redis_ports) {
        env.push((var, port.to_string()));
    }
    let names = [
        ("HERALD1_PORT", "HERALD1_ADMIN_PORT"),
        ("HERALD2_PORT", "HERALD2_ADMIN_PORT"),
        ("HERALD3_PORT", "HERALD3_ADMIN_PORT"),
    ];
    for ((public, admin), (public_var, admin_var)) in nodes.iter().zip(names) {
        env.push((public_var, public.to_string()));
        env.push((admin_var, admin.to_string()));
    }
    let compose = Compose::with_file("deploy/compose.cluster.yaml", &env);

    compose.run(&["up", "--detach", "--no-build"]);
    for (_, admin) in &nodes {
        assert!(
            common::wait_until(START_TIMEOUT, || ready(*admin)).await,
            "node with admin port {admin} never became ready"
        );
    }
    // The create step ran to the end and formed 3 masters + 3 replicas.
    let create = compose.container("redis-cluster-create");
    let state = || {
        podman(&[
            "inspect",
            "--format",
            "{{.State.Running}} {{.State.ExitCode}}",
            &create,
        ])
    };
    assert!(
        common::wait_until(START_TIMEOUT, || async { state().starts_with("false") }).await,
        "redis-cluster-create still running"
    );
    assert_eq!(state().trim(), "false 0", "redis-cluster-create's exit");
    let info: String = redis_query(redis_ports[0], &["CLUSTER", "INFO"]);
    assert!(info.contains("cluster_state:ok"), "{info}");
    assert!(
        info.contains("cluster_size:3"),
        "three masters with slots: {info}"
    );
    for service in ["redis0", "redis5", "herald1", "herald2", "herald3"] {
        podman(&["healthcheck", "run", &compose.container(service)]);
    }
    assert!(
        common::wait_until(START_TIMEOUT, || async {
            tokio::net::TcpStream::connect(("127.0.0.1", nginx_port))
                .await
                .is_ok()
        })
        .await,
        "nginx never listened on {nginx_port}"
    );

    // Through nginx, and one client on each node: a broadcast published
    // through nginx reaches every node over the cluster's sharded pub/sub.
    let through_nginx = format!("http://127.0.0.1:{nginx_port}");
    let _nginx_stream = stream_and_publish(&through_nginx, &through_nginx, "behind-nginx").await;
    let mut direct = Vec::new();
    for (i, (public, _)) in nodes.iter().enumerate() {
        let auth = bearer(&token(&format!("on-node-{i}")));
        let url = format!("http://127.0.0.1:{public}/events");
        let mut sse = Sse::connect(&url, &[("authorization", &auth)])
            .await
            .unwrap_or_else(|r| panic!("GET {url}: {} {}", r.status, r.text()));
        sse.wait_ready(WAIT).await;
        direct.push(sse);
    }
    publish_via(
        &through_nginx,
        "broadcast",
        json!("to every shard's clients"),
    )
    .await;
    for (i, sse) in direct.iter_mut().enumerate() {
        let Some(event) = sse.next_data(WAIT).await else {
            // What the nodes saw is the only way to tell a subscription
            // lost in the cluster's forming from one never made.
            for service in ["herald1", "herald2", "herald3", "redis-cluster-create"] {
                let logs = podman(&["logs", &compose.container(service)]);
                eprintln!("--- {service}\n{logs}");
            }
            for port in &redis_ports {
                let subscribers: Vec<redis::Value> =
                    redis_query(*port, &["PUBSUB", "SHARDNUMSUB", "herald:{broadcast}"]);
                let nodes: String = redis_query(*port, &["CLUSTER", "NODES"]);
                eprintln!("--- redis {port}: {subscribers:?}\n{nodes}");
            }
            panic!("node {i}'s client never got the broadcast");
        };
        assert_eq!(event.data(), "to every shard's clients");
    }
    // Sharded, not classic, pub/sub: `broadcast` is an SSUBSCRIBEd shard
    // channel on exactly one node (its slot's master), and no node has a
    // classic subscription to it.
    let holders: Vec<u16> = redis_ports
        .iter()
        .copied()
        .filter(|port| {
            let channels: Vec<String> =
                redis_query(*port, &["PUBSUB", "SHARDCHANNELS", "herald:{broadcast}"]);
            !channels.is_empty()
        })
        .collect();
    assert_eq!(
        holders.len(),
        1,
        "shard channel herald:{{broadcast}} on {holders:?}"
    );
    for port in &redis_ports {
        let classic: Vec<String> = redis_query(*port, &["PUBSUB", "CHANNELS", "herald:*"]);
        assert_eq!(classic, Vec::<String>::new(), "classic channels on {port}");
    }

    compose.run(&["stop"]);
    for service in ["herald1", "herald2", "herald3"] {
        let code = podman(&[
            "inspect",
            "--format",
            "{{.State.ExitCode}}",
            &compose.container(service),
        ]);
        assert_eq!(code.trim(), "0", "{service} exit code after compose stop");
    }
    compose.run(&["down"]);
    assert_eq!(
        podman::containers_labelled(&compose.label()),
        Vec::<String>::new(),
        "containers left after down"
    );
}

/// The files `deploy/kubernetes/kustomization.yaml` lists as resources.
fn kustomize_resources() -> Vec<String> {
    let text = std::fs::read_to_string(podman::repo().join("deploy/kubernetes/kustomization.yaml"))
        .expect("read kustomization.yaml");
    let mut in_resources = false;
    let mut files = Vec::new();
    for line in text.lines() {
        if !line.starts_with(' ') && !line.starts_with('-') {
            in_resources = line.trim_end() == "resources:";
            continue;
        }
        if in_resources {
            if let Some(file) = line.trim().strip_prefix("- ") {
                files.push(file.to_string());
            }
        }
    }
    files
}

#[test]
fn every_kubernetes_manifest_validates_against_current_kubernetes() {
    let dir = podman::repo().join("deploy/kubernetes");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .expect("read deploy/kubernetes")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    on_disk.sort();
    let mut listed = kustomize_resources();
    listed.sort();
    assert_eq!(listed, on_disk, "kustomization.yaml resources vs the files");

    // Each file alone, as `kubectl apply -f` would take it; then what
    // `kubectl apply -k` sends: kustomize's rendering of the directory.
    let files: Vec<_> = on_disk.iter().map(|f| dir.join(f)).collect();
    assert_valid(&files);

    // The overlay the README walks through, beside the repository so its
    // path to the base is relative (kustomize takes no absolute ones).
    let scratch = podman::repo().join("target");
    std::fs::create_dir_all(&scratch).expect("create target/");
    let overlay = tempfile::tempdir_in(&scratch).expect("overlay dir");
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        "resources: [../../deploy/kubernetes]\n\
         images: [{name: herald, newName: registry.example.com/herald, newTag: 0.1.0}]\n\
         secretGenerator:\n  - {name: herald-jwt, behavior: replace, files: [jwt-secret]}\n",
    )
    .expect("write the overlay");
    std::fs::write(overlay.path().join("jwt-secret"), SECRET).expect("write jwt-secret");
    let rendered = podman::checked(podman::command(
        podman::venv_tool("kubectl"),
        &["kustomize", overlay.path().to_str().expect("utf-8 path")],
    ));
    let file = overlay.path().join("rendered.yaml");
    std::fs::write(&file, &rendered).expect("write rendered.yaml");
    assert_valid(&[file]);
    assert!(
        rendered.contains("image: registry.example.com/herald:0.1.0"),
        "the overlay sets the Deployment's image:\n{rendered}"
    );
    let key = base64::engine::general_purpose::STANDARD.encode(SECRET);
    assert!(
        rendered.contains(&format!("jwt-secret: {key}")) && !rendered.contains("REPLACE"),
        "the overlay's key replaces the placeholder:\n{rendered}"
    );
    let namespaced = rendered.matches("\n  namespace: herald\n").count();
    assert_eq!(
        namespaced,
        MANIFEST_RESOURCES.len() - 1,
        "every resource but the Namespace lands in it:\n{rendered}"
    );
}

/// Every resource `deploy/kubernetes/` defines, as kubernetes-validate
/// names them.
const MANIFEST_RESOURCES: [&str; 10] = [
    "namespace/herald",
    "configmap/herald-config",
    "secret/herald-jwt",
    "deployment/herald",
    "service/herald",
    "poddisruptionbudget/herald",
    "horizontalpodautoscaler/herald",
    "ingress/herald",
    "service/redis",
    "statefulset/redis",
];

/// `kubernetes-validate --strict` (its newest Kubernetes, from the schemas
/// it ships) passes every one of `MANIFEST_RESOURCES` in `files`. Strict:
/// an unknown or misspelt field is an error, where an API server might
/// drop it silently.
fn assert_valid(files: &[std::path::PathBuf]) {
    let mut args = vec!["--strict"];
    args.extend(files.iter().map(|f| f.to_str().expect("utf-8 path")));
    let report = podman::checked(podman::command(
        podman::venv_tool("kubernetes-validate"),
        &args,
    ));
    for resource in MANIFEST_RESOURCES {
        assert!(
            report
                .lines()
                .any(|l| l.contains(&format!("passed for resource {resource} "))),
            "{resource} was not validated:\n{report}"
        );
    }
}

#[tokio::test]
async fn the_kubernetes_deployment_plays_in_podman_serves_and_drains_on_sigterm() {
    let image = herald_image();
    let redis = common::Redis::start();
    let (port, admin_port) = (common::free_port(), common::free_port());
    let drain = format!("{}s", DRAIN_TIMEOUT.as_secs());
    let mut played = podman::KubePlay::start(
        &podman::unique("herald-kube"),
        &[
            image,
            &port.to_string(),
            &admin_port.to_string(),
            &redis.url(),
            SECRET,
            &drain,
        ],
    );
    let container = played.container();
    let logs = || {
        let out = podman::podman_quiet(&["logs", &container]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (public, _) = wait_listening(logs).await;
    assert_eq!(public, format!("http://0.0.0.0:{port}"));

    // The manifest's securityContext, as the runtime applied it.
    let inspect = |format: &str| podman(&["inspect", "--format", format, &container]);
    assert_eq!(inspect("{{.Config.User}}").trim(), "10001:10001");
    assert_eq!(inspect("{{.HostConfig.ReadonlyRootfs}}").trim(), "true");
    assert_eq!(inspect("{{.EffectiveCaps}}").trim(), "[]");

    // The ConfigMap's Redis URL and the Secret's key reached the node, and
    // the probes ask the right port and paths.
    assert!(
        common::wait_until(WAIT, || ready(admin_port)).await,
        "/readyz never 200 (Redis from the ConfigMap)"
    );
    let probes = played.probes();
    assert_eq!(probes.len(), 2, "readiness and liveness: {probes:?}");
    for (probe, url) in probes {
        let reply = common::get(&url).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{probe} {url}: {}",
            reply.text()
        );
    }
    let base = format!("http://127.0.0.1:{port}");
    let mut sse = stream_and_publish(&base, &base, "in-a-pod").await;

    // SIGTERM, as the kubelet sends it: the node drains and exits 0 well
    // within the grace period (podman's --time 60, far above the drain).
    let started = std::time::Instant::now();
    played.stop();
    let took = started.elapsed();
    let frames = sse
        .read_to_end(WAIT)
        .await
        .expect("stopping the pod ends the open stream");
    assert!(
        frames.iter().any(|f| f.retry.is_some()),
        "the pod drains: the client is told when to reconnect: {frames:?}"
    );
    assert_eq!(inspect("{{.State.ExitCode}}").trim(), "0");
    assert!(
        took < DRAIN_TIMEOUT,
        "the pod took {took:?} to stop, more than the {DRAIN_TIMEOUT:?} drain budget"
    );

    played.down();
    assert!(
        !podman::podman_quiet(&["pod", "exists", &played.pod()])
            .status
            .success(),
        "the pod is gone after kube down"
    );
}
