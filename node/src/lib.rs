//! # fd-node
//!
//! One member of an fd federation: its private data, its student, the steps
//! of a round, the ensemble teacher, and (through `fd-net`) the networking that carries
//! logit shares (never weights, never data) between members.
//!
//! Below it: `fd-data` (loaders, partitioners, the public set, atomic
//! files) and `fd-net` (the libp2p swarm and client, codec, transfers,
//! membership, key files, the `[federation]` table, the metrics endpoint).
//! Neither knows about learning; this crate joins them to it.
//!
//! Map:
//! - [`model`], [`device`], [`learner`]: burn students and their training;
//!   [`fastconv`]: the CPU convolution and pooling kernels of the CNN students.
//! - [`aggregate`]: the ensemble teacher.
//! - [`privacy`]: DP-SGD (per-sample clipping, noise) and its RDP accountant.
//! - [`member`]: a round's learning steps on one member, no networking.
//! - [`gate`]: who may steer a member (the coordinator's signed control
//!   messages) and the bounded pool where inbound signatures are checked;
//! - [`inbox`]: the validation gate between received shares and aggregation;
//! - [`runtime`]: the networked member and the isolated baseline;
//!   [`doctor`]: `fd-node doctor`, which peers this member can reach and how.
//! - [`config`]: a node's configuration file.
//! - [`export`]: the student as a deployable SafeTensors model (f32/f16/int8);
//!   [`evaluate`]: its accuracy, latency, size, memory and energy;
//!   [`compress`]: distilling it into a smaller student; [`compare`]: A/B
//!   comparison of two exports.

pub mod aggregate;
pub mod checkpoint;
pub mod compare;
pub mod compress;
pub mod config;
pub mod device;
pub mod doctor;
pub mod evaluate;
pub mod export;
pub mod fastconv;
pub mod fpenv;
pub mod gate;
pub mod inbox;
pub mod knowledge;
pub mod learner;
pub mod member;
pub mod model;
pub mod privacy;
pub mod rollback;
pub mod round;
pub mod runtime;
