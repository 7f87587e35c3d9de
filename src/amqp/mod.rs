//! Nameko over AMQP: events ([`entrypoints::EventListener`], [`dependencies::Producer`]),
//! work queues, RPC ([`entrypoints::RPCListener`], [`dependencies::RpcProxy`],
//! [`rpc::Client`]) and the names of exchanges and queues per wire profile.

pub mod dependencies;
pub mod entrypoints;
pub mod naming;
pub mod rpc;
