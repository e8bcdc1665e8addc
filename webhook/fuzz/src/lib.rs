//! Fuzz targets for the ferrimesh webhook; see `check` for the properties.

pub mod check;
