//! Per-client bookkeeping of which messages arrived: the ground truth for
//! "lost", "duplicated" and "out of order".
//!
//! Order is the order of the channel's stream, where the stream id is
//! known (Herald's cursor names it): publishers running side by side may
//! commit message 8 before message 7, and a client getting them in that
//! order gets them in order. Without a stream id (nchan) it falls back to
//! the publisher's numbering.
//!
//! Message `k` (0-based, the `seq` in its payload) goes either to every
//! client (broadcast: stride 1) or to client `k mod N` (unicast: stride N,
//! offset = the client's index). A client keeps one bit per message meant
//! for it, so a duplicate is a bit already set, and a loss is a bit still
//! clear at the end among the messages the publisher confirmed. Messages
//! whose publish failed or whose outcome is unknown are excluded from what
//! is expected, but one that arrives anyway is simply counted as delivered.

use herald::StreamId;
use serde::{Deserialize, Serialize};

/// What one arriving message was, for this client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// First time seen, in order.
    New,
    /// First time seen, but after a later message.
    OutOfOrder,
    /// Seen before.
    Duplicate,
    /// Not a message for this client, or a sequence number beyond the run.
    Misrouted,
}

/// One client's received set.
#[derive(Debug, Clone)]
pub(crate) struct SeqTracker {
    stride: u64,
    offset: u64,
    /// Messages in the run; higher sequence numbers are misrouted.
    limit: u64,
    /// Bit `i` = message `offset + i * stride` arrived.
    bits: Vec<u64>,
    max_index: Option<u64>,
    /// The newest stream position seen, when arrivals carry one.
    max_position: Option<StreamId>,
    pub(crate) delivered: u64,
    pub(crate) duplicates: u64,
    pub(crate) out_of_order: u64,
    pub(crate) misrouted: u64,
}

impl SeqTracker {
    pub(crate) fn new(stride: u64, offset: u64, limit: u64) -> Self {
        assert!(stride > 0 && offset < stride, "offset must be below stride");
        SeqTracker {
            stride,
            offset,
            limit,
            bits: Vec::new(),
            max_index: None,
            max_position: None,
            delivered: 0,
            duplicates: 0,
            out_of_order: 0,
            misrouted: 0,
        }
    }

    /// Records message `seq`, which the stream placed at `position` if
    /// known.
    pub(crate) fn record(&mut self, seq: u64, position: Option<StreamId>) -> Arrival {
        if seq >= self.limit || seq % self.stride != self.offset {
            self.misrouted += 1;
            return Arrival::Misrouted;
        }
        let index = seq / self.stride;
        let (word, bit) = ((index / 64) as usize, index % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        if self.bits[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return Arrival::Duplicate;
        }
        self.bits[word] |= 1 << bit;
        self.delivered += 1;
        let late = match position {
            Some(p) => self.max_position.is_some_and(|m| p <= m),
            None => self.max_index.is_some_and(|m| index < m),
        };
        self.max_index = Some(self.max_index.map_or(index, |m| m.max(index)));
        if let Some(p) = position {
            self.max_position = Some(self.max_position.map_or(p, |m| m.max(p)));
        }
        if late {
            self.out_of_order += 1;
            return Arrival::OutOfOrder;
        }
        Arrival::New
    }

    fn has(&self, index: u64) -> bool {
        self.bits
            .get((index / 64) as usize)
            .is_some_and(|w| w & (1 << (index % 64)) != 0)
    }

    /// Settles the account once `published` messages (sequence numbers
    /// `0..published`) were sent; `excluded` (sorted) are those whose
    /// publish failed or is uncertain.
    pub(crate) fn tally(&self, published: u64, excluded: &[u64]) -> Tally {
        // Messages meant for us among 0..published.
        let meant = if published > self.offset {
            (published - 1 - self.offset) / self.stride + 1
        } else {
            0
        };
        let mut received = count_ones_below(&self.bits, meant);
        let mut expected = meant;
        for &seq in excluded {
            if seq < published && seq % self.stride == self.offset {
                expected -= 1;
                if self.has(seq / self.stride) {
                    received -= 1;
                }
            }
        }
        let lost = expected - received;
        Tally {
            clients: 1,
            expected,
            received,
            lost,
            delivered: self.delivered,
            duplicates: self.duplicates,
            out_of_order: self.out_of_order,
            misrouted: self.misrouted,
            clients_with_loss: u64::from(lost > 0),
            clients_with_duplicates: u64::from(self.duplicates > 0),
            max_lost_per_client: lost,
            max_duplicates_per_client: self.duplicates,
        }
    }
}

/// Set bits among the first `n` bits.
fn count_ones_below(bits: &[u64], n: u64) -> u64 {
    let full = (n / 64) as usize;
    let mut count: u64 = bits
        .iter()
        .take(full)
        .map(|w| u64::from(w.count_ones()))
        .sum();
    let rem = n % 64;
    if rem > 0 {
        if let Some(w) = bits.get(full) {
            count += u64::from((w & ((1u64 << rem) - 1)).count_ones());
        }
    }
    count
}

/// Delivery accounting, summed over clients.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Tally {
    pub(crate) clients: u64,
    /// Confirmed publishes meant for these clients.
    pub(crate) expected: u64,
    /// Of those, how many arrived (at least once).
    pub(crate) received: u64,
    pub(crate) lost: u64,
    /// Distinct messages that arrived, including unconfirmed ones.
    pub(crate) delivered: u64,
    /// Extra copies of messages already received.
    pub(crate) duplicates: u64,
    pub(crate) out_of_order: u64,
    /// Arrivals meant for another client or outside the run.
    pub(crate) misrouted: u64,
    pub(crate) clients_with_loss: u64,
    pub(crate) clients_with_duplicates: u64,
    pub(crate) max_lost_per_client: u64,
    pub(crate) max_duplicates_per_client: u64,
}

impl Tally {
    pub(crate) fn add(&mut self, o: &Tally) {
        self.clients += o.clients;
        self.expected += o.expected;
        self.received += o.received;
        self.lost += o.lost;
        self.delivered += o.delivered;
        self.duplicates += o.duplicates;
        self.out_of_order += o.out_of_order;
        self.misrouted += o.misrouted;
        self.clients_with_loss += o.clients_with_loss;
        self.clients_with_duplicates += o.clients_with_duplicates;
        self.max_lost_per_client = self.max_lost_per_client.max(o.max_lost_per_client);
        self.max_duplicates_per_client = self
            .max_duplicates_per_client
            .max(o.max_duplicates_per_client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_in_order_complete() {
        let mut t = SeqTracker::new(1, 0, 100);
        for k in 0..100 {
            assert_eq!(t.record(k, None), Arrival::New);
        }
        let tally = t.tally(100, &[]);
        assert_eq!(tally.expected, 100);
        assert_eq!(tally.received, 100);
        assert_eq!(tally.lost, 0);
        assert_eq!(tally.duplicates, 0);
        assert_eq!(tally.out_of_order, 0);
        assert_eq!(tally.clients_with_loss, 0);
    }

    #[test]
    fn loss_duplicates_and_order() {
        let mut t = SeqTracker::new(1, 0, 200);
        for k in [0, 1, 3, 2, 3, 3, 5, 150] {
            t.record(k, None);
        }
        let tally = t.tally(200, &[]);
        assert_eq!(tally.expected, 200);
        assert_eq!(tally.received, 6); // 0 1 2 3 5 150
        assert_eq!(tally.lost, 194);
        assert_eq!(tally.duplicates, 2);
        assert_eq!(tally.out_of_order, 1); // 2 after 3
        assert_eq!(tally.max_duplicates_per_client, 2);
        assert_eq!(tally.clients_with_duplicates, 1);
    }

    #[test]
    fn order_is_the_streams_where_it_is_known() {
        let at = |ms| Some(StreamId { ms, seq: 0 });
        let mut t = SeqTracker::new(1, 0, 10);
        // Two publishers side by side: 1 was committed before 0.
        assert_eq!(t.record(1, at(10)), Arrival::New);
        assert_eq!(t.record(0, at(11)), Arrival::New);
        assert_eq!(t.record(2, at(12)), Arrival::New);
        // A message placed before one already seen is out of order.
        assert_eq!(t.record(3, at(11)), Arrival::OutOfOrder);
        assert_eq!(t.record(2, at(12)), Arrival::Duplicate);
        let tally = t.tally(4, &[]);
        assert_eq!(
            (tally.out_of_order, tally.duplicates, tally.lost),
            (1, 1, 0)
        );
    }

    #[test]
    fn unicast_stride() {
        // Client 3 of 10: messages 3, 13, 23, ... are its own.
        let mut t = SeqTracker::new(10, 3, 100);
        assert_eq!(t.record(13, None), Arrival::New);
        assert_eq!(t.record(3, None), Arrival::OutOfOrder);
        assert_eq!(t.record(4, None), Arrival::Misrouted);
        assert_eq!(t.record(13, None), Arrival::Duplicate);
        assert_eq!(t.record(103, None), Arrival::Misrouted); // beyond the run
                                                             // 35 published: 3, 13, 23, 33 meant for it.
        let tally = t.tally(35, &[]);
        assert_eq!((tally.expected, tally.received, tally.lost), (4, 2, 2));
        assert_eq!(tally.misrouted, 2);
        // Nothing published yet for an offset past `published`.
        assert_eq!(SeqTracker::new(10, 7, 100).tally(5, &[]).expected, 0);
        assert_eq!(SeqTracker::new(10, 7, 100).tally(8, &[]).expected, 1);
    }

    #[test]
    fn excluded_publishes_are_not_expected() {
        let mut t = SeqTracker::new(1, 0, 10);
        for k in [0, 1, 2, 4] {
            t.record(k, None);
        }
        // 3 failed to publish, 4 is uncertain yet arrived, 9 never published.
        let tally = t.tally(6, &[3, 4]);
        assert_eq!(tally.expected, 4); // 0 1 2 5
        assert_eq!(tally.received, 3);
        assert_eq!(tally.lost, 1);
        assert_eq!(tally.delivered, 4);
    }

    #[test]
    fn bit_boundaries() {
        let mut t = SeqTracker::new(1, 0, 1000);
        for k in (0..130).filter(|k| k % 2 == 0) {
            t.record(k, None);
        }
        assert_eq!(t.tally(64, &[]).received, 32);
        assert_eq!(t.tally(65, &[]).received, 33);
        assert_eq!(t.tally(128, &[]).received, 64);
        assert_eq!(t.tally(1000, &[]).lost, 1000 - 65);
    }

    #[test]
    fn tallies_add_up() {
        let mut a = SeqTracker::new(1, 0, 10);
        a.record(0, None);
        a.record(0, None);
        let mut b = SeqTracker::new(1, 0, 10);
        b.record(0, None);
        b.record(1, None);
        let mut sum = Tally::default();
        sum.add(&a.tally(2, &[]));
        sum.add(&b.tally(2, &[]));
        assert_eq!(sum.clients, 2);
        assert_eq!(sum.expected, 4);
        assert_eq!(sum.lost, 1);
        assert_eq!(sum.duplicates, 1);
        assert_eq!(sum.clients_with_loss, 1);
        assert_eq!(sum.clients_with_duplicates, 1);
        assert_eq!(sum.max_lost_per_client, 1);
    }
}
