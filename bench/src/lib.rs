//! Shared pieces of the benchmark programs in `src/bin`.

pub mod wg;
