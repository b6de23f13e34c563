//! A tiny RESP2 client over a plain TCP socket: the tests' stand-in for an
//! app service that talks to Redis directly, in any language, without
//! Herald's code. It runs the shipped publish script (SCRIPT LOAD +
//! EVALSHA), sends raw PUBLISHes, and asks Redis what is subscribed
//! (`PUBSUB`) or cuts subscribers (`CLIENT KILL`).
//!
//! Every call has a deadline so a hung Redis fails the test instead of
//! hanging it.

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The publish script exactly as the server ships it.
pub(crate) const PUBLISH_SCRIPT: &str = include_str!("../../src/broker/publish.lua");

/// The default `--channel-prefix`.
pub(crate) const PREFIX: &str = "herald";

/// `ARGV[3]` / `ARGV[4]` of the publish script: the server's defaults.
const HISTORY_SIZE: &str = "1000";
const HISTORY_TTL_SECS: &str = "86400";

/// Longest one command may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RespValue {
    Simple(String),
    Error(String),
    Int(i64),
    /// `None` is the null bulk string.
    Bulk(Option<Vec<u8>>),
    /// `None` is the null array.
    Array(Option<Vec<RespValue>>),
}

impl RespValue {
    /// The reply as text (simple or bulk string); panics otherwise.
    pub(crate) fn text(&self) -> String {
        match self {
            RespValue::Simple(s) => s.clone(),
            RespValue::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            other => panic!("expected a string reply, got {other:?}"),
        }
    }

    /// The reply as an integer; panics otherwise.
    pub(crate) fn int(&self) -> i64 {
        match self {
            RespValue::Int(n) => *n,
            other => panic!("expected an integer reply, got {other:?}"),
        }
    }

    /// The reply as an array; panics otherwise.
    pub(crate) fn array(&self) -> &[RespValue] {
        match self {
            RespValue::Array(Some(items)) => items,
            other => panic!("expected an array reply, got {other:?}"),
        }
    }
}

/// The pub/sub channel of `channel`: `herald:{user:42}` for `user:42`.
pub(crate) fn pubsub_key(channel: &str) -> String {
    format!("{PREFIX}:{{{channel}}}")
}

/// One connection to a Redis server.
pub(crate) struct Resp {
    conn: BufReader<TcpStream>,
    port: u16,
}

impl Resp {
    /// Connects to `127.0.0.1:port`; panics if Redis is not there.
    pub(crate) async fn connect(port: u16) -> Resp {
        let connect = TcpStream::connect(("127.0.0.1", port));
        let stream = tokio::time::timeout(CALL_TIMEOUT, connect)
            .await
            .unwrap_or_else(|_| panic!("connect to redis on {port} timed out"))
            .unwrap_or_else(|e| panic!("connect to redis on {port}: {e}"));
        stream.set_nodelay(true).expect("TCP_NODELAY");
        Resp {
            conn: BufReader::new(stream),
            port,
        }
    }

    /// Sends one command and reads its reply (an error reply is returned,
    /// not a panic); panics on I/O failure or after the deadline.
    pub(crate) async fn call<A: AsRef<[u8]>>(&mut self, args: &[A]) -> RespValue {
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            let arg = arg.as_ref();
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg);
            request.extend_from_slice(b"\r\n");
        }
        let port = self.port;
        let exchange = async {
            self.conn.get_mut().write_all(&request).await?;
            read_value(&mut self.conn).await
        };
        let name = String::from_utf8_lossy(args.first().map_or(&[][..], |a| a.as_ref()));
        tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| panic!("redis {port}: {name} got no reply in {CALL_TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("redis {port}: {name} failed: {e}"))
    }

    /// Like `call`, but an error reply panics.
    pub(crate) async fn call_ok<A: AsRef<[u8]>>(&mut self, args: &[A]) -> RespValue {
        let reply = self.call(args).await;
        if let RespValue::Error(e) = &reply {
            let args: Vec<_> = args
                .iter()
                .map(|a| String::from_utf8_lossy(a.as_ref()).into_owned())
                .collect();
            panic!("redis {args:?} -> error {e}");
        }
        reply
    }

    /// `SCRIPT LOAD` of the shipped publish script; returns its SHA1.
    pub(crate) async fn load_publish_script(&mut self) -> String {
        self.call_ok(&["SCRIPT", "LOAD", PUBLISH_SCRIPT])
            .await
            .text()
    }

    /// Publishes as an app service would: `EVALSHA sha 2 <history key>
    /// <pub/sub channel> <event or ""> <data JSON> <history size> <ttl>`,
    /// with the default prefix and the server's default history bounds.
    /// Returns the new stream id.
    pub(crate) async fn script_publish(
        &mut self,
        sha: &str,
        channel: &str,
        event: &str,
        data_json: &str,
    ) -> String {
        self.script_publish_with(sha, PREFIX, HISTORY_SIZE, channel, event, data_json)
            .await
    }

    /// `script_publish` under another `--channel-prefix` and history size.
    pub(crate) async fn script_publish_with(
        &mut self,
        sha: &str,
        prefix: &str,
        history_size: &str,
        channel: &str,
        event: &str,
        data_json: &str,
    ) -> String {
        let history = format!("{prefix}:{{{channel}}}:h");
        let pubsub = format!("{prefix}:{{{channel}}}");
        self.call_ok(&[
            "EVALSHA",
            sha,
            "2",
            &history,
            &pubsub,
            event,
            data_json,
            history_size,
            HISTORY_TTL_SECS,
        ])
        .await
        .text()
    }

    /// A raw `PUBLISH`; returns how many subscribers Redis delivered it to.
    pub(crate) async fn publish(&mut self, channel_key: &str, payload: &[u8]) -> i64 {
        self.call_ok(&[b"PUBLISH".as_slice(), channel_key.as_bytes(), payload])
            .await
            .int()
    }

    /// `PUBSUB CHANNELS pattern`.
    pub(crate) async fn pubsub_channels(&mut self, pattern: &str) -> BTreeSet<String> {
        self.call_ok(&["PUBSUB", "CHANNELS", pattern])
            .await
            .array()
            .iter()
            .map(RespValue::text)
            .collect()
    }

    /// `PUBSUB NUMSUB key`: how many connections (nodes) subscribe to it.
    pub(crate) async fn numsub(&mut self, channel_key: &str) -> i64 {
        let reply = self.call_ok(&["PUBSUB", "NUMSUB", channel_key]).await;
        reply.array()[1].int()
    }

    /// `CLIENT KILL TYPE pubsub`; returns how many connections were cut.
    pub(crate) async fn kill_pubsub_clients(&mut self) -> i64 {
        self.call_ok(&["CLIENT", "KILL", "TYPE", "pubsub"])
            .await
            .int()
    }
}

fn read_value(
    conn: &mut BufReader<TcpStream>,
) -> Pin<Box<dyn Future<Output = io::Result<RespValue>> + Send + '_>> {
    Box::pin(async move {
        let mut line = String::new();
        if conn.read_line(&mut line).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "redis closed the connection",
            ));
        }
        let line = line.trim_end_matches(['\r', '\n']);
        let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("bad reply {line:?}"));
        let (kind, rest) = line.split_at_checked(1).ok_or_else(bad)?;
        Ok(match kind {
            "+" => RespValue::Simple(rest.to_string()),
            "-" => RespValue::Error(rest.to_string()),
            ":" => RespValue::Int(rest.parse().map_err(|_| bad())?),
            "$" => {
                let len: i64 = rest.parse().map_err(|_| bad())?;
                if len < 0 {
                    RespValue::Bulk(None)
                } else {
                    let mut body = vec![0; len as usize + 2];
                    conn.read_exact(&mut body).await?;
                    body.truncate(len as usize);
                    RespValue::Bulk(Some(body))
                }
            }
            "*" => {
                let len: i64 = rest.parse().map_err(|_| bad())?;
                if len < 0 {
                    RespValue::Array(None)
                } else {
                    let mut items = Vec::with_capacity(len as usize);
                    for _ in 0..len {
                        items.push(read_value(conn).await?);
                    }
                    RespValue::Array(Some(items))
                }
            }
            _ => return Err(bad()),
        })
    })
}
