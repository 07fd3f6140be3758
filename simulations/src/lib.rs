//! # fd-sim
//!
//! The research harness: many fd members on one machine.
//!
//! * [`sweep`]: `fd-sim run experiment.toml` expands an experiment
//!   ([`experiment`]) into its sweep cells and runs each into its own folder,
//!   resuming finished cells.
//! * [`runner`]: one run: federated distillation through `fd-node`'s round
//!   engine, or a baseline (isolated, FedAvg, centralized) on the same data
//!   split; [`memnet`] is the in-memory network with its simulated clock,
//!   [`scenario`] the seeded participation, dropouts, stragglers and attacks,
//!   [`topology`] who hears whom.
//! * [`audit`]: the leakage audit, a curious member's estimates of the
//!   others' label distributions against the truth.
//! * [`secure`]: secure aggregation among the simulated members (each runs
//!   its own `fd_protocol::secagg` participant; the hub carries messages).
//! * [`output`]: `metrics.csv`, `timings.csv`, `summary.json`, plots and the
//!   sweep table.
//! * [`bench`]: `fd-sim bench`, the bytes, throughput, round-breakdown,
//!   scale and codec tables of docs/performance.md.
//! * [`quickstart`]: a coordinator and N members over real libp2p in one
//!   process, exactly the `fd-node` and `fd-coordinator` code paths.

pub mod audit;
pub mod bench;
pub mod experiment;
pub mod memnet;
pub mod netbench;
pub mod output;
pub mod quickstart;
pub mod runner;
pub mod scenario;
pub mod secure;
pub mod sweep;
pub mod topology;
