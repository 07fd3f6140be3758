//! # fd-node
//!
//! One member of an fd federation: its private data, its student, the steps
//! of a round, the ensemble teacher, and (through `fd-net`) the networking that carries
//! logit shares (never weights, never data) between members.
//!
//! Below it: `fd-data` (loaders, partitioners, the public set, atomic
//! files), `fd-learn` (students, training, distillation, the ensemble
//! teacher, DP-SGD, checkpoints, rollback) and `fd-net` (the libp2p swarm
//! and client, codec, transfers, membership, key files, the `[federation]`
//! table, the metrics endpoint). fd-learn and fd-net do not know each other;
//! this crate joins them.
//!
//! Map:
//! - From fd-learn, re-exported under the same names: [`model`], [`device`],
//!   [`learner`], [`fastconv`], [`fpenv`], [`aggregate`], [`knowledge`],
//!   [`privacy`], [`checkpoint`], [`rollback`].
//! - [`member`]: a round's learning steps on one member, no networking.
//! - [`gate`]: who may steer a member (the coordinator's signed control
//!   messages) and the bounded pool where inbound signatures are checked;
//! - [`inbox`]: the validation gate between received shares and aggregation;
//! - [`runtime`]: the networked member and the isolated baseline;
//!   [`secure`]: secure aggregation between members over the network;
//!   [`doctor`]: `fd-node doctor`, which peers this member can reach and how.
//! - [`config`]: a node's configuration file.
//! - [`export`]: the student as a deployable SafeTensors model (f32/f16/int8);
//!   [`evaluate`]: its accuracy, latency, size, memory and energy;
//!   [`compress`]: distilling it into a smaller student; [`compare`]: A/B
//!   comparison of two exports.

// The learning layer lives in fd-learn; its modules are re-exported under
// their old paths (`fd_node::model`, …) for fd-sim and the binaries.
pub use fd_learn::{
    aggregate, checkpoint, device, fastconv, fpenv, knowledge, learner, model, privacy, rollback,
};

pub mod compare;
pub mod compress;
pub mod config;
pub mod doctor;
pub mod evaluate;
pub mod export;
pub mod gate;
pub mod inbox;
pub mod member;
pub mod round;
pub mod runtime;
pub mod secure;
