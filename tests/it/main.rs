//! End-to-end tests of medallion: one binary, a module per area.

mod bad_input;
mod handmade;
mod invariants;
mod recovery;
mod s3;
mod statistics;
mod validate;
