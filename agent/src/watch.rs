//! Kubernetes watches, kept in local stores ([`reflect`], workload policy)
//! or handed event by event to what keeps its own index ([`follow`],
//! discovery).

use std::sync::Arc;

use futures::{Stream, StreamExt};
use kube::runtime::reflector;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::Notify;
use tracing::warn;

/// Runs one reflector over `events` (a [`watcher`]), waking `changed`
/// after every event. `trim` drops what the agent does not need before an
/// object is stored. Watch failures are retried with backoff, forever.
pub async fn reflect<K>(
    events: impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    writer: reflector::store::Writer<K>,
    changed: Arc<Notify>,
    what: &'static str,
    trim: fn(&mut K),
) where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    let stream = events.default_backoff().modify(trim);
    let mut events = reflector::reflector(writer, stream).boxed();
    while let Some(ev) = events.next().await {
        match ev {
            Ok(_) => changed.notify_one(),
            Err(e) => warn!(error = %e, what, "watch failed; retrying"),
        }
    }
}

/// Runs one watch, handing each event (after `trim`) to `on_event`.
/// Watch failures are retried with backoff, forever; a relist after one
/// arrives as `Init`, `InitApply`…, `InitDone`.
pub async fn follow<K>(
    events: impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    what: &'static str,
    trim: fn(&mut K),
    mut on_event: impl FnMut(watcher::Event<K>) + Send,
) where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    let mut events = events.default_backoff().modify(trim).boxed();
    while let Some(ev) = events.next().await {
        match ev {
            Ok(ev) => on_event(ev),
            Err(e) => warn!(error = %e, what, "watch failed; retrying"),
        }
    }
}
