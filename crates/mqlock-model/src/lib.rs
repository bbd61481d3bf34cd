//! A model check of the mqlock protocols with [`stateright`]: mqlock 0.1's protocol (v1), the
//! protocol of `docs/protocol.md` as implemented (v2), a rejected design of it that took the
//! lease from publisher confirms (v2-confirm), and the grant without the fence register that
//! the core implements next (v3, [`v3`]), each against one model of RabbitMQ's single
//! active consumer queue (rabbit_fifo), its registers, partitions and a global clock; v2 with
//! locks kept until they are wanted ([`Parking`]); and the recipes built on the mutex
//! (semaphore, read-write lock) over an abstract model of one lock ([`recipes`]).
//!
//! See `docs/model.md` for what is modelled, the action names, the properties and the bounds.
//! Run it with `cargo test -p mqlock-model`.

pub mod broker;
pub mod client;
pub mod explore;
pub mod graph;
pub mod liveness;
pub mod model;
pub mod properties;
pub mod recipes;
pub mod types;
pub mod v1;
pub mod v2;
pub mod v3;

pub use model::{Action, Config, LockModel, Parking, State, V3Fault, Version};
