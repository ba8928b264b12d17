//! The device credential lifecycle in the store: claims, activation plans, profiles,
//! provisioning, two-phase key updates, fraud flags, rotation requests, ownership transfer and
//! release to another operator (spec "Core data model").
//!
//! Every function that changes state is one `BEGIN IMMEDIATE` transaction holding the change and
//! its audit record. The write lock is taken before anything is read, so each one sees the
//! result of every change committed before it: of two concurrent conflicting changes of one
//! device (two accepts of a transfer, a release racing an accept), the second one finds the
//! device changed and fails; both never win.

use std::collections::HashSet;

use relay_protocol::payload::{DeviceConfig, Release, MAX_READING};
use relay_protocol::session::PublicKey;
use rusqlite::{params, Connection, OptionalExtension};

use super::{
    index_row, insert_audit, key_from_blob, now_ms, status_from_text, u32_column, AuditEvent,
    IndexEntry, Store, StoreError, SubscriptionId, SubscriptionStatus, DEFAULT_PROFILE,
    INDEX_SELECT, MAX_PAGE,
};
use crate::manifest::{
    is_valid_account, is_valid_profile_name, ManifestRow, Parsed, PlanRow, RowError,
};
use crate::release::{ReleaseDocument, ReleasedDevice};

/// The longest reporting interval a profile may set: 30 days (sleepy meters wake once a day).
pub const MAX_REPORT_INTERVAL_SECS: u32 = 30 * 24 * 3600;
/// The most gateways a profile's policy may name.
pub const MAX_PROFILE_GATEWAYS: usize = 64;
/// The longest gateway name (a DNS name, as in the gateway's certificate).
pub const MAX_GATEWAY_NAME: usize = 253;
/// The longest fraud flag reason kept.
const MAX_FLAG: usize = 128;

/// Who makes a change, for the audit log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Actor<'a> {
    /// The token's name, `device` or `fraud-detector`.
    pub name: &'a str,
    /// The token's role.
    pub role: Option<&'a str>,
}

impl Actor<'static> {
    /// A device, through its own handshake (provisioning, key updates, configuration).
    pub const DEVICE: Self = Self {
        name: "device",
        role: None,
    };
    /// The core's fraud detector.
    pub const FRAUD_DETECTOR: Self = Self {
        name: "fraud-detector",
        role: None,
    };
}

/// A profile: service parameters shared by many devices, versioned.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Profile {
    /// Its name.
    pub name: String,
    /// Increases with every change.
    pub version: u32,
    /// How often devices report.
    pub report_interval_secs: u32,
    /// How large a report is.
    pub report_bytes: u16,
    /// The change that triggers an early report (0: none).
    pub threshold: u32,
    /// The gateways (by the name in their certificate) its devices may use; empty: any.
    pub gateways: Vec<String>,
    /// Whether its devices may use direct access.
    pub allow_direct: bool,
    /// The quota the gateways hold each of its devices' sessions to; `None`: the core's
    /// `[admission]` default.
    pub quota: Option<ProfileQuota>,
}

/// The most frames, and bytes of device frames, a session may send through a gateway per interval
/// (`docs/protocol.md`, admission). 0 in a field: unlimited for that field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileQuota {
    /// Frames per interval.
    pub frames: u32,
    /// Bytes of device frames per interval.
    pub bytes: u32,
    /// The interval's length in seconds (0 only when frames and bytes are both unlimited).
    pub interval_secs: u16,
}

impl ProfileQuota {
    /// `frames/bytes per interval`, for logs and the audit log.
    pub fn describe(&self) -> String {
        let limit = |n: u32| {
            if n == 0 {
                "unlimited".to_owned()
            } else {
                n.to_string()
            }
        };
        format!(
            "{} frames, {} bytes per {} s",
            limit(self.frames),
            limit(self.bytes),
            self.interval_secs
        )
    }

    fn check(&self) -> Result<(), StoreError> {
        if (self.frames != 0 || self.bytes != 0) && self.interval_secs == 0 {
            return Err(StoreError::Invalid(
                "quota.interval_secs must be at least 1 when frames or bytes are limited".into(),
            ));
        }
        Ok(())
    }
}

impl Profile {
    /// Whether the policy lets a device use the gateway whose certificate names it `gateway`.
    pub fn allows_gateway(&self, gateway: &str) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| g == gateway)
    }

    /// What a device of this profile is told.
    pub fn config(&self) -> DeviceConfig {
        DeviceConfig {
            version: self.version,
            report_interval_secs: self.report_interval_secs,
            report_bytes: self.report_bytes,
            threshold: self.threshold,
        }
    }
}

/// A profile's settings, as `PUT /v1/profiles/{name}` takes them. `PUT` replaces the whole
/// profile: a policy field left out takes its default (any gateway, direct access allowed).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileSettings {
    /// How often devices report, 1 s to 30 days.
    pub report_interval_secs: u32,
    /// How large a report is, 1 byte to the largest reading.
    pub report_bytes: u16,
    /// The change that triggers an early report (0: none).
    pub threshold: u32,
    /// The gateways its devices may use, by certificate name; empty (the default): any.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Whether its devices may use direct access (default: yes).
    #[serde(default = "allow_direct_default")]
    pub allow_direct: bool,
    /// The admission quota of its devices' sessions; left out (the default): the core's
    /// `[admission]` default.
    #[serde(default)]
    pub quota: Option<ProfileQuota>,
}

fn allow_direct_default() -> bool {
    true
}

/// Whether `name` can be a gateway's certificate name: 1 to 253 of `A-Z a-z 0-9 - _ .`.
pub fn is_valid_gateway_name(name: &str) -> bool {
    (1..=MAX_GATEWAY_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `profiles.gateways`: the names joined by commas (no valid name holds one).
fn gateways_column(gateways: &[String]) -> String {
    gateways.join(",")
}

fn gateways_from_column(text: &str) -> Vec<String> {
    text.split(',')
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
        .collect()
}

impl ProfileSettings {
    /// Sorts and deduplicates the gateway names, so equal policies compare equal.
    fn normalize(&mut self) {
        self.gateways.sort();
        self.gateways.dedup();
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.gateways.len() > MAX_PROFILE_GATEWAYS {
            return Err(StoreError::Invalid(format!(
                "a profile names at most {MAX_PROFILE_GATEWAYS} gateways"
            )));
        }
        if let Some(bad) = self.gateways.iter().find(|g| !is_valid_gateway_name(g)) {
            return Err(StoreError::Invalid(format!(
                "gateway name {bad:?}: 1 to {MAX_GATEWAY_NAME} of A-Z a-z 0-9 - _ ."
            )));
        }
        if let Some(q) = &self.quota {
            q.check()?;
        }
        if !(1..=MAX_REPORT_INTERVAL_SECS).contains(&self.report_interval_secs) {
            return Err(StoreError::Invalid(format!(
                "report_interval_secs must be between 1 and {MAX_REPORT_INTERVAL_SECS}"
            )));
        }
        if self.report_bytes == 0 || usize::from(self.report_bytes) > MAX_READING {
            return Err(StoreError::Invalid(format!(
                "report_bytes must be between 1 and {MAX_READING}"
            )));
        }
        Ok(())
    }
}

/// What the engine needs about a claimed device to answer its factory-identity handshake.
#[derive(Clone, Debug)]
pub(crate) struct FactoryEntry {
    pub serial: String,
    pub factory_key: PublicKey,
    pub owner: String,
    pub activated: bool,
    pub profile: Option<String>,
    pub release: Option<Release>,
}

/// An accepted transfer.
#[derive(Clone, Debug)]
pub(crate) struct Transferred {
    /// The device under its new owner.
    pub device: FactoryEntry,
    /// The previous owner.
    pub from: String,
    /// The previous owner's subscription, revoked.
    pub revoked: Option<SubscriptionId>,
}

/// A release, stored.
#[derive(Clone, Debug)]
pub(crate) struct ReleaseOutcome {
    /// The device, now carrying its release.
    pub device: FactoryEntry,
    /// Its subscription, revoked.
    pub revoked: Option<SubscriptionId>,
}

/// One reading as the owner-scoped listing shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ReadingRecord {
    /// The subscription it arrived on.
    pub subscription: i64,
    /// Its sequence number.
    pub seq: u64,
    /// When it was stored, ms since the Unix epoch.
    pub received_at_ms: i64,
    /// Its bytes, hex.
    pub data: String,
}

/// A device as an owner sees it: its claim, plan and release, and its current subscription.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceView {
    /// Its serial number.
    pub serial: String,
    /// Its owner.
    pub owner: String,
    /// `claimed`, `activated`, `provisioned` or `released`.
    pub state: &'static str,
    /// From the manifest (none for a statically provisioned device).
    pub model: Option<String>,
    /// From the plan.
    pub account: Option<String>,
    /// From the plan.
    pub profile: Option<String>,
    /// The profile's current version.
    pub profile_version: Option<u32>,
    /// When it was claimed.
    pub claimed_at_ms: Option<i64>,
    /// When it was activated.
    pub activated_at_ms: Option<i64>,
    /// The owner a transfer awaits.
    pub transfer_to: Option<String>,
    /// The endpoint it was released to.
    pub released_to: Option<String>,
    /// The owner's current subscription for it.
    pub subscription: Option<i64>,
    /// That subscription's status.
    pub status: Option<String>,
    /// When that subscription was created.
    pub created_at_ms: Option<i64>,
    /// When its current key was bound.
    pub key_since_ms: Option<i64>,
    /// A credential update is in its phase 1 (a next key is bound, not yet used).
    pub next_key_pending: bool,
    /// A credential update was asked for.
    pub rotate_requested: bool,
    /// The configuration version the device runs.
    pub config_version: Option<u32>,
    /// Why the fraud detector flagged it.
    pub flag: Option<String>,
    /// Readings stored under this owner's subscriptions.
    pub readings: u64,
}

/// One page of an owner's devices, by serial.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceViewPage {
    /// The owner's devices.
    pub total: u64,
    /// The page asked for.
    pub limit: u32,
    /// Rows skipped.
    pub offset: u64,
    /// The page.
    pub devices: Vec<DeviceView>,
}

/// A `devices` row.
#[derive(Clone, Debug)]
struct DeviceRow {
    serial: String,
    factory_key: PublicKey,
    model: String,
    owner: String,
    account: Option<String>,
    profile: Option<String>,
    claimed_at_ms: i64,
    activated_at_ms: Option<i64>,
    transfer_to: Option<String>,
    released: Option<String>,
}

impl DeviceRow {
    fn release(&self) -> Result<Option<ReleaseDocument>, StoreError> {
        self.released
            .as_deref()
            .map(|json| {
                ReleaseDocument::from_json(json.as_bytes()).map_err(|e| StoreError::Corrupt {
                    table: "devices",
                    why: format!("released: {e}"),
                })
            })
            .transpose()
    }

    fn factory_entry(&self) -> Result<FactoryEntry, StoreError> {
        Ok(FactoryEntry {
            serial: self.serial.clone(),
            factory_key: self.factory_key,
            owner: self.owner.clone(),
            activated: self.activated_at_ms.is_some(),
            profile: self.profile.clone(),
            release: self.release()?.map(|d| d.notice()),
        })
    }
}

const DEVICE_COLUMNS: &str = "serial, factory_key, model, owner, account, profile, claimed_at_ms,
    activated_at_ms, transfer_to, released";

fn device_from_row(r: &rusqlite::Row<'_>) -> Result<DeviceRow, StoreError> {
    Ok(DeviceRow {
        serial: r.get(0)?,
        factory_key: key_from_blob(&r.get::<_, Vec<u8>>(1)?)?,
        model: r.get(2)?,
        owner: r.get(3)?,
        account: r.get(4)?,
        profile: r.get(5)?,
        claimed_at_ms: r.get(6)?,
        activated_at_ms: r.get(7)?,
        transfer_to: r.get(8)?,
        released: r.get(9)?,
    })
}

fn device_row(conn: &Connection, serial: &str) -> Result<Option<DeviceRow>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {DEVICE_COLUMNS} FROM devices WHERE serial = ?1"
    ))?;
    let mut rows = stmt.query([serial])?;
    rows.next()?.map(device_from_row).transpose()
}

/// The device `serial` as its owner `owner` may change it.
fn owned_device(conn: &Connection, serial: &str, owner: &str) -> Result<DeviceRow, StoreError> {
    device_row(conn, serial)?
        .filter(|d| d.owner == owner)
        .ok_or_else(|| StoreError::UnknownDevice(serial.to_owned()))
}

/// A serial's subscription that is not revoked (at most one: the partial unique index).
struct LiveSubscription {
    id: i64,
    status: SubscriptionStatus,
    owner: String,
    public_key: PublicKey,
}

fn live_subscription(
    conn: &Connection,
    serial: &str,
) -> Result<Option<LiveSubscription>, StoreError> {
    let row: Option<(i64, String, String, Vec<u8>)> = conn
        .prepare_cached(
            "SELECT id, status, owner, public_key FROM subscriptions
             WHERE serial = ?1 AND status <> 'revoked'",
        )?
        .query_row([serial], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
    row.map(|(id, status, owner, key)| {
        Ok(LiveSubscription {
            id,
            status: status_from_text(&status)?,
            owner,
            public_key: key_from_blob(&key)?,
        })
    })
    .transpose()
}

/// Revokes the serial's live subscription, if any; returns it.
fn revoke_live(conn: &Connection, serial: &str) -> Result<Option<SubscriptionId>, StoreError> {
    let live = live_subscription(conn, serial)?;
    if let Some(l) = &live {
        conn.execute(
            "UPDATE subscriptions SET status = 'revoked', next_key = NULL WHERE id = ?1",
            [l.id],
        )?;
    }
    Ok(live.map(|l| SubscriptionId(l.id)))
}

/// Whether `key` is bound anywhere: a subscription key, a pending next key, a factory key.
fn key_in_use(conn: &Connection, key: &PublicKey) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM subscriptions WHERE public_key = ?1)
                 OR EXISTS (SELECT 1 FROM subscriptions WHERE next_key = ?1)
                 OR EXISTS (SELECT 1 FROM devices WHERE factory_key = ?1)",
        )?
        .query_row([&key.0[..]], |r| r.get(0))?)
}

fn index_entry_in(conn: &Connection, id: i64) -> Result<IndexEntry, StoreError> {
    let mut stmt = conn.prepare_cached(&format!("{INDEX_SELECT} WHERE s.id = ?1"))?;
    let mut rows = stmt.query([id])?;
    match rows.next()? {
        Some(r) => index_row(r),
        None => Err(StoreError::UnknownSubscription(SubscriptionId(id))),
    }
}

/// The columns [`profile_from_columns`] reads, in its order.
const PROFILE_COLUMNS: &str = "name, version, report_interval_secs, report_bytes, threshold, \
    gateways, allow_direct, quota_frames, quota_bytes, quota_interval_secs";

/// A profile row: the settings, then the three quota columns (all NULL, or all set).
type ProfileColumns = (
    (String, i64, i64, i64, i64, String, bool),
    (Option<i64>, Option<i64>, Option<i64>),
);

fn profile_columns(r: &rusqlite::Row<'_>) -> rusqlite::Result<ProfileColumns> {
    Ok((
        (
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
        ),
        (r.get(7)?, r.get(8)?, r.get(9)?),
    ))
}

fn profile_in(conn: &Connection, name: &str) -> Result<Option<Profile>, StoreError> {
    let row: Option<ProfileColumns> = conn
        .prepare_cached(&format!(
            "SELECT {PROFILE_COLUMNS} FROM profiles WHERE name = ?1"
        ))?
        .query_row([name], profile_columns)
        .optional()?;
    row.map(profile_from_columns).transpose()
}

fn profile_from_columns(
    ((name, version, interval, bytes, threshold, gateways, allow_direct), quota): ProfileColumns,
) -> Result<Profile, StoreError> {
    let corrupt = |why: &str| StoreError::Corrupt {
        table: "profiles",
        why: format!("{name}: {why}"),
    };
    let quota = match quota {
        (None, None, None) => None,
        (Some(frames), Some(bytes), Some(interval)) => Some(ProfileQuota {
            frames: u32_column(frames)?,
            bytes: u32_column(bytes)?,
            interval_secs: u16::try_from(interval).map_err(|_| corrupt("quota_interval_secs"))?,
        }),
        _ => return Err(corrupt("quota columns partly NULL")),
    };
    Ok(Profile {
        quota,
        version: u32_column(version)?,
        report_interval_secs: u32_column(interval)?,
        report_bytes: u16::try_from(bytes).map_err(|_| corrupt("report_bytes"))?,
        threshold: u32_column(threshold)?,
        gateways: gateways_from_column(&gateways),
        allow_direct,
        name,
    })
}

/// Appends an `ok` audit record for `actor`.
fn audit(
    conn: &Connection,
    actor: Actor<'_>,
    action: &str,
    target: Option<&str>,
    detail: &str,
) -> Result<(), StoreError> {
    insert_audit(
        conn,
        &AuditEvent {
            actor: actor.name,
            role: actor.role,
            action,
            target,
            outcome: "ok",
            detail,
        },
    )
}

fn fingerprint(key: &PublicKey) -> String {
    key.to_hex()[..16].to_owned()
}

/// Errors in row order, the parser's and the store's together.
fn bad_rows(mut errors: Vec<RowError>) -> StoreError {
    errors.sort_by_key(|e| e.row);
    StoreError::BadRows(errors)
}

impl Store {
    /// Every profile, by name.
    pub fn profiles(&self) -> Result<Vec<Profile>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {PROFILE_COLUMNS} FROM profiles ORDER BY name"
        ))?;
        let rows = stmt.query_map([], profile_columns)?;
        rows.map(|r| profile_from_columns(r?)).collect()
    }

    /// One profile.
    pub fn profile(&self, name: &str) -> Result<Profile, StoreError> {
        profile_in(&self.conn, name)?.ok_or_else(|| StoreError::UnknownProfile(name.to_owned()))
    }

    /// Creates a profile (version 1) or changes one. Its version goes up when what its devices
    /// are told changes (interval, size, threshold); a change of the gateway policy or the quota
    /// alone keeps the version (the devices have nothing new to apply) and takes effect at each
    /// device's next handshake (the quota also at the next admission a gateway asks for). Settings equal to the current ones change nothing. Returns the profile and
    /// whether it changed.
    pub fn put_profile(
        &self,
        name: &str,
        mut settings: ProfileSettings,
        actor: Actor<'_>,
    ) -> Result<(Profile, bool), StoreError> {
        if !is_valid_profile_name(name) {
            return Err(StoreError::Invalid(
                "a profile name is 1 to 32 of A-Z a-z 0-9 - _ .".into(),
            ));
        }
        settings.normalize();
        settings.check()?;
        let tx = self.immediate()?;
        let current = profile_in(&tx, name)?;
        let same_config = current.as_ref().is_some_and(|p| {
            (p.report_interval_secs, p.report_bytes, p.threshold)
                == (
                    settings.report_interval_secs,
                    settings.report_bytes,
                    settings.threshold,
                )
        });
        let same_policy = current.as_ref().is_some_and(|p| {
            (&p.gateways, p.allow_direct, p.quota)
                == (&settings.gateways, settings.allow_direct, settings.quota)
        });
        if let (true, true, Some(p)) = (same_config, same_policy, current.clone()) {
            return Ok((p, false));
        }
        let version = match &current {
            Some(p) if same_config => p.version,
            Some(p) => p.version.checked_add(1).ok_or_else(|| {
                StoreError::Conflict(format!("profile {name} is at its last version"))
            })?,
            None => 1,
        };
        tx.execute(
            "INSERT INTO profiles (name, version, report_interval_secs, report_bytes, threshold,
                 updated_at_ms, gateways, allow_direct, quota_frames, quota_bytes,
                 quota_interval_secs)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (name) DO UPDATE SET version = ?2, report_interval_secs = ?3,
                 report_bytes = ?4, threshold = ?5, updated_at_ms = ?6, gateways = ?7,
                 allow_direct = ?8, quota_frames = ?9, quota_bytes = ?10,
                 quota_interval_secs = ?11",
            params![
                name,
                version,
                settings.report_interval_secs,
                settings.report_bytes,
                settings.threshold,
                now_ms(),
                gateways_column(&settings.gateways),
                settings.allow_direct,
                settings.quota.map(|q| q.frames),
                settings.quota.map(|q| q.bytes),
                settings.quota.map(|q| q.interval_secs),
            ],
        )?;
        let profile = Profile {
            name: name.to_owned(),
            version,
            report_interval_secs: settings.report_interval_secs,
            report_bytes: settings.report_bytes,
            threshold: settings.threshold,
            gateways: settings.gateways,
            allow_direct: settings.allow_direct,
            quota: settings.quota,
        };
        let quota = profile
            .quota
            .map_or_else(|| "default".to_owned(), |q| q.describe());
        let gateways = if profile.gateways.is_empty() {
            "any".to_owned()
        } else {
            profile.gateways.join(" ")
        };
        audit(
            &tx,
            actor,
            "put_profile",
            None,
            &format!(
                "profile {name} version {version}: every {} s, {} B, threshold {}; gateways {gateways}, direct {}; quota {quota}",
                profile.report_interval_secs,
                profile.report_bytes,
                profile.threshold,
                if profile.allow_direct { "allowed" } else { "refused" },
            ),
        )?;
        tx.commit()?;
        Ok((profile, true))
    }

    /// Claims the devices of a shipping manifest for `owner`: all of them in one transaction, or
    /// none and [`StoreError::BadRows`] naming every bad row (`manifest.errors` included).
    pub(crate) fn claim(
        &self,
        owner: &str,
        manifest: &Parsed<ManifestRow>,
        actor: Actor<'_>,
    ) -> Result<Vec<FactoryEntry>, StoreError> {
        let tx = self.immediate()?;
        let mut errors = manifest.errors.clone();
        for r in &manifest.rows {
            let bad = |why: String| RowError::new(r.row, Some(&r.serial), why);
            if let Some(d) = device_row(&tx, &r.serial)? {
                let whose = if d.owner == owner {
                    "you"
                } else {
                    "another owner"
                };
                errors.push(bad(format!("already claimed by {whose}")));
            } else if key_in_use(&tx, &r.factory_key)? {
                errors.push(bad("the factory key is already in use".into()));
            } else if live_subscription(&tx, &r.serial)?.is_some() {
                errors.push(bad("the serial has a live subscription".into()));
            }
        }
        if !errors.is_empty() {
            return Err(bad_rows(errors));
        }
        let now = now_ms();
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO devices (serial, factory_key, model, owner, claimed_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for r in &manifest.rows {
                insert.execute(params![r.serial, &r.factory_key.0[..], r.model, owner, now])?;
                audit(
                    &tx,
                    actor,
                    "claim",
                    Some(&r.serial),
                    &format!("model {}, owner {owner}", r.model),
                )?;
            }
        }
        audit(
            &tx,
            actor,
            "claim_manifest",
            None,
            &format!("{} devices claimed for {owner}", manifest.rows.len()),
        )?;
        tx.commit()?;
        Ok(manifest
            .rows
            .iter()
            .map(|r| FactoryEntry {
                serial: r.serial.clone(),
                factory_key: r.factory_key,
                owner: owner.to_owned(),
                activated: false,
                profile: None,
                release: None,
            })
            .collect())
    }

    /// Activates the devices of a plan (`owner`'s, each with its account and profile): all of
    /// them in one transaction, or none and [`StoreError::BadRows`] naming every bad row
    /// (`plan.errors` included). A device already active takes the plan's account and profile.
    pub(crate) fn activate(
        &self,
        owner: &str,
        plan: &Parsed<PlanRow>,
        actor: Actor<'_>,
    ) -> Result<Vec<FactoryEntry>, StoreError> {
        let tx = self.immediate()?;
        let profiles: HashSet<String> = tx
            .prepare("SELECT name FROM profiles")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut errors = plan.errors.clone();
        let mut devices = Vec::with_capacity(plan.rows.len());
        for r in &plan.rows {
            let bad = |why: String| RowError::new(r.row, Some(&r.serial), why);
            match device_row(&tx, &r.serial)? {
                None => errors.push(bad("unknown serial: not claimed".into())),
                Some(d) if d.owner != owner => errors.push(bad("claimed by another owner".into())),
                Some(d) if d.released.is_some() => {
                    errors.push(bad("released to another operator".into()))
                }
                Some(_) if !profiles.contains(&r.profile) => {
                    errors.push(bad(format!("unknown profile {:?}", r.profile)))
                }
                Some(d) => devices.push(d),
            }
        }
        if !errors.is_empty() {
            return Err(bad_rows(errors));
        }
        let now = now_ms();
        {
            let mut update = tx.prepare_cached(
                "UPDATE devices SET account = ?2, profile = ?3,
                     activated_at_ms = COALESCE(activated_at_ms, ?4)
                 WHERE serial = ?1",
            )?;
            for (r, d) in plan.rows.iter().zip(&mut devices) {
                update.execute(params![r.serial, r.account, r.profile, now])?;
                audit(
                    &tx,
                    actor,
                    "activate",
                    Some(&r.serial),
                    &format!(
                        "account {}, profile {}",
                        r.account.as_deref().unwrap_or("-"),
                        r.profile
                    ),
                )?;
                d.account.clone_from(&r.account);
                d.profile = Some(r.profile.clone());
                d.activated_at_ms.get_or_insert(now);
            }
        }
        audit(
            &tx,
            actor,
            "activate_plan",
            None,
            &format!("{} devices activated for {owner}", plan.rows.len()),
        )?;
        tx.commit()?;
        devices.iter().map(DeviceRow::factory_entry).collect()
    }

    /// Every claimed device (released ones included: the engine tells them where they went).
    pub(crate) fn factory_entries(&self) -> Result<Vec<FactoryEntry>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices ORDER BY serial"
        ))?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(device_from_row(r)?.factory_entry()?);
        }
        Ok(out)
    }

    /// One claimed device.
    pub(crate) fn factory_entry(&self, serial: &str) -> Result<Option<FactoryEntry>, StoreError> {
        device_row(&self.conn, serial)?
            .map(|d| d.factory_entry())
            .transpose()
    }

    /// Provisioning (spec "Provisioning"): the device `serial`, authenticated by its factory key,
    /// proposes `key`. Without a live subscription one is created for the device's owner; with one
    /// (recovery from a lost key or a quarantine) its key is replaced at once, and its pending
    /// next key, flag and rotation request cleared: it is active again. Audited as `device`.
    ///
    /// Refused: [`StoreError::NotClaimed`], [`StoreError::Released`],
    /// [`StoreError::NotActivated`], [`StoreError::Suspended`], [`StoreError::KeyInUse`].
    /// The same key proposed again (a retransmission) returns the subscription unchanged.
    pub(crate) fn provision(
        &self,
        serial: &str,
        key: &PublicKey,
    ) -> Result<IndexEntry, StoreError> {
        let tx = self.immediate()?;
        let device =
            device_row(&tx, serial)?.ok_or_else(|| StoreError::NotClaimed(serial.to_owned()))?;
        if device.released.is_some() {
            return Err(StoreError::Released(serial.to_owned()));
        }
        if device.activated_at_ms.is_none() {
            return Err(StoreError::NotActivated(serial.to_owned()));
        }
        let live = live_subscription(&tx, serial)?;
        if let Some(l) = &live {
            if l.public_key == *key && l.status == SubscriptionStatus::Active {
                return index_entry_in(&tx, l.id);
            }
            if l.status == SubscriptionStatus::Suspended {
                return Err(StoreError::Suspended(serial.to_owned()));
            }
            if l.owner != device.owner {
                return Err(StoreError::Conflict(format!(
                    "device {serial} has a live subscription of another owner"
                )));
            }
        }
        if key_in_use(&tx, key)? {
            return Err(StoreError::KeyInUse);
        }
        let now = now_ms();
        let (id, detail) = match live {
            None => {
                tx.execute(
                    "INSERT INTO subscriptions
                         (serial, owner, public_key, status, created_at_ms, key_since_ms)
                     VALUES (?1, ?2, ?3, 'active', ?4, ?4)",
                    params![serial, device.owner, &key.0[..], now],
                )?;
                let id = tx.last_insert_rowid();
                (
                    id,
                    format!(
                        "subscription {id} created for {}, key {}",
                        device.owner,
                        fingerprint(key)
                    ),
                )
            }
            Some(l) => {
                tx.execute(
                    "UPDATE subscriptions SET public_key = ?2, next_key = NULL, flag = NULL,
                         rotate_requested = 0, status = 'active', key_since_ms = ?3
                     WHERE id = ?1",
                    params![l.id, &key.0[..], now],
                )?;
                (
                    l.id,
                    format!(
                        "subscription {} re-keyed from the factory identity ({} -> active), key {}",
                        l.id,
                        l.status,
                        fingerprint(key)
                    ),
                )
            }
        };
        audit(&tx, Actor::DEVICE, "provision", Some(serial), &detail)?;
        let entry = index_entry_in(&tx, id)?;
        tx.commit()?;
        Ok(entry)
    }

    /// Credential update, phase 1: binds `key` as the subscription's next key (the current key
    /// keeps working). A second proposal replaces an earlier one that was never used.
    pub(crate) fn set_next_key(
        &self,
        id: SubscriptionId,
        key: &PublicKey,
    ) -> Result<(), StoreError> {
        let tx = self.immediate()?;
        let entry = index_entry_in(&tx, id.0)?;
        if entry.status == SubscriptionStatus::Revoked {
            return Err(StoreError::Conflict(format!(
                "subscription {} is revoked",
                id.0
            )));
        }
        if entry.next_key == Some(*key) {
            return Ok(());
        }
        if key_in_use(&tx, key)? {
            return Err(StoreError::KeyInUse);
        }
        tx.execute(
            "UPDATE subscriptions SET next_key = ?2 WHERE id = ?1",
            params![id.0, &key.0[..]],
        )?;
        audit(
            &tx,
            Actor::DEVICE,
            "key_update_begin",
            Some(&entry.serial),
            &format!("subscription {}: next key {}", id.0, fingerprint(key)),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Credential update, phase 2: the first handshake with the next key makes it the key; the
    /// old one is retired, the rotation request cleared. Refused unless `key` is the pending next
    /// key ([`StoreError::NextKeyMismatch`]).
    pub(crate) fn promote_next_key(
        &self,
        id: SubscriptionId,
        key: &PublicKey,
    ) -> Result<(), StoreError> {
        let tx = self.immediate()?;
        let entry = index_entry_in(&tx, id.0)?;
        if entry.next_key != Some(*key) || entry.status == SubscriptionStatus::Revoked {
            return Err(StoreError::NextKeyMismatch(id));
        }
        tx.execute(
            "UPDATE subscriptions SET public_key = next_key, next_key = NULL,
                 key_since_ms = ?2, rotate_requested = 0
             WHERE id = ?1",
            params![id.0, now_ms()],
        )?;
        audit(
            &tx,
            Actor::DEVICE,
            "key_update_commit",
            Some(&entry.serial),
            &format!(
                "subscription {}: key {} retired, key {} in use",
                id.0,
                fingerprint(&entry.public_key),
                fingerprint(key)
            ),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The fraud detector's verdict: flags the subscription with `reason`, and quarantines it
    /// (`quarantine`) or asks for a credential update. A suspended subscription stays suspended
    /// (a quarantine would let the factory handshake resume it), with a credential update asked.
    pub(crate) fn flag(
        &self,
        id: SubscriptionId,
        reason: &str,
        quarantine: bool,
    ) -> Result<(), StoreError> {
        let reason: String = reason.chars().take(MAX_FLAG).collect();
        let tx = self.immediate()?;
        let entry = index_entry_in(&tx, id.0)?;
        if entry.status == SubscriptionStatus::Revoked {
            return Err(StoreError::Conflict(format!(
                "subscription {} is revoked",
                id.0
            )));
        }
        let quarantine = quarantine && entry.status != SubscriptionStatus::Suspended;
        if quarantine {
            tx.execute(
                "UPDATE subscriptions SET flag = ?2, status = 'quarantined' WHERE id = ?1",
                params![id.0, reason],
            )?;
        } else {
            tx.execute(
                "UPDATE subscriptions SET flag = ?2, rotate_requested = 1 WHERE id = ?1",
                params![id.0, reason],
            )?;
        }
        audit(
            &tx,
            Actor::FRAUD_DETECTOR,
            if quarantine { "quarantine" } else { "flag" },
            Some(&entry.serial),
            &format!("subscription {}: {reason}", id.0),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records the configuration version the device runs (reported, or just delivered). Audited
    /// when it changes.
    pub(crate) fn set_config_version(
        &self,
        id: SubscriptionId,
        version: u32,
    ) -> Result<(), StoreError> {
        let tx = self.immediate()?;
        let entry = index_entry_in(&tx, id.0)?;
        if entry.config_version == Some(version) {
            return Ok(());
        }
        tx.execute(
            "UPDATE subscriptions SET config_version = ?2 WHERE id = ?1",
            params![id.0, version],
        )?;
        let before = entry
            .config_version
            .map_or_else(|| "none".to_owned(), |v| v.to_string());
        audit(
            &tx,
            Actor::DEVICE,
            "config_version",
            Some(&entry.serial),
            &format!(
                "subscription {}: profile {} version {before} -> {version}",
                id.0, entry.profile
            ),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Whether `owner` may see the device `serial`: it owns it, a transfer to it is pending, or
    /// it holds one of its subscriptions (a statically provisioned device, or one it sold).
    pub fn visible_to(&self, serial: &str, owner: &str) -> Result<bool, StoreError> {
        Ok(self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM devices WHERE serial = ?1 AND (owner = ?2 OR transfer_to = ?2))
                 OR EXISTS (SELECT 1 FROM subscriptions WHERE serial = ?1 AND owner = ?2)",
            params![serial, owner],
            |r| r.get(0),
        )?)
    }

    /// An operator asks for a credential update of `owner`'s device: its live subscription gets
    /// the Rotate notice at its next contact. Returns that subscription.
    pub fn request_rotation(
        &self,
        serial: &str,
        owner: &str,
        actor: Actor<'_>,
    ) -> Result<SubscriptionId, StoreError> {
        let tx = self.immediate()?;
        let live = live_subscription(&tx, serial)?.filter(|l| l.owner == owner);
        let Some(live) = live else {
            return Err(
                if device_row(&tx, serial)?.is_some_and(|d| d.owner == owner) {
                    StoreError::Conflict(format!("device {serial} has no live subscription"))
                } else {
                    StoreError::UnknownDevice(serial.to_owned())
                },
            );
        };
        tx.execute(
            "UPDATE subscriptions SET rotate_requested = 1 WHERE id = ?1",
            [live.id],
        )?;
        audit(
            &tx,
            actor,
            "rotate",
            Some(serial),
            &format!("subscription {}: credential update requested", live.id),
        )?;
        tx.commit()?;
        Ok(SubscriptionId(live.id))
    }

    /// The owner `owner` offers its device to `to`; it changes hands when `to` accepts
    /// (`Store::accept_transfer`). A second offer replaces the first.
    pub fn request_transfer(
        &self,
        serial: &str,
        owner: &str,
        to: &str,
        actor: Actor<'_>,
    ) -> Result<(), StoreError> {
        if !crate::tokens::is_valid_owner(to) {
            return Err(StoreError::Invalid(
                "an owner is 1 to 64 of A-Z a-z 0-9 - _ .".into(),
            ));
        }
        let tx = self.immediate()?;
        let device = owned_device(&tx, serial, owner)?;
        if device.released.is_some() {
            return Err(StoreError::Conflict(format!(
                "device {serial} was released"
            )));
        }
        if to == owner {
            return Err(StoreError::Conflict(format!(
                "{owner} already owns {serial}"
            )));
        }
        tx.execute(
            "UPDATE devices SET transfer_to = ?2 WHERE serial = ?1",
            params![serial, to],
        )?;
        audit(
            &tx,
            actor,
            "transfer",
            Some(serial),
            &format!("{owner} -> {to}, awaiting acceptance"),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The owner `to` accepts a pending transfer: the device is `to`'s, activated with `account`
    /// and `profile` (default: [`DEFAULT_PROFILE`]); the previous owner's subscription is revoked
    /// in the same transaction. The device provisions under its new owner at its next contact.
    pub(crate) fn accept_transfer(
        &self,
        serial: &str,
        to: &str,
        account: Option<&str>,
        profile: Option<&str>,
        actor: Actor<'_>,
    ) -> Result<Transferred, StoreError> {
        if account.is_some_and(|a| !is_valid_account(a)) {
            return Err(StoreError::Invalid(
                "account: 1 to 64 printable ASCII characters, no comma".into(),
            ));
        }
        let profile = profile.unwrap_or(DEFAULT_PROFILE);
        let tx = self.immediate()?;
        let mut device = device_row(&tx, serial)?
            .filter(|d| d.transfer_to.as_deref() == Some(to) || d.owner == to)
            .ok_or_else(|| StoreError::UnknownDevice(serial.to_owned()))?;
        if device.transfer_to.as_deref() != Some(to) {
            return Err(StoreError::Conflict(format!(
                "no transfer of {serial} to {to} is pending"
            )));
        }
        if profile_in(&tx, profile)?.is_none() {
            return Err(StoreError::UnknownProfile(profile.to_owned()));
        }
        let now = now_ms();
        let from = std::mem::replace(&mut device.owner, to.to_owned());
        tx.execute(
            "UPDATE devices SET owner = ?2, account = ?3, profile = ?4, transfer_to = NULL,
                 claimed_at_ms = ?5, activated_at_ms = ?5
             WHERE serial = ?1",
            params![serial, to, account, profile, now],
        )?;
        let revoked = revoke_live(&tx, serial)?;
        audit(
            &tx,
            actor,
            "accept_transfer",
            Some(serial),
            &format!(
                "{from} -> {to}, profile {profile}; {}",
                revoked.map_or_else(
                    || "no live subscription".to_owned(),
                    |id| format!("subscription {} revoked", id.0)
                )
            ),
        )?;
        tx.commit()?;
        device.transfer_to = None;
        device.account = account.map(str::to_owned);
        device.profile = Some(profile.to_owned());
        device.activated_at_ms = Some(now);
        Ok(Transferred {
            device: device.factory_entry()?,
            from,
            revoked,
        })
    }

    /// What a release of `owner`'s device would name (to be signed), checked releasable.
    pub fn release_target(&self, serial: &str, owner: &str) -> Result<ReleasedDevice, StoreError> {
        let d = owned_device(&self.conn, serial, owner)?;
        if d.released.is_some() {
            return Err(StoreError::Conflict(format!(
                "device {serial} was released already"
            )));
        }
        Ok(ReleasedDevice {
            serial: d.serial,
            factory_key: d.factory_key,
            model: d.model,
        })
    }

    /// Stores a signed release of `owner`'s device: the device keeps it (its next contact is
    /// refused with it), its subscription is revoked and a pending transfer dropped.
    pub(crate) fn release(
        &self,
        owner: &str,
        doc: &ReleaseDocument,
        actor: Actor<'_>,
    ) -> Result<ReleaseOutcome, StoreError> {
        let tx = self.immediate()?;
        let mut device = owned_device(&tx, &doc.serial, owner)?;
        if device.released.is_some() {
            return Err(StoreError::Conflict(format!(
                "device {} was released already",
                doc.serial
            )));
        }
        if device.factory_key != doc.factory_public_key {
            return Err(StoreError::Conflict(
                "the release names another factory key".into(),
            ));
        }
        let json = doc.to_json().to_string();
        tx.execute(
            "UPDATE devices SET released = ?2, transfer_to = NULL WHERE serial = ?1",
            params![doc.serial, json],
        )?;
        let revoked = revoke_live(&tx, &doc.serial)?;
        audit(
            &tx,
            actor,
            "release",
            Some(&doc.serial),
            &format!(
                "to core {} at {}; {}",
                fingerprint(&doc.core_public_key),
                doc.endpoint,
                revoked.map_or_else(
                    || "no live subscription".to_owned(),
                    |id| format!("subscription {} revoked", id.0)
                )
            ),
        )?;
        tx.commit()?;
        device.released = Some(json);
        device.transfer_to = None;
        Ok(ReleaseOutcome {
            device: device.factory_entry()?,
            revoked,
        })
    }

    /// Claims for `owner` a device another operator's core released to this one (`doc` already
    /// verified against the trusted releasers; `issuer` names the one that signed it). A device
    /// this core released earlier and now gets back is claimed afresh.
    pub(crate) fn claim_release(
        &self,
        owner: &str,
        doc: &ReleaseDocument,
        issuer: &str,
        actor: Actor<'_>,
    ) -> Result<FactoryEntry, StoreError> {
        let tx = self.immediate()?;
        let serial = doc.serial.as_str();
        let returning = match device_row(&tx, serial)? {
            Some(d) if d.released.is_some() && d.factory_key == doc.factory_public_key => true,
            Some(_) => {
                return Err(StoreError::Conflict(format!(
                    "device {serial} is already claimed"
                )))
            }
            None => false,
        };
        if !returning && key_in_use(&tx, &doc.factory_public_key)? {
            return Err(StoreError::Conflict(
                "the factory key is already in use".into(),
            ));
        }
        if live_subscription(&tx, serial)?.is_some() {
            return Err(StoreError::Conflict(format!(
                "the serial {serial} has a live subscription"
            )));
        }
        let now = now_ms();
        tx.execute(
            "INSERT INTO devices (serial, factory_key, model, owner, claimed_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (serial) DO UPDATE SET model = ?3, owner = ?4, claimed_at_ms = ?5,
                 account = NULL, profile = NULL, activated_at_ms = NULL, transfer_to = NULL,
                 released = NULL",
            params![serial, &doc.factory_public_key.0[..], doc.model, owner, now],
        )?;
        audit(
            &tx,
            actor,
            "claim_release",
            Some(serial),
            &format!(
                "released by {issuer} at {} ms, model {}, owner {owner}",
                doc.issued_ms, doc.model
            ),
        )?;
        tx.commit()?;
        Ok(FactoryEntry {
            serial: serial.to_owned(),
            factory_key: doc.factory_public_key,
            owner: owner.to_owned(),
            activated: false,
            profile: None,
            release: None,
        })
    }

    /// The newest `limit` readings (capped at [`MAX_PAGE`]) of `owner`'s subscriptions of the
    /// device `serial`, oldest first: an owner never sees readings stored under another owner's
    /// subscription.
    pub fn readings_for_owner(
        &self,
        serial: &str,
        owner: &str,
        limit: u32,
    ) -> Result<Vec<ReadingRecord>, StoreError> {
        if !self.visible_to(serial, owner)? {
            return Err(StoreError::UnknownDevice(serial.to_owned()));
        }
        let mut stmt = self.conn.prepare_cached(
            "SELECT r.subscription_id, r.seq, r.received_at_ms, r.data
             FROM readings r JOIN subscriptions s ON s.id = r.subscription_id
             WHERE s.serial = ?1 AND s.owner = ?2
             ORDER BY r.received_at_ms DESC, r.subscription_id DESC, r.seq DESC LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![serial, owner, limit.min(MAX_PAGE)], |r| {
            Ok(ReadingRecord {
                subscription: r.get(0)?,
                seq: r.get::<_, i64>(1)? as u64,
                received_at_ms: r.get(2)?,
                data: hex::encode(r.get::<_, Vec<u8>>(3)?),
            })
        })?;
        let mut out = rows.collect::<Result<Vec<_>, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// The serial of every subscription `owner` holds (any status), by subscription id: whose
    /// stored videos it may list.
    pub fn subscription_serials(
        &self,
        owner: &str,
    ) -> Result<std::collections::HashMap<i64, String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, serial FROM subscriptions WHERE owner = ?1")?;
        let rows = stmt.query_map([owner], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The device `serial` as `owner` sees it ([`StoreError::UnknownDevice`] if it may not).
    pub fn device_view(&self, serial: &str, owner: &str) -> Result<DeviceView, StoreError> {
        if !self.visible_to(serial, owner)? {
            return Err(StoreError::UnknownDevice(serial.to_owned()));
        }
        let device = device_row(&self.conn, serial)?;
        // The subscription shown is the device owner's (or, for a device sold, the caller's).
        let sub_owner = match &device {
            Some(d) if d.owner == owner || d.transfer_to.as_deref() == Some(owner) => {
                d.owner.clone()
            }
            _ => owner.to_owned(),
        };
        let sub: Option<IndexEntry> = {
            let mut stmt = self.conn.prepare_cached(&format!(
                "{INDEX_SELECT} WHERE s.serial = ?1 AND s.owner = ?2
                 ORDER BY s.status = 'revoked', s.id DESC LIMIT 1"
            ))?;
            let mut rows = stmt.query(params![serial, sub_owner])?;
            rows.next()?.map(index_row).transpose()?
        };
        let sub_created: Option<i64> = match &sub {
            Some(s) => Some(self.conn.query_row(
                "SELECT created_at_ms FROM subscriptions WHERE id = ?1",
                [s.id.0],
                |r| r.get(0),
            )?),
            None => None,
        };
        let readings: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM readings WHERE subscription_id IN
                 (SELECT id FROM subscriptions WHERE serial = ?1 AND owner = ?2)",
            params![serial, owner],
            |r| r.get(0),
        )?;
        let live = sub
            .as_ref()
            .is_some_and(|s| s.status != SubscriptionStatus::Revoked);
        let release = device
            .as_ref()
            .map(DeviceRow::release)
            .transpose()?
            .flatten();
        let state = match &device {
            _ if release.is_some() => "released",
            _ if live => "provisioned",
            Some(d) if d.activated_at_ms.is_some() => "activated",
            Some(_) => "claimed",
            // A statically provisioned device (its subscription may be revoked: see status).
            None => "provisioned",
        };
        let profile_name = device.as_ref().and_then(|d| d.profile.clone());
        let profile_version = match (&profile_name, &sub) {
            (Some(p), _) => profile_in(&self.conn, p)?.map(|p| p.version),
            (None, Some(s)) => profile_in(&self.conn, &s.profile)?.map(|p| p.version),
            (None, None) => None,
        };
        Ok(DeviceView {
            serial: serial.to_owned(),
            owner: device
                .as_ref()
                .map_or_else(|| sub_owner.clone(), |d| d.owner.clone()),
            state,
            model: device.as_ref().map(|d| d.model.clone()),
            account: device.as_ref().and_then(|d| d.account.clone()),
            profile: profile_name.or_else(|| sub.as_ref().map(|s| s.profile.clone())),
            profile_version,
            claimed_at_ms: device.as_ref().map(|d| d.claimed_at_ms),
            activated_at_ms: device.as_ref().and_then(|d| d.activated_at_ms),
            transfer_to: device.as_ref().and_then(|d| d.transfer_to.clone()),
            released_to: release.map(|r| r.endpoint),
            subscription: sub.as_ref().map(|s| s.id.0),
            status: sub.as_ref().map(|s| s.status.as_str().to_owned()),
            created_at_ms: sub_created,
            key_since_ms: sub.as_ref().map(|s| s.key_since_ms),
            next_key_pending: sub.as_ref().is_some_and(|s| s.next_key.is_some()),
            rotate_requested: sub.as_ref().is_some_and(|s| s.rotate_requested),
            config_version: sub.as_ref().and_then(|s| s.config_version),
            flag: sub.and_then(|s| s.flag),
            readings: readings.max(0) as u64,
        })
    }

    /// One page of the devices `owner` sees (owned, offered to it, or holding one of its
    /// subscriptions), by serial; `limit` is capped at [`MAX_PAGE`].
    pub fn device_views(
        &self,
        owner: &str,
        limit: u32,
        offset: u64,
    ) -> Result<DeviceViewPage, StoreError> {
        const VISIBLE: &str = "SELECT serial FROM devices WHERE owner = ?1 OR transfer_to = ?1
            UNION SELECT serial FROM subscriptions WHERE owner = ?1";
        let limit = limit.min(MAX_PAGE);
        let total: i64 =
            self.conn
                .query_row(&format!("SELECT COUNT(*) FROM ({VISIBLE})"), [owner], |r| {
                    r.get(0)
                })?;
        let serials: Vec<String> = self
            .conn
            .prepare_cached(&format!(
                "SELECT serial FROM ({VISIBLE}) ORDER BY serial LIMIT ?2 OFFSET ?3"
            ))?
            .query_map(
                params![owner, limit, i64::try_from(offset).unwrap_or(i64::MAX)],
                |r| r.get(0),
            )?
            .collect::<Result<_, _>>()?;
        let devices = serials
            .iter()
            .map(|s| self.device_view(s, owner))
            .collect::<Result<_, _>>()?;
        Ok(DeviceViewPage {
            total: total.max(0) as u64,
            limit,
            offset,
            devices,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::*;
    use crate::manifest::{parse_manifest, parse_plan};
    use crate::release::ReleaseSigner;
    use crate::store::{PendingReading, SubscriptionStatus};
    use relay_protocol::payload::ReadingSeq;

    const OP: Actor<'static> = Actor {
        name: "op",
        role: Some("operator"),
    };

    fn key(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    fn open(dir: &tempfile::TempDir) -> Store {
        Store::open(&dir.path().join("s.db")).expect("open")
    }

    /// A manifest of `(serial, key byte)`.
    fn manifest(rows: &[(&str, u8)]) -> Parsed<ManifestRow> {
        let mut text = String::from("serial,factory_public_key,model\n");
        for (serial, k) in rows {
            text.push_str(&format!("{serial},{},EM-1\n", key(*k).to_hex()));
        }
        parse_manifest(text.as_bytes())
    }

    fn plan(rows: &[(&str, &str)]) -> Parsed<PlanRow> {
        let mut text = String::from("serial,account,profile\n");
        for (serial, profile) in rows {
            text.push_str(&format!("{serial},apt-{serial},{profile}\n"));
        }
        parse_plan(text.as_bytes())
    }

    fn bad_rows(e: StoreError) -> Vec<(usize, String)> {
        match e {
            StoreError::BadRows(rows) => rows.into_iter().map(|r| (r.row, r.error)).collect(),
            other => panic!("not BadRows: {other}"),
        }
    }

    fn reading(sub: SubscriptionId, seq: u64) -> PendingReading {
        PendingReading {
            slot: 0,
            subscription: sub,
            seq: ReadingSeq(seq),
            received_at_ms: now_ms(),
            data: vec![seq as u8],
        }
    }

    /// Claimed and activated for `owner` ("op" when not said).
    fn ready(store: &Store, owner: &str, rows: &[(&str, u8)]) {
        store.claim(owner, &manifest(rows), OP).expect("claim");
        let p: Vec<(&str, &str)> = rows.iter().map(|(s, _)| (*s, "default")).collect();
        store.activate(owner, &plan(&p), OP).expect("activate");
    }

    #[test]
    fn a_manifest_is_claimed_whole_or_not_at_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let claimed = store
            .claim("acme", &manifest(&[("m-1", 1), ("m-2", 2), ("m-3", 3)]), OP)
            .expect("claim");
        assert_eq!(claimed.len(), 3);
        assert!(claimed.iter().all(|d| d.owner == "acme" && !d.activated));
        let audit_before = store.audit(MAX_PAGE).expect("audit").len();
        assert_eq!(audit_before, 4, "one per device and the manifest");

        // Row 2 is fine; 3 is claimed already, 4 reuses a factory key, 5 is malformed, 6
        // repeats a serial of the file.
        let mut text = String::from("serial,factory_public_key,model\n");
        text.push_str(&format!("m-9,{},EM\n", key(9).to_hex()));
        text.push_str(&format!("m-1,{},EM\n", key(10).to_hex()));
        text.push_str(&format!("m-11,{},EM\n", key(2).to_hex()));
        text.push_str("m-12,zz,EM\n");
        text.push_str(&format!("m-9,{},EM\n", key(13).to_hex()));
        let e = store
            .claim("other", &parse_manifest(text.as_bytes()), OP)
            .expect_err("bad rows");
        let rows = bad_rows(e);
        assert_eq!(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            [3, 4, 5, 6],
            "{rows:?}"
        );
        assert!(rows[0].1.contains("another owner"));
        assert!(rows[1].1.contains("factory key"));
        // Nothing changed, not even the good row; no audit record either.
        assert_eq!(store.factory_entries().expect("entries").len(), 3);
        assert!(store.factory_entry("m-9").expect("entry").is_none());
        assert_eq!(store.audit(MAX_PAGE).expect("audit").len(), audit_before);

        // A serial statically provisioned cannot be claimed: it has a live subscription.
        store
            .add_subscription("legacy-1", &key(50), SubscriptionStatus::Active)
            .expect("add");
        let rows = bad_rows(
            store
                .claim("acme", &manifest(&[("legacy-1", 51)]), OP)
                .expect_err("live"),
        );
        assert!(rows[0].1.contains("live subscription"));
        // A device key cannot be a factory key.
        let rows = bad_rows(
            store
                .claim("acme", &manifest(&[("m-20", 50)]), OP)
                .expect_err("in use"),
        );
        assert!(rows[0].1.contains("in use"));
    }

    #[test]
    fn a_plan_activates_a_thousand_devices_in_one_transaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let serials: Vec<String> = (0..1000).map(|i| format!("meter-{i:05}")).collect();
        let mut text = String::from("serial,factory_public_key,model\n");
        for (i, s) in serials.iter().enumerate() {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&(i as u32 + 1).to_be_bytes());
            text.push_str(&format!("{s},{},EM\n", hex::encode(k)));
        }
        let m = parse_manifest(text.as_bytes());
        assert!(m.errors.is_empty());
        assert_eq!(store.claim("op", &m, OP).expect("claim").len(), 1000);
        let rows: Vec<(&str, &str)> = serials.iter().map(|s| (s.as_str(), "default")).collect();
        let activated = store.activate("op", &plan(&rows), OP).expect("activate");
        assert_eq!(activated.len(), 1000);
        assert!(activated
            .iter()
            .all(|d| d.activated && d.profile.as_deref() == Some("default")));
        assert!(store
            .factory_entries()
            .expect("entries")
            .iter()
            .all(|d| d.activated));
        let v = store.device_view("meter-00999", "op").expect("view");
        assert_eq!(
            (v.state, v.account.as_deref()),
            ("activated", Some("apt-meter-00999"))
        );
    }

    #[test]
    fn a_bad_plan_names_every_bad_row_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        store
            .claim("op", &manifest(&[("m-1", 1), ("m-2", 2), ("m-3", 3)]), OP)
            .expect("claim");
        store
            .claim("rival", &manifest(&[("r-1", 4)]), OP)
            .expect("claim");
        let signer =
            ReleaseSigner::from_pkcs8(&ReleaseSigner::generate_pkcs8().expect("gen")).expect("key");
        let target = store.release_target("m-3", "op").expect("target");
        let doc = signer.sign(&target, key(99), "core-2:4433", 1);
        store.release("op", &doc, OP).expect("release");

        let p = parse_plan(
            b"serial,account,profile\nm-1,a,default\nnobody,a,default\nr-1,a,default\nm-2,a,nope\nm-3,a,default\nm-1,b,default\nbad serial,a,default\n",
        );
        let rows = bad_rows(store.activate("op", &p, OP).expect_err("bad"));
        assert_eq!(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            [3, 4, 5, 6, 7, 8],
            "{rows:?}"
        );
        for (row, what) in [
            (3, "not claimed"),
            (4, "another owner"),
            (5, "unknown profile"),
            (6, "released"),
            (7, "duplicate"),
        ] {
            let (_, e) = rows.iter().find(|r| r.0 == row).expect("row");
            assert!(e.contains(what), "row {row}: {e}");
        }
        assert!(
            !store
                .factory_entry("m-1")
                .expect("entry")
                .expect("claimed")
                .activated
        );
        let empty = parse_plan(b"serial,account,profile\n");
        assert_eq!(
            bad_rows(store.activate("op", &empty, OP).expect_err("empty"))[0].0,
            1
        );
    }

    #[test]
    fn profiles_are_versioned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let default = store.profile(DEFAULT_PROFILE).expect("default");
        assert_eq!(
            default.config(),
            DeviceConfig {
                version: 1,
                report_interval_secs: 60,
                report_bytes: 64,
                threshold: 0
            }
        );
        let s = ProfileSettings {
            report_interval_secs: 900,
            report_bytes: 32,
            threshold: 5,
            gateways: Vec::new(),
            allow_direct: true,
            quota: None,
        };
        let (p, changed) = store.put_profile("heat", s.clone(), OP).expect("put");
        assert_eq!((p.version, changed), (1, true));
        assert!(
            p.gateways.is_empty() && p.allow_direct,
            "no policy: any path"
        );
        let (p, changed) = store.put_profile("heat", s.clone(), OP).expect("same");
        assert_eq!((p.version, changed), (1, false));
        let (p, changed) = store
            .put_profile(
                "heat",
                ProfileSettings {
                    threshold: 6,
                    ..s.clone()
                },
                OP,
            )
            .expect("change");
        assert_eq!((p.version, changed, p.config().threshold), (2, true, 6));
        let (p, _) = store
            .put_profile("default", s.clone(), OP)
            .expect("default");
        assert_eq!(p.version, 2);
        assert_eq!(
            store
                .profiles()
                .expect("list")
                .iter()
                .map(|p| (p.name.as_str(), p.version))
                .collect::<Vec<_>>(),
            [("default", 2), ("heat", 2)]
        );
        for bad in [
            ProfileSettings {
                report_interval_secs: 0,
                ..s.clone()
            },
            ProfileSettings {
                report_bytes: 0,
                ..s.clone()
            },
            ProfileSettings {
                report_bytes: u16::MAX,
                ..s.clone()
            },
            ProfileSettings {
                gateways: vec!["gw 1".into()],
                ..s.clone()
            },
            ProfileSettings {
                gateways: vec![String::new()],
                ..s.clone()
            },
            ProfileSettings {
                gateways: (0..=MAX_PROFILE_GATEWAYS)
                    .map(|i| format!("gw-{i}"))
                    .collect(),
                ..s.clone()
            },
        ] {
            assert!(matches!(
                store.put_profile("heat", bad, OP),
                Err(StoreError::Invalid(_))
            ));
        }
        assert!(matches!(
            store.put_profile("bad name", s, OP),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.profile("nope"),
            Err(StoreError::UnknownProfile(_))
        ));
        let log = store.audit(MAX_PAGE).expect("audit");
        assert_eq!(
            log.iter().filter(|r| r.action == "put_profile").count(),
            3,
            "changes only"
        );
    }

    #[test]
    fn a_gateway_policy_is_stored_and_keeps_the_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let s = ProfileSettings {
            report_interval_secs: 900,
            report_bytes: 32,
            threshold: 0,
            gateways: Vec::new(),
            allow_direct: true,
            quota: None,
        };
        let (p, _) = store.put_profile("building-a", s.clone(), OP).expect("put");
        assert_eq!(p.version, 1);
        let policy = ProfileSettings {
            gateways: vec!["gw-b".into(), "gw-a".into(), "gw-b".into()],
            allow_direct: false,
            ..s.clone()
        };
        let (p, changed) = store
            .put_profile("building-a", policy.clone(), OP)
            .expect("policy");
        assert!(changed);
        assert_eq!(p.version, 1, "the devices have nothing new to apply");
        assert_eq!(p.gateways, ["gw-a", "gw-b"], "sorted, once each");
        assert!(!p.allow_direct);
        assert!(p.allows_gateway("gw-a") && !p.allows_gateway("gw-c"));
        let (_, changed) = store
            .put_profile("building-a", policy, OP)
            .expect("same policy");
        assert!(!changed);
        assert_eq!(store.profile("building-a").expect("get"), p);
        // Leaving the policy out of a PUT restores the default: any path.
        let (p, changed) = store.put_profile("building-a", s, OP).expect("reset");
        assert!(changed);
        assert!(p.gateways.is_empty() && p.allow_direct && p.allows_gateway("gw-c"));
        let log = store.audit(MAX_PAGE).expect("audit");
        assert!(log.iter().any(|r| r.action == "put_profile"
            && r.detail.contains("gateways gw-a gw-b, direct refused")));
    }

    #[test]
    fn a_quota_is_stored_keeps_the_version_and_is_validated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let s = ProfileSettings {
            report_interval_secs: 900,
            report_bytes: 32,
            threshold: 0,
            gateways: Vec::new(),
            allow_direct: true,
            quota: None,
        };
        let (p, _) = store.put_profile("meters", s.clone(), OP).expect("put");
        assert_eq!((p.version, p.quota), (1, None), "no quota: the default");
        let quota = ProfileQuota {
            frames: 100,
            bytes: 0,
            interval_secs: 3600,
        };
        let with = ProfileSettings {
            quota: Some(quota),
            ..s.clone()
        };
        let (p, changed) = store
            .put_profile("meters", with.clone(), OP)
            .expect("quota");
        assert_eq!((p.version, changed, p.quota), (1, true, Some(quota)));
        assert_eq!(store.profile("meters").expect("get"), p);
        let (_, changed) = store.put_profile("meters", with, OP).expect("same");
        assert!(!changed);
        let unlimited = ProfileQuota {
            frames: 0,
            bytes: 0,
            interval_secs: 0,
        };
        let (p, _) = store
            .put_profile(
                "meters",
                ProfileSettings {
                    quota: Some(unlimited),
                    ..s.clone()
                },
                OP,
            )
            .expect("unlimited");
        assert_eq!(p.quota, Some(unlimited));
        assert!(matches!(
            store.put_profile(
                "meters",
                ProfileSettings {
                    quota: Some(ProfileQuota {
                        interval_secs: 0,
                        ..quota
                    }),
                    ..s.clone()
                },
                OP,
            ),
            Err(StoreError::Invalid(_))
        ));
        // Left out of a PUT: back to the default.
        let (p, changed) = store.put_profile("meters", s, OP).expect("reset");
        assert_eq!((changed, p.quota), (true, None));
        let log = store.audit(MAX_PAGE).expect("audit");
        assert!(log.iter().any(|r| r.action == "put_profile"
            && r.detail
                .contains("quota 100 frames, unlimited bytes per 3600 s")));
        // The JSON form the admin API takes and shows.
        let parsed: ProfileSettings = serde_json::from_str(
            r#"{"report_interval_secs":60,"report_bytes":8,"threshold":0,
                "quota":{"frames":5,"bytes":500,"interval_secs":10}}"#,
        )
        .expect("json");
        assert_eq!(
            parsed.quota,
            Some(ProfileQuota {
                frames: 5,
                bytes: 500,
                interval_secs: 10
            })
        );
        assert!(serde_json::from_str::<ProfileSettings>(
            r#"{"report_interval_secs":60,"report_bytes":8,"threshold":0,"quota":{"frames":5}}"#
        )
        .is_err());
    }

    #[test]
    fn provisioning_needs_a_claim_and_a_plan_and_recovers_a_quarantine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(&dir);
        assert!(matches!(
            store.provision("m-1", &key(101)),
            Err(StoreError::NotClaimed(_))
        ));
        store
            .claim("op", &manifest(&[("m-1", 1)]), OP)
            .expect("claim");
        assert!(matches!(
            store.provision("m-1", &key(101)),
            Err(StoreError::NotActivated(_))
        ));
        store
            .activate("op", &plan(&[("m-1", "default")]), OP)
            .expect("plan");
        // The factory key itself is never a subscription key.
        assert!(matches!(
            store.provision("m-1", &key(1)),
            Err(StoreError::KeyInUse)
        ));
        let e = store.provision("m-1", &key(101)).expect("provision");
        assert_eq!(
            (
                e.status,
                e.public_key,
                e.owner.as_str(),
                e.profile.as_str(),
                e.serial.as_str()
            ),
            (SubscriptionStatus::Active, key(101), "op", "default", "m-1")
        );
        // A retransmission: the same subscription, unchanged.
        assert_eq!(store.provision("m-1", &key(101)).expect("again").id, e.id);
        assert_eq!(
            store.device_view("m-1", "op").expect("view").state,
            "provisioned"
        );

        // Quarantine, then recovery with a new key: active, flag and rotation cleared.
        store.flag(e.id, "clone", true).expect("flag");
        let q = &store.index_entries().expect("index")[0];
        assert_eq!(
            (q.status, q.flag.as_deref()),
            (SubscriptionStatus::Quarantined, Some("clone"))
        );
        store.set_next_key(e.id, &key(102)).expect("next");
        let r = store.provision("m-1", &key(103)).expect("recover");
        assert_eq!(r.id, e.id, "the same subscription: readings stay");
        assert_eq!(
            (
                r.status,
                r.public_key,
                r.next_key,
                r.flag,
                r.rotate_requested
            ),
            (SubscriptionStatus::Active, key(103), None, None, false)
        );
        // The old key is gone from the index: refused from now on.
        assert!(store
            .index_entries()
            .expect("index")
            .iter()
            .all(|i| i.public_key != key(101)));

        // Suspended: the factory handshake does not resume it.
        store
            .change_status("m-1", SubscriptionStatus::Suspended, None)
            .expect("suspend");
        assert!(matches!(
            store.provision("m-1", &key(104)),
            Err(StoreError::Suspended(_))
        ));
        let log = store.audit(MAX_PAGE).expect("audit");
        let provisions: Vec<_> = log.iter().filter(|r| r.action == "provision").collect();
        assert_eq!(provisions.len(), 2);
        assert!(provisions.iter().all(|r| r.actor == "device"));
        assert!(log
            .iter()
            .any(|r| r.action == "quarantine" && r.actor == "fraud-detector"));
    }

    #[test]
    fn a_key_update_is_two_phase_and_one_promotion_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        let store = Store::open(&path).expect("open");
        ready(&store, "op", &[("m-1", 1), ("m-2", 2)]);
        let a = store.provision("m-1", &key(11)).expect("a");
        let b = store.provision("m-2", &key(12)).expect("b");
        store.flag(a.id, "replay", false).expect("flag");
        assert!(store.index_entries().expect("index")[0].rotate_requested);

        // Phase 1: bound, the old key still the key.
        store.set_next_key(a.id, &key(21)).expect("phase 1");
        store.set_next_key(a.id, &key(21)).expect("idempotent");
        assert!(matches!(
            store.set_next_key(b.id, &key(21)),
            Err(StoreError::KeyInUse)
        ));
        assert!(matches!(
            store.set_next_key(b.id, &key(11)),
            Err(StoreError::KeyInUse)
        ));
        let e = &store.index_entries().expect("index")[0];
        assert_eq!((e.public_key, e.next_key), (key(11), Some(key(21))));
        // A device that lost its first next key proposes another: it replaces it.
        store.set_next_key(a.id, &key(22)).expect("replace");
        assert!(matches!(
            store.promote_next_key(a.id, &key(21)),
            Err(StoreError::NextKeyMismatch(_))
        ));

        // Phase 2, raced by two connections: exactly one wins.
        let barrier = Arc::new(Barrier::new(2));
        let results: Vec<_> = (0..2)
            .map(|_| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let s = Store::open(&path).expect("open");
                    barrier.wait();
                    s.promote_next_key(a.id, &key(22)).is_ok()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect();
        assert_eq!(results.iter().filter(|ok| **ok).count(), 1, "{results:?}");
        let e = &store.index_entries().expect("index")[0];
        assert_eq!(
            (e.public_key, e.next_key, e.rotate_requested),
            (key(22), None, false)
        );
        assert!(e.key_since_ms >= a.key_since_ms);
        // The retired key is refused for good: it stays in no index entry.
        assert!(matches!(
            store.promote_next_key(a.id, &key(22)),
            Err(StoreError::NextKeyMismatch(_))
        ));
        assert!(matches!(
            store.set_next_key(SubscriptionId(999), &key(30)),
            Err(StoreError::UnknownSubscription(_))
        ));

        store.set_config_version(a.id, 1).expect("config");
        store.set_config_version(a.id, 1).expect("same");
        store.set_config_version(a.id, 2).expect("config 2");
        assert_eq!(
            store.index_entries().expect("index")[0].config_version,
            Some(2)
        );
        let log = store.audit(MAX_PAGE).expect("audit");
        assert_eq!(
            log.iter().filter(|r| r.action == "config_version").count(),
            2
        );
        assert_eq!(
            log.iter()
                .filter(|r| r.action == "key_update_begin")
                .count(),
            2
        );
        assert_eq!(
            log.iter()
                .filter(|r| r.action == "key_update_commit")
                .count(),
            1
        );
    }

    #[test]
    fn rotation_is_requested_by_the_owner_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        ready(&store, "op", &[("m-1", 1)]);
        assert!(matches!(
            store.request_rotation("m-1", "op", OP),
            Err(StoreError::Conflict(_))
        ));
        let a = store.provision("m-1", &key(11)).expect("a");
        assert!(matches!(
            store.request_rotation("m-1", "rival", OP),
            Err(StoreError::UnknownDevice(_))
        ));
        assert_eq!(
            store.request_rotation("m-1", "op", OP).expect("rotate"),
            a.id
        );
        assert!(store.index_entries().expect("index")[0].rotate_requested);
        assert!(
            store
                .device_view("m-1", "op")
                .expect("view")
                .rotate_requested
        );
    }

    #[test]
    fn a_transfer_needs_both_sides_and_cuts_the_old_owner_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(&dir);
        ready(&store, "alice", &[("m-1", 1)]);
        let a = store.provision("m-1", &key(11)).expect("a");
        store
            .insert_readings(&[reading(a.id, 1), reading(a.id, 2)])
            .expect("readings");

        assert!(matches!(
            store.request_transfer("m-1", "bob", "bob", OP),
            Err(StoreError::UnknownDevice(_))
        ));
        assert!(matches!(
            store.request_transfer("m-1", "alice", "alice", OP),
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            store.request_transfer("m-1", "alice", "b b", OP),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.accept_transfer("m-1", "bob", None, None, OP),
            Err(StoreError::UnknownDevice(_))
        ));
        store
            .request_transfer("m-1", "alice", "bob", OP)
            .expect("offer");
        // Offered, not yet transferred: the subscription still works.
        assert_eq!(
            store.index_entries().expect("index")[0].status,
            SubscriptionStatus::Active
        );
        assert!(matches!(
            store.accept_transfer("m-1", "carol", None, None, OP),
            Err(StoreError::UnknownDevice(_))
        ));
        assert!(matches!(
            store.accept_transfer("m-1", "bob", None, Some("nope"), OP),
            Err(StoreError::UnknownProfile(_))
        ));
        let t = store
            .accept_transfer("m-1", "bob", Some("flat 3"), None, OP)
            .expect("accept");
        assert_eq!((t.from.as_str(), t.revoked), ("alice", Some(a.id)));
        assert_eq!(
            (
                t.device.owner.as_str(),
                t.device.activated,
                t.device.profile.as_deref()
            ),
            ("bob", true, Some("default"))
        );
        assert_eq!(
            store.index_entries().expect("index")[0].status,
            SubscriptionStatus::Revoked
        );
        assert!(matches!(
            store.accept_transfer("m-1", "bob", None, None, OP),
            Err(StoreError::Conflict(_))
        ));

        // Bob's subscription: new, empty; Alice's readings stay Alice's.
        let b = store.provision("m-1", &key(12)).expect("bob's");
        assert_ne!(b.id, a.id);
        assert_eq!(b.owner, "bob");
        store.insert_readings(&[reading(b.id, 1)]).expect("reading");
        let bobs = store.readings_for_owner("m-1", "bob", 100).expect("bob");
        assert_eq!(bobs.len(), 1);
        assert!(bobs.iter().all(|r| r.subscription == b.id.0));
        let alices = store
            .readings_for_owner("m-1", "alice", 100)
            .expect("alice");
        assert_eq!(alices.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
        assert!(matches!(
            store.readings_for_owner("m-1", "carol", 100),
            Err(StoreError::UnknownDevice(_))
        ));
        assert_eq!(store.device_view("m-1", "bob").expect("bob").readings, 1);
        // Alice may no longer change it.
        assert!(matches!(
            store.change_status_for(
                "alice",
                "m-1",
                SubscriptionStatus::Suspended,
                ("a", "operator", "suspend")
            ),
            Err(StoreError::UnknownSerial(_))
        ));
        assert!(matches!(
            store.request_rotation("m-1", "alice", OP),
            Err(StoreError::UnknownDevice(_))
        ));
        let log = store.audit(MAX_PAGE).expect("audit");
        assert!(log
            .iter()
            .any(|r| r.action == "transfer" && r.detail.contains("alice -> bob")));
        assert!(log
            .iter()
            .any(|r| r.action == "accept_transfer" && r.detail.contains("revoked")));
    }

    #[test]
    fn concurrent_accepts_and_releases_never_both_win() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        let store = Store::open(&path).expect("open");
        let signer =
            ReleaseSigner::from_pkcs8(&ReleaseSigner::generate_pkcs8().expect("gen")).expect("key");
        for round in 0..10u8 {
            let serial = format!("m-{round}");
            ready(&store, "alice", &[(&serial, round + 1)]);
            store
                .provision(&serial, &key(100 + round))
                .expect("provision");
            store
                .request_transfer(&serial, "alice", "bob", OP)
                .expect("offer");
            let target = store.release_target(&serial, "alice").expect("target");
            let doc = signer.sign(&target, key(200), "core-2:1", 1);
            let barrier = Arc::new(Barrier::new(3));
            let spawn = |f: Box<dyn FnOnce(&Store) -> bool + Send>| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let s = Store::open(&path).expect("open");
                    barrier.wait();
                    f(&s)
                })
            };
            let s1 = serial.clone();
            let s2 = serial.clone();
            let threads = [
                spawn(Box::new(move |s| {
                    s.accept_transfer(&s1, "bob", None, None, OP).is_ok()
                })),
                spawn(Box::new(move |s| {
                    s.accept_transfer(&s2, "bob", None, None, OP).is_ok()
                })),
                spawn(Box::new(move |s| s.release("alice", &doc, OP).is_ok())),
            ];
            let won: Vec<bool> = threads
                .into_iter()
                .map(|t| t.join().expect("thread"))
                .collect();
            assert_eq!(
                won.iter().filter(|w| **w).count(),
                1,
                "round {round}: {won:?}"
            );
            // Whoever won, the old subscription is revoked and the device consistent.
            let d = store
                .factory_entry(&serial)
                .expect("entry")
                .expect("device");
            if won[2] {
                assert_eq!((d.owner.as_str(), d.release.is_some()), ("alice", true));
            } else {
                assert_eq!((d.owner.as_str(), d.release.is_none()), ("bob", true));
            }
            assert!(store
                .index_entries()
                .expect("index")
                .iter()
                .filter(|e| e.serial == serial)
                .all(|e| e.status == SubscriptionStatus::Revoked));
        }
    }

    #[test]
    fn a_release_is_stored_signed_and_claimed_by_the_next_core() {
        let old_dir = tempfile::tempdir().expect("tempdir");
        let new_dir = tempfile::tempdir().expect("tempdir");
        let (old, new) = (open(&old_dir), open(&new_dir));
        ready(&old, "op", &[("m-1", 1)]);
        let a = old.provision("m-1", &key(11)).expect("provision");
        let signer =
            ReleaseSigner::from_pkcs8(&ReleaseSigner::generate_pkcs8().expect("gen")).expect("key");
        assert!(matches!(
            old.release_target("m-1", "rival"),
            Err(StoreError::UnknownDevice(_))
        ));
        let target = old.release_target("m-1", "op").expect("target");
        assert_eq!(
            (target.model.as_str(), target.factory_key),
            ("EM-1", key(1))
        );
        let doc = signer.sign(&target, key(77), "core-2.example:4433", 5);
        let out = old.release("op", &doc, OP).expect("release");
        assert_eq!(out.revoked, Some(a.id));
        let notice = out.device.release.expect("notice");
        assert_eq!(
            (notice.core, notice.endpoint.as_str()),
            (key(77), "core-2.example:4433")
        );
        assert!(old.factory_entries().expect("entries")[0].release.is_some());
        assert!(matches!(
            old.release("op", &doc, OP),
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            old.release_target("m-1", "op"),
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            old.provision("m-1", &key(12)),
            Err(StoreError::Released(_))
        ));
        assert_eq!(
            old.device_view("m-1", "op").expect("view").state,
            "released"
        );

        let d = new
            .claim_release("op2", &doc, "old-operator", OP)
            .expect("claim");
        assert_eq!(
            (d.owner.as_str(), d.activated, d.factory_key),
            ("op2", false, key(1))
        );
        assert!(matches!(
            new.claim_release("op2", &doc, "old-operator", OP),
            Err(StoreError::Conflict(_))
        ));
        ready_plan(&new, "op2", "m-1");
        assert_eq!(
            new.provision("m-1", &key(12)).expect("provision").owner,
            "op2"
        );
        let log = new.audit(MAX_PAGE).expect("audit");
        assert!(log
            .iter()
            .any(|r| r.action == "claim_release" && r.detail.contains("old-operator")));

        // Back to the first core, released again there: claimed afresh.
        let target = new.release_target("m-1", "op2").expect("target");
        let back = signer.sign(&target, key(78), "core-1:4433", 6);
        new.release("op2", &back, OP).expect("release back");
        let d = old
            .claim_release("op", &back, "core-2", OP)
            .expect("returns");
        assert!(d.release.is_none() && !d.activated);
        ready_plan(&old, "op", "m-1");
        assert_eq!(
            old.provision("m-1", &key(13)).expect("provision").owner,
            "op"
        );
    }

    fn ready_plan(store: &Store, owner: &str, serial: &str) {
        store
            .activate(owner, &plan(&[(serial, "default")]), OP)
            .expect("plan");
    }

    #[test]
    fn revoking_a_claimed_device_withdraws_its_activation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(&dir);
        ready(&store, "op", &[("m-1", 1)]);
        store.provision("m-1", &key(11)).expect("provision");
        store
            .change_status_for(
                "op",
                "m-1",
                SubscriptionStatus::Revoked,
                ("op", "operator", "revoke"),
            )
            .expect("revoke");
        assert!(
            !store
                .factory_entry("m-1")
                .expect("entry")
                .expect("device")
                .activated
        );
        assert!(matches!(
            store.provision("m-1", &key(12)),
            Err(StoreError::NotActivated(_))
        ));
        ready_plan(&store, "op", "m-1");
        let again = store.provision("m-1", &key(12)).expect("provision");
        assert_eq!(again.status, SubscriptionStatus::Active);
        assert_eq!(store.subscriptions().expect("subs").len(), 2);
    }

    #[test]
    fn owners_see_their_own_devices() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        store
            .add_subscription("legacy-1", &key(50), SubscriptionStatus::Active)
            .expect("legacy");
        ready(&store, "operator", &[("m-1", 1)]);
        store
            .claim("acme", &manifest(&[("a-1", 2), ("a-2", 3)]), OP)
            .expect("claim");
        let op = store.device_views("operator", 10, 0).expect("op");
        assert_eq!(
            op.devices
                .iter()
                .map(|d| d.serial.as_str())
                .collect::<Vec<_>>(),
            ["legacy-1", "m-1"]
        );
        assert_eq!(op.devices[0].status.as_deref(), Some("active"));
        assert_eq!(op.devices[0].state, "provisioned");
        assert_eq!(op.devices[1].state, "activated");
        let acme = store.device_views("acme", 1, 1).expect("acme");
        assert_eq!((acme.total, acme.devices.len()), (2, 1));
        assert_eq!(acme.devices[0].serial, "a-2");
        assert_eq!(acme.devices[0].state, "claimed");
        assert!(matches!(
            store.device_view("a-1", "operator"),
            Err(StoreError::UnknownDevice(_))
        ));
        assert!(matches!(
            store.device_view("legacy-1", "acme"),
            Err(StoreError::UnknownDevice(_))
        ));
        let json = serde_json::to_value(&op).expect("json");
        assert_eq!(json["devices"][1]["profile"], "default");
        assert_eq!(json["devices"][1]["profile_version"], 1);
    }
}
