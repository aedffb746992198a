//! Helpers for reading diffusers/transformers `config.json` files.

use serde::Deserialize;

/// A config value that diffusers accepts either as one value for all blocks or as one per block.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// The same value for every block.
    One(T),
    /// One value per block.
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// The per-block values for `n` blocks, or an error naming `field` if a list has the wrong length.
    pub fn per_block(&self, n: usize, field: &str) -> Result<Vec<T>, ConfigError> {
        match self {
            OneOrMany::One(v) => Ok(vec![v.clone(); n]),
            OneOrMany::Many(v) if v.len() == n => Ok(v.clone()),
            OneOrMany::Many(v) => Err(ConfigError::Invalid(format!(
                "`{field}` has {} entries but there are {n} blocks",
                v.len()
            ))),
        }
    }
}

/// A config that this implementation cannot build.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A field holds a value this implementation does not support.
    #[error("unsupported {field} = {value} (supported: {supported})")]
    Unsupported {
        /// The config field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What is supported.
        supported: &'static str,
    },
    /// Fields that contradict each other or have impossible values.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Fail with [`ConfigError::Unsupported`] unless `ok`.
pub fn require(
    ok: bool,
    field: &'static str,
    value: impl std::fmt::Debug,
    supported: &'static str,
) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Unsupported {
            field,
            value: format!("{value:?}"),
            supported,
        })
    }
}
