//! `keyrack add-user EMAIL`: creates an account from the command line, for installs that close
//! sign-ups (`KEYRACK_SIGNUPS=closed`). The password is asked twice on the terminal without
//! echo, or, with no terminal, read as the first line of stdin (for scripts).

use std::io::{BufRead, IsTerminal};

use crate::app::App;
use crate::auth;
use crate::domain::{Email, Password, Secret};
use crate::store::StoreError;
use crate::Failure;

pub fn add_user(app: &App, email: &str) -> Result<(), Failure> {
    let email =
        Email::parse(email).map_err(|e| Failure::Config(format!("add-user: {}", e.message)))?;
    let password = read_password(&email)?;
    let password = Password::parse(password.expose())
        .map_err(|e| Failure::Config(format!("add-user: {}", e.message)))?;
    let hash = auth::hash_password(&password)
        .map_err(|e| Failure::Runtime(format!("password hashing failed: {e}")))?;
    let mut store = app.store()?;
    match store.create_user_by(&email, &hash, Some("command:add-user")) {
        Ok(user) => {
            log::info!("added user {} with the command line", user.id);
            println!("added user {} ({})", user.id, user.email);
            Ok(())
        }
        Err(StoreError::EmailTaken) => Err(Failure::Runtime(format!(
            "the email {} is already registered; nothing was changed",
            email.as_str()
        ))),
        Err(e) => Err(Failure::store("add-user", e)),
    }
}

fn read_password(email: &Email) -> Result<Secret, Failure> {
    let fail = |e: std::io::Error| Failure::Runtime(format!("cannot read the password: {e}"));
    if std::io::stdin().is_terminal() {
        let first = Secret::new(
            rpassword::prompt_password(format!("Password for {}: ", email.as_str()))
                .map_err(fail)?,
        );
        let again =
            Secret::new(rpassword::prompt_password("The same password again: ").map_err(fail)?);
        if first != again {
            return Err(Failure::Config(
                "add-user: the two passwords differ; nothing was changed".into(),
            ));
        }
        return Ok(first);
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(fail)?;
    let line = Secret::new(line);
    let password = line.expose().trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err(Failure::Config(
            "add-user: no password: run it on a terminal, or give the password as the first line of stdin".into(),
        ));
    }
    Ok(Secret::new(password.to_owned()))
}
