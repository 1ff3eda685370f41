//! Collective communication (in progress).
