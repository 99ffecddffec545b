//! Helpers shared by some cluster-tier test files (each includes this module).

pub mod chaos;
