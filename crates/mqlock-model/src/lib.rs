//! A model check of the mqlock protocols with [`stateright`]: today's protocol (v1,
//! `docs/protocol.md`), the new one (v2) and a candidate fix of v2 (v2fix), each against one model of RabbitMQ's single active
//! consumer queue (rabbit_fifo), its registers, partitions and a global clock.
//!
//! See `docs/model.md` for what is modelled, the action names, the properties and the bounds.
//! Run it with `cargo test -p mqlock-model`.

pub mod broker;
pub mod client;
pub mod liveness;
pub mod model;
pub mod properties;
pub mod types;
pub mod v1;
pub mod v2;

pub use model::{Action, Config, LockModel, State, Version};
