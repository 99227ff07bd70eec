//! What the controller tells live viewers (the dashboard's stream): a route's status
//! changed, a chart point was taken, an entry went into the journal.
//!
//! A `tokio::sync::broadcast` channel: the controller never waits for a viewer, and a
//! viewer that falls behind is told it lagged (the stream then asks the page to
//! refetch) instead of holding memory for it.

use std::sync::Arc;

use canary_core::rollout::Event;
use tokio::sync::broadcast;

use crate::history::PointView;

/// How many updates a slow viewer may fall behind before it is told to resync.
pub const CAPACITY: usize = 1024;

/// One update for live viewers.
#[derive(Clone, Debug)]
pub enum Update {
    /// The route's status changed (fetch it with `Controller::status`).
    Status(String),
    /// A new chart point of a route.
    Point(Arc<PointView>),
    /// A journal entry of a route.
    Event(String, Arc<Event>),
}

/// The sending side, kept by the controller.
pub struct Live(broadcast::Sender<Update>);

impl Default for Live {
    fn default() -> Self {
        Live(broadcast::channel(CAPACITY).0)
    }
}

impl Live {
    /// Sends to whoever listens; nobody listening is fine.
    pub fn send(&self, u: Update) {
        let _ = self.0.send(u);
    }

    /// A new viewer.
    pub fn subscribe(&self) -> broadcast::Receiver<Update> {
        self.0.subscribe()
    }
}
