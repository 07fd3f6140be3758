//! # fd-sim
//!
//! The simulation harness: many fd members on one machine. For now it holds
//! the `quickstart`, which runs a real federation (one coordinator, N
//! members, the real libp2p stack on 127.0.0.1) inside one process, using
//! exactly the `fd-node` and `fd-coordinator` code paths, and compares it
//! with the isolated baseline.

pub mod quickstart;
