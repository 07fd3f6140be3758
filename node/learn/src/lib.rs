//! # fd-learn
//!
//! The learning layer of a member: everything that touches a student's
//! weights or a teacher's numbers, and nothing that touches the network.
//! fd-node joins it to fd-net; fd-sim drives it in one process.
//!
//! Design:
//! * One student type for every architecture ([`model::Student`], a burn
//!   `#[derive(Module)]` enum of MLP and CNNs) on a run-time
//!   [`device::DeviceKind`] (flex by default; ndarray and wgpu when this crate
//!   is built with those features), so members of one federation may differ in
//!   architecture and device and still share logits of the same shape.
//! * A [`learner::Learner`] owns a student, its optimizer and its seeded
//!   random state; every step (local training, prediction on the public
//!   subset, distillation, DP-SGD) is a method on it, deterministic in the
//!   seed, and its whole state saves and restores ([`checkpoint`]), so a
//!   member killed mid-federation resumes where it was.
//! * The teacher is built from already-validated shares: [`aggregate`]
//!   (mean of logits or probabilities, sample-weighted, ERA sharpening,
//!   median, trimmed mean) and [`knowledge`] (per-row knowledge weights a
//!   member attaches to its share, and the receiver's filter on them). Validation of what arrived
//!   from the network is not done here but in fd-node's inbox, before any of
//!   it reaches this crate.
//! * [`rollback`]: the member's validation split judges each distillation
//!   and keeps the best student on disk.
//! * [`fastconv`]: the CPU convolution and pooling kernels of the CNN
//!   students (a burn backend extension); [`fpenv`]: denormal floats flushed
//!   in every thread that computes. These two are the only places in the
//!   workspace allowed `unsafe`, each with a SAFETY note.
//! * [`privacy`]: DP-SGD (per-sample clipping, Gaussian noise) and its RDP
//!   accountant.
//!
//! Invariants: no dependency on fd-net, libp2p or fd-node (checked by
//! fd-node's `tests/layering.rs`); no module imports another around a loop.

pub mod aggregate;
pub mod checkpoint;
pub mod device;
pub mod fastconv;
pub mod fpenv;
pub mod knowledge;
pub mod learner;
pub mod model;
pub mod privacy;
pub mod rollback;
