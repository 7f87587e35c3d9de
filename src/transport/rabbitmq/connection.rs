//! The connection and its supervisor: detects a lost connection, reconnects (to the next
//! node of the list, with exponential backoff between passes over all of them) and replays
//! the recorded topology before announcing the new link.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use futures::{FutureExt, StreamExt};
use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::consumer_links::ConsumerLinks;
use super::error::map_connect_error;
use super::losses::{log_loss, YoungLosses};
use super::nodes::Nodes;
use super::options::RabbitMqOptions;
use super::replay::{reclaim, replay, Reclaims};
use super::returns::Returns;
use super::topology::Topology;
use super::uri::{scrub, BrokerUri};
use crate::transport::{ClosedPart, TransportError};

/// How long an operation on a dead link may still take to report its own error.
const DEATH_GRACE: Duration = Duration::from_millis(100);

/// How often the supervisor checks the connection when nothing else woke it up.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// One live AMQP connection. Every reconnect makes a new link with the next generation.
pub(crate) struct Link {
    /// The lapin connection.
    pub(crate) connection: Connection,
    /// 1 for the first connection, then +1 per reconnect.
    pub(crate) generation: u64,
    /// Set once the supervisor saw the connection die (or the transport closed).
    dead: watch::Sender<bool>,
    /// The broker closed a channel of this connection over an operation it refused. lapin
    /// never lets the number of such a channel be opened again: its frames are discarded for
    /// the connection's life, and an open on it fails and holds the number for good.
    refused_channels: AtomicBool,
}

impl Link {
    fn new(connection: Connection, generation: u64) -> Self {
        let (dead, refused_channels) = (watch::Sender::new(false), AtomicBool::new(false));
        Link { connection, generation, dead, refused_channels }
    }

    /// The broker closed a channel of this link (a soft error).
    pub(crate) fn channel_refused(&self) {
        self.refused_channels.store(true, Ordering::Relaxed);
    }

    /// True once the broker closed a channel of this link: a failed channel open may be one
    /// on a number lapin no longer lets open (see [`Link::channel_refused`]).
    pub(crate) fn had_channels_refused(&self) -> bool {
        self.refused_channels.load(Ordering::Relaxed)
    }

    /// True while lapin considers the connection open and the supervisor has not seen it die.
    pub(crate) fn alive(&self) -> bool {
        !*self.dead.borrow() && self.connection.status().connected()
    }

    /// Fail every [`Link::guard`]ed operation still waiting on this link.
    pub(crate) fn mark_dead(&self) {
        self.dead.send_replace(true);
    }

    /// Resolves once the link is known dead.
    pub(crate) async fn died(&self) {
        let mut dead = self.dead.subscribe();
        let _ = dead.wait_for(|dead| *dead).await;
    }

    /// Run a lapin operation, failing it as soon as the link is known dead: lapin may never
    /// answer a request issued on a connection that just failed.
    pub(crate) async fn guard<T>(
        &self,
        operation: impl Future<Output = lapin::Result<T>>,
    ) -> lapin::Result<T> {
        tokio::pin!(operation);
        tokio::select! {
            result = &mut operation => result,
            () = self.died() => {
                // Give lapin a moment to report the real cause (e.g. the broker's close reason).
                let lost = lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Error);
                tokio::time::timeout(DEATH_GRACE, operation).await.unwrap_or(Err(lost.into()))
            }
        }
    }

    /// Close the connection gracefully (bounded by `limit`), then mark the link dead.
    pub(crate) async fn close(&self, limit: Duration) {
        if self.connection.status().connected() {
            let closing = async {
                // Channels dropped just before (a consumer that ended) close in lapin's
                // background; a connection.close racing their close fails it, which lapin
                // logs as a connection error at every stop. A channel opened and closed now
                // goes through lapin's queue of commands after theirs, and its two round
                // trips leave their closes the time to finish.
                if let Ok(probe) = self.connection.create_channel().await {
                    let _ = probe.close(200, "OK".into()).await;
                }
                self.connection.close(200, "closed by the application".into()).await
            };
            let _ = tokio::time::timeout(limit, closing).await;
        }
        self.mark_dead();
    }
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link").field("generation", &self.generation).finish()
    }
}

/// What the transport is connected to.
#[derive(Clone, Debug)]
pub(crate) enum LinkState {
    /// Reconnecting.
    Down,
    /// Connected, topology replayed.
    Up(Arc<Link>),
    /// Closed by the application: nothing reconnects.
    Closed,
}

/// State shared by the transport, its supervisor and its consumers.
pub(crate) struct Shared {
    /// The options the transport was created with.
    pub(crate) options: RabbitMqOptions,
    /// The broker nodes, in this transport's order.
    pub(crate) nodes: Nodes,
    tls: OwnedTLSConfig,
    state: watch::Sender<LinkState>,
    kick: Notify,
    /// Declarations to replay after a reconnect.
    topology: Mutex<Topology>,
    /// The exclusive queues the previous connection still held at the last replay.
    pub(crate) reclaims: Reclaims,
    /// The consumers' deliveries in flight, and those the broker took back at a channel's loss.
    pub(crate) returns: Arc<Returns>,
    /// When the current link came up.
    linked_at: Mutex<Option<SystemTime>>,
    /// Reconnections so far. Counted apart from the link's generation, which reads 0 while
    /// the link is down: a connection that keeps dying is down most of the time.
    reconnects: AtomicU64,
    /// Why the last pass of reconnection attempts failed, while the link is down.
    refused: Mutex<Option<String>>,
    /// The link each consumer is subscribed on.
    pub(crate) consumer_links: Arc<ConsumerLinks>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("nodes", &self.nodes.masked())
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The state, not connected yet.
    pub(crate) fn new(options: RabbitMqOptions, nodes: Nodes, tls: OwnedTLSConfig) -> Self {
        let (state, _) = watch::channel(LinkState::Down);
        let (kick, topology, reconnects) = (Notify::new(), Mutex::default(), AtomicU64::new(0));
        let linked_at = Mutex::new(None);
        let (reclaims, refused) = (Reclaims::default(), Mutex::new(None));
        Shared {
            options,
            nodes,
            tls,
            state,
            kick,
            topology,
            reclaims,
            returns: Arc::default(),
            linked_at,
            reconnects,
            refused,
            consumer_links: Arc::default(),
        }
    }

    /// Record why reconnecting failed (`None`: it succeeded), for the errors of the
    /// operations that time out waiting for it.
    fn set_refused(&self, why: Option<&TransportError>) {
        *self.refused.lock().unwrap_or_else(PoisonError::into_inner) = why.map(ToString::to_string);
    }

    /// Announce the first link.
    pub(crate) fn with_link(self, link: Arc<Link>) -> Self {
        self.state.send_replace(LinkState::Up(link));
        self.linked_now();
        self
    }

    fn linked_now(&self) {
        *self.linked_at.lock().unwrap_or_else(PoisonError::into_inner) = Some(SystemTime::now());
    }

    /// Since when the current link is up; `None` while it is down.
    pub(crate) fn connected_since(&self) -> Option<SystemTime> {
        let since = *self.linked_at.lock().unwrap_or_else(PoisonError::into_inner);
        self.current().and(since)
    }

    /// The generation of the last link announced.
    #[cfg(test)]
    pub(crate) fn generation(&self) -> u64 {
        match &*self.state.borrow() {
            LinkState::Up(link) => link.generation,
            LinkState::Down | LinkState::Closed => 0,
        }
    }

    /// `host:port` of the node the link is up to; `None` while it is down.
    pub(crate) fn node(&self) -> Option<String> {
        self.current().map(|_| self.nodes.current().node.clone())
    }

    /// `host:port` of the node the link was last up to, also while it is down: the transport
    /// exists once its first link is up, and only a link that opens changes the node in use.
    pub(crate) fn last_node(&self) -> String {
        self.nodes.current().node.clone()
    }

    /// How many times the link was reopened after it dropped.
    pub(crate) fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// The recorded topology (a poisoned lock is still usable: the data stays consistent).
    pub(crate) fn topology(&self) -> MutexGuard<'_, Topology> {
        self.topology.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current link if it is up.
    pub(crate) fn current(&self) -> Option<Arc<Link>> {
        match &*self.state.borrow() {
            LinkState::Up(link) if link.alive() => Some(link.clone()),
            _ => None,
        }
    }

    /// True once [`Shared::close`] was called.
    pub(crate) fn is_closed(&self) -> bool {
        matches!(*self.state.borrow(), LinkState::Closed)
    }

    /// Wait for a link of at least `min_generation`, until `deadline`.
    pub(crate) async fn link(
        &self,
        min_generation: u64,
        deadline: Instant,
    ) -> Result<Arc<Link>, TransportError> {
        let mut rx = self.state.subscribe();
        let ready = rx.wait_for(|state| match state {
            LinkState::Up(link) => link.generation >= min_generation,
            LinkState::Closed => true,
            LinkState::Down => false,
        });
        let outcome = match tokio::time::timeout_at(deadline, ready).await {
            Err(_) => {
                let refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
                let why = match refused.as_deref() {
                    Some(why) => format!("; the last attempt failed: {why}"),
                    None => String::new(),
                };
                Err(TransportError::Unreachable(format!(
                    "no connection to {} (timed out waiting for reconnection{why})",
                    self.nodes.masked()
                )))
            }
            Ok(Ok(state)) => match &*state {
                LinkState::Up(link) => Ok(link.clone()),
                _ => Err(closed()),
            },
            Ok(Err(_)) => Err(closed()),
        };
        outcome
    }

    /// Tell the supervisor that an operation saw the connection fail.
    pub(crate) fn kick(&self) {
        self.kick.notify_one();
    }

    /// Resolves once the transport is closed.
    pub(crate) async fn closed(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|state| matches!(state, LinkState::Closed)).await;
    }

    /// Stop reconnecting and return the last link, to close it.
    pub(crate) fn close(&self) -> Option<Arc<Link>> {
        match self.state.send_replace(LinkState::Closed) {
            LinkState::Up(link) => Some(link),
            _ => None,
        }
    }

    /// Open the first connection, trying each node once in order (no topology to replay).
    ///
    /// # Errors
    /// When no node accepts: the first permanent error (e.g. refused credentials), else
    /// every node's error.
    pub(crate) async fn open_first(&self) -> Result<Arc<Link>, TransportError> {
        let mut errors = Vec::new();
        for (index, node) in self.nodes.pass(false) {
            match open(&self.options, node, &self.tls).await {
                Ok(connection) => {
                    self.nodes.use_node(index);
                    tracing::info!(uri = %node.masked, "connected to broker node {}", node.masked);
                    return Ok(Arc::new(Link::new(connection, 1)));
                }
                Err(error) => {
                    tracing::warn!(uri = %node.masked, %error, "cannot connect to broker node");
                    errors.push(error);
                }
            }
        }
        Err(first_permanent_or_all(errors))
    }

    /// Open a connection to the node at `index` and replay the recorded topology on it.
    /// Returns the link and the exclusive queues the previous connection still holds.
    async fn reconnect(
        &self,
        index: usize,
        node: &BrokerUri,
        generation: u64,
    ) -> Result<(Arc<Link>, Vec<String>), TransportError> {
        let connection = open(&self.options, node, &self.tls).await?;
        let link = Arc::new(Link::new(connection, generation));
        let locked = replay(self, &link).await?;
        self.nodes.use_node(index);
        Ok((link, locked))
    }

    /// One pass over the nodes, starting after the current one: the first link that comes
    /// up with its topology replayed, else the last error. `None` once closed.
    async fn reconnect_pass(
        &self,
        generation: u64,
        pass: u32,
    ) -> Option<Result<(Arc<Link>, Vec<String>), TransportError>> {
        let mut last = None;
        for (index, node) in self.nodes.pass(true) {
            tracing::warn!(uri = %node.masked, pass, "reconnecting to the broker");
            // A close during the attempt wins: no topology is replayed after `close()`.
            let attempt = tokio::select! {
                result = self.reconnect(index, node, generation) => result,
                _ = self.closed() => return None,
            };
            match attempt {
                Ok(replayed) => return Some(Ok(replayed)),
                Err(error) => {
                    tracing::warn!(uri = %node.masked, pass, %error, "reconnect failed");
                    last = Some(error);
                }
            }
        }
        last.map(Err)
    }
}

/// The error of a first connection that no node accepted.
fn first_permanent_or_all(mut errors: Vec<TransportError>) -> TransportError {
    if let Some(index) = errors.iter().position(TransportError::is_permanent) {
        return errors.swap_remove(index);
    }
    if errors.len() <= 1 {
        let none = || TransportError::Unreachable("no broker node to connect to".into());
        return errors.pop().unwrap_or_else(none);
    }
    let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
    TransportError::Unreachable(format!("no broker node accepted: {}", all.join("; ")))
}

/// The error of an operation on a transport the application closed.
fn closed() -> TransportError {
    TransportError::Closed { what: ClosedPart::Transport, reason: "transport closed".into() }
}

/// Connect to the broker, with the password kept out of every error message. The error says
/// what went wrong (see [`map_connect_error`]).
async fn open(
    options: &RabbitMqOptions,
    uri: &BrokerUri,
    tls: &OwnedTLSConfig,
) -> Result<Connection, TransportError> {
    super::compat_runtime::build();
    let mut properties = ConnectionProperties::default();
    if let Some(name) = &options.connection_name {
        properties = properties.with_connection_name(name.as_str().into());
    }
    let password = &uri.amqp.authority.userinfo.password;
    let describe =
        |why: String| format!("cannot connect to {}: {}", uri.masked, scrub(&why, password));
    let runtime = lapin::runtime::default_runtime().map_err(|e| map_connect_error(&e, describe))?;
    let connect =
        Connection::connect_uri_with_config(uri.amqp.clone(), properties, tls.clone(), runtime);
    // The URI's `connection_timeout` (milliseconds, as RabbitMQ's URI spec has it) is this
    // node's; lapin's asynchronous connect does not read it.
    let limit =
        uri.amqp.query.connection_timeout.map_or(options.connect_timeout, Duration::from_millis);
    match tokio::time::timeout(limit, connect).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(map_connect_error(&error, describe)),
        Err(_) => Err(TransportError::Unreachable(describe(format!("timed out after {limit:?}")))),
    }
}

/// Watch the link; when it drops, reconnect with exponential backoff until closed.
pub(crate) async fn supervise(shared: Arc<Shared>, mut link: Arc<Link>) {
    let mut young_losses = YoungLosses::default();
    loop {
        let linked_at = Instant::now();
        let mut events = link.connection.events_listener();
        let mut last_error = None;
        while link.alive() && !shared.is_closed() {
            tokio::select! {
                event = events.next() => match event {
                    None => tokio::time::sleep(WATCH_INTERVAL).await,
                    Some(lapin::Event::Error(error)) => last_error = Some(error),
                    Some(lapin::Event::ConnectionBlocked(reason)) => {
                        let uri = &shared.nodes.current().masked;
                        tracing::warn!(%uri, %reason, "the broker blocks publishing on this connection ({reason}): publishes wait until it unblocks or time out");
                    }
                    Some(lapin::Event::ConnectionUnblocked) => {
                        tracing::info!(uri = %shared.nodes.current().masked, "the broker unblocked publishing on this connection");
                    }
                    Some(_) => {}
                },
                _ = shared.kick.notified() => {}
                _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                _ = shared.closed() => {}
            }
        }
        link.mark_dead();
        if shared.is_closed() {
            return;
        }
        shared.state.send_if_modified(|state| {
            let up = matches!(state, LinkState::Up(_));
            if up {
                *state = LinkState::Down;
            }
            up
        });
        while let Some(Some(event)) = events.next().now_or_never() {
            if let lapin::Event::Error(error) = event {
                last_error = Some(error);
            }
        }
        log_loss(&shared.nodes.current().masked, last_error.as_ref());
        let pause = young_losses.pause_after(linked_at.elapsed(), &shared.options);
        if !pause.is_zero() {
            tracing::warn!(?pause, "the connections to the broker keep dropping soon after they are made: waiting before the next");
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shared.closed() => return,
            }
        }
        // The backoff grows per pass over every node: a dead node costs one attempt.
        let mut delay = shared.options.reconnect_min;
        let mut pass = 1u32;
        let locked;
        (link, locked) = loop {
            match shared.reconnect_pass(link.generation + 1, pass).await {
                None => return,
                Some(Ok(replayed)) => break replayed,
                Some(Err(error)) => {
                    tracing::warn!(uris = %shared.nodes.masked(), pass, %error, ?delay, "no broker node accepted; waiting");
                    shared.set_refused(Some(&error));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shared.closed() => return,
            }
            delay = (delay * 2).min(shared.options.reconnect_max);
            pass += 1;
        };
        shared.reclaims.begin(&locked, link.generation);
        let announced = shared.state.send_if_modified(|state| {
            let down = matches!(state, LinkState::Down);
            if down {
                // counted before the link is seen: a reader that sees it connected sees the
                // reconnection (a timer's leadership, taken on the lost link, ends with it)
                shared.reconnects.fetch_add(1, Ordering::Relaxed);
                *state = LinkState::Up(link.clone());
            }
            down
        });
        if !announced {
            link.close(shared.options.connect_timeout).await;
            return;
        }
        shared.linked_now();
        shared.set_refused(None);
        if !locked.is_empty() {
            tokio::spawn(reclaim(shared.clone(), link.clone(), locked));
        }
        let node = &shared.nodes.current().masked;
        tracing::info!(uri = %node, generation = link.generation, "connected to broker node {node}");
    }
}
