//! The migration phase and its transition table.
//!
//! The phase is kept in the database (`keyrack_meta`), read inside every key transaction, and
//! changed only by the phase commands, in the same transaction as their work. What each phase
//! means for reads and writes is implemented in `store::keys`, the only place with key SQL.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// The column `users.openai_api_key` is the source of truth; the table is not used.
    Legacy,
    /// The table is the source of truth and the column mirrors the default OpenAI key.
    Dual,
    /// The column is gone.
    NewOnly,
}

impl Phase {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Phase::Legacy => "legacy",
            Phase::Dual => "dual",
            Phase::NewOnly => "new_only",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Phase> {
        match s {
            "legacy" => Some(Phase::Legacy),
            "dual" => Some(Phase::Dual),
            "new_only" => Some(Phase::NewOnly),
            _ => None,
        }
    }

    /// Whether `users.openai_api_key` exists in this phase.
    pub(crate) fn has_column(self) -> bool {
        self != Phase::NewOnly
    }

    /// Whether the `api_keys` table is in use (several keys, other providers).
    pub(crate) fn uses_table(self) -> bool {
        self != Phase::Legacy
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The phase commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    Migrate,
    RemoveLegacyColumn,
    Revert,
}

/// What a phase command should do, given the current phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Do the work, ending in the target phase.
    Run { target: Phase },
    /// The target phase is already reached: say so and exit 0.
    AlreadyDone(String),
    /// The command cannot run from this phase; the message names the command to run first.
    WrongPhase(String),
}

/// The transition table.
pub(crate) fn plan(command: Command, current: Phase) -> Step {
    use Phase::*;
    match (command, current) {
        (Command::Migrate, Legacy | Dual) => Step::Run { target: Dual },
        (Command::Migrate, NewOnly) => Step::AlreadyDone(
            "phase is new_only: the legacy column is gone and every key is in the table; \
             nothing to migrate"
                .into(),
        ),
        (Command::RemoveLegacyColumn, Dual) => Step::Run { target: NewOnly },
        (Command::RemoveLegacyColumn, NewOnly) => Step::AlreadyDone(
            "phase is already new_only: the legacy column is gone; nothing to do".into(),
        ),
        (Command::RemoveLegacyColumn, Legacy) => Step::WrongPhase(
            "phase is legacy: the keys are still only in the column; run `keyrack migrate` first"
                .into(),
        ),
        (Command::Revert, Dual | NewOnly) => Step::Run { target: Legacy },
        (Command::Revert, Legacy) => {
            Step::AlreadyDone("phase is already legacy; nothing to revert".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in [Phase::Legacy, Phase::Dual, Phase::NewOnly] {
            assert_eq!(Phase::parse(p.as_str()), Some(p));
        }
        assert_eq!(Phase::parse("other"), None);
    }

    #[test]
    fn transition_table() {
        use Phase::*;
        assert_eq!(plan(Command::Migrate, Legacy), Step::Run { target: Dual });
        assert_eq!(plan(Command::Migrate, Dual), Step::Run { target: Dual });
        assert!(matches!(
            plan(Command::Migrate, NewOnly),
            Step::AlreadyDone(_)
        ));
        assert_eq!(
            plan(Command::RemoveLegacyColumn, Dual),
            Step::Run { target: NewOnly }
        );
        assert!(matches!(
            plan(Command::RemoveLegacyColumn, NewOnly),
            Step::AlreadyDone(_)
        ));
        match plan(Command::RemoveLegacyColumn, Legacy) {
            Step::WrongPhase(m) => assert!(m.contains("keyrack migrate")),
            other => panic!("{other:?}"),
        }
        assert_eq!(plan(Command::Revert, Dual), Step::Run { target: Legacy });
        assert_eq!(plan(Command::Revert, NewOnly), Step::Run { target: Legacy });
        assert!(matches!(
            plan(Command::Revert, Legacy),
            Step::AlreadyDone(_)
        ));
    }

    /// `has_column` and `uses_table` agree with what the phase commands do to the two stores.
    #[test]
    fn column_and_table_by_phase() {
        for p in [Phase::Legacy, Phase::Dual, Phase::NewOnly] {
            assert!(p.has_column() || p.uses_table(), "{p} keeps keys somewhere");
            // migrate copies the column into the table; with no column it has nothing to do.
            match plan(Command::Migrate, p) {
                Step::Run { target } => {
                    assert!(p.has_column(), "{p}");
                    assert!(target.has_column() && target.uses_table(), "{p}");
                }
                Step::AlreadyDone(_) => assert!(!p.has_column(), "{p}"),
                Step::WrongPhase(_) => panic!("migrate runs from every phase but new_only"),
            }
            // remove-legacy-column compares both stores, then drops the column.
            match plan(Command::RemoveLegacyColumn, p) {
                Step::Run { target } => {
                    assert!(p.has_column() && p.uses_table(), "{p}");
                    assert!(!target.has_column() && target.uses_table(), "{p}");
                }
                Step::AlreadyDone(_) => assert!(!p.has_column(), "{p}"),
                Step::WrongPhase(_) => assert!(!p.uses_table(), "{p}"),
            }
            // revert goes back to the column alone.
            match plan(Command::Revert, p) {
                Step::Run { target } => {
                    assert!(p.uses_table(), "{p}");
                    assert!(target.has_column() && !target.uses_table(), "{p}");
                }
                Step::AlreadyDone(_) => assert!(!p.uses_table(), "{p}"),
                Step::WrongPhase(_) => panic!("revert runs from every phase but legacy"),
            }
        }
    }
}
