//! A connection's bounded queue of frames, and every other reason its task
//! has to wake: a heartbeat is due, its token expired, it reached its
//! maximum age, the node drains, or the hub cut it.
//!
//! One mailbox per connection replaces a channel, two cancellation tokens
//! and two timers. A connection task then waits on exactly one thing, and
//! neither a delivery nor an idle connection touches a shared lock or the
//! timer wheel: the hub's sweep (a single task, see [`crate::hub`]) raises
//! heartbeat and expiry flags for all connections at once. An idle
//! connection's empty `VecDeque` allocates nothing.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use futures_util::task::AtomicWaker;

use crate::envelope::now_ms;
use crate::frame::Frame;

/// Queues beyond this capacity are given back once drained, so a burst does
/// not leave an idle connection holding a large buffer.
const SHRINK_ABOVE: usize = 64;

const KILLED: u8 = 1;
const SLOW: u8 = 2;
const SHUTDOWN: u8 = 4;
const EXPIRED: u8 = 8;
const HEARTBEAT: u8 = 16;
const DISCONNECTED: u8 = 32;
const AGED: u8 = 64;

/// What woke a connection.
#[derive(Debug)]
pub(crate) enum Wake {
    /// A frame to write.
    Frame(Arc<Frame>),
    /// Idle for the heartbeat interval: write a comment.
    Heartbeat,
    /// The token expired.
    Expired,
    /// The node is draining.
    Shutdown,
    /// The connection reached `--max-connection-age`.
    Aged,
    /// The hub cut the connection (slow, or its channel lost history).
    Killed,
    /// The server API disconnected the user; its last frame is written.
    Disconnected,
}

/// One connection's queue and flags.
#[derive(Debug)]
pub(crate) struct Mailbox {
    /// Frames not yet written. A std mutex: held for a push or a pop only.
    queue: Mutex<VecDeque<Arc<Frame>>>,
    /// The connection task, parked waiting for its next wake.
    reader: AtomicWaker,
    /// The connection task again, parked on a blocked write: a kill must
    /// reach it there too.
    writer: AtomicWaker,
    flags: AtomicU8,
    capacity: usize,
    /// When something was last written (ms); the sweep reads it for
    /// heartbeats.
    last_write_ms: AtomicU64,
    /// When the token expires (ms since the epoch).
    expires_at_ms: u64,
    /// When the connection reaches its maximum age (ms since the epoch;
    /// `u64::MAX` for never).
    retire_at_ms: u64,
}

impl Mailbox {
    /// A mailbox holding at most `capacity` frames, for a token expiring at
    /// `expires_at_ms` and a connection retired at `retire_at_ms`.
    pub(crate) fn new(capacity: usize, expires_at_ms: u64, retire_at_ms: u64) -> Self {
        Mailbox {
            queue: Mutex::new(VecDeque::new()),
            reader: AtomicWaker::new(),
            writer: AtomicWaker::new(),
            flags: AtomicU8::new(0),
            capacity: capacity.max(1),
            last_write_ms: AtomicU64::new(now_ms()),
            expires_at_ms,
            retire_at_ms,
        }
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Arc<Frame>>> {
        crate::sync::lock(&self.queue)
    }

    fn raise(&self, flag: u8) {
        self.flags.fetch_or(flag, Ordering::AcqRel);
        self.reader.wake();
    }

    /// Queues a frame; `false` if the mailbox is full (the caller cuts the
    /// connection as slow).
    pub(crate) fn push(&self, frame: Arc<Frame>) -> bool {
        if self.flags.load(Ordering::Acquire) & DISCONNECTED != 0 {
            // Ending after its last frame: nothing more goes out.
            return true;
        }
        {
            let mut queue = self.queue();
            if queue.len() >= self.capacity {
                return false;
            }
            queue.push_back(frame);
        }
        self.reader.wake();
        true
    }

    /// The next queued frame, if any.
    pub(crate) fn try_pop(&self) -> Option<Arc<Frame>> {
        let mut queue = self.queue();
        let frame = queue.pop_front();
        if queue.is_empty() && queue.capacity() > SHRINK_ABOVE {
            queue.shrink_to(0);
        }
        frame
    }

    fn check(&self) -> Option<Wake> {
        let flags = self.flags.load(Ordering::Acquire);
        if flags & KILLED != 0 {
            return Some(Wake::Killed);
        }
        // Queued frames go out before a drain or expiry ends the stream.
        if let Some(frame) = self.try_pop() {
            return Some(Wake::Frame(frame));
        }
        if flags & DISCONNECTED != 0 {
            return Some(Wake::Disconnected);
        }
        if flags & SHUTDOWN != 0 {
            return Some(Wake::Shutdown);
        }
        if flags & EXPIRED != 0 {
            return Some(Wake::Expired);
        }
        if flags & AGED != 0 {
            return Some(Wake::Aged);
        }
        if flags & HEARTBEAT != 0 {
            self.flags.fetch_and(!HEARTBEAT, Ordering::AcqRel);
            return Some(Wake::Heartbeat);
        }
        None
    }

    /// Waits for the next reason to act.
    pub(crate) async fn next(&self) -> Wake {
        poll_fn(|cx| {
            if let Some(wake) = self.check() {
                return Poll::Ready(wake);
            }
            self.reader.register(cx.waker());
            // Something raised between the first look and the
            // registration woke nobody: look again.
            match self.check() {
                Some(wake) => Poll::Ready(wake),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// Resolves once the connection is killed (for a task blocked on a
    /// write to a client that stopped reading).
    pub(crate) async fn killed(&self) {
        poll_fn(|cx| {
            if self.is_killed() {
                return Poll::Ready(());
            }
            self.writer.register(cx.waker());
            if self.is_killed() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Records a write, postponing the next heartbeat.
    pub(crate) fn wrote(&self) {
        self.last_write_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// For the sweep: raises the heartbeat flag if idle for `heartbeat_ms`,
    /// the expiry flag once the token expired, and the age flag once the
    /// connection is old enough.
    pub(crate) fn sweep(&self, now_ms: u64, heartbeat_ms: u64) {
        if now_ms >= self.expires_at_ms {
            if self.flags.load(Ordering::Relaxed) & EXPIRED == 0 {
                self.raise(EXPIRED);
            }
        } else if now_ms >= self.retire_at_ms {
            if self.flags.load(Ordering::Relaxed) & AGED == 0 {
                self.raise(AGED);
            }
        } else if now_ms.saturating_sub(self.last_write_ms.load(Ordering::Relaxed)) >= heartbeat_ms
        {
            // Counts as a write, so one idle period gets one heartbeat.
            self.wrote();
            self.raise(HEARTBEAT);
        }
    }

    /// Ends the connection's stream with a drain `retry:`.
    pub(crate) fn shut_down(&self) {
        self.raise(SHUTDOWN);
    }

    /// Closes the connection now.
    pub(crate) fn kill(&self) {
        self.raise(KILLED);
        self.writer.wake();
    }

    /// Ends the stream after what is queued and then `last` (one frame
    /// beyond the capacity: it is the last). `false` if the connection was
    /// already killed or disconnected.
    pub(crate) fn disconnect(&self, last: Arc<Frame>) -> bool {
        if self.flags.load(Ordering::Acquire) & (KILLED | DISCONNECTED) != 0 {
            return false;
        }
        self.queue().push_back(last);
        self.raise(DISCONNECTED);
        true
    }

    /// Marks the connection slow and closes it.
    pub(crate) fn cut_slow(&self) {
        self.flags.fetch_or(SLOW, Ordering::AcqRel);
        self.kill();
    }

    /// Whether the connection was killed.
    pub(crate) fn is_killed(&self) -> bool {
        self.flags.load(Ordering::Acquire) & KILLED != 0
    }

    /// Whether the hub cut this connection as slow.
    pub(crate) fn is_slow(&self) -> bool {
        self.flags.load(Ordering::Acquire) & SLOW != 0
    }
}

/// Shared handle, as held by the hub and the connection.
pub(crate) type MailboxRef = Arc<Mailbox>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::Channel;
    use bytes::Bytes;

    fn frame(n: u8) -> Arc<Frame> {
        Arc::new(Frame {
            channel: Channel::broadcast(),
            id: None,
            ts: None,
            body: Bytes::from(vec![n]),
        })
    }

    fn body(wake: Wake) -> Bytes {
        match wake {
            Wake::Frame(f) => f.body.clone(),
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn bounded_fifo_that_wakes_its_reader() {
        let mailbox = Arc::new(Mailbox::new(2, u64::MAX, u64::MAX));
        let reader = {
            let mailbox = mailbox.clone();
            tokio::spawn(async move { body(mailbox.next().await) })
        };
        tokio::task::yield_now().await;
        assert!(mailbox.push(frame(1)));
        assert_eq!(reader.await.expect("joins"), Bytes::from_static(&[1]));
        assert!(mailbox.push(frame(2)));
        assert!(mailbox.push(frame(3)));
        assert!(!mailbox.push(frame(4)), "full at capacity");
        assert_eq!(body(mailbox.next().await), Bytes::from_static(&[2]));
        assert_eq!(body(mailbox.next().await), Bytes::from_static(&[3]));
        assert!(mailbox.try_pop().is_none());
    }

    #[tokio::test]
    async fn frames_drain_before_shutdown_but_a_kill_is_immediate() {
        let mailbox = Mailbox::new(4, u64::MAX, u64::MAX);
        mailbox.push(frame(1));
        mailbox.shut_down();
        assert!(matches!(mailbox.next().await, Wake::Frame(_)));
        assert!(matches!(mailbox.next().await, Wake::Shutdown));
        mailbox.push(frame(2));
        mailbox.cut_slow();
        assert!(matches!(mailbox.next().await, Wake::Killed));
        assert!(mailbox.is_slow());
        mailbox.killed().await;
    }

    #[tokio::test]
    async fn the_sweep_raises_heartbeats_and_expiry() {
        let mailbox = Mailbox::new(4, now_ms() + 60_000, u64::MAX);
        mailbox.sweep(now_ms(), 60_000);
        assert!(mailbox.check().is_none(), "not idle yet");
        mailbox.sweep(now_ms() + 1_000, 500);
        assert!(matches!(mailbox.next().await, Wake::Heartbeat));
        assert!(mailbox.check().is_none(), "one heartbeat per idle period");
        mailbox.sweep(now_ms() + 61_000, 500);
        assert!(matches!(mailbox.next().await, Wake::Expired));
    }

    #[tokio::test]
    async fn the_sweep_retires_an_old_connection_after_its_frames() {
        let now = now_ms();
        let mailbox = Mailbox::new(4, now + 60_000, now + 10_000);
        mailbox.sweep(now + 9_000, 60_000);
        assert!(mailbox.check().is_none(), "not old yet");
        mailbox.push(frame(1));
        mailbox.sweep(now + 10_000, 60_000);
        assert!(matches!(mailbox.next().await, Wake::Frame(_)));
        assert!(matches!(mailbox.next().await, Wake::Aged));
        mailbox.sweep(now + 61_000, 60_000);
        assert!(matches!(mailbox.next().await, Wake::Expired), "expiry wins");
    }
}
