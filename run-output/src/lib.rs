//! A run's outputs, torch-free: [`metrics`] (one JSON line per logged step, and rates), [`output`] (the run as a
//! local folder or a store URL: metrics in parts, `final/` with its commit record, reading them back while the
//! run trains) and [`plot`] (loss and learning-rate curves to PNG; the `m3d-plot` binary).
//!
//! **Invariant: no libtorch**: reading and plotting a run must not need the training stack.

pub mod metrics;
pub mod output;
pub mod plot;
