//! One test binary for every end-to-end test: it links once, and cargo runs its tests in
//! parallel, each against its own server and database.

mod application;
mod deploy;
mod foundation;
mod hostile;
mod http_layer;
mod import_legacy;
mod instruments;
mod keys;
mod migration;
mod operator;
mod page;
mod phases;
mod service;
mod support;
