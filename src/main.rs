//! keyrack: per-user provider API keys, encrypted at rest in SQLite, served over a small JSON
//! HTTP API, carried through the three-phase move from `users.openai_api_key` to `api_keys`.
//!
//! `main` is thin: parse the command line, set up logging, load the configuration, run the
//! command, turn its outcome into an exit code. The work lives in the library (`src/lib.rs`);
//! see ARCHITECTURE.md for the map.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use keyrack::config::{Config, DbLocation, Lookup, ServeConfig};
use keyrack::open;
use keyrack::operator::{Keep, Stores};
use keyrack::{commands, export, fixtures, http, import, Failure};

/// The settings and exit codes, shown by `keyrack --help`.
const AFTER_HELP: &str = "\
Settings: a flag wins over its environment variable, the variable over the .env file (--env-file,
else ./.env when it exists), the file over the default. An empty variable counts as unset.
  KEYRACK_DB                   database file, or :memory: (default keyrack.db)
  KEYRACK_LISTEN               serve: address to listen on (default 127.0.0.1:8080; port 0: any)
  KEYRACK_WORKERS              serve: worker threads (default twice the cores, at least 4)
  KEYRACK_WRITE_WORKERS        serve: threads that serve writes (default 16)
  KEYRACK_EXIT_WITH_PARENT     serve: 1 stops the server (as SIGTERM does) when the process
                               that started it exits, even by SIGKILL (Linux; default 0)
  KEYRACK_ENCRYPTION_KEY       32 random bytes in standard base64, as `keyrack gen-key` prints;
                               unset: KEYRACK_ENCRYPTION_KEY_FILE, else the systemd credential
                               keyrack-encryption-key in $CREDENTIALS_DIRECTORY, else the key file
                               <database>.key, created 0600 for a new database
  KEYRACK_ENCRYPTION_KEY_FILE  a file holding the key (not together with KEYRACK_ENCRYPTION_KEY)
  KEYRACK_OLD_ENCRYPTION_KEYS  comma-separated older keys, used only to decrypt (rotation)
  KEYRACK_ADMIN_TOKEN          enables GET /admin/status, /admin/events and /metrics; unset: 404
  KEYRACK_SESSION_TTL          session lifetime in seconds (default 2592000, 30 days)
  KEYRACK_SIGNUPS              open (default) or closed: POST /auth/register answers 403
                               and accounts are made with `keyrack add-user`
  KEYRACK_MAX_KEYS_PER_USER    most keys one user may add (default 1000; past it 409)
  KEYRACK_AUDIT_DAYS           days events are kept (default 365); pruned at start and hourly
  KEYRACK_AUDIT_FOLD_SECONDS   one actor's reads of one key in this window are one event
                               with a count (default 3600)
  KEYRACK_WRITE_RATE           writes (key writes, logins) one account may make per minute
                               (default 600, bursts of as many; past it 429 with Retry-After)
  KEYRACK_HEAD_TIMEOUT         serve: seconds a request head (and a small body) may take (10)
  KEYRACK_IDLE_TIMEOUT         serve: seconds a keep-alive connection may sit idle (10)
  KEYRACK_SOCKET_TIMEOUT       serve: seconds each socket read or write may take (10)
  KEYRACK_BUSY_TIMEOUT         seconds a statement waits for a lock another process holds
                               (default 5; past it a request answers 503 busy)
  KEYRACK_LEGACY_FERNET_KEY    import-legacy, export-legacy: comma-separated Fernet keys of the
                               application (export-legacy seals with the first)
  KEYRACK_UPGRADE_BACKUP       off: serve, migrate and upgrade apply schema migrations without
                               first writing the backup <database>.backup-<time>-schema-<n>
  RUST_LOG                     log filter (default info); logs go to stderr

Exit codes:
  0  success
  1  failure at run time (also: an email already taken by add-user)
  2  usage or configuration error, or a --db file that does not exist (only serve,
     load-fixtures and import-legacy create a database), or a backup PATH that already
     exists, or a database whose schema is older (run `keyrack upgrade`) or newer than this
     binary's
  3  refused by a safety check

Every file keyrack creates (database, -wal, -shm, key file, backups) is readable by its owner only.";

#[derive(Parser)]
#[command(
    name = "keyrack",
    version,
    about = "Per-user provider API keys, encrypted at rest, over a JSON HTTP API",
    after_help = AFTER_HELP,
    help_expected = true
)]
struct Cli {
    #[command(flatten)]
    settings: Settings,
    #[command(subcommand)]
    command: Option<Cmd>,
}

/// Where the database and the settings are: given before the command or after it.
#[derive(clap::Args, Default, Clone)]
struct Settings {
    /// SQLite database file, or `:memory:` [env: KEYRACK_DB] [default: keyrack.db]
    #[arg(long, value_name = "PATH")]
    db: Option<String>,
    /// A .env file to read settings from [default: ./.env when it exists]
    #[arg(long, value_name = "PATH")]
    env_file: Option<PathBuf>,
}

impl Settings {
    /// The command's own flags win over those given before the command.
    fn or(self, outer: Settings) -> Settings {
        Settings {
            db: self.db.or(outer.db),
            env_file: self.env_file.or(outer.env_file),
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the HTTP API (the default command); creates the database if it does not exist
    Serve(ServeArgs),
    /// Phase 1: set phase dual and copy every column key into api_keys
    Migrate {
        /// Print what would be copied, write nothing
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        settings: Settings,
    },
    /// Print the phase, the schema version and the key counts
    Status {
        /// Print one JSON object
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        settings: Settings,
    },
    /// Phase 3: drop users.openai_api_key after safety checks and a backup
    RemoveLegacyColumn {
        /// Do not ask for confirmation
        #[arg(long)]
        yes: bool,
        /// Where to write the backup [default: beside the database, named with the date and time]
        #[arg(long, value_name = "PATH")]
        backup: Option<PathBuf>,
        /// Print the checks and what would be dropped, write nothing
        #[arg(long)]
        dry_run: bool,
        /// Go on although something other than keyrack wrote the legacy column in the last 24 hours
        #[arg(long)]
        ignore_foreign_writes: bool,
        #[command(flatten)]
        settings: Settings,
    },
    /// Go back to phase legacy: each default OpenAI key back into the column, keeping every column value the table lacks
    Revert {
        /// Do not ask for confirmation
        #[arg(long)]
        yes: bool,
        /// Where to write the backup [default: beside the database, named with the date and time]
        #[arg(long, value_name = "PATH")]
        backup: Option<PathBuf>,
        /// Print what would be written and kept, write nothing
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        settings: Settings,
    },
    /// Re-encrypt every stored value under KEYRACK_ENCRYPTION_KEY
    RotateEncryptionKey {
        #[command(flatten)]
        settings: Settings,
    },
    /// Print a fresh encryption key (uses no database and no settings)
    GenKey,
    /// Load a fixtures file, all or nothing; creates the database if it does not exist
    LoadFixtures {
        /// The fixtures file (JSON; its format is in docs/commands.md)
        #[arg(value_name = "FILE")]
        file: PathBuf,
        #[command(flatten)]
        settings: Settings,
    },
    /// Write a consistent copy of the database to PATH (mode 0600) while servers keep serving
    Backup {
        /// Where to write the copy; must not exist
        #[arg(value_name = "PATH")]
        path: PathBuf,
        #[command(flatten)]
        settings: Settings,
    },
    /// Show every key of one user in every store: where it lives, the key that sealed it, whether it opens, what happens next
    Inspect {
        /// The user's email or id
        #[arg(value_name = "USER")]
        user: String,
        /// Print one JSON object
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        settings: Settings,
    },
    /// Settle a conflict of one user's OpenAI key, keeping the column's or the table's value
    Resolve {
        /// The user's email or id
        #[arg(value_name = "USER")]
        user: String,
        /// Which value becomes the user's OpenAI key; the other is kept as an extra key
        #[arg(long, value_enum)]
        keep: KeepArg,
        /// Do not ask for confirmation
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        settings: Settings,
    },
    /// Remove one user's stored values that do not open with the configured keys
    ClearKey {
        /// The user's email or id
        #[arg(value_name = "USER")]
        user: String,
        /// The provider [default: openai]
        #[arg(long, value_name = "P")]
        provider: Option<String>,
        /// Where to look
        #[arg(long, value_enum, default_value = "all")]
        store: StoreArg,
        /// Do not ask for confirmation
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        settings: Settings,
    },
    /// Print the recorded events (the audit trail), oldest first
    Audit {
        /// Only this user's events (an email or a user id)
        #[arg(long, value_name = "USER")]
        user: Option<String>,
        /// Only events at or after this RFC 3339 time
        #[arg(long, value_name = "RFC3339")]
        since: Option<String>,
        /// Only the N most recent events
        #[arg(long, value_name = "N")]
        limit: Option<i64>,
        /// Print one JSON object per line
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        settings: Settings,
    },
    /// Print the id of each configured encryption key, the current one first (uses no database)
    KeyId {
        #[command(flatten)]
        settings: Settings,
    },
    /// Exit 0 when a server answers GET /healthz (uses no database; for images without curl)
    Healthcheck {
        /// The server [default: http://KEYRACK_LISTEN/healthz, loopback for 0.0.0.0 or ::]
        #[arg(long, value_name = "URL")]
        url: Option<String>,
        /// Seconds to wait for the connection and for the answer
        #[arg(long, value_name = "SECONDS", default_value = "5")]
        timeout: f64,
        #[command(flatten)]
        settings: Settings,
    },
    /// Create an account; the password is asked on the terminal, or read from stdin
    AddUser {
        /// The account's email address
        #[arg(value_name = "EMAIL")]
        email: String,
        #[command(flatten)]
        settings: Settings,
    },
    /// Create the --db database (which must not exist) in phase legacy from another
    /// application's users table; keys in plaintext or as Fernet tokens (KEYRACK_LEGACY_FERNET_KEY)
    ImportLegacy(ImportArgs),
    /// Give an adopted application its keys back in its own column (plaintext or Fernet), after a
    /// backup of its database
    ExportLegacy(ExportArgs),
    /// Apply pending schema migrations to the database, after a backup beside it
    Upgrade {
        /// Do not write the backup first
        #[arg(long)]
        no_backup: bool,
        #[command(flatten)]
        settings: Settings,
    },
    /// Print keyrack's version and the schema version it uses (uses no database)
    Version,
    /// Set a user's password (from a terminal prompt, or the first line of stdin) and end their
    /// sessions
    ResetPassword {
        /// The user's email
        #[arg(value_name = "EMAIL")]
        email: String,
        #[command(flatten)]
        settings: Settings,
    },
    /// An application's tokens: create (printed once), list, revoke
    ServiceToken {
        #[command(subcommand)]
        action: TokenCmd,
        #[command(flatten)]
        settings: Settings,
    },
    /// List the users: id, email, external id, created, last login, password, key count
    Users {
        /// Only users whose email or external id contains TEXT
        #[arg(long, value_name = "TEXT")]
        query: Option<String>,
        /// Print {"users":[…]}
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        settings: Settings,
    },
    /// Delete a user with every key of theirs in every store, their sessions and usage (events stay)
    DeleteUser {
        /// A user id, an email, or ext:<external id>
        #[arg(value_name = "USER")]
        user: String,
        /// Do not ask for the word `delete`
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        settings: Settings,
    },
    /// Print a one-time link BASE/#set-password=<token> for USER, or for every user without a password
    Invite {
        /// A user id, an email, or ext:<external id>
        #[arg(value_name = "USER", required_unless_present = "without_password")]
        user: Option<String>,
        /// One link per user who has no usable password
        #[arg(long, conflicts_with = "user")]
        without_password: bool,
        /// The page's address (default http://127.0.0.1:8080)
        #[arg(long, value_name = "BASE")]
        url: Option<String>,
        /// How long the link may be used, in seconds (default 259200, 72 hours)
        #[arg(long, value_name = "SECONDS")]
        ttl: Option<i64>,
        /// With --without-password: one {"email","external_id","link"} per line
        #[arg(long, requires = "without_password")]
        json: bool,
        #[command(flatten)]
        settings: Settings,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token and print it once, alone on its line
    Create {
        /// [a-z0-9_-]{1,64}, held by no token that is not revoked
        #[arg(value_name = "NAME")]
        name: String,
        /// read (the default: users and keys) or write (also create, change, delete)
        #[arg(long, value_name = "read|write")]
        scope: Option<String>,
        /// When the token stops working (RFC 3339, in the future)
        #[arg(long, value_name = "RFC3339")]
        expires: Option<String>,
    },
    /// List the tokens (never the token itself)
    List {
        /// Print {"service_tokens":[…]}
        #[arg(long)]
        json: bool,
    },
    /// Revoke the token of NAME: it answers 401 from the next request on
    Revoke {
        /// The token's name
        #[arg(value_name = "NAME")]
        name: String,
    },
}

impl Cmd {
    fn settings(&self) -> Settings {
        match self {
            Cmd::Serve(a) => a.settings.clone(),
            Cmd::Migrate { settings, .. }
            | Cmd::Status { settings, .. }
            | Cmd::RemoveLegacyColumn { settings, .. }
            | Cmd::Revert { settings, .. }
            | Cmd::RotateEncryptionKey { settings }
            | Cmd::LoadFixtures { settings, .. }
            | Cmd::AddUser { settings, .. }
            | Cmd::Backup { settings, .. }
            | Cmd::Inspect { settings, .. }
            | Cmd::KeyId { settings }
            | Cmd::Healthcheck { settings, .. }
            | Cmd::Resolve { settings, .. }
            | Cmd::Audit { settings, .. }
            | Cmd::ClearKey { settings, .. }
            | Cmd::Upgrade { settings, .. }
            | Cmd::ResetPassword { settings, .. }
            | Cmd::ServiceToken { settings, .. }
            | Cmd::Users { settings, .. }
            | Cmd::DeleteUser { settings, .. }
            | Cmd::Invite { settings, .. } => settings.clone(),
            Cmd::ImportLegacy(a) => a.settings.clone(),
            Cmd::ExportLegacy(a) => a.settings.clone(),
            Cmd::GenKey | Cmd::Version => Settings::default(),
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum KeepArg {
    Column,
    Table,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum StoreArg {
    Column,
    Table,
    All,
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
    /// A column of password hashes to carry over: bcrypt, argon2, Werkzeug scrypt or
    /// pbkdf2:sha256, Django pbkdf2_sha256, passlib pbkdf2-sha256 [default: none]
    #[arg(long, value_name = "C")]
    password_column: Option<String>,
    /// Import users whose key does not decode without their key, instead of refusing (exit 3)
    #[arg(long)]
    skip_unreadable: bool,
    /// Write a JSON report (mode 0600) of the users without a usable password, the rows skipped
    /// and the keys that did not decode; never a key or a hash. PATH must not exist
    #[arg(long, value_name = "PATH")]
    report: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// The application's SQLite database, whose key column is written
    #[arg(long, value_name = "APP.db")]
    to: PathBuf,
    /// How the keys are written: plaintext, or Fernet tokens under the first key of
    /// KEYRACK_LEGACY_FERNET_KEY
    #[arg(long, value_enum)]
    format: FormatArg,
    /// The application's users table
    #[arg(long, value_name = "T", default_value = "users")]
    users_table: String,
    /// The column of the application's user ids (matched, as text, to keyrack's external ids)
    #[arg(long, value_name = "C", default_value = "id")]
    id_column: String,
    /// The column the keys are written to
    #[arg(long, value_name = "C", default_value = "openai_api_key")]
    key_column: String,
    /// Where to write the backup of APP.db [default: beside it, named with the date and time]
    #[arg(long, value_name = "PATH")]
    backup: Option<PathBuf>,
    /// Print the counts, write nothing
    #[arg(long)]
    dry_run: bool,
    /// Do not ask for confirmation
    #[arg(long)]
    yes: bool,
    #[command(flatten)]
    settings: Settings,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum FormatArg {
    Plaintext,
    Fernet,
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
    /// Stop (as on SIGTERM) when the process that started keyrack exits, however it ends, even
    /// by SIGKILL; Linux only [env: KEYRACK_EXIT_WITH_PARENT=1]
    #[arg(long)]
    exit_with_parent: bool,
    #[command(flatten)]
    settings: Settings,
}

fn main() -> ExitCode {
    // Every file keyrack creates — the database and SQLite's -wal and -shm beside it, the key
    // file, backups — is for its owner only: they hold password hashes, session hashes and
    // sealed keys. The mask covers the files SQLite creates itself; set before any thread starts.
    // SAFETY: umask only changes this process's file creation mask.
    unsafe {
        libc::umask(0o077);
    }
    tune_allocator();
    let matches = Cli::command().get_matches();
    // The command's name as typed (no command: serve), the key of its needs in `keyrack::open`.
    let name = matches.subcommand_name().unwrap_or("serve").to_owned();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match run(cli, &name) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("keyrack: {}", f.message());
            ExitCode::from(f.exit_code())
        }
    }
}

fn run(cli: Cli, name: &str) -> Result<(), Failure> {
    let command = cli.command.unwrap_or(Cmd::Serve(ServeArgs::default()));
    let needs = open::for_command(name)?;
    if let Cmd::GenKey = command {
        commands::gen_key();
        return Ok(());
    }
    if let Cmd::Version = command {
        println!(
            "keyrack {}\nschema version {}",
            open::VERSION,
            keyrack::db::binary_schema_version()
        );
        return Ok(());
    }
    let settings = command.settings().or(cli.settings);
    let lookup = Lookup::load(settings.env_file.as_deref()).map_err(|e| Failure::Config(e.0))?;
    if let Cmd::Healthcheck { url, timeout, .. } = &command {
        let timeout = Some(*timeout)
            .filter(|t| (0.1..=3600.0).contains(t))
            .map(std::time::Duration::from_secs_f64)
            .ok_or_else(|| {
                Failure::Config("--timeout: give a number of seconds from 0.1 to 3600".to_owned())
            })?;
        let url = match url {
            Some(u) => u.clone(),
            None => {
                let listen = ServeConfig::resolve(None, Some("1"), &lookup)
                    .map_err(|e| Failure::Config(e.0))?
                    .listen;
                keyrack::healthcheck::default_url(listen)
            }
        };
        return keyrack::healthcheck::check(&url, timeout);
    }
    let config =
        Config::resolve(settings.db.as_deref(), &lookup).map_err(|e| Failure::Config(e.0))?;
    keyrack::logging::init(&config.log_filter);
    let db_location = config.db.clone();
    if let Cmd::KeyId { .. } = command {
        return keyrack::operator::key_id(&config);
    }

    // Serve settings are checked before the database is touched.
    let serve_config = match &command {
        Cmd::Serve(a) => {
            let mut cfg = ServeConfig::resolve(a.listen.as_deref(), a.workers.as_deref(), &lookup)
                .map_err(|e| Failure::Config(e.0))?;
            cfg.exit_with_parent |= a.exit_with_parent;
            Some(cfg)
        }
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
            report: a.report,
        };
        let fernet_keys = lookup.get(import::FERNET_VAR);
        return import::run(config, fernet_keys.as_deref(), &opts);
    }

    let Some(needs) = needs else {
        return Err(Failure::Runtime(format!("{name} uses no database (a bug)")));
    };
    let new_files = if needs.database == open::Database::MayCreate {
        NewFiles::before_opening(&db_location)
    } else {
        if let DbLocation::File(path) = &db_location {
            if !path.exists() {
                return Err(Failure::Config(format!(
                    "the database {} does not exist; check --db / KEYRACK_DB (only `keyrack serve`, \
                     `keyrack load-fixtures` and `keyrack import-legacy` create a database)",
                    keyrack::logging::printable(&path.display().to_string())
                )));
            }
        }
        NewFiles::default()
    };
    // Commands that neither decrypt nor seal open the database without the encryption key,
    // once its schema is known to be this binary's (read-only: nothing written).
    if matches!(
        command,
        Cmd::ServiceToken { .. } | Cmd::Users { .. } | Cmd::DeleteUser { .. } | Cmd::Invite { .. }
    ) {
        open::check_schema(&config.db, needs)?;
    }
    match command {
        Cmd::ServiceToken { action, .. } => {
            use keyrack::service_tokens as st;
            return match action {
                TokenCmd::Create {
                    name,
                    scope,
                    expires,
                } => st::create(&config, &name, scope.as_deref(), expires.as_deref()),
                TokenCmd::List { json } => st::list(&config, json),
                TokenCmd::Revoke { name } => st::revoke(&config, &name),
            };
        }
        Cmd::Users { query, json, .. } => {
            return keyrack::people::users(&config, query.as_deref(), json)
        }
        Cmd::DeleteUser { user, yes, .. } => {
            return keyrack::people::delete_user(&config, &user, yes)
        }
        Cmd::Invite {
            user,
            without_password,
            url,
            ttl,
            json,
            ..
        } => {
            use keyrack::people::InviteWho;
            let who = match (&user, without_password) {
                (Some(u), false) => InviteWho::One(u),
                _ => InviteWho::WithoutPassword { json },
            };
            return keyrack::people::invite(&config, who, url.as_deref(), ttl);
        }
        _ => {}
    }
    // A command that fails before it has done anything with a database it created removes it
    // (and its key file) again: a failed load-fixtures leaves nothing behind.
    let fixtures = match &command {
        Cmd::Serve(a) => a.fixtures.clone(),
        Cmd::LoadFixtures { file, .. } => Some(file.clone()),
        _ => None,
    };
    let serving = matches!(command, Cmd::Serve(_));
    // A dry run does its whole start-up on an in-memory copy: it writes nothing, not even a
    // schema upgrade.
    let dry_run = matches!(
        command,
        Cmd::Migrate { dry_run: true, .. }
            | Cmd::RemoveLegacyColumn { dry_run: true, .. }
            | Cmd::Revert { dry_run: true, .. }
    );
    let options = open::Options {
        dry_run,
        no_backup: matches!(
            command,
            Cmd::Upgrade {
                no_backup: true,
                ..
            }
        ) || upgrade_backup_off(&lookup)?,
        serving,
    };
    let app = open::open(config, needs, options).and_then(|(app, opened)| {
        if let Cmd::Upgrade { .. } = command {
            report_upgrade(&db_location, &opened);
        }
        if serving {
            // Values sealed with a key outside the ring stop a server before it loads anything.
            app.check_keys_for_serving()?;
        }
        let loaded = match &fixtures {
            Some(f) => Some(fixtures::load(&app, f)?),
            None => None,
        };
        Ok((app, loaded))
    });
    let (app, loaded) = match app {
        Ok(a) => a,
        Err(f) => {
            new_files.remove();
            return Err(f);
        }
    };

    match command {
        Cmd::Serve(_) => {
            let cfg = serve_config.expect("resolved above for serve");
            http::serve(Arc::new(app), &cfg)
        }
        Cmd::Migrate { dry_run, .. } => commands::migrate(&app, dry_run),
        Cmd::Status { json, .. } => commands::status(&app, json),
        Cmd::RemoveLegacyColumn {
            yes,
            backup,
            dry_run,
            ignore_foreign_writes,
            ..
        } => commands::remove_legacy_column(
            &app,
            &db_location,
            yes,
            backup.as_deref(),
            dry_run,
            ignore_foreign_writes,
        ),
        Cmd::Revert {
            yes,
            backup,
            dry_run,
            ..
        } => commands::revert(&app, &db_location, yes, backup.as_deref(), dry_run),
        Cmd::RotateEncryptionKey { .. } => commands::rotate_encryption_key(&app),
        Cmd::LoadFixtures { .. } => {
            println!("loaded {} users", loaded.unwrap_or(0));
            Ok(())
        }
        Cmd::AddUser { email, .. } => keyrack::accounts::add_user(&app, &email),
        Cmd::Backup { path, .. } => keyrack::operator::backup(&app, &db_location, &path),
        Cmd::Inspect { user, json, .. } => keyrack::operator::inspect(&app, &user, json),
        Cmd::Resolve {
            user, keep, yes, ..
        } => keyrack::operator::resolve(
            &app,
            &user,
            match keep {
                KeepArg::Column => Keep::Column,
                KeepArg::Table => Keep::Table,
            },
            yes,
        ),
        Cmd::ClearKey {
            user,
            provider,
            store,
            yes,
            ..
        } => keyrack::operator::clear_key(
            &app,
            &user,
            provider.as_deref(),
            match store {
                StoreArg::Column => Stores::Column,
                StoreArg::Table => Stores::Table,
                StoreArg::All => Stores::All,
            },
            yes,
        ),
        Cmd::Audit {
            user,
            since,
            limit,
            json,
            ..
        } => keyrack::operator::audit(&app, user.as_deref(), since.as_deref(), limit, json),
        Cmd::ResetPassword { email, .. } => commands::reset_password(&app, &email),
        Cmd::ExportLegacy(a) => export::run(
            &app,
            &export::Options {
                to: a.to,
                format: match a.format {
                    FormatArg::Plaintext => export::Format::Plaintext,
                    FormatArg::Fernet => export::Format::Fernet,
                },
                users_table: a.users_table,
                id_column: a.id_column,
                key_column: a.key_column,
                backup: a.backup,
                dry_run: a.dry_run,
                yes: a.yes,
            },
            lookup.get(import::FERNET_VAR).as_deref(),
        ),
        Cmd::Upgrade { .. } => Ok(()),
        Cmd::GenKey
        | Cmd::Version
        | Cmd::KeyId { .. }
        | Cmd::ImportLegacy(_)
        | Cmd::Healthcheck { .. }
        | Cmd::ServiceToken { .. }
        | Cmd::Users { .. }
        | Cmd::DeleteUser { .. }
        | Cmd::Invite { .. } => Ok(()),
    }
}

/// `KEYRACK_UPGRADE_BACKUP=off`: schema upgrades write no backup first.
fn upgrade_backup_off(lookup: &Lookup) -> Result<bool, Failure> {
    match lookup.get("KEYRACK_UPGRADE_BACKUP").as_deref() {
        None | Some("on") => Ok(false),
        Some("off") => Ok(true),
        Some(_) => Err(Failure::Config(
            "KEYRACK_UPGRADE_BACKUP must be on (the default) or off".into(),
        )),
    }
}

/// What `keyrack upgrade` did, on stdout.
fn report_upgrade(db: &DbLocation, opened: &open::Opened) {
    let db = match db {
        DbLocation::File(p) => keyrack::logging::printable(&p.display().to_string()),
        DbLocation::Memory => ":memory:".to_owned(),
    };
    if opened.schema_before == opened.schema_after {
        println!(
            "{db} is at schema version {} already; nothing to upgrade",
            opened.schema_after
        );
        return;
    }
    let backup = match &opened.backup {
        Some(p) => format!(
            "; the backup is {}",
            keyrack::logging::printable(&p.display().to_string())
        ),
        None => "; no backup was written".to_owned(),
    };
    println!(
        "upgraded {db} from schema version {} to {}{backup}",
        opened.schema_before, opened.schema_after
    );
}

/// The files a command that creates a database would leave behind, when they did not exist
/// before it started.
#[derive(Default)]
struct NewFiles(Vec<PathBuf>);

impl NewFiles {
    fn before_opening(db: &DbLocation) -> NewFiles {
        let DbLocation::File(path) = db else {
            return NewFiles::default();
        };
        if path.exists() {
            return NewFiles::default();
        }
        let mut files: Vec<PathBuf> = ["", "-wal", "-shm", "-journal"]
            .iter()
            .map(|suffix| {
                let mut p = path.clone().into_os_string();
                p.push(suffix);
                PathBuf::from(p)
            })
            .collect();
        files.extend(db.key_file().filter(|k| !k.exists()));
        NewFiles(files)
    }

    fn remove(self) {
        for f in self.0 {
            let _ = std::fs::remove_file(f);
        }
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
