//! The YAML config in three parts: `raw` (the file as written, unknown keys rejected),
//! `validate` (every value checked against its range, every error with its path) and
//! `model` (what the runtime is built from).

mod model;
mod raw;
mod validate;

#[cfg(test)]
mod robustness;

pub use model::*;
pub use validate::parse;
