//! One test binary for every end-to-end test: it links once, and cargo runs its tests in
//! parallel, each against its own server and database.

mod foundation;
mod hostile;
mod import_legacy;
mod keys;
mod phases;
mod support;
