//! [`FakeRpc`]: an [`RpcProxy`] that records its calls and answers them from stubs.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::amqp::dependencies::RpcProxy;
use crate::amqp::rpc::{RpcBackend, RpcError, RpcReply, RpcRequest};
use crate::config::{Config, Protocol};
use crate::data::{BoxError, Headers};
use crate::handler::dependencies::Dependency;
use crate::handler::WorkerContext;
use crate::testing::fakes::refuse_in_worker_process;

/// A call a [`FakeRpc`] recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedCall {
    /// The service called.
    pub service: String,
    /// The method called.
    pub method: String,
    /// The positional arguments, as JSON.
    pub args: Vec<Value>,
    /// The keyword arguments, as JSON.
    pub kwargs: Map<String, Value>,
    /// The wire protocol the call would have used.
    pub protocol: Protocol,
    /// The headers the real request would carry: the call's context headers.
    pub headers: Headers,
}

/// A stub's answer computed from the call's arguments.
type Answer = dyn Fn(&[Value], &Map<String, Value>) -> Result<Value, RpcError> + Send + Sync;

#[derive(Clone)]
enum Stub {
    Returns(Value),
    Fails(RpcError),
    Answers(Arc<Answer>),
}

#[derive(Default)]
struct State {
    stubs: BTreeMap<(String, String), Stub>,
    calls: Vec<RecordedCall>,
}

/// Replaces the [`RpcProxy`] of the routes it is added to: every call is recorded and
/// answered by the stub of its `service.method` ([`FakeRpc::returns`], [`FakeRpc::fails`],
/// [`FakeRpc::answers`]; the last stub set wins). A call without a stub fails at once as an
/// unreachable one does: `UnknownService` when nothing of the service is stubbed
/// (`MethodNotFound` under the micro-framework protocol), `MethodNotFound` when other methods
/// are, the message naming what is stubbed.
///
/// Arguments and sizes are checked as the real proxy checks them (bad arguments and oversized
/// requests fail and are not recorded). Answers come at once: timeouts are not simulated
/// (stub `fails(.., RpcError::Timeout { .. })` to test a timeout path). Clones share stubs
/// and records.
///
/// ```
/// use micro_framework::prelude::*;
/// use micro_framework::amqp::dependencies::RpcProxy;
/// use micro_framework::amqp::rpc::RpcError;
/// use micro_framework::testing::{call_route, test_config, FakeRpc};
/// use micro_framework::Message;
/// use serde_json::json;
///
/// async fn quote(Payload(item): Payload<String>, rpc: RpcProxy) -> Result<i64, RpcError> {
///     let price: i64 = rpc.call("prices", "get", (&item,), ()).await?;
///     Ok(price * 2)
/// }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let rpc = FakeRpc::new();
/// rpc.answers("prices", "get", |args, _kwargs| Ok(json!(if args[0] == "pen" { 3 } else { 10 })));
/// let route = Route::new(quote).dependency(rpc.clone());
/// let outcome = call_route(route, test_config("shop"), Message::json(&"pen").unwrap()).await;
/// assert_eq!(outcome.unwrap(), json!(6));
/// rpc.assert_called("prices", "get");
/// assert_eq!(rpc.calls()[0].args, vec![json!("pen")]);
/// # });
/// ```
#[derive(Clone, Default)]
pub struct FakeRpc {
    state: Arc<Mutex<State>>,
}

impl FakeRpc {
    /// A fake with no stubs and no calls.
    pub fn new() -> Self {
        FakeRpc::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stub(&self, service: &str, method: &str, stub: Stub) -> &Self {
        self.state().stubs.insert((service.to_owned(), method.to_owned()), stub);
        self
    }

    /// Answer `service.method` with `value`. A value that cannot be serialized makes the
    /// call fail with `InvalidReply`, saying so.
    pub fn returns(&self, service: &str, method: &str, value: impl Serialize) -> &Self {
        let stub = match serde_json::to_value(value) {
            Ok(value) => Stub::Returns(value),
            Err(error) => Stub::Fails(RpcError::InvalidReply(format!(
                "the value stubbed for {service}.{method} cannot be serialized: {error}"
            ))),
        };
        self.stub(service, method, stub)
    }

    /// Make `service.method` fail with `error`.
    pub fn fails(&self, service: &str, method: &str, error: RpcError) -> &Self {
        self.stub(service, method, Stub::Fails(error))
    }

    /// Answer `service.method` with what `answer` makes of the call's `args` and `kwargs`.
    pub fn answers<F>(&self, service: &str, method: &str, answer: F) -> &Self
    where
        F: Fn(&[Value], &Map<String, Value>) -> Result<Value, RpcError> + Send + Sync + 'static,
    {
        self.stub(service, method, Stub::Answers(Arc::new(answer)))
    }

    /// A proxy outside any call that calls here, in `config`'s protocol, without context
    /// headers.
    pub fn proxy(&self, config: &Config) -> RpcProxy {
        self.proxy_with(config, Headers::new())
    }

    fn proxy_with(&self, config: &Config, headers: Headers) -> RpcProxy {
        RpcProxy::new(Arc::new(FakeBackend {
            state: self.state.clone(),
            protocol: config.protocol,
            headers,
            max_message_size: config.max_message_size,
        }))
    }

    /// Every call made so far, in order.
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.state().calls.clone()
    }

    /// The calls of `service.method` made so far, in order.
    pub fn calls_to(&self, service: &str, method: &str) -> Vec<RecordedCall> {
        let state = self.state();
        let matching = |call: &&RecordedCall| call.service == service && call.method == method;
        state.calls.iter().filter(matching).cloned().collect()
    }

    /// Panic unless `service.method` was called; the message lists the calls made.
    pub fn assert_called(&self, service: &str, method: &str) {
        let state = self.state();
        if state.calls.iter().any(|call| call.service == service && call.method == method) {
            return;
        }
        let mut seen = String::new();
        for call in &state.calls {
            let (args, kwargs) = (Value::from(call.args.clone()), Value::from(call.kwargs.clone()));
            let _ =
                write!(seen, "\n  {}.{} args {args} kwargs {kwargs}", call.service, call.method);
        }
        if seen.is_empty() {
            seen.push_str(" none");
        }
        panic!("{service}.{method} was not called; calls made:{seen}");
    }

    /// Forget the recorded calls (the stubs stay).
    pub fn clear(&self) {
        self.state().calls.clear();
    }
}

impl fmt::Debug for FakeRpc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        let stubs: Vec<_> = state.stubs.keys().map(|(s, m)| format!("{s}.{m}")).collect();
        f.debug_struct("FakeRpc").field("stubs", &stubs).field("calls", &state.calls.len()).finish()
    }
}

#[async_trait]
impl Dependency for FakeRpc {
    type Output = RpcProxy;

    /// A proxy in the service's protocol, with the call's context headers, calling here.
    async fn get(&self, call: &WorkerContext) -> Result<RpcProxy, BoxError> {
        refuse_in_worker_process("FakeRpc")?;
        Ok(self.proxy_with(call.config(), call.call().outgoing_headers()))
    }
}

/// Records each request and answers it from the stubs.
struct FakeBackend {
    state: Arc<Mutex<State>>,
    protocol: Protocol,
    headers: Headers,
    max_message_size: usize,
}

impl fmt::Debug for FakeBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeBackend").field("protocol", &self.protocol).finish_non_exhaustive()
    }
}

#[async_trait]
impl RpcBackend for FakeBackend {
    fn protocol(&self) -> Protocol {
        self.protocol
    }

    async fn send(&self, request: RpcRequest) -> Result<RpcReply, RpcError> {
        request.clone().into_body(self.max_message_size)?;
        let RpcRequest { protocol, service, method, args, kwargs, .. } = request;
        let stub = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.calls.push(RecordedCall {
                service: service.clone(),
                method: method.clone(),
                args: args.clone(),
                kwargs: kwargs.clone(),
                protocol,
                headers: self.headers.clone(),
            });
            match state.stubs.get(&(service.clone(), method.clone())) {
                Some(stub) => stub.clone(),
                None => return Err(unstubbed(&state.stubs, protocol, &service, &method)),
            }
        };
        // Outside the lock: an answer may use the fake itself.
        let outcome = match stub {
            Stub::Returns(value) => Ok(value),
            Stub::Fails(error) => Err(error),
            Stub::Answers(answer) => answer(&args, &kwargs),
        };
        Ok(RpcReply::answered(&service, &method, outcome))
    }
}

/// The error of a call without a stub, as the broker would report an unreachable one.
fn unstubbed(
    stubs: &BTreeMap<(String, String), Stub>,
    protocol: Protocol,
    service: &str,
    method: &str,
) -> RpcError {
    let stubbed: Vec<String> = stubs.keys().map(|(s, m)| format!("{s}.{m}")).collect();
    let stubbed = match stubbed.is_empty() {
        true => "nothing is stubbed".to_owned(),
        false => format!("stubbed: {}", stubbed.join(", ")),
    };
    let service_stubbed = stubs.keys().any(|(s, _)| s == service);
    match (service_stubbed, protocol) {
        (false, Protocol::Nameko) => {
            RpcError::UnknownService(format!("{service}: not stubbed in FakeRpc, {stubbed}"))
        }
        _ => RpcError::MethodNotFound(format!(
            "{service}.{method} is not stubbed in FakeRpc, {stubbed}"
        )),
    }
}
