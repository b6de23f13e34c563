//! A raw HTTP/1.1 client over one TCP connection, for tests that check the
//! exact bytes the edge reads and writes.

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Node, WAIT};

/// One raw HTTP/1.1 connection and what it has read but not yet consumed.
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) read: Vec<u8>,
}

/// A parsed response.
#[derive(Debug)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) head: String,
    pub(crate) body: Vec<u8>,
}

impl Response {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }

    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

impl Conn {
    pub(crate) async fn open(node: &Node) -> Conn {
        let stream = TcpStream::connect(host(node))
            .await
            .expect("connect to the node");
        Conn {
            stream,
            read: Vec::new(),
        }
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write request");
    }

    pub(crate) async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .expect("the node answers in time")
            .expect("read");
        self.read.extend_from_slice(&chunk[..n]);
        n
    }

    /// Reads one response framed by `Content-Length` (every response here).
    pub(crate) async fn response(&mut self) -> Response {
        let head_end = loop {
            if let Some(i) = self.read.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(self.fill().await > 0, "connection closed before a response");
        };
        let head = String::from_utf8(self.read[..head_end].to_vec()).expect("UTF-8 head");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line: {head}"));
        let mut response = Response {
            status,
            head,
            body: Vec::new(),
        };
        if status == 100 {
            self.read.drain(..head_end);
            return response;
        }
        let len: usize = response
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no content-length: {}", response.head));
        while self.read.len() < head_end + len {
            assert!(self.fill().await > 0, "connection closed inside a body");
        }
        response.body = self.read[head_end..head_end + len].to_vec();
        self.read.drain(..head_end + len);
        response
    }

    /// Whether the node closes the connection (EOF) within `WAIT`.
    pub(crate) async fn closes(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        loop {
            match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// `host:port` of the node's public listener.
pub(crate) fn host(node: &Node) -> &str {
    node.public().trim_start_matches("http://")
}
