//! `rediss://`: a node reaches a TLS-only Redis, verifying its certificate
//! against the system trust store (here a test CA, via `SSL_CERT_FILE`).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{get, publish_ok, token, wait_until, Node, Sse, WAIT};
use serde_json::json;

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl is installed");
    assert!(status.success(), "openssl {args:?}");
}

/// A CA and a server certificate for `localhost`, made fresh for the test.
fn make_certs(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=herald-test-ca",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(dir.join("ext"), "subjectAltName=DNS:localhost\n").expect("write ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ],
    );
}

struct TlsRedis {
    child: Child,
    port: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_tls_redis(dir: &Path) -> TlsRedis {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            "srv.pem",
            "--tls-key-file",
            "srv.key",
            "--tls-ca-cert-file",
            "ca.pem",
        ])
        .args([
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server");
    TlsRedis { child, port }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_rediss_verifies_the_server_and_delivers() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path());
    let redis = start_tls_redis(dir.path());
    let url = format!("rediss://localhost:{}", redis.port);
    let ca = dir.path().join("ca.pem");
    let ca = ca.to_str().expect("utf-8 path");
    let node = Node::start_with_env(&["--redis-url", &url], &[("SSL_CERT_FILE", ca)]);
    let ready = wait_until(Duration::from_secs(15), || async {
        get(&node.admin_url("/readyz")).await.status == 200
    })
    .await;
    assert!(
        ready,
        "node never became ready over TLS: {}",
        node.stderr_tail()
    );
    let mut sse = Sse::open(&node, &token("tls-user")).await;
    publish_ok(&node, "user:tls-user", json!("over tls")).await;
    let event = sse
        .next_data(WAIT)
        .await
        .expect("delivered through TLS Redis");
    assert_eq!(event.data(), "over tls");

    // Without the CA the certificate is not trusted: the node never turns
    // ready (verification is on, not skipped).
    let untrusting = Node::start(&["--redis-url", &url]);
    let trusted = wait_until(Duration::from_secs(3), || async {
        get(&untrusting.admin_url("/readyz")).await.status == 200
    })
    .await;
    assert!(!trusted, "a node trusted an unknown CA");
}
