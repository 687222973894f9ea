pub mod buckets;
pub mod captions;
pub mod config;
