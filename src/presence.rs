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
//! Redis for longer than the TTL) is written again in full. The hub notes
//! which channels changed count, so a tick reads only those, not every
//! channel the node holds.

use std::collections::HashSet;
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
    let mut tick = tokio::time::interval(PRESENCE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refreshed: Option<Instant> = None;
    // The table is written in full at first and after it lapsed; otherwise
    // a tick sends only the counts that changed since the last one.
    let mut full = true;
    // What a report of changes wrote into a table that had lapsed: the
    // full write after it clears those no longer held.
    let mut carried: Vec<Channel> = Vec::new();
    loop {
        tick.tick().await;
        let now = Instant::now();
        let changes = if full {
            let mut all = hub.presence_all();
            let held: HashSet<&Channel> = all.iter().map(|(channel, _)| channel).collect();
            let gone: Vec<(Channel, usize)> = carried
                .iter()
                .filter(|channel| !held.contains(channel))
                .map(|channel| (channel.clone(), 0))
                .collect();
            all.extend(gone);
            all
        } else {
            hub.presence_changes()
        };
        let due = refreshed.is_none_or(|at| now - at >= PRESENCE_REFRESH);
        if changes.is_empty() && !due && !full {
            continue;
        }
        match hub
            .broker()
            .report_presence(&node_id, &changes, PRESENCE_TTL)
            .await
        {
            Ok(alive) => {
                refreshed = Some(now);
                if alive || full {
                    // The table holds every count.
                    full = false;
                    carried.clear();
                } else {
                    // It had lapsed and now holds only these changes.
                    full = true;
                    carried = changes
                        .into_iter()
                        .filter(|(_, count)| *count > 0)
                        .map(|(channel, _)| channel)
                        .collect();
                }
            }
            Err(error) => {
                tracing::debug!(%error, "presence report failed; retrying");
                if !full {
                    hub.presence_retry(changes.into_iter().map(|(channel, _)| channel));
                }
            }
        }
    }
}
