//! A call of a route: the target run (here, or in a worker process), retried in the worker
//! or handed to the entrypoint to retry on the broker as the route's backoff says, then its
//! callback when no retry remains.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tracing::Instrument;

use super::RouteHandle;
use crate::clock;
use crate::config::RetryDelay;
use crate::data::{CallContext, Failure, FailureKind, Handled, Message, Outcome, TargetRole};
use crate::handler::dependencies::{after_all, provide_all, DependencyValues};
use crate::handler::targets::{ErasedTarget, TargetError, TargetResult};
use crate::handler::translators::translate;
use crate::handler::WorkerContext;
use crate::metrics::RouteSeries;
use crate::pipeline::entrypoint_kind::Kind;
use crate::pipeline::interrupted::{Ended, Interrupted, Unstarted};
use crate::pipeline::retry::{BackOffData, BackOffPolicy, RetryMode};
#[cfg(feature = "process")]
use crate::pipeline::spawners::process::{BorrowedCall, ProcessPool, Reserved};
use crate::pipeline::spawners::WorkerPermit;

/// How a worker process encodes the value of the call it runs for the link to its service,
/// before the call's dependencies are told (see [`RouteHandle::run_here`]); an error says why
/// the link cannot carry it.
pub(crate) type EncodeValue<'a> = dyn FnMut(&Value) -> std::io::Result<()> + Send + 'a;

/// One run of one of a route's functions: which one, on what message, after what failure (a
/// callback's), at which retry.
pub(crate) struct Attempt<'a> {
    pub role: TargetRole,
    pub message: &'a Arc<Message>,
    pub failure: Option<Failure>,
    pub retry: &'a BackOffData,
}

impl<'a> Attempt<'a> {
    /// The target's run on `message` at `retry`.
    fn of_target(message: &'a Arc<Message>, retry: &'a BackOffData) -> Self {
        Attempt { role: TargetRole::Target, message, failure: None, retry }
    }
}

impl RouteHandle {
    /// Handle a message in the slot `permit`: run the target; on a failure (not bad input)
    /// retry it as the route's backoff says (in the worker, or by asking the entrypoint to
    /// schedule it on the broker), and when no retry remains run the callback.
    ///
    /// A call waiting between in-worker retries (`BackOff`) when the service stops makes no
    /// further attempt (in `greedy_*` modes: once the stop has waited `SHUTDOWN_TIMEOUT`): it
    /// ends [`Handled::Failed`] with its last failure, whose last cause is `not retried: the
    /// service is stopping`; the callback does not run.
    ///
    /// In a process mode, a call still running when the stop ends its worker processes (past
    /// `SHUTDOWN_TIMEOUT`) ends [`Handled::Failed`], kind `crashed`, so that an entrypoint
    /// answering a client (HTTP, WebSocket) answers it rather than waiting for ever.
    pub async fn handle(&self, permit: WorkerPermit, message: Message) -> Handled {
        let message = Arc::new(message);
        tokio::select! {
            biased;
            ended = self.handle_counted(permit, &message) => ended.or_failed(),
            () = self.calls_abandoned() => Handled::Failed(Failure::new(
                FailureKind::Crashed,
                "the service stopped before the call ended: past SHUTDOWN_TIMEOUT its worker \
                 processes are ended, and no worker runs a call any more",
            )),
        }
    }

    /// [`RouteHandle::handle`], and how many retries were made before the last attempt: those
    /// its headers count, plus those made in the worker (`BackOff`), which its dead letter
    /// counts in its attempts; or, when the service's stop cut the call short between
    /// in-worker retries, [`Ended::Interrupted`], for an entrypoint with a queue to give the
    /// message back. The message is shared with the entrypoint (RPC replies to it).
    pub(crate) async fn handle_counted(
        &self,
        permit: WorkerPermit,
        message: &Arc<Message>,
    ) -> Ended {
        self.inner.stats.received();
        let (metrics, labels) =
            (&self.inner.metrics, (self.inner.pool.context(), self.metric_label()));
        let series = self.inner.series.get_or_init(|| metrics.route_series(labels.0, labels.1));
        metrics.received(series);
        metrics.call_started(series);
        self.inner.pool.report_available(|free| metrics.available(series, free));
        let started = tokio::time::Instant::now();
        let mut running = RunningCall { route: self, series, permit: Some(permit), ended: None };
        let ended = self.handle_in_slot(message).await;
        let failed = !matches!(ended, Ended::Handled(Handled::Succeeded(_), _));
        // a call that never started has no outcome or duration: dropped
        if !matches!(ended, Ended::Unstarted(_)) {
            running.ended = Some((started.elapsed(), failed));
        }
        drop(running);
        match &ended {
            Ended::Handled(handled, _) => self.inner.calls.finished(message, handled),
            Ended::Interrupted(interrupted) => {
                self.inner.calls.finished(message, &interrupted.failed())
            }
            Ended::Unstarted(_) => {}
        }
        ended
    }

    async fn handle_in_slot(&self, message: &Arc<Message>) -> Ended {
        let max_size = self.inner.config.max_message_size;
        if message.body.len() > max_size {
            let reason = format!(
                "message of {} bytes exceeds MAX_MESSAGE_SIZE ({max_size} bytes)",
                message.body.len()
            );
            return Ended::Handled(Handled::Failed(Failure::bad_input(reason)), 0);
        }
        let max_retries = self.inner.backoff.as_ref().map_or(0, |policy| policy.max_retries);
        let mut retry = BackOffData::from_headers(&message.properties.headers, max_retries);
        let mut outcome = match self.first_attempt(message, &retry).await {
            Ok(outcome) => outcome,
            Err(unstarted) => return Ended::Unstarted(unstarted),
        };
        while let (Err(failure), Some(policy)) = (&outcome, &self.inner.backoff) {
            if !failure.retryable || !retry.can_retry() {
                break;
            }
            let next = retry.retry_count + 1;
            let in_steps = (policy.mode, self.inner.config.retry_delay)
                == (RetryMode::Broker, RetryDelay::DelayQueues);
            let delay = match policy.try_delay(next, in_steps) {
                Ok(delay) => delay,
                Err(reason) => {
                    outcome = Err(not_retried(failure.clone(), reason));
                    break;
                }
            };
            if policy.mode == RetryMode::Broker {
                if !self.retries_on_broker() {
                    break;
                }
                let retry_on_broker = Handled::Retry { failure: failure.clone(), delay };
                return Ended::Handled(retry_on_broker, retry.retry_count);
            }
            tracing::info!(route = self.name(), "retry {} in {delay:?}", retry.retry_count + 1);
            self.inner.metrics.retried(self.inner.pool.context(), self.metric_label());
            // `last_retry` is when the retry was scheduled, as a broker retry stamps it
            let scheduled = clock::wall_now();
            if !self.wait_to_retry(delay).await {
                tracing::info!(
                    route = self.name(),
                    "retry {} not made: the service is stopping",
                    retry.retry_count + 1
                );
                return Ended::Interrupted(Interrupted::new(failure.clone(), &retry));
            }
            retry = retry.next(failure.full_message(), scheduled);
            outcome = self.run(Attempt::of_target(message, &retry)).await;
        }
        let handled = match outcome {
            Ok(value) => Handled::Succeeded(value),
            Err(failure) => self.no_retry_remains(message, failure, &retry).await,
        };
        Ended::Handled(handled, retry.retry_count)
    }

    /// Wait `delay` before an in-worker retry: `false` when the service's stop cuts the wait
    /// short. A next attempt would run while the stop waits for nothing useful, or, past
    /// `SHUTDOWN_TIMEOUT`, after the stop returned, while the message goes back to its queue
    /// to run again elsewhere. Modes that hand back what has not started cut it as the stop
    /// begins; greedy modes, which finish what they received, once the stop gives up.
    async fn wait_to_retry(&self, delay: std::time::Duration) -> bool {
        let route = &self.inner;
        let stop = match route.pool.mode().is_greedy() {
            true => &route.given_up,
            false => &route.stopping,
        };
        tokio::select! {
            biased;
            () = stop.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }

    /// Handle, in the slot `permit`, a `message` whose last attempt failed with `failure` and
    /// that will not be retried after all (its retry copy could not be made): its callback
    /// runs as after the last retry.
    pub(crate) async fn no_retry_made(
        &self,
        permit: WorkerPermit,
        message: Message,
        failure: Failure,
    ) -> Handled {
        let max_retries = self.inner.backoff.as_ref().map_or(0, |policy| policy.max_retries);
        let retry = BackOffData::from_headers(&message.properties.headers, max_retries);
        let handled = self.no_retry_remains(&Arc::new(message), failure, &retry).await;
        drop(permit);
        handled
    }

    /// The end of a message whose handling failed with `failure` and that no retry remains
    /// for: the callback of a `CallbackRoute` runs (never for bad input); else it failed.
    /// Not once the stop gave up on the calls: it tore their dependencies down, so the failure
    /// may be its doing, and the callback would be told the stop's error for a message that
    /// goes back to run again.
    async fn no_retry_remains(
        &self,
        message: &Arc<Message>,
        failure: Failure,
        retry: &BackOffData,
    ) -> Handled {
        let no_callback = self.inner.callback.is_none() || self.given_up();
        if failure.kind == FailureKind::BadInput || no_callback {
            return Handled::Failed(failure);
        }
        let callback =
            Attempt { role: TargetRole::Callback, message, failure: Some(failure.clone()), retry };
        match self.run(callback).await {
            Ok(_) => Handled::CalledBack(failure),
            Err(callback_failure) => Handled::Failed(callback_failure.of_callback_after(&failure)),
        }
    }

    /// Run one function of the route on `message` once, as the attempt its headers say it
    /// is: the retry state it sees (`BackOffData`: the retry count, the route's limit) is
    /// the one a service would give it.
    pub(crate) async fn execute(
        &self,
        role: TargetRole,
        message: Message,
        failure: Option<Failure>,
    ) -> Outcome {
        let max_retries = self.inner.backoff.as_ref().map_or(0, |policy| policy.max_retries);
        let retry = BackOffData::from_headers(&message.properties.headers, max_retries);
        self.run(Attempt { role, message: &Arc::new(message), failure, retry: &retry }).await
    }

    /// The target's first attempt on `message`. In a process mode it starts once a worker
    /// process is free for it (one may be being replaced): [`Unstarted`] when the stop gives
    /// up first, for the entrypoint to hand the message back as one that waited for a slot
    /// (left waiting, it went back with the connection, counted as a crash that never ran).
    async fn first_attempt(
        &self,
        message: &Arc<Message>,
        retry: &BackOffData,
    ) -> Result<Outcome, Unstarted> {
        #[cfg(feature = "process")]
        if let Some(processes) = self.inner.pool.processes() {
            let unstarted = self.unstarted();
            let reserved = tokio::select! {
                biased;
                reserved = processes.reserve() => reserved,
                () = self.inner.given_up.cancelled() => None,
            };
            let Some(reserved) = reserved.filter(|_| !self.given_up()) else {
                return Err(unstarted);
            };
            drop(unstarted);
            let attempt = Attempt::of_target(message, retry);
            return Ok(self.in_process(processes, attempt, Some(reserved)).await);
        }
        Ok(self.run(Attempt::of_target(message, retry)).await)
    }

    async fn run(&self, attempt: Attempt<'_>) -> Outcome {
        #[cfg(feature = "process")]
        if let Some(processes) = self.inner.pool.processes() {
            return self.in_process(processes, attempt, None).await;
        }
        let limit = self.inner.pool.time_limit();
        self.run_here(attempt, None, limit, None).await
    }

    /// Make `attempt` in a worker process of `processes` (the `reserved` one, if given).
    #[cfg(feature = "process")]
    async fn in_process(
        &self,
        processes: &Arc<ProcessPool>,
        attempt: Attempt<'_>,
        reserved: Option<Reserved<'_>>,
    ) -> Outcome {
        let Attempt { role, message, failure, retry } = attempt;
        // The service logs the call under the id its worker gives it, so that what only the
        // service sees (a worker killed past the time limit, or dying) is logged with the
        // call's route and id too.
        let route = &self.inner;
        let call_id = CallContext::new_id(&route.service, &route.name);
        let headers = &message.properties.headers;
        let context = CallContext::gathered(headers, route.config.parent_calls_tracked, call_id);
        let call = BorrowedCall {
            route: self.name(),
            call_id: &context.call_id,
            role,
            message,
            failure: failure.as_ref(),
            retry,
        };
        let span = self.call_span(&context, retry);
        let outcome = processes.call(call, reserved).instrument(span).await;
        outcome.map_err(|failure| self.filtered(failure))
    }

    /// The span a call runs in.
    fn call_span(&self, call: &CallContext, retry: &BackOffData) -> tracing::Span {
        tracing::info_span!(
            "call",
            service = %self.inner.service,
            route = %self.inner.name,
            call_id = %call.call_id,
            parent_call_id = call.parent_call_id().unwrap_or_default(),
            retry = retry.retry_count,
        )
    }

    /// `value`, unless it is an RPC target's result whose reply would not fit in
    /// `MAX_MESSAGE_SIZE`: such a call fails (as unserializable, which the caller is replied)
    /// before its dependencies are told, so that a session is not committed for a call its
    /// caller is told failed.
    fn reply_fits(&self, role: TargetRole, value: Value) -> TargetResult {
        let rpc = self.entrypoint().map(|entrypoint| &entrypoint.kind);
        if let (TargetRole::Target, Some(Kind::Rpc { protocol, reply_fits })) = (role, rpc) {
            reply_fits(&value, *protocol, &self.inner.config)
                .map_err(TargetError::Unserializable)?;
        }
        Ok(value)
    }

    /// `value`, once `encode` has encoded it for a worker's link to its service; a value the
    /// link cannot carry (its frames hold 256 MiB) fails the call, kind `error`. That failure
    /// has no error of the call's for the route's retry filter to match, as a crash: it is
    /// retryable only where the route's backoff accepts such failures.
    fn encoded(&self, value: Value, encode: &mut EncodeValue<'_>) -> Outcome {
        match encode(&value) {
            Ok(()) => Ok(value),
            Err(error) => {
                let message = format!("the call's outcome cannot be sent to the service: {error}");
                Err(self.unmatched(Failure::new(FailureKind::Error, message)))
            }
        }
    }

    /// The function of the route that `role` names, if it has one.
    fn function(&self, role: TargetRole) -> Option<&ErasedTarget> {
        match role {
            TargetRole::Target => Some(&self.inner.target),
            TargetRole::Callback => self.inner.callback.as_ref(),
        }
    }

    /// A failure of the call's worker itself (its process died, or the call ran past its
    /// time limit), retryable as it is: like a panic, it has no error for the route's retry
    /// filter to match, and with a filter it fails at once. (The call's own failures were
    /// filtered where it ran.)
    fn filtered(&self, failure: Failure) -> Failure {
        match failure.kind {
            FailureKind::Crashed | FailureKind::TimedOut => self.unmatched(failure),
            _ => failure,
        }
    }

    /// `failure`, which has no error for the route's retry filter to match: retryable only
    /// where the route's backoff accepts such failures.
    fn unmatched(&self, failure: Failure) -> Failure {
        let accepts = self.inner.backoff.as_ref().is_none_or(|policy| policy.accepts(None));
        Failure { retryable: failure.retryable && accepts, ..failure }
    }

    /// Make `attempt` in this process, as the call `call_id` (a new one if `None`); with a
    /// `limit`, cancelled past it (see [`TimeLimit`]).
    ///
    /// In a worker process, `encode` encodes the function's value for the link to the service
    /// before the dependencies are told the outcome: a value the link cannot carry fails the
    /// call they are told of (a session is not committed for a call that then fails), and
    /// the value is encoded once, where it was checked.
    pub(crate) async fn run_here(
        &self,
        attempt: Attempt<'_>,
        call_id: Option<String>,
        limit: Option<Duration>,
        encode: Option<&mut EncodeValue<'_>>,
    ) -> Outcome {
        let route = &self.inner;
        let call_id = call_id.unwrap_or_else(|| CallContext::new_id(&route.service, &route.name));
        let headers = &attempt.message.properties.headers;
        let call = CallContext::gathered(headers, route.config.parent_calls_tracked, call_id);
        call.warn_of_keys_not_forwarded();
        let span = self.call_span(&call, attempt.retry);
        let limit = limit.map(TimeLimit::starting_now);
        self.run_pipeline(attempt, call, limit, encode).instrument(span).await
    }

    async fn run_pipeline(
        &self,
        attempt: Attempt<'_>,
        call: CallContext,
        limit: Option<TimeLimit>,
        encode: Option<&mut EncodeValue<'_>>,
    ) -> Outcome {
        let Attempt { role, message, failure, retry } = attempt;
        let (message, retry) = (message.clone(), retry.clone());
        let route = &self.inner;
        let Some(target) = self.function(role) else {
            return Err(Failure::new(FailureKind::Error, "route has no callback"));
        };
        let payload = std::sync::OnceLock::new();
        if !route.translators.is_empty() {
            let translated = translate(&route.translators, &message).map_err(Failure::bad_input)?;
            let _ = payload.set(Ok(translated));
        }
        let mut ctx = WorkerContext {
            service: route.service.clone(),
            route: route.name.clone(),
            role,
            message,
            payload,
            call,
            config: route.config.clone(),
            failure,
            transport: route.transport.clone(),
            dependencies: Arc::default(),
            state: route.state.clone(),
            retry,
            lone_call: route.pool.lone_call(),
        };
        let retryable = |error: Option<&(dyn std::error::Error + 'static)>| {
            route.backoff.as_ref().is_none_or(|policy| policy.accepts(error))
        };
        let mut values = DependencyValues::default();
        let provided = provide_all(&route.dependencies, &ctx, role, retryable, &mut values);
        match within(limit, provided).await {
            Some(Ok(())) => {}
            // a `get` that failed told the others itself; one cut short by the limit did not
            Some(Err(failure)) => return Err(failure),
            None => return self.tell(&values, Err(self.past(limit)), limit).await,
        }
        let values = Arc::new(values);
        ctx.dependencies = values.clone();
        // In a thread mode only an async function can be stopped mid-call: dropped at an
        // `.await`, as `tokio::time::timeout` drops it. A sync one holds its thread to the
        // end (its dependencies' `get` and `after_call`, async, are held to the limit).
        let function_limit = limit.filter(|_| target.asynchronous);
        let outcome = match within(function_limit, (target.invoke)(ctx)).await {
            Some(result) => into_outcome(
                result.and_then(|value| self.reply_fits(role, value)),
                route.backoff.as_ref(),
            ),
            None => Err(self.past(limit)),
        };
        let outcome = match (outcome, encode) {
            (Ok(value), Some(encode)) => self.encoded(value, encode),
            (outcome, _) => outcome,
        };
        let outcome = self.tell(&values, outcome, limit).await;
        match &outcome {
            Ok(_) => tracing::debug!("call succeeded"),
            Err(failure) => {
                tracing::warn!(kind = %failure.kind, "call failed: {}", failure.full_message())
            }
        }
        outcome
    }
}

impl RouteHandle {
    /// The failure of a call cut short by its time limit (`limit` is set when one cut it).
    fn past(&self, limit: Option<TimeLimit>) -> Failure {
        let limit = limit.map(|limit| limit.length).unwrap_or_default();
        let message = format!("call ran past its time limit of {limit:?}: cancelled");
        tracing::error!(route = self.name(), "{message}");
        self.filtered(Failure::new(FailureKind::TimedOut, message))
    }

    /// Tell the route's dependencies that gave `values` the call's `outcome`, and return it.
    /// With a time limit the telling has a limit of the same length of its own, from now: a
    /// call cut short still rolls its session back, and an `after_call` that hangs still
    /// frees its worker. Past it the telling is cancelled: a call that succeeded then fails
    /// `timed_out`, as whether its `after_call` (a commit, say) took effect is not known.
    async fn tell(
        &self,
        values: &DependencyValues,
        outcome: Outcome,
        limit: Option<TimeLimit>,
    ) -> Outcome {
        let limit = limit.map(|limit| TimeLimit::starting_now(limit.length));
        let told = within(limit, after_all(&self.inner.dependencies, values, &outcome)).await;
        match (told, outcome) {
            (Some(()), outcome) => outcome,
            (None, Ok(_)) => Err(self.past(limit)),
            (None, Err(failure)) => {
                tracing::error!(route = self.name(), "after_call ran past the time limit");
                Err(failure)
            }
        }
    }
}

/// The time limit of one call in a thread mode (`TASK_TIME_LIMIT`): its dependencies' `get`
/// and, for an async function, the function itself must end by `deadline`.
#[derive(Clone, Copy)]
struct TimeLimit {
    length: Duration,
    deadline: tokio::time::Instant,
}

impl TimeLimit {
    fn starting_now(length: Duration) -> Self {
        TimeLimit { length, deadline: clock::deadline_after(length) }
    }
}

/// `future`'s output, or `None` when `limit` passed first (the future is then dropped).
async fn within<F: std::future::Future>(limit: Option<TimeLimit>, future: F) -> Option<F::Output> {
    match limit {
        Some(limit) => tokio::time::timeout_at(limit.deadline, future).await.ok(),
        None => Some(future.await),
    }
}

/// A call counted as running, with its worker slot. Its end is recorded when it is dropped,
/// also when the call's future is dropped before its end (its caller gave up on it: a test's
/// hook call under a timeout, a custom entrypoint's task aborted): the call would count as
/// running for ever, and the slot it freed as busy.
struct RunningCall<'a> {
    route: &'a RouteHandle,
    series: &'a RouteSeries,
    permit: Option<WorkerPermit>,
    /// How long it took and whether it failed, once it has ended.
    ended: Option<(std::time::Duration, bool)>,
}

impl Drop for RunningCall<'_> {
    fn drop(&mut self) {
        // the slot first: the free slots recorded below count it
        drop(self.permit.take());
        let (route, series) = (&self.route.inner, self.series);
        match self.ended {
            Some((elapsed, failed)) => {
                let labels = (route.pool.context(), self.route.metric_label());
                route.metrics.call_finished(series, labels, elapsed, failed);
            }
            None => route.metrics.call_dropped(series),
        }
        route.pool.report_available(|free| route.metrics.available(series, free));
    }
}

fn into_outcome(result: TargetResult, backoff: Option<&BackOffPolicy>) -> Outcome {
    // whether the policy retries a failure with this error; a filter that panicked cannot
    // say: not retried, and the failure says why
    let judged = |failure: Failure, error: Option<&(dyn std::error::Error + 'static)>| match backoff
        .map_or(Ok(true), |policy| policy.try_accepts(error))
    {
        Ok(retryable) => Failure { retryable, ..failure },
        Err(reason) => not_retried(failure, reason),
    };
    result.map_err(|error| match error {
        TargetError::Extract(crate::handler::extract::ExtractError::BadInput(reason)) => {
            Failure::bad_input(reason)
        }
        // with a retry filter, failures without an error to match fail at once, as panics do
        TargetError::Extract(crate::handler::extract::ExtractError::Unavailable(reason)) => {
            judged(Failure::new(FailureKind::Error, reason), None)
        }
        // a Failure the target returned says itself what kind it is, and whether it may be
        // retried at all
        TargetError::Error { error, type_name } => {
            let failure = Failure::from_returned(&error, type_name);
            match failure.retryable {
                true => judged(failure, Some(&*error)),
                false => failure,
            }
        }
        TargetError::Panic(message) => {
            judged(Failure::new(FailureKind::Panic, format!("target panicked: {message}")), None)
        }
        TargetError::Unserializable(reason) => {
            let reason = format!("return value cannot be serialized: {reason}");
            judged(Failure::new(FailureKind::Unserializable, reason), None)
        }
    })
}

/// `failure`, which no retry follows for `reason`.
fn not_retried(failure: Failure, reason: String) -> Failure {
    let mut causes = failure.causes;
    causes.push(format!("not retried: {reason}"));
    Failure { retryable: false, causes, ..failure }
}
