//! Presence: how many connections a channel has across the cluster.
//!
//! Each node writes its own count per channel it holds into the broker
//! (one entry per node, fresh for [`PRESENCE_TTL`]) and readers add up the
//! fresh entries ([`crate::broker::Store::presence`]). Counts, never
//! connection lists. A count that changed is written within
//! [`PRESENCE_INTERVAL`]; an unchanged one is rewritten every
//! [`PRESENCE_REFRESH`], so a node that dies without a goodbye (SIGKILL)
//! drops out within [`PRESENCE_TTL`]. The cost: about one Redis write per
//! held channel per refresh, plus one per change.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::channel::Channel;
use crate::hub::Hub;

/// How often a node compares its counts with what it last wrote.
pub(crate) const PRESENCE_INTERVAL: Duration = Duration::from_secs(1);
/// How often an unchanged count is rewritten.
pub(crate) const PRESENCE_REFRESH: Duration = Duration::from_secs(4);
/// How long a written count stays valid without a rewrite.
pub(crate) const PRESENCE_TTL: Duration = Duration::from_secs(10);

/// Reports this node's counts to the broker until the process ends.
/// A failed write is logged and retried on the next tick.
pub(crate) async fn report(hub: Hub, node_id: String) {
    // What was last written, when, and on which tick the channel was last
    // seen held; updated in place, so a tick allocates only its changes.
    let mut written: HashMap<Channel, Written> = HashMap::new();
    let mut tick = tokio::time::interval(PRESENCE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut round: u64 = 0;
    loop {
        tick.tick().await;
        round += 1;
        let now = Instant::now();
        let mut changes: Vec<(Channel, usize)> = Vec::new();
        hub.each_channel_count(|channel, count| match written.get_mut(channel) {
            Some(entry) => {
                entry.seen = round;
                if entry.count != count || now - entry.at >= PRESENCE_REFRESH {
                    changes.push((channel.clone(), count));
                }
            }
            None => changes.push((channel.clone(), count)),
        });
        // Channels this node no longer holds: remove its entry.
        changes.extend(
            written
                .iter()
                .filter(|(_, entry)| entry.seen != round)
                .map(|(channel, _)| (channel.clone(), 0)),
        );
        if changes.is_empty() {
            continue;
        }
        match hub
            .broker()
            .report_presence(&node_id, &changes, PRESENCE_TTL)
            .await
        {
            Ok(()) => {
                for (channel, count) in changes {
                    if count == 0 {
                        written.remove(&channel);
                    } else {
                        let seen = round;
                        written.insert(
                            channel,
                            Written {
                                count,
                                at: now,
                                seen,
                            },
                        );
                    }
                }
            }
            Err(error) => tracing::debug!(%error, "presence report failed; retrying"),
        }
    }
}

/// One channel's last report.
struct Written {
    count: usize,
    at: Instant,
    /// The tick on which the hub last held the channel.
    seen: u64,
}
