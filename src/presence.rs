//! Presence: how many connections a channel has across the cluster.
//!
//! Each node keeps a table in the broker, channel → its count there, alive
//! for [`PRESENCE_TTL`] after its last report; readers add up the tables
//! of the live nodes ([`crate::broker::Store::presence`]). Counts, never
//! connection lists. A count that changed is written within
//! [`PRESENCE_INTERVAL`], and the table is kept alive every
//! [`PRESENCE_REFRESH`], so a node that dies without a goodbye (SIGKILL)
//! drops out within [`PRESENCE_TTL`]. The cost is the changes (connects
//! and disconnects) plus a few commands per node per refresh, whatever the
//! number of channels held; a table that lapsed (the node was cut off from
//! Redis for longer than the TTL) is written again in full.

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
    // What was last written, and on which tick the channel was last seen
    // held; updated in place, so a tick allocates only its changes.
    let mut written: HashMap<Channel, Written> = HashMap::new();
    let mut tick = tokio::time::interval(PRESENCE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut round: u64 = 0;
    let mut refreshed: Option<Instant> = None;
    loop {
        tick.tick().await;
        round += 1;
        let now = Instant::now();
        let mut changes: Vec<(Channel, usize)> = Vec::new();
        hub.each_channel_count(|channel, count| match written.get_mut(channel) {
            Some(entry) => {
                entry.seen = round;
                if entry.count != count {
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
        let due = refreshed.is_none_or(|at| now - at >= PRESENCE_REFRESH);
        if changes.is_empty() && !due {
            continue;
        }
        match hub
            .broker()
            .report_presence(&node_id, &changes, PRESENCE_TTL)
            .await
        {
            Ok(alive) => {
                refreshed = Some(now);
                if !alive {
                    // The table lapsed: what it held is gone, so everything
                    // not in this report is written again on the next tick.
                    written.clear();
                }
                for (channel, count) in changes {
                    if count == 0 {
                        written.remove(&channel);
                    } else {
                        let seen = round;
                        written.insert(channel, Written { count, seen });
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
    /// The tick on which the hub last held the channel.
    seen: u64,
}
