//! The partner API over real HTTP, on SQLite and on Postgres.

mod helpers;

mod confirm;
mod errors;
mod flows;
mod operations;
mod rules;
mod sandbox;
