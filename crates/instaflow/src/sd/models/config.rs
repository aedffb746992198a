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

/// Group counts and channel counts a config declares must be positive (a zero divides by zero or
/// builds an empty layer).
pub fn positive_sizes(
    norm_num_groups: usize,
    block_out_channels: &[usize],
) -> Result<(), ConfigError> {
    if norm_num_groups == 0 {
        return Err(ConfigError::Invalid(
            "norm_num_groups is 0: it must be a positive number of groups".into(),
        ));
    }
    if let Some(i) = block_out_channels.iter().position(|&c| c == 0) {
        return Err(ConfigError::Invalid(format!(
            "block_out_channels[{i}] is 0: every block needs channels"
        )));
    }
    Ok(())
}

/// Sizes a config declares must stay below what any real model uses (SD-1.5: 1,280 channels, 2
/// layers per block, CLIP-L: 12 layers, 49,408 tokens), so a corrupt or hostile `config.json`
/// fails with a message instead of building millions of layers.
pub fn at_most(fields: &[(&str, &[usize], usize)]) -> Result<(), ConfigError> {
    for &(field, values, max) in fields {
        if let Some(v) = values.iter().find(|&&v| v > max) {
            return Err(ConfigError::Invalid(format!(
                "{field} = {v} is larger than {max}, the most this implementation builds"
            )));
        }
    }
    Ok(())
}

impl<T: Clone> OneOrMany<T> {
    /// Every value given (one, or one per block).
    pub fn values(&self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
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

#[cfg(test)]
mod tests {
    use crate::sd::models::unet_2d::UNet2DConditionConfig;
    use crate::sd::models::vae::AutoencoderKLConfig;
    use crate::test_util::{TB, device};

    #[test]
    fn zero_groups_or_channels_are_refused_not_divided_by() {
        let unet = UNet2DConditionConfig {
            norm_num_groups: 0,
            ..Default::default()
        };
        let err = unet.init::<TB>(&device()).unwrap_err().to_string();
        assert!(err.contains("norm_num_groups is 0"), "{err}");
        let mut unet = UNet2DConditionConfig::default();
        unet.block_out_channels[1] = 0;
        let err = unet.init::<TB>(&device()).unwrap_err().to_string();
        assert!(err.contains("block_out_channels[1] is 0"), "{err}");
        let vae = AutoencoderKLConfig {
            norm_num_groups: 0,
            ..Default::default()
        };
        let err = vae.init::<TB>(&device()).unwrap_err().to_string();
        assert!(err.contains("norm_num_groups is 0"), "{err}");
    }
}
