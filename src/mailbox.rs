//! A connection's bounded queue of frames, and how the hub cuts it.
//!
//! Replaces a tokio mpsc channel per connection: most connections are idle
//! most of the time, and an empty `VecDeque` allocates nothing, where a
//! channel keeps its first block of slots and its semaphore for life. The
//! hub pushes (never waits: a full mailbox means a slow client), the
//! connection's task pops; one waker, woken once per burst.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use futures_util::task::AtomicWaker;
use tokio_util::sync::CancellationToken;

use crate::hub::Frame;

/// Queues beyond this capacity are given back once drained, so a burst does
/// not leave an idle connection holding a large buffer.
const SHRINK_ABOVE: usize = 64;

/// One connection's queue.
#[derive(Debug)]
pub struct Mailbox {
    /// Frames not yet written. A std mutex: held for a push or a pop only.
    queue: Mutex<VecDeque<Arc<Frame>>>,
    /// The connection task, parked on an empty queue.
    waker: AtomicWaker,
    capacity: usize,
    /// Cancelled to close the connection (and its TCP socket).
    pub kill: CancellationToken,
    slow: AtomicBool,
}

impl Mailbox {
    /// A mailbox holding at most `capacity` frames; `kill` closes the
    /// connection it belongs to.
    pub fn new(capacity: usize, kill: CancellationToken) -> Self {
        Mailbox {
            queue: Mutex::new(VecDeque::new()),
            waker: AtomicWaker::new(),
            capacity: capacity.max(1),
            kill,
            slow: AtomicBool::new(false),
        }
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Arc<Frame>>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a frame; `false` if the mailbox is full.
    pub fn push(&self, frame: Arc<Frame>) -> bool {
        {
            let mut queue = self.queue();
            if queue.len() >= self.capacity {
                return false;
            }
            queue.push_back(frame);
        }
        self.waker.wake();
        true
    }

    /// The next frame, if one is queued.
    pub fn try_pop(&self) -> Option<Arc<Frame>> {
        let mut queue = self.queue();
        let frame = queue.pop_front();
        if queue.is_empty() && queue.capacity() > SHRINK_ABOVE {
            queue.shrink_to(0);
        }
        frame
    }

    /// Waits for the next frame.
    pub async fn pop(&self) -> Arc<Frame> {
        poll_fn(|cx| {
            if let Some(frame) = self.try_pop() {
                return Poll::Ready(frame);
            }
            self.waker.register(cx.waker());
            // A push between the first look and the registration woke
            // nobody: look again.
            match self.try_pop() {
                Some(frame) => Poll::Ready(frame),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// Whether the hub cut this connection as slow.
    pub fn is_slow(&self) -> bool {
        self.slow.load(Ordering::Relaxed)
    }

    /// Marks the connection slow and closes it.
    pub fn cut_slow(&self) {
        self.slow.store(true, Ordering::Relaxed);
        self.kill.cancel();
    }
}

/// Shared handle, as held by the hub and the connection.
pub type MailboxRef = Arc<Mailbox>;

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

    #[tokio::test]
    async fn bounded_fifo_that_wakes_its_reader() {
        let mailbox = Arc::new(Mailbox::new(2, CancellationToken::new()));
        let reader = {
            let mailbox = mailbox.clone();
            tokio::spawn(async move { mailbox.pop().await.body.clone() })
        };
        tokio::task::yield_now().await;
        assert!(mailbox.push(frame(1)));
        assert_eq!(reader.await.expect("joins"), Bytes::from_static(&[1]));
        assert!(mailbox.push(frame(2)));
        assert!(mailbox.push(frame(3)));
        assert!(!mailbox.push(frame(4)), "full at capacity");
        assert_eq!(mailbox.try_pop().map(|f| f.body.clone()), Some(Bytes::from_static(&[2])));
        assert_eq!(mailbox.pop().await.body, Bytes::from_static(&[3]));
        assert!(mailbox.try_pop().is_none());
    }

    #[test]
    fn a_slow_cut_kills_the_connection() {
        let mailbox = Mailbox::new(1, CancellationToken::new());
        assert!(!mailbox.is_slow());
        mailbox.cut_slow();
        assert!(mailbox.is_slow());
        assert!(mailbox.kill.is_cancelled());
    }
}
