//! keyrack: per-user provider API keys, encrypted at rest in SQLite, served over a small JSON
//! HTTP API, carried through the three-phase move from `users.openai_api_key` to `api_keys`.
//!
//! `main` is thin: parse the command line, set up logging, load the configuration, run the
//! command, turn its outcome into an exit code. The work lives in the library (`src/lib.rs`);
//! see ARCHITECTURE.md for the map.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use keyrack::config::{Config, Lookup, ServeConfig};
use keyrack::{app, commands, fixtures, http, import, Failure};

#[derive(Parser)]
#[command(
    name = "keyrack",
    version,
    about = "Per-user provider API keys, encrypted at rest, over a JSON HTTP API"
)]
struct Cli {
    /// SQLite database file, or `:memory:` [env: KEYRACK_DB] [default: keyrack.db]
    #[arg(long, global = true, value_name = "PATH")]
    db: Option<String>,
    /// A .env file to read settings from [default: ./.env when it exists]
    #[arg(long, global = true, value_name = "PATH")]
    env_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the HTTP API (the default command)
    Serve(ServeArgs),
    /// Phase 1: set phase dual and copy every column key into api_keys
    Migrate,
    /// Print the phase, the schema version and the key counts
    Status {
        /// Print one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Phase 3: drop users.openai_api_key after safety checks and a backup
    RemoveLegacyColumn {
        /// Do not ask for confirmation
        #[arg(long)]
        yes: bool,
        /// Where to write the backup [default: beside the database, named with the date and time]
        #[arg(long, value_name = "PATH")]
        backup: Option<PathBuf>,
    },
    /// Go back to phase legacy, writing each default OpenAI key into the column
    Revert {
        /// Do not ask for confirmation
        #[arg(long)]
        yes: bool,
    },
    /// Re-encrypt every stored value under KEYRACK_ENCRYPTION_KEY
    RotateEncryptionKey,
    /// Print a fresh encryption key
    GenKey,
    /// Load a fixtures file, all or nothing
    LoadFixtures {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Create the --db database (which must not exist) in phase legacy from another
    /// application's users table; keys in plaintext or as Fernet tokens (KEYRACK_LEGACY_FERNET_KEY)
    ImportLegacy(ImportArgs),
    /// Set a user's password (from a terminal prompt, or the first line of stdin) and end their
    /// sessions
    ResetPassword {
        /// The user's email
        #[arg(value_name = "EMAIL")]
        email: String,
    },
}

#[derive(clap::Args)]
struct ImportArgs {
    /// The application's SQLite database, opened read-only
    #[arg(long, value_name = "APP.db")]
    from: PathBuf,
    /// The application's users table
    #[arg(long, value_name = "T", default_value = "users")]
    users_table: String,
    /// The column of user ids (integers; kept as keyrack's user ids)
    #[arg(long, value_name = "C", default_value = "id")]
    id_column: String,
    /// The column of emails (trimmed and lowercased)
    #[arg(long, value_name = "C", default_value = "email")]
    email_column: String,
    /// The column of OpenAI keys, plaintext or Fernet tokens
    #[arg(long, value_name = "C", default_value = "openai_api_key")]
    key_column: String,
    /// A column of bcrypt or argon2 password hashes to carry over [default: none]
    #[arg(long, value_name = "C")]
    password_column: Option<String>,
    /// Import users whose key does not decode without their key, instead of refusing (exit 3)
    #[arg(long)]
    skip_unreadable: bool,
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// Address to listen on [env: KEYRACK_LISTEN] [default: 127.0.0.1:8080]
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Worker threads [env: KEYRACK_WORKERS] [default: twice the cores, at least 4]
    #[arg(long, value_name = "N")]
    workers: Option<String>,
    /// Load this fixtures file before serving
    #[arg(long, value_name = "FILE")]
    fixtures: Option<PathBuf>,
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("keyrack: {}", f.message());
            ExitCode::from(f.exit_code())
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let command = cli.command.unwrap_or(Cmd::Serve(ServeArgs::default()));
    if let Cmd::GenKey = command {
        commands::gen_key();
        return Ok(());
    }
    let lookup = Lookup::load(cli.env_file.as_deref()).map_err(|e| Failure::Config(e.0))?;
    let config = Config::resolve(cli.db.as_deref(), &lookup).map_err(|e| Failure::Config(e.0))?;
    keyrack::logging::init(&config.log_filter);
    let db_location = config.db.clone();

    // Serve settings are checked before the database is touched.
    let serve_config = match &command {
        Cmd::Serve(a) => Some(
            ServeConfig::resolve(a.listen.as_deref(), a.workers.as_deref(), &lookup)
                .map_err(|e| Failure::Config(e.0))?,
        ),
        _ => None,
    };

    // import-legacy creates its database itself, from nothing: no App::open before it.
    if let Cmd::ImportLegacy(a) = command {
        let opts = import::Options {
            from: a.from,
            users_table: a.users_table,
            id_column: a.id_column,
            email_column: a.email_column,
            key_column: a.key_column,
            password_column: a.password_column,
            skip_unreadable: a.skip_unreadable,
        };
        let fernet_keys = lookup.get(import::FERNET_VAR);
        return import::run(config, fernet_keys.as_deref(), &opts);
    }

    let app = app::App::open(config)?;
    match command {
        Cmd::Serve(args) => {
            if let Some(f) = &args.fixtures {
                fixtures::load(&app, f)?;
            }
            let cfg = serve_config.expect("resolved above for serve");
            http::serve(Arc::new(app), &cfg)
        }
        Cmd::Migrate => commands::migrate(&app),
        Cmd::Status { json } => commands::status(&app, json),
        Cmd::RemoveLegacyColumn { yes, backup } => {
            commands::remove_legacy_column(&app, &db_location, yes, backup.as_deref())
        }
        Cmd::Revert { yes } => commands::revert(&app, yes),
        Cmd::RotateEncryptionKey => commands::rotate_encryption_key(&app),
        Cmd::LoadFixtures { file } => {
            let n = fixtures::load(&app, &file)?;
            println!("loaded {n} users");
            Ok(())
        }
        Cmd::ResetPassword { email } => commands::reset_password(&app, &email),
        Cmd::GenKey | Cmd::ImportLegacy(_) => Ok(()),
    }
}

/// glibc raises its mmap threshold after the first large block is freed, so later large blocks
/// (argon2's 9 MiB, big response buffers) come from per-thread arenas and their memory is never
/// given back: the server's resident size then grows with every worker that once hashed a
/// password. A fixed threshold keeps blocks of 1 MiB and more in mmap, returned on free.
/// (Limiting the number of arenas, tried too, cost a sixth of the throughput in lock contention.)
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called once, before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1024 * 1024);
        // Fixing the mmap threshold also fixes the trim threshold at its 128 KiB default, and
        // the heap would then be trimmed (a system call) on every other free: keep 16 MiB.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 * 1024 * 1024);
    }
}
