//! Training recipes: the YAML schema (strict: unknown keys are errors) and its documented defaults.
//!
//! Empty until the distributed runtime lands (issue 4).
