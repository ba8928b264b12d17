//! The subscription store: which devices are claimed and activated, which device keys may
//! connect, the service profiles, and every reading stored exactly once.
//!
//! SQLite in WAL mode with `synchronous=FULL`, so a committed transaction survives a power cut:
//! the core acknowledges a reading only after the transaction holding it committed. The writer
//! runs on its own OS thread (`spawn_writer`): it takes readings off a bounded channel in
//! batches, commits each batch in one transaction with `INSERT OR IGNORE` on
//! `(subscription_id, seq)`, and only then hands the sequence numbers back to the engine.
//!
//! ```text
//!  engine ──PendingReading (bounded)──▶ writer thread ──BEGIN; INSERT OR IGNORE ×n; COMMIT──▶ SQLite
//!  engine ◀──Committed (seqs to ack)── writer thread
//! ```
//!
//! Schema version 5 is in [`SCHEMA`]: `devices` (claimed factory identities, their owner, plan
//! and release), `profiles` (versioned service parameters, the gateway policy: which gateways
//! their devices may use, whether direct access is allowed, added by version 4; and the admission
//! quota the gateways hold its sessions to, added by version 5), `subscriptions` (one per
//! provisioning of a device under an owner; at most one not revoked per serial, enforced by a
//! partial unique index) and `readings` (keyed by
//! subscription, so a new owner's subscription never sees the old owner's readings). Every
//! lifecycle change (`store/lifecycle.rs`) is one `BEGIN IMMEDIATE` transaction that also appends its
//! audit record, so a change is never stored without its record and two concurrent changes of
//! one device are serialised: the second one sees the first one's result.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use relay_protocol::payload::ReadingSeq;
use relay_protocol::session::{PublicKey, KEY_LEN};
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use tokio::sync::mpsc;

use crate::disk::DiskGate;
use crate::manifest::RowError;
use crate::metrics::Metrics;

mod lifecycle;

pub(crate) use lifecycle::FactoryEntry;
pub use lifecycle::{
    Actor, DeviceView, DeviceViewPage, Profile, ProfileQuota, ProfileSettings, ReadingRecord,
    MAX_REPORT_INTERVAL_SECS,
};

/// The schema this code writes, kept in `PRAGMA user_version`. Version 1 had no audit log,
/// version 2 no device lifecycle, version 3 no gateway policy on profiles, version 4 no quota on
/// profiles.
pub const SCHEMA_VERSION: i64 = 5;

/// The owner of subscriptions provisioned statically (`init`) and of those a version 2 store
/// held: the operator running the core.
pub const LEGACY_OWNER: &str = "operator";

/// The profile every store has, and devices without a profile of their own use.
pub const DEFAULT_PROFILE: &str = "default";

/// Schema version 5, created whole in a new store. A profile's quota columns are all NULL (the
/// core's `[admission]` default applies) or all set (0 in one: unlimited for that field).
pub const SCHEMA: &str = "
CREATE TABLE profiles (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL CHECK (version >= 1),
    report_interval_secs INTEGER NOT NULL,
    report_bytes INTEGER NOT NULL,
    threshold INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    gateways TEXT NOT NULL DEFAULT '',
    allow_direct INTEGER NOT NULL DEFAULT 1 CHECK (allow_direct IN (0, 1)),
    quota_frames INTEGER,
    quota_bytes INTEGER,
    quota_interval_secs INTEGER
);
CREATE TABLE devices (
    serial TEXT PRIMARY KEY,
    factory_key BLOB NOT NULL UNIQUE,
    model TEXT NOT NULL,
    owner TEXT NOT NULL,
    account TEXT,
    profile TEXT REFERENCES profiles(name),
    claimed_at_ms INTEGER NOT NULL,
    activated_at_ms INTEGER,
    transfer_to TEXT,
    released TEXT
);
CREATE INDEX devices_by_owner ON devices(owner, serial);
CREATE TABLE subscriptions (
    id INTEGER PRIMARY KEY,
    serial TEXT NOT NULL,
    owner TEXT NOT NULL,
    public_key BLOB NOT NULL UNIQUE,
    next_key BLOB UNIQUE,
    status TEXT NOT NULL CHECK (status IN ('active', 'suspended', 'revoked', 'quarantined')),
    created_at_ms INTEGER NOT NULL,
    key_since_ms INTEGER NOT NULL,
    rotate_requested INTEGER NOT NULL DEFAULT 0 CHECK (rotate_requested IN (0, 1)),
    config_version INTEGER,
    flag TEXT
);
CREATE UNIQUE INDEX subscriptions_one_live ON subscriptions(serial) WHERE status <> 'revoked';
CREATE INDEX subscriptions_by_serial ON subscriptions(serial, id);
CREATE INDEX subscriptions_by_owner ON subscriptions(owner, serial);
";

/// `readings`, unchanged since version 1.
const READINGS_SCHEMA: &str = "
CREATE TABLE readings (
    subscription_id INTEGER NOT NULL REFERENCES subscriptions(id),
    seq INTEGER NOT NULL,
    received_at_ms INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (subscription_id, seq)
) WITHOUT ROWID;
";

/// Version 1's `subscriptions` (serial UNIQUE, three statuses), for the migration tests.
#[cfg(test)]
const SCHEMA_V1: &str = "
CREATE TABLE subscriptions (
    id INTEGER PRIMARY KEY,
    serial TEXT NOT NULL UNIQUE,
    public_key BLOB NOT NULL UNIQUE,
    status TEXT NOT NULL CHECK (status IN ('active', 'suspended', 'revoked')),
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE readings (
    subscription_id INTEGER NOT NULL REFERENCES subscriptions(id),
    seq INTEGER NOT NULL,
    received_at_ms INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (subscription_id, seq)
) WITHOUT ROWID;
";

/// Version 2 -> 3: `subscriptions` is rebuilt (its serial was UNIQUE; SQLite cannot drop a
/// constraint) the way the SQLite manual's "12 steps" do it: new table, copy, drop, rename, with
/// foreign keys off and checked before the commit. Ids are kept, so the readings stay attached.
const MIGRATE_V2_V3: &str = "
CREATE TABLE subscriptions_v3 (
    id INTEGER PRIMARY KEY,
    serial TEXT NOT NULL,
    owner TEXT NOT NULL,
    public_key BLOB NOT NULL UNIQUE,
    next_key BLOB UNIQUE,
    status TEXT NOT NULL CHECK (status IN ('active', 'suspended', 'revoked', 'quarantined')),
    created_at_ms INTEGER NOT NULL,
    key_since_ms INTEGER NOT NULL,
    rotate_requested INTEGER NOT NULL DEFAULT 0 CHECK (rotate_requested IN (0, 1)),
    config_version INTEGER,
    flag TEXT
);
INSERT INTO subscriptions_v3 (id, serial, owner, public_key, status, created_at_ms, key_since_ms)
    SELECT id, serial, 'operator', public_key, status, created_at_ms, created_at_ms
    FROM subscriptions;
DROP TABLE subscriptions;
ALTER TABLE subscriptions_v3 RENAME TO subscriptions;
CREATE UNIQUE INDEX subscriptions_one_live ON subscriptions(serial) WHERE status <> 'revoked';
CREATE INDEX subscriptions_by_serial ON subscriptions(serial, id);
CREATE INDEX subscriptions_by_owner ON subscriptions(owner, serial);
CREATE TABLE profiles (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL CHECK (version >= 1),
    report_interval_secs INTEGER NOT NULL,
    report_bytes INTEGER NOT NULL,
    threshold INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
CREATE TABLE devices (
    serial TEXT PRIMARY KEY,
    factory_key BLOB NOT NULL UNIQUE,
    model TEXT NOT NULL,
    owner TEXT NOT NULL,
    account TEXT,
    profile TEXT REFERENCES profiles(name),
    claimed_at_ms INTEGER NOT NULL,
    activated_at_ms INTEGER,
    transfer_to TEXT,
    released TEXT
);
CREATE INDEX devices_by_owner ON devices(owner, serial);
";

/// Version 3 -> 4: the gateway policy on profiles. Existing profiles allow every gateway
/// (`gateways` empty: any) and direct access, so nothing that worked before is refused.
const MIGRATE_V3_V4: &str = "
ALTER TABLE profiles ADD COLUMN gateways TEXT NOT NULL DEFAULT '';
ALTER TABLE profiles ADD COLUMN allow_direct INTEGER NOT NULL DEFAULT 1
    CHECK (allow_direct IN (0, 1));
";

/// Version 4 -> 5: the admission quota on profiles. Existing profiles get none (NULL), so their
/// devices are held to the core's `[admission]` default.
const MIGRATE_V4_V5: &str = "
ALTER TABLE profiles ADD COLUMN quota_frames INTEGER;
ALTER TABLE profiles ADD COLUMN quota_bytes INTEGER;
ALTER TABLE profiles ADD COLUMN quota_interval_secs INTEGER;
";

/// The default profile as the migration creates it: version 1, a report every 60 s of 64 bytes,
/// no threshold.
const DEFAULT_PROFILE_ROW: &str = "INSERT INTO profiles
    (name, version, report_interval_secs, report_bytes, threshold, updated_at_ms)
    VALUES ('default', 1, 60, 64, 0, ?1)";

/// The audit log (schema version 2): append-only. The triggers make that a property of the
/// database, not only of this code: an UPDATE or DELETE on `audit` aborts.
const AUDIT_SCHEMA: &str = "
CREATE TABLE audit (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    role TEXT,
    action TEXT NOT NULL,
    target TEXT,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
";

/// The most rows one page of a listing returns.
pub const MAX_PAGE: u32 = 1000;

/// Why a store operation failed: the local side (disk, database file), or a caller naming
/// something that does not exist or asking for a change the lifecycle does not allow.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database was written by a newer version of this program.
    #[error("database schema version {found} is newer than {SCHEMA_VERSION}")]
    SchemaTooNew {
        /// `PRAGMA user_version` found.
        found: i64,
    },
    /// The database holds a row this code cannot read.
    #[error("corrupt row in {table}: {why}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What is wrong.
        why: String,
    },
    /// No subscription has that serial.
    #[error("no subscription with serial {0:?}")]
    UnknownSerial(String),
    /// The subscription is revoked, which is final.
    #[error("subscription {0:?} is revoked; revocation is final")]
    RevokedForGood(String),
    /// The journal mode could not be switched to WAL (for example on a read-only medium).
    #[error("journal mode is {0}, not wal")]
    NotWal(String),
    /// No device with that serial is visible to the caller (unknown, or another owner's).
    #[error("no device {0:?}")]
    UnknownDevice(String),
    /// No subscription has that id.
    #[error("no subscription {}", .0 .0)]
    UnknownSubscription(SubscriptionId),
    /// No profile has that name.
    #[error("no profile {0:?}")]
    UnknownProfile(String),
    /// A manifest, a plan or a release claim was refused: every bad row, nothing changed.
    #[error("{} bad row(s), nothing changed", .0.len())]
    BadRows(Vec<RowError>),
    /// The change contradicts the device's state (already released, no transfer pending, …).
    #[error("{0}")]
    Conflict(String),
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
    /// Provisioning: no owner claimed this factory identity.
    #[error("device {0:?} is not claimed")]
    NotClaimed(String),
    /// Provisioning: claimed, but no activation plan named it.
    #[error("device {0:?} is not activated")]
    NotActivated(String),
    /// Provisioning: its subscription is suspended.
    #[error("device {0:?} is suspended")]
    Suspended(String),
    /// Provisioning: it was released to another operator.
    #[error("device {0:?} was released to another operator")]
    Released(String),
    /// The key is already bound (a subscription key, a pending next key or a factory key).
    #[error("the key is already in use")]
    KeyInUse,
    /// Update phase 2: the key is not the subscription's pending next key.
    #[error("subscription {} has no pending next key equal to the one presented", .0 .0)]
    NextKeyMismatch(SubscriptionId),
}

/// A subscription's row id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriptionId(pub i64);

/// Whether a subscription's device may connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SubscriptionStatus {
    /// The device may open sessions.
    Active,
    /// Temporarily refused.
    Suspended,
    /// Refused for good.
    Revoked,
    /// Suspected of being cloned: refused until the device re-provisions with its factory
    /// identity (which makes it active again, with a new key).
    Quarantined,
}

impl SubscriptionStatus {
    /// The value in the `status` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Suspended => "suspended",
            Self::Revoked => "revoked",
            Self::Quarantined => "quarantined",
        }
    }
}

impl fmt::Display for SubscriptionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SubscriptionStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(Self::Active),
            "suspended" => Ok(Self::Suspended),
            "revoked" => Ok(Self::Revoked),
            "quarantined" => Ok(Self::Quarantined),
            other => Err(format!("unknown status {other:?}")),
        }
    }
}

/// One row of `subscriptions`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    /// Row id.
    pub id: SubscriptionId,
    /// The device's serial number.
    pub serial: String,
    /// The device's Noise static public key.
    pub public_key: PublicKey,
    /// Whether it may connect.
    pub status: SubscriptionStatus,
    /// When it was provisioned, ms since the Unix epoch.
    pub created_at_ms: i64,
}

/// One subscription as the admin API lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceSummary {
    /// The device's serial number.
    pub serial: String,
    /// Whether it may connect.
    #[serde(serialize_with = "serialize_status")]
    pub status: SubscriptionStatus,
    /// When it was provisioned, ms since the Unix epoch.
    pub created_at_ms: i64,
}

/// One page of subscriptions, by id.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DevicePage {
    /// Subscriptions in the store.
    pub total: u64,
    /// The page asked for.
    pub limit: u32,
    /// Rows skipped.
    pub offset: u64,
    /// The page.
    pub devices: Vec<DeviceSummary>,
}

/// A status change as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusChange {
    /// The subscription changed.
    pub id: SubscriptionId,
    /// Its status before.
    pub previous: SubscriptionStatus,
}

/// One lifecycle or refusal event, to be appended to the audit log.
#[derive(Clone, Debug)]
pub struct AuditEvent<'a> {
    /// Who: the token's name, `device`, `fraud-detector`, or `anonymous`.
    pub actor: &'a str,
    /// The token's role, when one was presented and valid.
    pub role: Option<&'a str>,
    /// What was asked (`suspend`, `list_devices`, …).
    pub action: &'a str,
    /// The device concerned.
    pub target: Option<&'a str>,
    /// `ok`, `unchanged`, `unauthorized`, `forbidden`, `not_found`, `conflict`, `bad_request`, …
    pub outcome: &'a str,
    /// Free text (never a secret).
    pub detail: &'a str,
}

/// One row of the audit log.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AuditRecord {
    /// Its position in the log.
    pub id: i64,
    /// When, ms since the Unix epoch.
    pub at_ms: i64,
    /// Who.
    pub actor: String,
    /// With which role.
    pub role: Option<String>,
    /// What.
    pub action: String,
    /// On which device.
    pub target: Option<String>,
    /// How it ended.
    pub outcome: String,
    /// Details.
    pub detail: String,
}

/// What the engine's subscription index needs from a row.
#[derive(Clone, Debug)]
pub(crate) struct IndexEntry {
    pub id: SubscriptionId,
    pub public_key: PublicKey,
    pub status: SubscriptionStatus,
    /// The device's serial number.
    pub serial: String,
    /// The owner the subscription was provisioned for.
    pub owner: String,
    /// The key proposed by a credential update in progress (phase 1 done).
    pub next_key: Option<PublicKey>,
    /// The device's profile ([`DEFAULT_PROFILE`] when it has none, or no device row).
    pub profile: String,
    /// The configuration version the device last reported or was last given.
    pub config_version: Option<u32>,
    /// An operator or the fraud detector asked for a credential update.
    pub rotate_requested: bool,
    /// When the current key was bound, ms since the Unix epoch.
    pub key_since_ms: i64,
    /// Why the fraud detector flagged it, if it did.
    pub flag: Option<String>,
}

/// A reading on its way to disk.
#[derive(Debug)]
pub(crate) struct PendingReading {
    /// The engine's handle for the subscription, handed back with the acknowledgement.
    pub slot: u32,
    pub subscription: SubscriptionId,
    pub seq: ReadingSeq,
    pub received_at_ms: i64,
    pub data: Vec<u8>,
}

/// Readings now durable (stored now or before): `(slot, seq)`, to be acknowledged.
#[derive(Debug)]
pub(crate) struct Committed {
    pub durable: Vec<(u32, ReadingSeq)>,
}

/// What the store holds now (`core-stub stats`): for an operator, and for the deployment smoke
/// test, which needs to know that every meter's readings arrived without a per-device metric.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StoreStats {
    /// When the figures were read, milliseconds since the Unix epoch (the clock of
    /// `last_reading_ms`).
    pub now_ms: i64,
    /// Subscriptions provisioned.
    pub subscriptions: u64,
    /// Of which active.
    pub active: u64,
    /// Subscriptions with at least one reading stored.
    pub with_readings: u64,
    /// Readings stored.
    pub readings: u64,
    /// Per subscription, by id.
    pub devices: Vec<SubscriptionReadings>,
}

/// One subscription's readings, in [`StoreStats`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct SubscriptionReadings {
    /// The device's serial number.
    pub serial: String,
    /// Its status.
    #[serde(serialize_with = "serialize_status")]
    pub status: SubscriptionStatus,
    /// Readings stored.
    pub readings: u64,
    /// When the newest one was stored, milliseconds since the Unix epoch.
    pub last_reading_ms: Option<i64>,
}

fn serialize_status<S: serde::Serializer>(
    status: &SubscriptionStatus,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(status.as_str())
}

/// An open store.
pub struct Store {
    conn: Connection,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.conn.path())
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn key_from_blob(blob: &[u8]) -> Result<PublicKey, StoreError> {
    <[u8; KEY_LEN]>::try_from(blob)
        .map(PublicKey)
        .map_err(|_| StoreError::Corrupt {
            table: "subscriptions",
            why: format!("public_key of {} bytes", blob.len()),
        })
}

fn status_from_text(s: &str) -> Result<SubscriptionStatus, StoreError> {
    s.parse().map_err(|why| StoreError::Corrupt {
        table: "subscriptions",
        why,
    })
}

/// The subscription a serial names in the calls that predate the lifecycle (suspend, resume,
/// revoke, show, `readings_of`): its live one, else its newest.
const CURRENT_BY_SERIAL: &str = "SELECT id, status FROM subscriptions WHERE serial = ?1
    ORDER BY status = 'revoked', id DESC LIMIT 1";

impl Store {
    /// Opens (creating if needed) the database at `path`: WAL, `synchronous=FULL`, foreign keys
    /// on, schema created or migrated to [`SCHEMA_VERSION`].
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NotWal(mode));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        let mut store = Self { conn };
        // Foreign keys stay off while the schema migrates (a table rebuild; the pragma cannot
        // change inside a transaction); the migration checks them itself before its commit.
        store.conn.pragma_update(None, "foreign_keys", false)?;
        store.migrate()?;
        store.conn.pragma_update(None, "foreign_keys", true)?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        match version {
            0 => {
                tx.execute_batch(SCHEMA)?;
                tx.execute_batch(READINGS_SCHEMA)?;
                tx.execute_batch(AUDIT_SCHEMA)?;
                tx.execute(DEFAULT_PROFILE_ROW, [now_ms()])?;
            }
            1..=4 => {
                if version == 1 {
                    tx.execute_batch(AUDIT_SCHEMA)?;
                }
                if version < 3 {
                    tx.execute_batch(MIGRATE_V2_V3)?;
                    tx.execute(DEFAULT_PROFILE_ROW, [now_ms()])?;
                }
                if version < 4 {
                    tx.execute_batch(MIGRATE_V3_V4)?;
                }
                tx.execute_batch(MIGRATE_V4_V5)?;
                let dangling: Option<String> = tx
                    .query_row("PRAGMA foreign_key_check", [], |r| r.get(0))
                    .optional()?;
                if let Some(table) = dangling {
                    return Err(StoreError::Corrupt {
                        table: "readings",
                        why: format!("foreign key violation in {table} after the migration"),
                    });
                }
                tracing::info!(from = version, to = SCHEMA_VERSION, "store migrated");
            }
            SCHEMA_VERSION => return Ok(()),
            found => return Err(StoreError::SchemaTooNew { found }),
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        Ok(())
    }

    /// A `BEGIN IMMEDIATE` transaction on a shared reference: it takes the write lock at once, so
    /// what it reads cannot change before it commits.
    fn immediate(&self) -> Result<Transaction<'_>, StoreError> {
        Ok(Transaction::new_unchecked(
            &self.conn,
            TransactionBehavior::Immediate,
        )?)
    }

    /// `PRAGMA user_version`.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    /// Provisions one device statically (owner [`LEGACY_OWNER`]).
    pub fn add_subscription(
        &self,
        serial: &str,
        public_key: &PublicKey,
        status: SubscriptionStatus,
    ) -> Result<SubscriptionId, StoreError> {
        let now = now_ms();
        self.conn.execute(
            "INSERT INTO subscriptions (serial, owner, public_key, status, created_at_ms, key_since_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            params![serial, LEGACY_OWNER, &public_key.0[..], status.as_str(), now],
        )?;
        Ok(SubscriptionId(self.conn.last_insert_rowid()))
    }

    /// Provisions many devices statically in one transaction (`init` with a large fleet).
    pub fn add_subscriptions<'a>(
        &mut self,
        subscriptions: impl IntoIterator<Item = (&'a str, &'a PublicKey, SubscriptionStatus)>,
    ) -> Result<usize, StoreError> {
        let now = now_ms();
        let tx = self.conn.transaction()?;
        let mut n = 0;
        {
            let mut stmt = tx.prepare(
                "INSERT INTO subscriptions (serial, owner, public_key, status, created_at_ms, key_since_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            )?;
            for (serial, key, status) in subscriptions {
                stmt.execute(params![
                    serial,
                    LEGACY_OWNER,
                    &key.0[..],
                    status.as_str(),
                    now
                ])?;
                n += 1;
            }
        }
        tx.commit()?;
        Ok(n)
    }

    /// Changes the status of a serial's current subscription (its live one, else its newest). A
    /// running core reads statuses at start.
    pub fn set_status(&self, serial: &str, status: SubscriptionStatus) -> Result<(), StoreError> {
        let n = self.conn.execute(
            "UPDATE subscriptions SET status = ?2 WHERE id = (SELECT id FROM subscriptions
             WHERE serial = ?1 ORDER BY status = 'revoked', id DESC LIMIT 1)",
            params![serial, status.as_str()],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownSerial(serial.to_owned()));
        }
        Ok(())
    }

    /// Changes a subscription's status for the admin API, in one transaction: revocation is
    /// final, so a revoked subscription can only be "revoked" again. Returns the previous status.
    /// The subscription is the serial's live one, else its newest.
    ///
    /// Revoking the subscription of a claimed device also withdraws its activation (in the same
    /// transaction): otherwise its next factory handshake would provision a new subscription at
    /// once. An activation plan brings it back.
    ///
    /// With `audit` (actor, role, action), the event is appended to the audit log in the same
    /// transaction, so a change is never stored without its record (outcome `ok`, or `unchanged`
    /// when the status already was `status`).
    pub fn change_status(
        &mut self,
        serial: &str,
        status: SubscriptionStatus,
        audit: Option<(&str, &str, &str)>,
    ) -> Result<StatusChange, StoreError> {
        self.change_status_inner(None, serial, status, audit)
    }

    /// [`Store::change_status`] on behalf of `owner`: the serial's current subscription must be
    /// `owner`'s, else [`StoreError::UnknownSerial`] (an owner never changes another's device).
    pub fn change_status_for(
        &mut self,
        owner: &str,
        serial: &str,
        status: SubscriptionStatus,
        audit: (&str, &str, &str),
    ) -> Result<StatusChange, StoreError> {
        self.change_status_inner(Some(owner), serial, status, Some(audit))
    }

    fn change_status_inner(
        &mut self,
        owner: Option<&str>,
        serial: &str,
        status: SubscriptionStatus,
        audit: Option<(&str, &str, &str)>,
    ) -> Result<StatusChange, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(owner) = owner {
            let current: Option<String> = tx
                .query_row(
                    "SELECT owner FROM subscriptions WHERE serial = ?1
                     ORDER BY status = 'revoked', id DESC LIMIT 1",
                    [serial],
                    |r| r.get(0),
                )
                .optional()?;
            if current.as_deref() != Some(owner) {
                return Err(StoreError::UnknownSerial(serial.to_owned()));
            }
        }
        let row: Option<(i64, String)> = tx
            .query_row(CURRENT_BY_SERIAL, [serial], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let (id, previous) = row.ok_or_else(|| StoreError::UnknownSerial(serial.to_owned()))?;
        let previous = status_from_text(&previous)?;
        if previous == SubscriptionStatus::Revoked && status != SubscriptionStatus::Revoked {
            return Err(StoreError::RevokedForGood(serial.to_owned()));
        }
        if previous != status {
            tx.execute(
                "UPDATE subscriptions SET status = ?1 WHERE id = ?2",
                params![status.as_str(), id],
            )?;
            if status == SubscriptionStatus::Revoked {
                tx.execute(
                    "UPDATE devices SET activated_at_ms = NULL WHERE serial = ?1
                     AND owner = (SELECT owner FROM subscriptions WHERE id = ?2)",
                    params![serial, id],
                )?;
            }
        }
        if let Some((actor, role, action)) = audit {
            tx.execute(
                "INSERT INTO audit (at_ms, actor, role, action, target, outcome, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    now_ms(),
                    actor,
                    role,
                    action,
                    serial,
                    if previous == status { "unchanged" } else { "ok" },
                    format!("{previous} -> {status}")
                ],
            )?;
        }
        tx.commit()?;
        Ok(StatusChange {
            id: SubscriptionId(id),
            previous,
        })
    }

    /// One page of subscriptions by id; `limit` is capped at [`MAX_PAGE`].
    pub fn device_page(&self, limit: u32, offset: u64) -> Result<DevicePage, StoreError> {
        let limit = limit.min(MAX_PAGE);
        let total: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM subscriptions", [], |r| r.get(0))?;
        let mut stmt = self.conn.prepare_cached(
            "SELECT serial, status, created_at_ms FROM subscriptions ORDER BY id LIMIT ?1 OFFSET ?2",
        )?;
        let mut rows = stmt.query(params![limit, i64::try_from(offset).unwrap_or(i64::MAX)])?;
        let mut devices = Vec::new();
        while let Some(row) = rows.next()? {
            devices.push(DeviceSummary {
                serial: row.get(0)?,
                status: status_from_text(&row.get::<_, String>(1)?)?,
                created_at_ms: row.get(2)?,
            });
        }
        Ok(DevicePage {
            total: total.max(0) as u64,
            limit,
            offset,
            devices,
        })
    }

    /// A serial's current subscription (its live one, else its newest) and how many readings it
    /// has stored.
    pub fn device(&self, serial: &str) -> Result<(SubscriptionId, DeviceSummary, u64), StoreError> {
        let row: Option<(i64, String, i64)> = self
            .conn
            .query_row(
                "SELECT id, status, created_at_ms FROM subscriptions WHERE serial = ?1
                 ORDER BY status = 'revoked', id DESC LIMIT 1",
                [serial],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let (id, status, created_at_ms) =
            row.ok_or_else(|| StoreError::UnknownSerial(serial.to_owned()))?;
        let readings: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM readings WHERE subscription_id = ?1",
            [id],
            |r| r.get(0),
        )?;
        Ok((
            SubscriptionId(id),
            DeviceSummary {
                serial: serial.to_owned(),
                status: status_from_text(&status)?,
                created_at_ms,
            },
            readings.max(0) as u64,
        ))
    }

    /// Appends one event to the audit log (the only write the log accepts).
    pub fn append_audit(&self, event: &AuditEvent<'_>) -> Result<i64, StoreError> {
        insert_audit(&self.conn, event)?;
        Ok(self.conn.last_insert_rowid())
    }

    /// The newest `limit` audit events (capped at [`MAX_PAGE`]), oldest first.
    pub fn audit(&self, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, at_ms, actor, role, action, target, outcome, detail FROM
             (SELECT * FROM audit ORDER BY id DESC LIMIT ?1) ORDER BY id",
        )?;
        let rows = stmt.query_map([limit.min(MAX_PAGE)], |r| {
            Ok(AuditRecord {
                id: r.get(0)?,
                at_ms: r.get(1)?,
                actor: r.get(2)?,
                role: r.get(3)?,
                action: r.get(4)?,
                target: r.get(5)?,
                outcome: r.get(6)?,
                detail: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every subscription, by id.
    pub fn subscriptions(&self) -> Result<Vec<Subscription>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, serial, public_key, status, created_at_ms FROM subscriptions ORDER BY id",
        )?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(Subscription {
                id: SubscriptionId(row.get(0)?),
                serial: row.get(1)?,
                public_key: key_from_blob(&row.get::<_, Vec<u8>>(2)?)?,
                status: status_from_text(&row.get::<_, String>(3)?)?,
                created_at_ms: row.get(4)?,
            });
        }
        Ok(out)
    }

    /// What the engine's in-memory index needs: every subscription, by id.
    pub(crate) fn index_entries(&self) -> Result<Vec<IndexEntry>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("{INDEX_SELECT} ORDER BY s.id"))?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(index_row(row)?);
        }
        Ok(out)
    }

    /// How many readings are stored.
    pub fn count_readings(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM readings", [], |r| r.get(0))?;
        Ok(n.max(0) as u64)
    }

    /// The readings of a serial's current subscription (its live one, else its newest), by
    /// sequence number. The admin API's owner-scoped listing is [`Store::readings_for_owner`].
    pub fn readings_of(&self, serial: &str) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let id: Option<i64> = self
            .conn
            .query_row(CURRENT_BY_SERIAL, [serial], |r| r.get(0))
            .optional()?;
        let id = id.ok_or_else(|| StoreError::UnknownSerial(serial.to_owned()))?;
        let mut stmt = self
            .conn
            .prepare("SELECT seq, data FROM readings WHERE subscription_id = ?1")?;
        let mut out = stmt
            .query_map([id], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?
            .collect::<Result<Vec<(u64, Vec<u8>)>, _>>()?;
        out.sort_unstable_by_key(|(seq, _)| *seq);
        Ok(out)
    }

    /// Opens an existing store to look at it while a core may be running (`core-stub stats`):
    /// never creates or migrates it, and the connection is query-only. (It is not opened
    /// read-only: a reader of a WAL database takes part in the shared-memory index.)
    pub fn open_existing(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "query_only", true)?;
        // A scratch container has no /tmp for SQLite's temporary files.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        let store = Self { conn };
        match store.schema_version()? {
            SCHEMA_VERSION => Ok(store),
            found if found > SCHEMA_VERSION => Err(StoreError::SchemaTooNew { found }),
            found => Err(StoreError::Corrupt {
                table: "user_version",
                why: format!("schema version {found}: not a store written by core-stub"),
            }),
        }
    }

    /// Totals and, per subscription, how many readings arrived and when the last one did.
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT s.serial, s.status, COUNT(r.seq), MAX(r.received_at_ms)
             FROM subscriptions s LEFT JOIN readings r ON r.subscription_id = s.id
             GROUP BY s.id ORDER BY s.id",
        )?;
        let mut rows = stmt.query([])?;
        let mut devices = Vec::new();
        while let Some(row) = rows.next()? {
            devices.push(SubscriptionReadings {
                serial: row.get(0)?,
                status: status_from_text(&row.get::<_, String>(1)?)?,
                readings: row.get::<_, i64>(2)?.max(0) as u64,
                last_reading_ms: row.get(3)?,
            });
        }
        Ok(StoreStats {
            now_ms: now_ms(),
            subscriptions: devices.len() as u64,
            active: devices
                .iter()
                .filter(|d| d.status == SubscriptionStatus::Active)
                .count() as u64,
            with_readings: devices.iter().filter(|d| d.readings > 0).count() as u64,
            readings: devices.iter().map(|d| d.readings).sum(),
            devices,
        })
    }

    /// Stores a batch in one transaction. Returns how many rows were new; the rest were already
    /// stored (`INSERT OR IGNORE`). When this returns `Ok`, every reading in `batch` is durable.
    pub(crate) fn insert_readings(
        &mut self,
        batch: &[PendingReading],
    ) -> Result<usize, StoreError> {
        let tx = self.conn.transaction()?;
        let mut stored = 0;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR IGNORE INTO readings (subscription_id, seq, received_at_ms, data) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for r in batch {
                // seq is a u64; SQLite stores its i64 bit pattern.
                stored += stmt.execute(params![
                    r.subscription.0,
                    r.seq.0 as i64,
                    r.received_at_ms,
                    r.data
                ])?;
            }
        }
        tx.commit()?;
        Ok(stored)
    }
}

/// The columns of an [`IndexEntry`], read by [`index_row`].
const INDEX_SELECT: &str = "SELECT s.id, s.public_key, s.status, s.serial, s.owner, s.next_key,
    COALESCE(d.profile, 'default'), s.config_version, s.rotate_requested, s.key_since_ms, s.flag
    FROM subscriptions s LEFT JOIN devices d ON d.serial = s.serial";

fn index_row(r: &rusqlite::Row<'_>) -> Result<IndexEntry, StoreError> {
    Ok(IndexEntry {
        id: SubscriptionId(r.get(0)?),
        public_key: key_from_blob(&r.get::<_, Vec<u8>>(1)?)?,
        status: status_from_text(&r.get::<_, String>(2)?)?,
        serial: r.get(3)?,
        owner: r.get(4)?,
        next_key: r
            .get::<_, Option<Vec<u8>>>(5)?
            .as_deref()
            .map(key_from_blob)
            .transpose()?,
        profile: r.get(6)?,
        config_version: r.get::<_, Option<i64>>(7)?.map(u32_column).transpose()?,
        rotate_requested: r.get::<_, i64>(8)? != 0,
        key_since_ms: r.get(9)?,
        flag: r.get(10)?,
    })
}

fn u32_column(v: i64) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt {
        table: "subscriptions",
        why: format!("{v} is not a u32"),
    })
}

/// Appends an audit record on `conn` (a transaction derefs to its connection).
fn insert_audit(conn: &Connection, event: &AuditEvent<'_>) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO audit (at_ms, actor, role, action, target, outcome, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        now_ms(),
        event.actor,
        event.role,
        event.action,
        event.target,
        event.outcome,
        event.detail
    ])?;
    Ok(())
}

/// Starts the writer thread. It ends when `readings` is closed and drained, after its last commit.
pub(crate) fn spawn_writer(
    store: Store,
    readings: mpsc::Receiver<PendingReading>,
    committed: mpsc::Sender<Committed>,
    batch_max: usize,
    linger: Duration,
    metrics: Metrics,
    gate: Arc<DiskGate>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || {
            // A runtime of its own, for `recv` with a deadline; the commits block this thread only.
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "store writer could not start");
                    return;
                }
            };
            rt.block_on(write_loop(
                store, readings, committed, batch_max, linger, metrics, &gate,
            ));
        })
}

async fn write_loop(
    mut store: Store,
    mut readings: mpsc::Receiver<PendingReading>,
    committed: mpsc::Sender<Committed>,
    batch_max: usize,
    linger: Duration,
    metrics: Metrics,
    gate: &DiskGate,
) {
    let mut batch = Vec::with_capacity(batch_max);
    while let Some(first) = readings.recv().await {
        // Videos on the same disk hold back from now until this batch is committed.
        let held = gate.hold();
        batch.push(first);
        let deadline = tokio::time::Instant::now() + linger;
        while batch.len() < batch_max {
            // Whatever is already queued joins without waiting.
            match readings.try_recv() {
                Ok(r) => {
                    batch.push(r);
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            match tokio::time::timeout_at(deadline, readings.recv()).await {
                Ok(Some(r)) => batch.push(r),
                Ok(None) | Err(_) => break,
            }
        }

        let started = Instant::now();
        let result = store.insert_readings(&batch);
        drop(held);
        metrics
            .store_commit_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(stored) => {
                metrics.readings_stored.inc_by(stored as u64);
                metrics
                    .readings_duplicate
                    .inc_by((batch.len() - stored) as u64);
                let durable = batch.drain(..).map(|r| (r.slot, r.seq)).collect();
                if committed.send(Committed { durable }).await.is_err() {
                    // The engine is gone (shutdown): the readings are stored, the devices will
                    // resend them and get their acknowledgements from the next run.
                    tracing::debug!("engine gone; acknowledgements dropped");
                }
            }
            Err(e) => {
                // Nothing is acknowledged: the devices retransmit and the readings come back.
                tracing::error!(error = %e, readings = batch.len(), "store commit failed");
                batch.clear();
            }
        }
    }
    tracing::debug!("store writer done");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> PublicKey {
        PublicKey([n; KEY_LEN])
    }

    fn reading(sub: SubscriptionId, seq: u64, data: &[u8]) -> PendingReading {
        PendingReading {
            slot: 0,
            subscription: sub,
            seq: ReadingSeq(seq),
            received_at_ms: now_ms(),
            data: data.to_vec(),
        }
    }

    #[test]
    fn opens_with_wal_full_and_foreign_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        let store = Store::open(&path).expect("open");
        let mode: String = store
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .expect("journal_mode");
        assert_eq!(mode.to_lowercase(), "wal");
        let sync: i64 = store
            .conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .expect("synchronous");
        assert_eq!(sync, 2, "synchronous=FULL");
        let fk: i64 = store
            .conn
            .pragma_query_value(None, "foreign_keys", |r| r.get(0))
            .expect("foreign_keys");
        assert_eq!(fk, 1);
        assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
        drop(store);
        // Reopening an existing database keeps it.
        let store = Store::open(&path).expect("reopen");
        assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        let conn = Connection::open(&path).expect("open");
        conn.pragma_update(None, "user_version", 99).expect("set");
        drop(conn);
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::SchemaTooNew { found: 99 })
        ));
    }

    #[test]
    fn insert_or_ignore_stores_each_reading_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(&dir.path().join("s.db")).expect("open");
        let a = store
            .add_subscription("meter-a", &key(1), SubscriptionStatus::Active)
            .expect("add");
        let b = store
            .add_subscription("meter-b", &key(2), SubscriptionStatus::Active)
            .expect("add");
        let stored = store
            .insert_readings(&[
                reading(a, 1, b"one"),
                reading(a, 2, b"two"),
                reading(b, 1, b"b-one"),
                reading(a, 1, b"one again, in the same batch"),
            ])
            .expect("insert");
        assert_eq!(stored, 3);
        let stored = store
            .insert_readings(&[reading(a, 2, b"dup"), reading(a, u64::MAX, b"max")])
            .expect("insert");
        assert_eq!(stored, 1);
        assert_eq!(store.count_readings().expect("count"), 4);
        assert_eq!(
            store.readings_of("meter-a").expect("readings"),
            vec![
                (1, b"one".to_vec()),
                (2, b"two".to_vec()),
                (u64::MAX, b"max".to_vec())
            ]
        );
        assert!(matches!(
            store.readings_of("nobody"),
            Err(StoreError::UnknownSerial(_))
        ));
        // A reading for a subscription that does not exist violates the foreign key.
        assert!(store
            .insert_readings(&[reading(SubscriptionId(999), 1, b"x")])
            .is_err());
    }

    #[test]
    fn stats_count_readings_per_subscription_beside_a_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        let mut writer = Store::open(&path).expect("open");
        let a = writer
            .add_subscription("meter-00001", &key(1), SubscriptionStatus::Active)
            .expect("add");
        writer
            .add_subscription("meter-00002", &key(2), SubscriptionStatus::Active)
            .expect("add");
        writer
            .add_subscription("meter-00003", &key(3), SubscriptionStatus::Suspended)
            .expect("add");
        let before = now_ms();
        writer
            .insert_readings(&[reading(a, 1, b"x"), reading(a, 2, b"y")])
            .expect("insert");

        // A second connection, as `core-stub stats` is while the core runs.
        let reader = Store::open_existing(&path).expect("open existing");
        let stats = reader.stats().expect("stats");
        assert_eq!(
            (
                stats.subscriptions,
                stats.active,
                stats.with_readings,
                stats.readings
            ),
            (3, 2, 1, 2)
        );
        assert_eq!(stats.devices[0].serial, "meter-00001");
        assert_eq!(stats.devices[0].readings, 2);
        assert!(stats.devices[0]
            .last_reading_ms
            .is_some_and(|t| t >= before));
        assert_eq!(
            (stats.devices[1].readings, stats.devices[1].last_reading_ms),
            (0, None)
        );
        let json = serde_json::to_value(&stats).expect("json");
        assert_eq!(json["devices"][2]["status"], "suspended");
        assert_eq!(json["with_readings"], 1);

        // Query-only: it cannot write.
        assert!(reader
            .add_subscription("meter-00009", &key(9), SubscriptionStatus::Active)
            .is_err());
        // Writes made after it opened are seen.
        writer
            .insert_readings(&[reading(a, 3, b"z")])
            .expect("insert");
        assert_eq!(reader.stats().expect("stats").readings, 3);

        // It never creates a store.
        assert!(Store::open_existing(&dir.path().join("absent.db")).is_err());
    }

    #[test]
    fn subscriptions_and_status() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(&dir.path().join("s.db")).expect("open");
        let keys = [key(1), key(2)];
        store
            .add_subscriptions([
                ("m1", &keys[0], SubscriptionStatus::Active),
                ("m2", &keys[1], SubscriptionStatus::Active),
            ])
            .expect("add");
        // Serial and key are unique.
        assert!(store
            .add_subscription("m1", &key(3), SubscriptionStatus::Active)
            .is_err());
        assert!(store
            .add_subscription("m3", &key(1), SubscriptionStatus::Active)
            .is_err());
        store
            .set_status("m2", SubscriptionStatus::Revoked)
            .expect("set");
        assert!(matches!(
            store.set_status("zz", SubscriptionStatus::Active),
            Err(StoreError::UnknownSerial(_))
        ));
        let subs = store.subscriptions().expect("list");
        assert_eq!(subs.len(), 2);
        assert_eq!(subs[0].serial, "m1");
        assert_eq!(subs[0].public_key, keys[0]);
        assert_eq!(subs[0].status, SubscriptionStatus::Active);
        assert_eq!(subs[1].status, SubscriptionStatus::Revoked);
        let index = store.index_entries().expect("index");
        assert_eq!(index[1].status, SubscriptionStatus::Revoked);
    }

    #[test]
    fn revocation_is_final_and_the_audit_log_is_append_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(&dir.path().join("s.db")).expect("open");
        store
            .add_subscription("m1", &key(1), SubscriptionStatus::Active)
            .expect("add");
        let c = store
            .change_status(
                "m1",
                SubscriptionStatus::Suspended,
                Some(("op", "operator", "suspend")),
            )
            .expect("suspend");
        assert_eq!(c.previous, SubscriptionStatus::Active);
        let c = store
            .change_status("m1", SubscriptionStatus::Revoked, None)
            .expect("revoke");
        assert_eq!(c.previous, SubscriptionStatus::Suspended);
        assert!(matches!(
            store.change_status("m1", SubscriptionStatus::Active, None),
            Err(StoreError::RevokedForGood(_))
        ));
        assert!(matches!(
            store.change_status("m9", SubscriptionStatus::Active, None),
            Err(StoreError::UnknownSerial(_))
        ));
        let (_, d, readings) = store.device("m1").expect("device");
        assert_eq!((d.status, readings), (SubscriptionStatus::Revoked, 0));
        let page = store.device_page(10, 0).expect("page");
        assert_eq!((page.total, page.devices.len()), (1, 1));
        assert!(store.device_page(10, 1).expect("page").devices.is_empty());

        let first = store.audit(10).expect("audit");
        assert_eq!(first.len(), 1, "the suspension, in its transaction");
        assert_eq!(
            (first[0].outcome.as_str(), first[0].detail.as_str()),
            ("ok", "active -> suspended")
        );
        for n in 0..3 {
            let detail = format!("event {n}");
            store
                .append_audit(&AuditEvent {
                    actor: "op",
                    role: Some("operator"),
                    action: "suspend",
                    target: Some("m1"),
                    outcome: "ok",
                    detail: &detail,
                })
                .expect("append");
        }
        let log = store.audit(2).expect("audit");
        assert_eq!(
            log.iter().map(|r| r.detail.as_str()).collect::<Vec<_>>(),
            ["event 1", "event 2"]
        );
        assert!(store
            .conn
            .execute("UPDATE audit SET actor = 'x'", [])
            .is_err());
        assert!(store.conn.execute("DELETE FROM audit", []).is_err());
        assert_eq!(store.audit(10).expect("audit").len(), 4);
    }

    #[test]
    fn a_version_1_store_gains_the_audit_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch(SCHEMA_V1).expect("schema");
        conn.pragma_update(None, "user_version", 1)
            .expect("version");
        drop(conn);
        let store = Store::open(&path).expect("migrate");
        assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
        assert!(store.audit(1).expect("audit").is_empty());
    }

    #[test]
    fn writer_acknowledges_only_after_commit_and_counts_duplicates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        let store = Store::open(&path).expect("open");
        let a = store
            .add_subscription("meter-a", &key(1), SubscriptionStatus::Active)
            .expect("add");
        let metrics = Metrics::new().expect("metrics");
        let (tx, rx) = mpsc::channel(16);
        let (ctx, mut crx) = mpsc::channel(16);
        let handle = spawn_writer(
            store,
            rx,
            ctx,
            4,
            Duration::from_millis(1),
            metrics.clone(),
            Arc::default(),
        )
        .expect("spawn");
        for seq in [1, 2, 3, 2, 1, 4, 5] {
            tx.blocking_send(reading(a, seq, b"d")).expect("send");
        }
        drop(tx);
        let mut acked = Vec::new();
        while let Some(c) = crx.blocking_recv() {
            // Whatever was acknowledged is already readable from another connection.
            let reader = Store::open(&path).expect("reader");
            assert!(reader.count_readings().expect("count") >= 1);
            acked.extend(c.durable.into_iter().map(|(_, s)| s.0));
        }
        handle.join().expect("writer thread");
        acked.sort_unstable();
        assert_eq!(acked, vec![1, 1, 2, 2, 3, 4, 5]);
        assert_eq!(metrics.readings_stored.get(), 5);
        assert_eq!(metrics.readings_duplicate.get(), 2);
        assert!(metrics.store_commit_seconds.get_sample_count() >= 2);
    }

    #[test]
    fn a_version_3_store_migrates_with_profiles_allowing_every_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        let conn = Connection::open(&path).expect("open");
        // A version 3 store, built the way version 3 built it.
        conn.execute_batch(SCHEMA_V1).expect("schema");
        conn.execute_batch(AUDIT_SCHEMA).expect("audit");
        conn.execute_batch(MIGRATE_V2_V3).expect("v3");
        conn.execute(DEFAULT_PROFILE_ROW, [1000]).expect("default");
        conn.execute(
            "INSERT INTO profiles (name, version, report_interval_secs, report_bytes, threshold, updated_at_ms)
             VALUES ('heat', 3, 900, 32, 5, 1000)",
            [],
        )
        .expect("profile");
        conn.execute(
            "INSERT INTO subscriptions (id, serial, owner, public_key, status, created_at_ms, key_since_ms)
             VALUES (1, 'm1', 'operator', ?1, 'active', 1000, 1000)",
            [&[1u8; KEY_LEN][..]],
        )
        .expect("sub");
        conn.execute("INSERT INTO readings VALUES (1, 1, 2000, x'01')", [])
            .expect("reading");
        conn.pragma_update(None, "user_version", 3)
            .expect("version");
        drop(conn);

        let store = Store::open(&path).expect("migrate");
        assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
        let profiles = store.profiles().expect("profiles");
        assert_eq!(
            profiles
                .iter()
                .map(|p| (
                    p.name.as_str(),
                    p.version,
                    p.report_interval_secs,
                    p.gateways.is_empty(),
                    p.allow_direct
                ))
                .collect::<Vec<_>>(),
            [("default", 1, 60, true, true), ("heat", 3, 900, true, true)],
            "kept, and every path allowed"
        );
        assert_eq!(store.readings_of("m1").expect("readings").len(), 1);
        assert_eq!(store.index_entries().expect("index").len(), 1);
        drop(store);
        // Opening again is a no-op.
        let store = Store::open(&path).expect("reopen");
        assert_eq!(store.profiles().expect("profiles").len(), 2);
    }

    #[test]
    fn a_version_4_store_migrates_to_version_5_keeping_everything_with_no_profile_quota() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        let conn = Connection::open(&path).expect("open");
        // A version 4 store, built the way version 4 built it.
        conn.execute_batch(SCHEMA_V1).expect("schema");
        conn.execute_batch(AUDIT_SCHEMA).expect("audit");
        conn.execute_batch(MIGRATE_V2_V3).expect("v3");
        conn.execute(DEFAULT_PROFILE_ROW, [1000]).expect("default");
        conn.execute_batch(MIGRATE_V3_V4).expect("v4");
        conn.execute(
            "INSERT INTO profiles (name, version, report_interval_secs, report_bytes, threshold,
                 updated_at_ms, gateways, allow_direct)
             VALUES ('building-a', 2, 900, 32, 5, 1000, 'gw-a,gw-b', 0)",
            [],
        )
        .expect("profile");
        conn.execute(
            "INSERT INTO devices (serial, factory_key, model, owner, profile, claimed_at_ms,
                 activated_at_ms)
             VALUES ('m1', ?1, 'meter', 'operator', 'building-a', 1000, 1000)",
            [&[7u8; KEY_LEN][..]],
        )
        .expect("device");
        conn.execute(
            "INSERT INTO subscriptions (id, serial, owner, public_key, status, created_at_ms, key_since_ms, config_version)
             VALUES (1, 'm1', 'operator', ?1, 'active', 1000, 1000, 2)",
            [&[1u8; KEY_LEN][..]],
        )
        .expect("sub");
        conn.execute("INSERT INTO readings VALUES (1, 1, 2000, x'01')", [])
            .expect("reading");
        conn.execute(
            "INSERT INTO audit (at_ms, actor, action, outcome, detail) VALUES (1, 'op', 'claim', 'ok', 'x')",
            [],
        )
        .expect("audit");
        conn.pragma_update(None, "user_version", 4)
            .expect("version");
        drop(conn);

        let store = Store::open(&path).expect("migrate");
        assert_eq!(store.schema_version().expect("version"), 5);
        let profiles = store.profiles().expect("profiles");
        assert_eq!(
            profiles
                .iter()
                .map(|p| (
                    p.name.as_str(),
                    p.version,
                    p.report_interval_secs,
                    p.gateways.join(","),
                    p.allow_direct,
                    p.quota
                ))
                .collect::<Vec<_>>(),
            [
                ("building-a", 2, 900, "gw-a,gw-b".to_owned(), false, None),
                ("default", 1, 60, String::new(), true, None)
            ],
            "kept, with no quota of their own (the core's default applies)"
        );
        assert_eq!(store.readings_of("m1").expect("readings").len(), 1);
        let index = store.index_entries().expect("index");
        assert_eq!(
            (
                index.len(),
                index[0].profile.as_str(),
                index[0].config_version
            ),
            (1, "building-a", Some(2))
        );
        assert_eq!(store.audit(10).expect("audit").len(), 1, "the log is kept");
        // A quota can be set now, and is read back.
        let quota = ProfileQuota {
            frames: 10,
            bytes: 1000,
            interval_secs: 60,
        };
        let (p, changed) = store
            .put_profile(
                "building-a",
                ProfileSettings {
                    report_interval_secs: 900,
                    report_bytes: 32,
                    threshold: 5,
                    gateways: vec!["gw-a".into(), "gw-b".into()],
                    allow_direct: false,
                    quota: Some(quota),
                },
                Actor {
                    name: "op",
                    role: Some("operator"),
                },
            )
            .expect("quota");
        assert_eq!((p.version, changed, p.quota), (2, true, Some(quota)));
        drop(store);
        // Opening again is a no-op, and the quota is there.
        let store = Store::open(&path).expect("reopen");
        assert_eq!(
            store.profile("building-a").expect("profile").quota,
            Some(quota)
        );
    }

    #[test]
    fn a_version_2_store_migrates_to_the_current_version_keeping_subscriptions_and_readings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch(SCHEMA_V1).expect("schema");
        conn.execute_batch(AUDIT_SCHEMA).expect("audit");
        for (id, serial, k, status) in [
            (1, "m1", 1u8, "active"),
            (2, "m2", 2, "suspended"),
            (3, "m3", 3, "revoked"),
        ] {
            conn.execute(
                "INSERT INTO subscriptions (id, serial, public_key, status, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, 1000)",
                params![id, serial, &[k; KEY_LEN][..], status],
            )
            .expect("sub");
        }
        for seq in 1..=3i64 {
            conn.execute("INSERT INTO readings VALUES (1, ?1, 2000, x'01')", [seq])
                .expect("reading");
        }
        conn.execute(
            "INSERT INTO audit (at_ms, actor, action, outcome, detail) VALUES (1, 'op', 'suspend', 'ok', 'x')",
            [],
        )
        .expect("audit");
        conn.pragma_update(None, "user_version", 2)
            .expect("version");
        drop(conn);

        let mut store = Store::open(&path).expect("migrate");
        assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
        let subs = store.subscriptions().expect("subs");
        assert_eq!(
            subs.iter()
                .map(|s| (s.id.0, s.serial.as_str(), s.status))
                .collect::<Vec<_>>(),
            [
                (1, "m1", SubscriptionStatus::Active),
                (2, "m2", SubscriptionStatus::Suspended),
                (3, "m3", SubscriptionStatus::Revoked)
            ]
        );
        assert_eq!(store.readings_of("m1").expect("readings").len(), 3);
        assert_eq!(store.audit(10).expect("audit").len(), 1, "the log is kept");
        let index = store.index_entries().expect("index");
        assert_eq!(
            (
                index[0].owner.as_str(),
                index[0].profile.as_str(),
                index[0].key_since_ms,
                index[0].next_key,
                index[0].config_version
            ),
            ("operator", "default", 1000, None, None)
        );
        assert_eq!(store.profiles().expect("profiles")[0].name, "default");
        // Foreign keys are on again, and the serial is no longer UNIQUE: only one live
        // subscription per serial.
        assert!(store
            .insert_readings(&[reading(SubscriptionId(99), 1, b"x")])
            .is_err());
        assert!(store
            .add_subscription("m1", &key(9), SubscriptionStatus::Active)
            .is_err());
        store
            .add_subscription("m3", &key(9), SubscriptionStatus::Active)
            .expect("a new subscription beside the revoked one");
        assert_eq!(store.device("m3").expect("device").0, SubscriptionId(4));
        let fk: i64 = store
            .conn
            .pragma_query_value(None, "foreign_keys", |r| r.get(0))
            .expect("foreign_keys");
        assert_eq!(fk, 1);
        drop(store);
        // Opened again: nothing to do.
        assert_eq!(
            Store::open(&path)
                .expect("reopen")
                .schema_version()
                .expect("v"),
            SCHEMA_VERSION
        );
    }

    #[test]
    fn quarantined_is_a_status() {
        assert_eq!(
            "quarantined".parse::<SubscriptionStatus>(),
            Ok(SubscriptionStatus::Quarantined)
        );
        assert_eq!(SubscriptionStatus::Quarantined.to_string(), "quarantined");
    }
}
