//! One test binary for every end-to-end test: it links once, and cargo runs its tests in
//! parallel, each against its own server and database.

mod adoption;
mod application;
mod audit;
mod deploy;
mod disguised_text;
mod foundation;
mod harness;
mod hostile;
mod http_layer;
mod import_legacy;
mod instruments;
mod interrupted;
mod keys;
mod login_flood;
mod metrics_survey;
mod migration;
mod operator;
mod page;
mod phases;
mod service;
mod support;
mod upgrade;
