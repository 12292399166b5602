//! How the SQLite store reaches its file: one writer thread that commits
//! writes in groups, and reader connections used in place.
//!
//! Why not sqlx here: sqlx runs each SQLite connection on a thread of its
//! own and hands it every statement and every row over a channel, so a flow
//! of a dozen statements cost a dozen thread hand-offs; on a small machine
//! those context switches were most of the gateway's CPU. Here a write is
//! one hand-off (to the writer thread) and a read none.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use handset_core::store::StoreError;
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags, Row, Statement, ToSql};
use tokio::sync::oneshot;

/// Where the database lives, from a `sqlite:` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    File(PathBuf),
    /// `sqlite::memory:`: one connection (the writer's) holds the whole database.
    Memory,
}

impl Location {
    /// `sqlite://PATH`, `sqlite:PATH` or `sqlite::memory:`, with an optional
    /// `?mode=rwc` (the default: created if missing) or `?mode=memory`.
    pub(crate) fn of_url(url: &str) -> Result<Location, String> {
        let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url);
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut memory = path == ":memory:";
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair {
                "mode=memory" => memory = true,
                "mode=rwc" => {}
                other => return Err(format!("unsupported SQLite URL option {other:?} (use mode=rwc or mode=memory)")),
            }
        }
        if memory {
            return Ok(Location::Memory);
        }
        if path.is_empty() {
            return Err("a SQLite URL needs a file path: sqlite://PATH".into());
        }
        Ok(Location::File(PathBuf::from(path)))
    }
}

/// Waits for another process's write lock (replicas, the CLI) instead of failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// The most writes committed together.
const MAX_GROUP: usize = 64;
/// While writes arrive together (the last group held more than one), the
/// writer waits this long after the first of a group for others before it
/// commits. A commit writes every page it changed to the log, about ten
/// per write when groups are of one or two: fewer, larger groups write less
/// and meet fewer of the stalls of the log's file while the checkpointer
/// syncs it. Measured on the benchmark (SQLite, 16 in flight): p99 47-56 ms
/// to 31-34 ms at the same rate, for about 1 ms more at the median when
/// half loaded (1 ms of waiting cut the rate by a fifth). A lone write, on
/// a quiet server, never waits.
const GATHER: Duration = Duration::from_micros(300);
/// Prepared statements kept per connection (handset runs about 40).
const STATEMENT_CACHE: usize = 64;

fn open(location: &Location, read_only: bool) -> rusqlite::Result<Connection> {
    let conn = match location {
        Location::Memory => Connection::open_in_memory()?,
        Location::File(path) => {
            // Readers open only a file the writer created.
            let create = if read_only { OpenFlags::empty() } else { OpenFlags::SQLITE_OPEN_CREATE };
            Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | create,
            )?
        }
    };
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    if read_only {
        conn.pragma_update(None, "query_only", "ON")?;
    } else {
        // WAL (kept in the file): readers run beside the writer.
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))?;
    }
    // NORMAL: a power loss can lose the last commits, never corrupt the file.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

pub(crate) fn db(error: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(failure, message) = &error
        && matches!(
            failure.extended_code,
            rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
        )
    {
        return StoreError::Conflict(message.clone().unwrap_or_else(|| failure.to_string()));
    }
    StoreError::Database(Box::new(error))
}

/// One write, run by the writer thread inside the group's transaction.
trait Job: Send {
    /// Runs the statements; false when they failed (they are rolled back).
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller once the group's commit is known.
    fn answer(self: Box<Self>, committed: Result<(), &rusqlite::Error>);
}

struct Call<T, F> {
    work: Option<F>,
    outcome: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Job for Call<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let Some(work) = self.work.take() else { return false };
        let outcome = work(conn);
        let ok = outcome.is_ok();
        self.outcome = Some(outcome);
        ok
    }

    fn answer(self: Box<Self>, committed: Result<(), &rusqlite::Error>) {
        let answer = match (self.outcome, committed) {
            (Some(Err(error)), _) => Err(error),
            (Some(Ok(value)), Ok(())) => Ok(value),
            (_, Err(error)) => Err(StoreError::Database(format!("SQLite commit failed: {error}").into())),
            (None, Ok(())) => Err(StoreError::Database("the write stopped with a panic".into())),
        };
        // The caller may have gone (its request was cancelled); the write stands.
        let _ = self.reply.send(answer);
    }
}

/// The SQLite database: the writer thread's queue and the readers.
pub(crate) struct Engine {
    location: Location,
    /// Closing it (dropping the engine) ends the writer thread.
    jobs: mpsc::Sender<Box<dyn Job>>,
    /// Idle reader connections; `None` in memory (reads go to the writer).
    readers: Option<Arc<Mutex<Vec<Connection>>>>,
    max_idle_readers: usize,
}

impl Engine {
    /// Starts the writer thread but opens nothing yet: the writer connects
    /// at the first write and readers at the first reads, so a file that
    /// cannot be opened makes `/ready` answer 503 instead of stopping the process.
    pub(crate) fn new(location: Location, max_readers: usize) -> Result<Engine, StoreError> {
        let (jobs, queue) = mpsc::channel();
        let writer_location = location.clone();
        std::thread::Builder::new()
            .name("handset-sqlite-writer".into())
            .spawn(move || run_writer(&writer_location, &queue))
            .map_err(|e| StoreError::Database(Box::new(e)))?;
        let readers = match location {
            Location::Memory => None,
            Location::File(_) => Some(Arc::new(Mutex::new(Vec::new()))),
        };
        Ok(Engine { location, jobs, readers, max_idle_readers: max_readers.max(1) })
    }

    pub(crate) fn location(&self) -> &Location {
        &self.location
    }

    /// Idle reader connections and the most kept idle.
    pub(crate) fn reader_usage(&self) -> (u32, u32) {
        let idle = self.readers.as_ref().map_or(0, |r| r.lock().map_or(0, |pool| pool.len()));
        (u32::try_from(idle).unwrap_or(u32::MAX), u32::try_from(self.max_idle_readers).unwrap_or(u32::MAX))
    }

    /// Runs `work` on the writer thread inside a transaction it shares with
    /// the other writes queued meanwhile (one commit for the group). Each
    /// write runs in a savepoint: if it fails, only its own statements are
    /// undone. The answer comes after the commit, so a caller that reads
    /// next sees its write. Dropping the future does not cancel the write.
    pub(crate) async fn write<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Call { work: Some(work), outcome: None, reply });
        if self.jobs.send(job).is_err() {
            return Err(StoreError::Database("the SQLite writer has stopped".into()));
        }
        answer.await.map_err(|_| StoreError::Database("the SQLite writer stopped before answering".into()))?
    }

    /// Runs `work` on a reader connection, here on the calling thread: a
    /// read by key takes microseconds, less than handing it to another
    /// thread. In memory, reads go through the writer.
    pub(crate) async fn read<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let Some(readers) = &self.readers else { return self.write(work).await };
        read_on(readers, &self.location, self.max_idle_readers, work)
    }

    /// As `read`, on a blocking thread: for scans that may take long (the
    /// funnel over a range of days), which must not hold up the runtime.
    pub(crate) async fn read_apart<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let Some(readers) = &self.readers else { return self.write(work).await };
        let (readers, location, max_idle) = (readers.clone(), self.location.clone(), self.max_idle_readers);
        tokio::task::spawn_blocking(move || read_on(&readers, &location, max_idle, work))
            .await
            .map_err(|e| StoreError::Database(Box::new(e)))?
    }
}

/// Runs `work` on an idle reader connection (or a new one), then keeps it
/// idle unless `max_idle` already are.
fn read_on<T>(
    readers: &Mutex<Vec<Connection>>,
    location: &Location,
    max_idle: usize,
    work: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let idle = readers.lock().ok().and_then(|mut pool| pool.pop());
    let conn = match idle {
        Some(conn) => conn,
        None => open(location, true).map_err(db)?,
    };
    let outcome = work(&conn);
    if let Ok(mut pool) = readers.lock()
        && pool.len() < max_idle
    {
        pool.push(conn);
    }
    outcome
}

/// The WAL pages after which the writer checkpoints by itself: only when
/// the checkpointer thread has fallen that far behind (SQLite's default is 1000).
const WRITER_CHECKPOINT_PAGES: i64 = 10_000;
/// The least time between two checkpoints by the checkpointer thread.
const CHECKPOINT_PAUSE: Duration = Duration::from_millis(100);

/// The writer thread: takes the queued writes in groups, one transaction
/// (and one commit) per group. A connection that cannot be opened fails the
/// waiting writes and is tried again for the next ones.
fn run_writer(location: &Location, queue: &mpsc::Receiver<Box<dyn Job>>) {
    let mut conn: Option<Connection> = None;
    // Wakes the checkpointer after commits (one pending signal is enough).
    let mut committed: Option<mpsc::SyncSender<()>> = None;
    let mut busy = false;
    while let Ok(first) = queue.recv() {
        let gathered_until = Instant::now() + if busy { GATHER } else { Duration::ZERO };
        let mut group = vec![first];
        // A zero wait still takes what is already queued.
        while group.len() < MAX_GROUP {
            match queue.recv_timeout(gathered_until.saturating_duration_since(Instant::now())) {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        busy = group.len() > 1;
        if conn.is_none() {
            match open_writer(location) {
                Ok((opened, checkpointer)) => (conn, committed) = (Some(opened), checkpointer),
                Err(error) => {
                    tracing::warn!(%error, "cannot open the SQLite database");
                    group.into_iter().for_each(|job| job.answer(Err(&error)));
                    continue;
                }
            }
        }
        let Some(c) = conn.as_ref() else { continue };
        if let Err(error) = commit_group(c, &mut group) {
            tracing::warn!(%error, "a SQLite write group failed");
            // Whatever was open is undone; the next group starts clean.
            let _ = c.execute_batch("ROLLBACK");
            group.into_iter().for_each(|job| job.answer(Err(&error)));
            continue;
        }
        group.into_iter().for_each(|job| job.answer(Ok(())));
        if let Some(wake) = &committed {
            let _ = wake.try_send(());
        }
    }
}

/// The writer's connection and, for a file, the checkpointer thread it wakes.
///
/// A checkpoint copies the WAL into the database file and syncs both; run by
/// the writer (SQLite's default, every 1000 pages) it stalls every queued
/// write behind the disk. Run by a thread of its own (`PASSIVE`: it never
/// blocks the writer or readers), the writer only appends to the WAL.
fn open_writer(location: &Location) -> rusqlite::Result<(Connection, Option<mpsc::SyncSender<()>>)> {
    let conn = open(location, false)?;
    let Location::File(_) = location else { return Ok((conn, None)) };
    conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES)?;
    let checkpointer = open(location, false)?;
    let (wake, woken) = mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new().name("handset-sqlite-checkpoint".into()).spawn(move || {
        // Ends when the writer (the only sender) is gone.
        while woken.recv().is_ok() {
            if let Err(error) = checkpointer.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::warn!(%error, "SQLite checkpoint failed; the writer checkpoints by itself meanwhile");
            }
            std::thread::sleep(CHECKPOINT_PAUSE);
        }
    });
    match spawned {
        Ok(_) => Ok((conn, Some(wake))),
        Err(error) => {
            // Without the thread, the writer checkpoints as SQLite does by default.
            tracing::warn!(%error, "no SQLite checkpoint thread; the writer checkpoints");
            conn.pragma_update(None, "wal_autocheckpoint", 1000)?;
            Ok((conn, None))
        }
    }
}

fn commit_group(conn: &Connection, group: &mut [Box<dyn Job>]) -> rusqlite::Result<()> {
    // IMMEDIATE takes the write lock now, so a statement never meets
    // another process's writer halfway (busy_timeout waits for it here).
    conn.execute_batch("BEGIN IMMEDIATE")?;
    for job in group.iter_mut() {
        conn.execute_batch("SAVEPOINT job")?;
        let kept = std::panic::catch_unwind(AssertUnwindSafe(|| job.run(conn))).unwrap_or_else(|_| {
            tracing::error!("a SQLite write panicked; its statements are rolled back");
            false
        });
        if !kept {
            conn.execute_batch("ROLLBACK TO job")?;
        }
        conn.execute_batch("RELEASE job")?;
    }
    conn.execute_batch("COMMIT")
}

/// Binds `args` to `$n` parameters by number, as sqlx does (SQLite itself
/// numbers named parameters in order of appearance, which is not `n`).
fn bind(stmt: &mut Statement<'_>, args: &[&dyn ToSql]) -> rusqlite::Result<()> {
    for index in 1..=stmt.parameter_count() {
        let number = stmt
            .parameter_name(index)
            .and_then(|name| name.strip_prefix('$'))
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(index);
        let value =
            args.get(number.wrapping_sub(1)).ok_or(rusqlite::Error::InvalidParameterCount(number, args.len()))?;
        stmt.raw_bind_parameter(index, value)?;
    }
    Ok(())
}

/// Runs a statement; the number of rows it changed.
pub(crate) fn execute(conn: &Connection, sql: &str, args: &[&dyn ToSql]) -> Result<usize, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(db)?;
    bind(&mut stmt, args).map_err(db)?;
    stmt.raw_execute().map_err(db)
}

/// Runs a query (or a statement with `RETURNING`); every row read by `read`.
pub(crate) fn query<T>(
    conn: &Connection,
    sql: &str,
    args: &[&dyn ToSql],
    mut read: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(db)?;
    bind(&mut stmt, args).map_err(db)?;
    let mut rows = stmt.raw_query();
    let mut found = Vec::new();
    while let Some(row) = rows.next().map_err(db)? {
        found.push(read(row).map_err(db)?);
    }
    Ok(found)
}

/// The first row of a query, if any (a `RETURNING` statement runs to its end).
pub(crate) fn query_row<T>(
    conn: &Connection,
    sql: &str,
    args: &[&dyn ToSql],
    read: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Option<T>, StoreError> {
    Ok(query(conn, sql, args, read)?.into_iter().next())
}

/// A timestamp in sqlx's SQLite form (RFC 3339, `+00:00`, fraction in groups
/// of three digits), so rows written before and after compare as text.
pub(crate) struct Ts(pub(crate) DateTime<Utc>);

impl ToSql for Ts {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.0.to_rfc3339_opts(SecondsFormat::AutoSi, false)))
    }
}

impl FromSql for Ts {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let text = value.as_str()?;
        DateTime::parse_from_rfc3339(text)
            .map(|t| Ts(t.with_timezone(&Utc)))
            .map_err(|e| FromSqlError::Other(Box::new(e)))
    }
}

pub(crate) fn ts(t: DateTime<Utc>) -> Ts {
    Ts(t)
}

pub(crate) fn opt_ts(t: Option<DateTime<Utc>>) -> Option<Ts> {
    t.map(Ts)
}

pub(crate) fn get_ts(row: &Row<'_>, index: usize) -> rusqlite::Result<DateTime<Utc>> {
    row.get::<_, Ts>(index).map(|t| t.0)
}

pub(crate) fn get_opt_ts(row: &Row<'_>, index: usize) -> rusqlite::Result<Option<DateTime<Utc>>> {
    row.get::<_, Option<Ts>>(index).map(|t| t.map(|t| t.0))
}

/// A JSON column, stored as text (as sqlx's `Json` did).
pub(crate) fn get_json<T: serde::de::DeserializeOwned>(row: &Row<'_>, index: usize) -> rusqlite::Result<T> {
    let text: String = row.get(index)?;
    serde_json::from_str(&text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, Box::new(e)))
}

pub(crate) fn get_opt_json<T: serde::de::DeserializeOwned>(row: &Row<'_>, index: usize) -> rusqlite::Result<Option<T>> {
    let text: Option<String> = row.get(index)?;
    text.map(|text| {
        serde_json::from_str(&text)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, Box::new(e)))
    })
    .transpose()
}

pub(crate) fn json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Database(Box::new(e)))
}

#[cfg(test)]
mod tests {
    /// The writer's savepoints keep their statement journals in memory up
    /// to 4 MiB (`.cargo/config.toml` builds SQLite so): with SQLite's 64 KiB
    /// a start's journal went to a temporary file inside the commit.
    #[test]
    fn statement_journals_stay_in_memory_up_to_four_mib() {
        let conn = rusqlite::Connection::open_in_memory().expect("open");
        let mut options = conn.prepare("PRAGMA compile_options").expect("prepare");
        let options: Vec<String> =
            options.query_map([], |row| row.get(0)).expect("query").collect::<Result<_, _>>().expect("read");
        assert!(options.iter().any(|o| o == "STMTJRNL_SPILL=4194304"), "built without it: {options:?}");
    }
}
