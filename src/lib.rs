//! flowgate: an OpenAI-compatible LLM gateway that records every call as a trace and aggregates
//! traces into experiments and runs. See ARCHITECTURE.md for the map.

pub mod allocator;
pub mod api;
pub mod cache;
pub mod cli;
pub mod config;
pub mod context;
pub mod error;
pub mod guardrails;
pub mod metering;
pub mod providers;
pub mod proxy;
pub mod recorder;
pub mod response;
pub mod routing;
pub mod runs;
pub mod server;
pub mod sketch;
pub mod sse;
pub mod store;
pub mod telemetry;
pub mod trace;
pub mod usage;
