//! The status report of `keyrack status` and GET /admin/status: phase, schema version and the
//! counts docs/commands.md lists under `keyrack status`, every stored value decrypted to check it.

use serde_json::{json, Value};

use crate::phase::Phase;
use crate::store::events;
use crate::store::evidence::Evidence;
use crate::store::phases::Survey;
use crate::store::{rfc3339, Store, StoreError};

#[derive(Debug)]
pub(crate) struct Status {
    pub(crate) phase: Phase,
    pub(crate) schema_version: i64,
    pub(crate) survey: Survey,
    /// Evidence of legacy use since the phase last became dual.
    pub(crate) evidence: Evidence,
    /// The audit trail's size.
    pub(crate) events: events::Size,
}

impl Status {
    /// Reads everything in one read transaction, so the counts agree with each other.
    pub(crate) fn collect(store: &mut Store) -> Result<Status, StoreError> {
        let (phase, schema_version, survey, evidence, events) = store.survey()?;
        Ok(Status {
            phase,
            schema_version,
            survey,
            evidence,
            events,
        })
    }

    pub(crate) fn to_json(&self) -> Value {
        let s = &self.survey;
        json!({
            "phase": self.phase.as_str(),
            "version": crate::open::VERSION,
            "schema_version": self.schema_version,
            "users": s.users,
            "column_keys": s.column_keys,
            "table_keys": s.table_keys,
            "unmigrated": s.unmigrated.count,
            "conflicts": s.conflicts.count,
            "undecryptable": s.undecryptable.count,
            "backfill_unfinished": s.backfill_left > 0,
            "backfill_users_left": s.backfill_left,
            "legacy_reads": self.evidence.legacy_reads,
            "last_legacy_read_at": self.evidence.last_legacy_read_at.map(rfc3339),
            "foreign_column_writes": self.evidence.foreign_column_writes,
            "last_foreign_column_write_at": self.evidence.last_foreign_column_write_at.map(rfc3339),
            "events": {"rows": self.events.rows, "bytes": self.events.bytes},
        })
    }

    pub(crate) fn to_text(&self) -> String {
        let s = &self.survey;
        let mut out = format!(
            "phase            {}\nversion          {}\nschema version   {}\nusers            {}\ncolumn keys      {}\n\
             table keys       {}\nunmigrated       {}\nconflicts        {}\nundecryptable    {}\n",
            self.phase,
            crate::open::VERSION,
            self.schema_version,
            s.users,
            s.column_keys,
            s.table_keys,
            s.unmigrated.count,
            s.conflicts.count,
            s.undecryptable.count
        );
        out.push_str(&self.evidence_text());
        out.push_str(&format!(
            "events           {} rows, {} bytes\n",
            self.events.rows, self.events.bytes
        ));
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

impl Status {
    /// The four lines of legacy-use evidence, as `status` and `remove-legacy-column` print them.
    pub(crate) fn evidence_text(&self) -> String {
        let e = &self.evidence;
        let at = |t: Option<i64>| t.map_or("never".to_owned(), rfc3339);
        format!(
            "legacy reads     {}\nlast legacy read {}\nforeign column writes     {}\nlast foreign column write {}\n",
            e.legacy_reads,
            at(e.last_legacy_read_at),
            e.foreign_column_writes,
            at(e.last_foreign_column_write_at)
        )
    }
}

pub(crate) fn join_ids(ids: &[i64]) -> String {
    ids.iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
