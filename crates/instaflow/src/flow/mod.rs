//! Rectified flow: the time convention (owned by [`time`], re-exported here), velocity fields
//! and guidance, ODE solvers, training objectives, straightness metrics and seeded noise.

pub mod losses;
pub mod metrics;
pub mod noise;
pub mod solvers;
pub mod time;
pub mod velocity;

pub use time::*;
