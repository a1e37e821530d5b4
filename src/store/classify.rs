//! The one rule that compares a user's OpenAI key in the two stores in phase dual: the legacy
//! column's value and the default OpenAI row of `api_keys`. Every place that must know whether
//! a column value is migrated, newer, conflicting or unreadable asks `classify`: a read or a
//! write that moves the key (`store::keys`), the backfill of `migrate`, the survey behind
//! `status`, the last re-check of `remove-legacy-column` and the plan of `revert`.
//!
//! "The column wins" only for a user still pending a backfill from phase legacy (listed in
//! `legacy_backfill` by `migrate` run from legacy, until the backfill or a request of keyrack has
//! settled that user). For everyone else the table is the truth, and a column value that differs
//! from it was written by something other than keyrack: a conflict, reported, never resolved.

use crate::domain::Secret;

/// What the two stores hold for one user, and so what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The column is empty: nothing to move; the table's key, if any, is the truth.
    NoColumn,
    /// The column holds the table's key (the same sealed text, or the same key).
    InStep,
    /// The column holds a key the table lacks: it is moved in (it becomes the default).
    Unmigrated,
    /// A user pending backfill whose column holds another key than the table: the column's is
    /// the newer one. It becomes the default; the table's old default stays as an extra key.
    ColumnWins,
    /// Both open and differ, and the table's key is the truth: reported, both kept.
    Conflict,
    /// The column's value does not open (tampered, an unknown key, not keyrack's format): it
    /// stays where it is, untouched, and is reported.
    ColumnUnreadable,
    /// The column's value opens but the table's default does not (and the table is the truth).
    TableUnreadable,
}

impl Verdict {
    /// True when the column holds a key the table should get (`migrate` moves it).
    pub(crate) fn needs_move(self) -> bool {
        matches!(self, Verdict::Unmigrated | Verdict::ColumnWins)
    }
}

/// Classifies one user. `column` and `table` are sealed texts; `pending` says whether the user
/// is still pending a backfill from phase legacy; `open` decrypts a sealed text (bound to the
/// user and `openai`), `None` when it does not open. Equal sealed texts are never decrypted.
pub(crate) fn classify(
    column: Option<&str>,
    table: Option<&str>,
    pending: bool,
    open: impl Fn(&str) -> Option<Secret>,
) -> Verdict {
    let Some(column) = column else {
        return Verdict::NoColumn;
    };
    if table == Some(column) {
        return Verdict::InStep;
    }
    let Some(in_column) = open(column) else {
        return Verdict::ColumnUnreadable;
    };
    let Some(table) = table else {
        return Verdict::Unmigrated;
    };
    match open(table) {
        Some(in_table) if in_table.expose() == in_column.expose() => Verdict::InStep,
        _ if pending => Verdict::ColumnWins,
        Some(_) => Verdict::Conflict,
        None => Verdict::TableUnreadable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sealed texts of the tests: `k:<key>` opens to `<key>`, `x:…` does not open.
    fn open(s: &str) -> Option<Secret> {
        s.strip_prefix("k:").map(|k| Secret::new(k.to_owned()))
    }

    #[test]
    fn every_combination() {
        use Verdict::*;
        // (column, table, pending) -> verdict, for each kind of value in each store.
        let column_values = [None, Some("k:a"), Some("k:a2"), Some("x:bad")];
        let table_values = [None, Some("k:a"), Some("k:b"), Some("x:bad2")];
        for column in column_values {
            for table in table_values {
                for pending in [false, true] {
                    let got = classify(column, table, pending, open);
                    let want = match (column, table) {
                        (None, _) => NoColumn,
                        (Some(c), Some(t)) if c == t => InStep,
                        (Some("x:bad"), _) => ColumnUnreadable,
                        (Some(_), None) => Unmigrated,
                        // "k:a2" is sealed differently from "k:a" but opens to another key.
                        (Some(c), Some(t))
                            if open(c).map(|s| s.expose().to_owned())
                                == open(t).map(|s| s.expose().to_owned()) =>
                        {
                            InStep
                        }
                        (Some(_), Some(_)) if pending => ColumnWins,
                        (Some(_), Some("x:bad2")) => TableUnreadable,
                        (Some(_), Some(_)) => Conflict,
                    };
                    assert_eq!(
                        got, want,
                        "column {column:?}, table {table:?}, pending {pending}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_same_key_sealed_twice_is_in_step_for_everyone() {
        // Two sealed texts of one key (a fresh nonce each) are the same key, pending or not.
        let open_both = |s: &str| match s {
            "n1" | "n2" => Some(Secret::new("sk-same".to_owned())),
            _ => None,
        };
        for pending in [false, true] {
            assert_eq!(
                classify(Some("n1"), Some("n2"), pending, open_both),
                Verdict::InStep
            );
        }
    }

    #[test]
    fn the_column_wins_only_for_pending_users() {
        assert_eq!(
            classify(Some("k:new"), Some("k:old"), true, open),
            Verdict::ColumnWins
        );
        assert_eq!(
            classify(Some("k:new"), Some("k:old"), false, open),
            Verdict::Conflict
        );
        // An unreadable column value never wins, and is never overwritten by a move.
        assert_eq!(
            classify(Some("x:?"), Some("k:old"), true, open),
            Verdict::ColumnUnreadable
        );
        // Equal sealed texts are not even opened.
        assert_eq!(
            classify(Some("x:same"), Some("x:same"), false, open),
            Verdict::InStep
        );
    }

    #[test]
    fn needs_move() {
        assert!(Verdict::Unmigrated.needs_move() && Verdict::ColumnWins.needs_move());
        for v in [
            Verdict::NoColumn,
            Verdict::InStep,
            Verdict::Conflict,
            Verdict::ColumnUnreadable,
            Verdict::TableUnreadable,
        ] {
            assert!(!v.needs_move());
        }
    }
}
