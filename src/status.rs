//! The status report of `keyrack status` and GET /admin/status: phase, schema version and the
//! counts the README lists under `keyrack status`, every stored value decrypted to check it.

use serde_json::{json, Value};

use crate::phase::Phase;
use crate::store::phases::Survey;
use crate::store::{Store, StoreError};

#[derive(Debug)]
pub(crate) struct Status {
    pub(crate) phase: Phase,
    pub(crate) schema_version: i64,
    pub(crate) survey: Survey,
}

impl Status {
    /// Reads everything in one read transaction, so the counts agree with each other.
    pub(crate) fn collect(store: &mut Store) -> Result<Status, StoreError> {
        let (phase, schema_version, survey) = store.survey()?;
        Ok(Status {
            phase,
            schema_version,
            survey,
        })
    }

    pub(crate) fn to_json(&self) -> Value {
        let s = &self.survey;
        json!({
            "phase": self.phase.as_str(),
            "schema_version": self.schema_version,
            "users": s.users,
            "column_keys": s.column_keys,
            "table_keys": s.table_keys,
            "unmigrated": s.unmigrated.count,
            "conflicts": s.conflicts.count,
            "undecryptable": s.undecryptable.count,
            "backfill_unfinished": s.backfill_left > 0,
            "backfill_users_left": s.backfill_left,
        })
    }

    pub(crate) fn to_text(&self) -> String {
        let s = &self.survey;
        let mut out = format!(
            "phase            {}\nschema version   {}\nusers            {}\ncolumn keys      {}\n\
             table keys       {}\nunmigrated       {}\nconflicts        {}\nundecryptable    {}\n",
            self.phase,
            self.schema_version,
            s.users,
            s.column_keys,
            s.table_keys,
            s.unmigrated.count,
            s.conflicts.count,
            s.undecryptable.count
        );
        if s.backfill_left > 0 {
            out.push_str(&format!(
                "backfill from legacy unfinished: {} users left (their legacy column value wins until `keyrack migrate` reaches them)\n",
                s.backfill_left
            ));
        }
        for line in s.problem_lines() {
            out.push_str(&line);
            out.push('\n');
        }
        out
    }
}

pub(crate) fn join_ids(ids: &[i64]) -> String {
    ids.iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
