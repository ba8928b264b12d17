//! The admin API (`/v1/…` on the admin listener, `docs/admin-api.json`): the device lifecycle
//! from the owner's side. Claim devices from a shipping manifest, activate them with a plan,
//! manage profiles, list and show devices, suspend, resume, revoke, rotate their credentials,
//! transfer them to another owner, release them to another operator, read their readings and the
//! audit log, list the videos their cameras uploaded (`GET /v1/videos`, operator role). JSON (and CSV for manifests and plans) over HTTP/1.1, bearer tokens per role and
//! owner ([`crate::tokens`]): a token sees and changes its owner's devices only.
//!
//! A change is made durable first (SQLite, with its audit record in the same transaction), then
//! pushed to the engine on its control channel; the answer goes out only after the engine applied
//! it, so when a client sees `200` a revoked device's sessions are already gone. Every refusal is
//! audited too (actor `anonymous` without a valid token). Successful reads are not: they change
//! nothing.
//!
//! ```text
//!  client ─HTTP─▶ relay-ops admin ─Handler─▶ AdminApi ─spawn_blocking─▶ Store (own connection)
//!                                               └──EngineControl (bounded)──▶ engine ──reply──┘
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use relay_ops::admin::{Handler, HandlerFuture, Request, Response};
use relay_protocol::session::PublicKey;
use tokio::sync::{mpsc, oneshot};

use crate::engine::EngineControl;
use crate::manifest::{self, is_valid_serial, RowError};
use crate::metrics::Metrics;
use crate::release::{
    is_valid_endpoint, ReleaseDocument, ReleaseError, ReleaseSigner, TrustedReleaser,
};
use crate::store::{
    now_ms, Actor, AuditEvent, FactoryEntry, ProfileSettings, Store, StoreError, SubscriptionId,
    SubscriptionStatus, MAX_PAGE,
};
use crate::tokens::{Role, TokenSet};

/// Every route the API serves, as `docs/admin-api.json` names them (method, path template).
/// `GET /v1/videos` (issue 6) is served too and joins this list once the document describes it.
pub const ROUTES: [(&str, &str); 17] = [
    ("get", "/v1/devices"),
    ("get", "/v1/devices/{serial}"),
    ("post", "/v1/devices/{serial}/suspend"),
    ("post", "/v1/devices/{serial}/resume"),
    ("post", "/v1/devices/{serial}/revoke"),
    ("post", "/v1/devices/{serial}/rotate"),
    ("post", "/v1/devices/{serial}/transfer"),
    ("post", "/v1/devices/{serial}/accept-transfer"),
    ("post", "/v1/devices/{serial}/release"),
    ("get", "/v1/devices/{serial}/readings"),
    ("post", "/v1/claims"),
    ("post", "/v1/claims/release"),
    ("post", "/v1/plans"),
    ("get", "/v1/profiles"),
    ("put", "/v1/profiles/{name}"),
    ("get", "/v1/audit"),
    ("get", "/v1/videos"),
];

/// The page size when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 100;
/// The longest serial accepted.
pub const MAX_SERIAL: usize = manifest::MAX_SERIAL;
/// The most row errors one answer lists (`bad_rows` counts them all).
pub const MAX_REPORTED_ROW_ERRORS: usize = 10_000;
/// The largest request body the API accepts: a manifest of [`manifest::MAX_ROWS`] rows.
pub const MAX_BODY: usize = 16 << 20;
/// How long a request waits for the engine before answering 503.
const ENGINE_WAIT: Duration = Duration::from_secs(5);
/// The longest request path recorded in the audit log.
const MAX_AUDITED_PATH: usize = 128;

/// A status change an operator may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    Suspend,
    Resume,
    Revoke,
}

impl Change {
    fn status(self) -> SubscriptionStatus {
        match self {
            Self::Suspend => SubscriptionStatus::Suspended,
            Self::Resume => SubscriptionStatus::Active,
            Self::Revoke => SubscriptionStatus::Revoked,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Suspend => "suspend",
            Self::Resume => "resume",
            Self::Revoke => "revoke",
        }
    }
}

/// A parsed request (the body is read by the handler of each).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    List { limit: u32, offset: u64 },
    Show { serial: String },
    Change { serial: String, change: Change },
    Audit { limit: u32 },
    Claim,
    ClaimRelease,
    Activate,
    Profiles,
    PutProfile { name: String },
    Rotate { serial: String },
    Transfer { serial: String },
    AcceptTransfer { serial: String },
    Release { serial: String },
    Readings { serial: String, limit: u32 },
    Videos { limit: u32 },
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Self::List { .. } => "list_devices",
            Self::Show { .. } => "show_device",
            Self::Change { change, .. } => change.name(),
            Self::Audit { .. } => "read_audit",
            Self::Claim => "claim",
            Self::ClaimRelease => "claim_release",
            Self::Activate => "activate",
            Self::Profiles => "list_profiles",
            Self::PutProfile { .. } => "put_profile",
            Self::Rotate { .. } => "rotate",
            Self::Transfer { .. } => "transfer",
            Self::AcceptTransfer { .. } => "accept_transfer",
            Self::Release { .. } => "release",
            Self::Readings { .. } => "read_readings",
            Self::Videos { .. } => "list_videos",
        }
    }

    fn target(&self) -> Option<&str> {
        match self {
            Self::Show { serial }
            | Self::Change { serial, .. }
            | Self::Rotate { serial }
            | Self::Transfer { serial }
            | Self::AcceptTransfer { serial }
            | Self::Release { serial }
            | Self::Readings { serial, .. } => Some(serial),
            Self::PutProfile { name } => Some(name),
            _ => None,
        }
    }

    fn allowed(&self, role: Role) -> bool {
        match self {
            Self::List { .. }
            | Self::Show { .. }
            | Self::Profiles
            | Self::Readings { .. }
            | Self::Activate => true,
            _ => role == Role::Operator,
        }
    }
}

/// Why a request is refused: the status, the metric's `result`, the audit's outcome, a message
/// for the client and, for a manifest or a plan, every bad row.
#[derive(Debug)]
struct Refusal {
    status: u16,
    result: &'static str,
    message: String,
    rows: Vec<RowError>,
}

impl Refusal {
    fn new(status: u16, message: impl Into<String>) -> Self {
        let result = match status {
            400 | 405 | 413 | 422 => "bad_request",
            401 => "unauthorized",
            403 => "forbidden",
            404 => "not_found",
            409 => "conflict",
            503 => "unavailable",
            _ => "error",
        };
        Self {
            status,
            result,
            message: message.into(),
            rows: Vec::new(),
        }
    }

    fn bad_rows(mut rows: Vec<RowError>) -> Self {
        rows.sort_by_key(|e| e.row);
        let first = rows
            .first()
            .map(|e| format!("; first: row {}: {}", e.row, e.error))
            .unwrap_or_default();
        let mut r = Self::new(
            422,
            format!("{} bad row(s), nothing changed{first}", rows.len()),
        );
        r.rows = rows;
        r
    }
}

fn parse(method: &str, path: &str, query: &str) -> Result<Action, Refusal> {
    let rest = path.strip_prefix("/v1/").unwrap_or("");
    let segments: Vec<&str> = rest.split('/').collect();
    let want = |m: &str| {
        if method == m {
            Ok(())
        } else {
            Err(Refusal::new(405, format!("{path} takes {m}")))
        }
    };
    let action = match segments.as_slice() {
        ["devices"] => {
            want("GET")?;
            let q = parse_query(query, &["limit", "offset"])?;
            Action::List {
                limit: q.limit.unwrap_or(DEFAULT_LIMIT),
                offset: q.offset.unwrap_or(0),
            }
        }
        ["devices", serial] => {
            want("GET")?;
            parse_query(query, &[])?;
            Action::Show {
                serial: parse_serial(serial)?,
            }
        }
        ["devices", serial, "readings"] => {
            want("GET")?;
            let q = parse_query(query, &["limit"])?;
            Action::Readings {
                serial: parse_serial(serial)?,
                limit: q.limit.unwrap_or(DEFAULT_LIMIT),
            }
        }
        ["devices", serial, op] => {
            let serial = parse_serial(serial);
            let action = match *op {
                "suspend" => Action::Change {
                    serial: serial?,
                    change: Change::Suspend,
                },
                "resume" => Action::Change {
                    serial: serial?,
                    change: Change::Resume,
                },
                "revoke" => Action::Change {
                    serial: serial?,
                    change: Change::Revoke,
                },
                "rotate" => Action::Rotate { serial: serial? },
                "transfer" => Action::Transfer { serial: serial? },
                "accept-transfer" => Action::AcceptTransfer { serial: serial? },
                "release" => Action::Release { serial: serial? },
                _ => return Err(Refusal::new(404, "no such route")),
            };
            want("POST")?;
            parse_query(query, &[])?;
            action
        }
        ["claims"] => {
            want("POST")?;
            parse_query(query, &[])?;
            Action::Claim
        }
        ["claims", "release"] => {
            want("POST")?;
            parse_query(query, &[])?;
            Action::ClaimRelease
        }
        ["plans"] => {
            want("POST")?;
            parse_query(query, &[])?;
            Action::Activate
        }
        ["profiles"] => {
            want("GET")?;
            parse_query(query, &[])?;
            Action::Profiles
        }
        ["profiles", name] => {
            want("PUT")?;
            parse_query(query, &[])?;
            if !manifest::is_valid_profile_name(name) {
                return Err(Refusal::new(
                    400,
                    "a profile name is 1 to 32 of A-Z a-z 0-9 - _ .",
                ));
            }
            Action::PutProfile {
                name: (*name).to_owned(),
            }
        }
        ["videos"] => {
            want("GET")?;
            let q = parse_query(query, &["limit"])?;
            Action::Videos {
                limit: q.limit.unwrap_or(DEFAULT_LIMIT),
            }
        }
        ["audit"] => {
            want("GET")?;
            let q = parse_query(query, &["limit"])?;
            Action::Audit {
                limit: q.limit.unwrap_or(DEFAULT_LIMIT),
            }
        }
        _ => return Err(Refusal::new(404, "no such route")),
    };
    Ok(action)
}

#[derive(Default)]
struct Query {
    limit: Option<u32>,
    offset: Option<u64>,
}

fn parse_query(query: &str, allowed: &[&str]) -> Result<Query, Refusal> {
    let mut q = Query::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !allowed.contains(&key) {
            return Err(Refusal::new(400, "unknown query parameter"));
        }
        match key {
            "limit" => {
                let n: u32 = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        Refusal::new(400, format!("limit must be between 1 and {MAX_PAGE}"))
                    })?;
                q.limit = Some(n);
            }
            "offset" => {
                let n: u64 = value
                    .parse()
                    .ok()
                    .filter(|n| i64::try_from(*n).is_ok())
                    .ok_or_else(|| Refusal::new(400, "offset must be a non-negative integer"))?;
                q.offset = Some(n);
            }
            _ => {}
        }
    }
    Ok(q)
}

/// Serials are what `init` writes (`meter-00001`) or similar: short, printable, no escaping.
fn parse_serial(s: &str) -> Result<String, Refusal> {
    if is_valid_serial(s) {
        Ok(s.to_owned())
    } else {
        Err(Refusal::new(
            400,
            format!("a serial is 1 to {MAX_SERIAL} of A-Z a-z 0-9 - _ ."),
        ))
    }
}

/// A JSON body, unknown fields refused. An empty body is `{}`.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Refusal> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| Refusal::new(400, format!("body: {}", e.to_string().replace('\n', " "))))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferBody {
    to: String,
}

#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AcceptBody {
    account: Option<String>,
    profile: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    core_public_key: String,
    endpoint: String,
}

/// Who is asking.
#[derive(Clone, Debug)]
struct Caller {
    name: String,
    role: Option<Role>,
    /// The owner whose devices it sees and changes.
    owner: String,
}

impl Caller {
    fn actor(&self) -> (String, Option<&'static str>) {
        (self.name.clone(), self.role.map(Role::as_str))
    }
}

/// What the API needs to issue and accept releases (`[release]`, and the core's own key).
#[derive(Clone, Debug)]
pub(crate) struct ReleaseSettings {
    /// Signs this core's releases; `None`: it issues none.
    pub signer: Option<ReleaseSigner>,
    /// Whose releases this core accepts.
    pub trusted: Vec<TrustedReleaser>,
    /// This core's Noise public key: a release it accepts must name it.
    pub core_public_key: PublicKey,
}

/// The admin API: tokens, its own store connection and the engine's control channel.
pub(crate) struct AdminApi {
    tokens: TokenSet,
    store: Arc<Mutex<Store>>,
    engine: mpsc::Sender<EngineControl>,
    /// Held across "store, then engine" so two changes of one device cannot reach the engine in
    /// the other order than they reached the store.
    changes: tokio::sync::Mutex<()>,
    metrics: Metrics,
    release: ReleaseSettings,
    /// Where completed uploads are recorded; `None`: `/v1/videos` is not served.
    videos: Option<crate::video::VideoStore>,
}

impl std::fmt::Debug for AdminApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminApi")
            .field("tokens", &self.tokens.len())
            .field("release", &self.release)
            .finish_non_exhaustive()
    }
}

impl AdminApi {
    pub fn new(
        tokens: TokenSet,
        store: Store,
        engine: mpsc::Sender<EngineControl>,
        metrics: Metrics,
        release: ReleaseSettings,
    ) -> Self {
        Self {
            tokens,
            store: Arc::new(Mutex::new(store)),
            engine,
            changes: tokio::sync::Mutex::new(()),
            metrics,
            release,
            videos: None,
        }
    }

    /// Serves `GET /v1/videos` from `videos`.
    pub fn with_videos(mut self, videos: crate::video::VideoStore) -> Self {
        self.videos = Some(videos);
        self
    }

    /// The handler for `relay_ops::admin`.
    pub fn into_handler(self) -> Handler {
        let api = Arc::new(self);
        Arc::new(move |req: Request| {
            let api = api.clone();
            Box::pin(async move { api.handle(req).await }) as HandlerFuture
        })
    }

    async fn handle(&self, req: Request) -> Option<Response> {
        let (path, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
        if path != "/v1" && !path.starts_with("/v1/") {
            return None;
        }
        let parsed = parse(&req.method, path, query);
        let (action, target) = match &parsed {
            Ok(a) => (a.name(), a.target().map(str::to_owned)),
            Err(_) => ("unknown", None),
        };

        // Authentication first: without a valid token nothing else is revealed, not even
        // whether the route exists.
        let presented = req
            .header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let entry = presented.and_then(|t| self.tokens.authenticate(t));
        let Some(entry) = entry else {
            let anonymous = Caller {
                name: "anonymous".into(),
                role: None,
                owner: String::new(),
            };
            let why = if presented.is_some() {
                "invalid token"
            } else {
                "no bearer token"
            };
            let detail = format!("{why}: {} {}", req.method, truncate(path));
            let refusal = Refusal::new(401, why);
            return Some(
                self.refuse(&anonymous, action, target.as_deref(), refusal, &detail)
                    .await,
            );
        };
        let caller = Caller {
            name: entry.name.clone(),
            role: Some(entry.role),
            owner: entry.owner.clone(),
        };
        let action_parsed = match parsed {
            Ok(a) => a,
            Err(refusal) => {
                let detail = format!("{} {}", req.method, truncate(path));
                return Some(self.refuse(&caller, action, None, refusal, &detail).await);
            }
        };
        if !action_parsed.allowed(entry.role) {
            let refusal = Refusal::new(
                403,
                format!("the {} role may not do this", entry.role.as_str()),
            );
            return Some(
                self.refuse(&caller, action, target.as_deref(), refusal, "role")
                    .await,
            );
        }
        let body = req.body;
        let outcome = match action_parsed {
            Action::List { limit, offset } => self.list(&caller, limit, offset).await,
            Action::Show { serial } => self.show(&caller, serial).await,
            Action::Audit { limit } => self.audit(limit).await,
            Action::Change { serial, change } => self.change(&caller, serial, change).await,
            Action::Claim => self.claim(&caller, body).await,
            Action::ClaimRelease => self.claim_release(&caller, body).await,
            Action::Activate => self.activate(&caller, body).await,
            Action::Profiles => self.profiles().await,
            Action::PutProfile { name } => self.put_profile(&caller, name, &body).await,
            Action::Rotate { serial } => self.rotate(&caller, serial).await,
            Action::Transfer { serial } => self.transfer(&caller, serial, &body).await,
            Action::AcceptTransfer { serial } => self.accept_transfer(&caller, serial, &body).await,
            Action::Release { serial } => self.release(&caller, serial, &body).await,
            Action::Readings { serial, limit } => self.readings(&caller, serial, limit).await,
            Action::Videos { limit } => self.videos(&caller, limit).await,
        };
        Some(match outcome {
            Ok(body) => {
                self.metrics.admin_request("ok");
                Response::json(200, body)
            }
            Err(refusal) => {
                let detail = refusal.message.clone();
                self.refuse(&caller, action, target.as_deref(), refusal, &detail)
                    .await
            }
        })
    }

    /// Counts, audits and answers a refusal.
    async fn refuse(
        &self,
        caller: &Caller,
        action: &str,
        target: Option<&str>,
        refusal: Refusal,
        detail: &str,
    ) -> Response {
        self.metrics.admin_request(refusal.result);
        let (actor, role) = caller.actor();
        let (action, target, outcome, detail) = (
            action.to_owned(),
            target.map(str::to_owned),
            refusal.result,
            detail.to_owned(),
        );
        let audited = self
            .with_store(move |s| {
                s.append_audit(&AuditEvent {
                    actor: &actor,
                    role,
                    action: &action,
                    target: target.as_deref(),
                    outcome,
                    detail: &detail,
                })
            })
            .await;
        if let Err(e) = audited {
            tracing::error!(error = %e.message, "audit record not written");
        }
        error_response(&refusal)
    }

    async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Failure> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut store = store.lock().map_err(|_| Failure::internal("store lock"))?;
            f(&mut store).map_err(Failure::store)
        })
        .await
        .map_err(|_| Failure::internal("store task"))?
    }

    /// A store call on behalf of `caller` (its name and role for the audit record).
    async fn store_as<T: Send + 'static>(
        &self,
        caller: &Caller,
        f: impl FnOnce(&mut Store, Actor<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Refusal> {
        let (name, role) = caller.actor();
        self.with_store(move |s| f(s, Actor { name: &name, role }))
            .await
            .map_err(Failure::refusal)
    }

    async fn ask_engine<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> EngineControl,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        let asked = async {
            self.engine.send(make(tx)).await.ok()?;
            rx.await.ok()
        };
        tokio::time::timeout(ENGINE_WAIT, asked)
            .await
            .ok()
            .flatten()
    }

    /// Tells the engine about claimed, activated, transferred or released devices.
    async fn devices_changed(&self, devices: Vec<FactoryEntry>) -> Result<(), Refusal> {
        if devices.is_empty() {
            return Ok(());
        }
        self.ask_engine(|reply| EngineControl::DevicesChanged { devices, reply })
            .await
            .ok_or_else(|| Refusal::new(503, "stored, but the engine did not apply it"))
    }

    /// Tells the engine a subscription is revoked (its sessions go at once); returns how many
    /// sessions it dropped.
    async fn revoked(&self, subscription: Option<SubscriptionId>) -> Result<usize, Refusal> {
        let Some(subscription) = subscription else {
            return Ok(0);
        };
        self.ask_engine(|reply| EngineControl::SetStatus {
            subscription,
            status: SubscriptionStatus::Revoked,
            reply,
        })
        .await
        .ok_or_else(|| Refusal::new(503, "stored, but the engine did not apply it"))
    }

    async fn list(&self, caller: &Caller, limit: u32, offset: u64) -> Result<Vec<u8>, Refusal> {
        let owner = caller.owner.clone();
        let page = self
            .with_store(move |s| s.device_views(&owner, limit, offset))
            .await
            .map_err(Failure::refusal)?;
        json(&page)
    }

    async fn show(&self, caller: &Caller, serial: String) -> Result<Vec<u8>, Refusal> {
        let owner = caller.owner.clone();
        let view = self
            .with_store(move |s| s.device_view(&serial, &owner))
            .await
            .map_err(Failure::refusal)?;
        let live = match view.subscription {
            Some(id) => self
                .ask_engine(|reply| EngineControl::LiveSessions {
                    subscription: SubscriptionId(id),
                    reply,
                })
                .await
                .ok_or_else(|| Refusal::new(503, "engine unavailable"))?,
            None => 0,
        };
        let mut body = serde_json::to_value(&view).map_err(|e| Refusal::new(500, e.to_string()))?;
        body["live_sessions"] = live.into();
        json(&body)
    }

    async fn audit(&self, limit: u32) -> Result<Vec<u8>, Refusal> {
        let events = self
            .with_store(move |s| s.audit(limit))
            .await
            .map_err(Failure::refusal)?;
        json(&serde_json::json!({ "events": events }))
    }

    async fn change(
        &self,
        caller: &Caller,
        serial: String,
        change: Change,
    ) -> Result<Vec<u8>, Refusal> {
        let status = change.status();
        let _one_at_a_time = self.changes.lock().await;
        let owner = caller.owner.clone();
        let s = serial.clone();
        let (stored, device) = self
            .store_as(caller, move |store, actor| {
                let change = store.change_status_for(
                    &owner,
                    &s,
                    status,
                    (actor.name, actor.role.unwrap_or(""), change.name()),
                )?;
                // A revocation withdraws a claimed device's activation: the engine learns it.
                let device = match status {
                    SubscriptionStatus::Revoked => store.factory_entry(&s)?,
                    _ => None,
                };
                Ok((change, device))
            })
            .await?;
        let changed = stored.previous != status;
        if changed {
            self.metrics.lifecycle_event(change.name());
        }
        // Durable already; the engine applies it now (or reads it at its next start).
        let dropped = self
            .ask_engine(|reply| EngineControl::SetStatus {
                subscription: stored.id,
                status,
                reply,
            })
            .await
            .ok_or_else(|| Refusal::new(503, "stored, but the engine did not apply it"))?;
        if changed {
            self.devices_changed(device.into_iter().collect()).await?;
        }
        tracing::info!(
            actor = %caller.name,
            serial = %serial,
            action = change.name(),
            previous = %stored.previous,
            sessions_dropped = dropped,
            "subscription status changed"
        );
        json(&serde_json::json!({
            "serial": serial,
            "status": status.as_str(),
            "previous": stored.previous.as_str(),
            "changed": changed,
            "sessions_dropped": dropped,
        }))
    }

    async fn claim(&self, caller: &Caller, body: Vec<u8>) -> Result<Vec<u8>, Refusal> {
        let _one_at_a_time = self.changes.lock().await;
        let owner = caller.owner.clone();
        let claimed = self
            .store_as(caller, move |s, actor| {
                let parsed = manifest::parse_manifest(&body);
                s.claim(&owner, &parsed, actor)
            })
            .await?;
        let n = claimed.len();
        self.metrics.devices_claimed.inc_by(n as u64);
        self.metrics.lifecycle_event("claim");
        self.devices_changed(claimed).await?;
        tracing::info!(actor = %caller.name, owner = %caller.owner, devices = n, "manifest claimed");
        json(&serde_json::json!({ "claimed": n, "owner": caller.owner }))
    }

    async fn activate(&self, caller: &Caller, body: Vec<u8>) -> Result<Vec<u8>, Refusal> {
        let _one_at_a_time = self.changes.lock().await;
        let owner = caller.owner.clone();
        let activated = self
            .store_as(caller, move |s, actor| {
                let parsed = manifest::parse_plan(&body);
                s.activate(&owner, &parsed, actor)
            })
            .await?;
        let n = activated.len();
        self.metrics.devices_activated.inc_by(n as u64);
        self.metrics.lifecycle_event("activate");
        self.devices_changed(activated).await?;
        tracing::info!(actor = %caller.name, owner = %caller.owner, devices = n, "plan activated");
        json(&serde_json::json!({ "activated": n }))
    }

    async fn profiles(&self) -> Result<Vec<u8>, Refusal> {
        let profiles = self
            .with_store(|s| s.profiles())
            .await
            .map_err(Failure::refusal)?;
        json(&serde_json::json!({ "profiles": profiles }))
    }

    async fn put_profile(
        &self,
        caller: &Caller,
        name: String,
        body: &[u8],
    ) -> Result<Vec<u8>, Refusal> {
        let settings: ProfileSettings = json_body(body)?;
        let _one_at_a_time = self.changes.lock().await;
        let (profile, changed) = self
            .store_as(caller, move |s, actor| {
                s.put_profile(&name, settings, actor)
            })
            .await?;
        if changed {
            self.metrics.lifecycle_event("put_profile");
            let p = profile.clone();
            self.ask_engine(|reply| EngineControl::ProfileChanged { profile: p, reply })
                .await
                .ok_or_else(|| Refusal::new(503, "stored, but the engine did not apply it"))?;
        }
        json(&serde_json::json!({ "profile": profile, "changed": changed }))
    }

    async fn rotate(&self, caller: &Caller, serial: String) -> Result<Vec<u8>, Refusal> {
        let _one_at_a_time = self.changes.lock().await;
        let owner = caller.owner.clone();
        let s = serial.clone();
        let subscription = self
            .store_as(caller, move |store, actor| {
                store.request_rotation(&s, &owner, actor)
            })
            .await?;
        self.metrics.lifecycle_event("rotate");
        self.ask_engine(|reply| EngineControl::RequestRotation {
            subscription,
            reply,
        })
        .await
        .ok_or_else(|| Refusal::new(503, "stored, but the engine did not apply it"))?;
        json(&serde_json::json!({
            "serial": serial,
            "subscription": subscription.0,
            "rotate_requested": true,
        }))
    }

    async fn transfer(
        &self,
        caller: &Caller,
        serial: String,
        body: &[u8],
    ) -> Result<Vec<u8>, Refusal> {
        let TransferBody { to } = json_body(body)?;
        let _one_at_a_time = self.changes.lock().await;
        let owner = caller.owner.clone();
        let (s, t) = (serial.clone(), to.clone());
        self.store_as(caller, move |store, actor| {
            store.request_transfer(&s, &owner, &t, actor)
        })
        .await?;
        self.metrics.lifecycle_event("transfer");
        json(&serde_json::json!({
            "serial": serial,
            "owner": caller.owner,
            "transfer_to": to,
        }))
    }

    async fn accept_transfer(
        &self,
        caller: &Caller,
        serial: String,
        body: &[u8],
    ) -> Result<Vec<u8>, Refusal> {
        let AcceptBody { account, profile } = json_body(body)?;
        let _one_at_a_time = self.changes.lock().await;
        let owner = caller.owner.clone();
        let s = serial.clone();
        let done = self
            .store_as(caller, move |store, actor| {
                store.accept_transfer(&s, &owner, account.as_deref(), profile.as_deref(), actor)
            })
            .await?;
        self.metrics.lifecycle_event("accept_transfer");
        self.metrics.devices_activated.inc();
        // The engine learns the device's new owner first, so that the refusal its old key gets
        // from the moment the subscription is revoked already says "re-provision".
        let profile = done.device.profile.clone();
        self.devices_changed(vec![done.device]).await?;
        let dropped = self.revoked(done.revoked).await?;
        tracing::info!(serial = %serial, from = %done.from, to = %caller.owner, "transfer accepted");
        json(&serde_json::json!({
            "serial": serial,
            "owner": caller.owner,
            "from": done.from,
            "profile": profile,
            "revoked_subscription": done.revoked.map(|id| id.0),
            "sessions_dropped": dropped,
        }))
    }

    async fn release(
        &self,
        caller: &Caller,
        serial: String,
        body: &[u8],
    ) -> Result<Vec<u8>, Refusal> {
        let ReleaseBody {
            core_public_key,
            endpoint,
        } = json_body(body)?;
        let core = PublicKey::from_hex(core_public_key.trim())
            .map_err(|_| Refusal::new(400, "core_public_key: 64 hex digits"))?;
        if !is_valid_endpoint(&endpoint) {
            return Err(Refusal::new(
                400,
                "endpoint: HOST:PORT, at most 64 printable ASCII bytes",
            ));
        }
        let signer = self
            .release
            .signer
            .clone()
            .ok_or_else(|| Refusal::new(409, "this core has no release signing key"))?;
        let _one_at_a_time = self.changes.lock().await;
        let owner = caller.owner.clone();
        let done = self
            .store_as(caller, move |store, actor| {
                let device = store.release_target(&serial, &owner)?;
                let issued_ms = u64::try_from(now_ms()).unwrap_or(0);
                let doc = signer.sign(&device, core, &endpoint, issued_ms);
                let outcome = store.release(&owner, &doc, actor)?;
                Ok((doc, outcome))
            })
            .await?;
        let (doc, outcome) = done;
        self.metrics.lifecycle_event("release");
        // Release first, then revoke: the old key's refusal then carries the release.
        self.devices_changed(vec![outcome.device]).await?;
        self.revoked(outcome.revoked).await?;
        tracing::info!(serial = %doc.serial, endpoint = %doc.endpoint, "device released");
        json(&doc.to_json())
    }

    async fn claim_release(&self, caller: &Caller, body: Vec<u8>) -> Result<Vec<u8>, Refusal> {
        let doc = ReleaseDocument::from_json(&body).map_err(release_refusal)?;
        let issuer = doc
            .verify(&self.release.trusted, &self.release.core_public_key)
            .map_err(release_refusal)?
            .name
            .clone();
        let _one_at_a_time = self.changes.lock().await;
        let owner = caller.owner.clone();
        let i = issuer.clone();
        let device = self
            .store_as(caller, move |store, actor| {
                store.claim_release(&owner, &doc, &i, actor)
            })
            .await?;
        self.metrics.devices_claimed.inc();
        self.metrics.lifecycle_event("claim_release");
        let serial = device.serial.clone();
        self.devices_changed(vec![device]).await?;
        json(&serde_json::json!({
            "serial": serial,
            "owner": caller.owner,
            "state": "claimed",
            "released_by": issuer,
        }))
    }

    async fn readings(
        &self,
        caller: &Caller,
        serial: String,
        limit: u32,
    ) -> Result<Vec<u8>, Refusal> {
        let owner = caller.owner.clone();
        let s = serial.clone();
        let readings = self
            .with_store(move |store| store.readings_for_owner(&s, &owner, limit))
            .await
            .map_err(Failure::refusal)?;
        json(&serde_json::json!({ "serial": serial, "readings": readings }))
    }

    /// The newest `limit` completed uploads of the caller's owner's subscriptions, each record
    /// with the device's serial.
    async fn videos(&self, caller: &Caller, limit: u32) -> Result<Vec<u8>, Refusal> {
        let videos = self
            .videos
            .clone()
            .ok_or_else(|| Refusal::new(404, "no video store"))?;
        let owner = caller.owner.clone();
        let serials = self
            .with_store(move |s| s.subscription_serials(&owner))
            .await
            .map_err(Failure::refusal)?;
        let records = tokio::task::spawn_blocking(move || videos.list())
            .await
            .map_err(|_| Refusal::new(500, "video listing task"))?
            .map_err(|e| {
                tracing::error!(error = %e, "cannot list the stored videos");
                Refusal::new(500, "cannot list the stored videos")
            })?;
        let mine: Vec<_> = records
            .into_iter()
            .rev()
            .filter_map(|mut r| {
                let serial = serials.get(&r.subscription)?;
                r.device = Some(serial.clone());
                Some(r)
            })
            .take(limit as usize)
            .collect();
        json(&serde_json::json!({ "videos": mine }))
    }
}

fn release_refusal(e: ReleaseError) -> Refusal {
    let status = match e {
        ReleaseError::Malformed(_) => 400,
        ReleaseError::Untrusted(_) | ReleaseError::BadSignature | ReleaseError::OtherCore(_) => 422,
    };
    Refusal::new(status, e.to_string())
}

/// What went wrong under a store call.
#[derive(Debug)]
struct Failure {
    status: u16,
    message: String,
    rows: Vec<RowError>,
}

impl Failure {
    fn internal(what: &str) -> Self {
        Self {
            status: 500,
            message: format!("internal error: {what}"),
            rows: Vec::new(),
        }
    }

    fn store(e: StoreError) -> Self {
        let status = match &e {
            StoreError::UnknownSerial(_)
            | StoreError::UnknownDevice(_)
            | StoreError::UnknownSubscription(_)
            | StoreError::UnknownProfile(_) => 404,
            StoreError::RevokedForGood(_)
            | StoreError::Conflict(_)
            | StoreError::KeyInUse
            | StoreError::NextKeyMismatch(_)
            | StoreError::NotClaimed(_)
            | StoreError::NotActivated(_)
            | StoreError::Suspended(_)
            | StoreError::Released(_) => 409,
            StoreError::Invalid(_) => 400,
            StoreError::BadRows(_) => 422,
            StoreError::Sqlite(_)
            | StoreError::SchemaTooNew { .. }
            | StoreError::Corrupt { .. }
            | StoreError::NotWal(_) => 500,
        };
        if status == 500 {
            tracing::error!(error = %e, "admin API store call failed");
        }
        match e {
            StoreError::BadRows(rows) => Self {
                status,
                message: String::new(),
                rows,
            },
            e => Self {
                status,
                message: e.to_string(),
                rows: Vec::new(),
            },
        }
    }

    fn refusal(self) -> Refusal {
        if self.status == 422 {
            Refusal::bad_rows(self.rows)
        } else {
            Refusal::new(self.status, self.message)
        }
    }
}

fn json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Refusal> {
    serde_json::to_vec(value).map_err(|e| Refusal::new(500, e.to_string()))
}

fn error_response(refusal: &Refusal) -> Response {
    let mut body = serde_json::json!({ "error": refusal.message });
    if !refusal.rows.is_empty() {
        body["bad_rows"] = refusal.rows.len().into();
        let shown = &refusal.rows[..refusal.rows.len().min(MAX_REPORTED_ROW_ERRORS)];
        body["errors"] = serde_json::to_value(shown).unwrap_or_default();
    }
    Response::json(refusal.status, body.to_string())
}

fn truncate(path: &str) -> &str {
    match path.char_indices().nth(MAX_AUDITED_PATH) {
        Some((i, _)) => &path[..i],
        None => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::TrustedReleaser;

    #[test]
    fn routes_parse_and_bad_input_is_refused() {
        for (m, p, want) in [
            ("POST", "/v1/claims", Action::Claim),
            ("POST", "/v1/claims/release", Action::ClaimRelease),
            ("POST", "/v1/plans", Action::Activate),
            ("GET", "/v1/profiles", Action::Profiles),
            (
                "PUT",
                "/v1/profiles/heat",
                Action::PutProfile {
                    name: "heat".into(),
                },
            ),
            (
                "POST",
                "/v1/devices/m-1/accept-transfer",
                Action::AcceptTransfer {
                    serial: "m-1".into(),
                },
            ),
            (
                "GET",
                "/v1/devices/m-1/readings",
                Action::Readings {
                    serial: "m-1".into(),
                    limit: DEFAULT_LIMIT,
                },
            ),
        ] {
            assert_eq!(parse(m, p, "").expect(p), want);
        }
        assert_eq!(
            parse("GET", "/v1/devices", "limit=5&offset=10").expect("list"),
            Action::List {
                limit: 5,
                offset: 10
            }
        );
        assert_eq!(
            parse("POST", "/v1/devices/meter-00001/revoke", "").expect("revoke"),
            Action::Change {
                serial: "meter-00001".into(),
                change: Change::Revoke
            }
        );
        for (m, p, q, status) in [
            ("GET", "/v1/devices", "limit=0", 400),
            ("GET", "/v1/devices", "limit=100000", 400),
            ("GET", "/v1/devices", "offset=-1", 400),
            ("GET", "/v1/devices", "sort=x", 400),
            ("GET", "/v1/devices/bad%20serial", "", 400),
            ("GET", "/v1/devices/meter-1/suspend", "", 405),
            ("POST", "/v1/devices/meter-1/explode", "", 404),
            ("GET", "/v1/nothing", "", 404),
            ("DELETE", "/v1/audit", "", 405),
            ("GET", "/v1/claims", "", 405),
            ("POST", "/v1/claims", "x=1", 400),
            ("GET", "/v1/plans", "", 405),
            ("POST", "/v1/profiles", "", 405),
            ("PUT", "/v1/profiles/bad%20name", "", 400),
            ("GET", "/v1/devices/m-1/rotate", "", 405),
            ("POST", "/v1/devices/m-1/readings", "", 405),
            ("GET", "/v1/devices/m-1/readings", "limit=5000", 400),
            ("POST", "/v1/claims/other", "", 404),
        ] {
            let e = parse(m, p, q).expect_err(p);
            assert_eq!(e.status, status, "{m} {p}?{q}");
        }
    }

    /// Every route served is in the OpenAPI document, with its method, and the document has the
    /// bearer scheme.
    #[test]
    fn openapi_document_describes_every_route() {
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/admin-api.json")).expect("valid JSON");
        assert!(doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.0")));
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        let paths = doc["paths"].as_object().expect("paths");
        for (method, path) in ROUTES {
            let op = &paths
                .get(path)
                .unwrap_or_else(|| panic!("{path} not documented"))[method];
            assert!(op.is_object(), "{method} {path} not documented");
            assert!(op["responses"]["401"].is_object(), "{method} {path}: 401");
        }
        let documented: usize = paths
            .values()
            .map(|p| p.as_object().map_or(0, |o| o.len()))
            .sum();
        assert_eq!(
            documented,
            ROUTES.len(),
            "the document names a route not served"
        );
    }

    /// The API on a fresh store, with an engine that answers every control message and
    /// records it.
    struct Rig {
        _dir: tempfile::TempDir,
        api: AdminApi,
        tokens: Vec<(&'static str, String)>,
        seen: Arc<Mutex<Vec<String>>>,
        metrics: Metrics,
        signer: ReleaseSigner,
    }

    fn rig_with(trusted: Vec<TrustedReleaser>) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("s.db")).expect("store");
        let mut text = String::new();
        let mut tokens = Vec::new();
        for (name, role, owner) in [
            ("op", Role::Operator, "operator"),
            ("tech", Role::Technician, "operator"),
            ("acme-op", Role::Operator, "acme"),
        ] {
            let t = crate::tokens::PlainToken::generate();
            text.push_str(&TokenSet::entry_text(name, role, owner, &t));
            tokens.push((name, t.expose().to_owned()));
        }
        let (tx, mut rx) = mpsc::channel(16);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Some(c) = rx.recv().await {
                let what = match c {
                    EngineControl::SetStatus {
                        subscription,
                        status,
                        reply,
                    } => {
                        let _ = reply.send(0);
                        format!("status {} {status}", subscription.0)
                    }
                    EngineControl::LiveSessions { reply, .. } => {
                        let _ = reply.send(0);
                        continue;
                    }
                    EngineControl::DevicesChanged { devices, reply } => {
                        let _ = reply.send(());
                        format!("devices {}", devices.len())
                    }
                    EngineControl::ProfileChanged { profile, reply } => {
                        let _ = reply.send(());
                        format!("profile {} {}", profile.name, profile.version)
                    }
                    EngineControl::RequestRotation {
                        subscription,
                        reply,
                    } => {
                        let _ = reply.send(());
                        format!("rotate {}", subscription.0)
                    }
                };
                log.lock().expect("log").push(what);
            }
        });
        let metrics = Metrics::new().expect("metrics");
        let signer =
            ReleaseSigner::from_pkcs8(&ReleaseSigner::generate_pkcs8().expect("gen")).expect("k");
        let api = AdminApi::new(
            TokenSet::parse(&text).expect("tokens"),
            store,
            tx,
            metrics.clone(),
            ReleaseSettings {
                signer: Some(signer.clone()),
                trusted,
                core_public_key: PublicKey([0xc0; 32]),
            },
        );
        Rig {
            _dir: dir,
            api,
            tokens,
            seen,
            metrics,
            signer,
        }
    }

    impl Rig {
        async fn call(
            &self,
            who: &str,
            method: &str,
            path: &str,
            body: &[u8],
        ) -> (u16, serde_json::Value) {
            let token = self
                .tokens
                .iter()
                .find(|(n, _)| *n == who)
                .map(|(_, t)| t.clone())
                .unwrap_or_else(|| "wrong".into());
            let req = Request {
                method: method.into(),
                path: path.into(),
                headers: vec![("authorization".into(), format!("Bearer {token}"))],
                body: body.to_vec(),
            };
            let r = self.api.handle(req).await.expect("a /v1 route");
            (
                r.status,
                serde_json::from_slice(&r.body).unwrap_or_default(),
            )
        }

        fn seen(&self) -> Vec<String> {
            std::mem::take(&mut *self.seen.lock().expect("log"))
        }

        async fn audit_actions(&self) -> Vec<(String, String, String)> {
            let (_, a) = self.call("op", "GET", "/v1/audit?limit=1000", b"").await;
            a["events"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    (
                        e["actor"].as_str().unwrap_or("").to_owned(),
                        e["action"].as_str().unwrap_or("").to_owned(),
                        e["outcome"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        }
    }

    fn manifest(rows: &[(&str, u8)]) -> Vec<u8> {
        let mut text = String::from("serial,factory_public_key,model\n");
        for (serial, k) in rows {
            text.push_str(&format!("{serial},{},EM-1\n", hex::encode([*k; 32])));
        }
        text.into_bytes()
    }

    #[tokio::test]
    async fn claim_then_activate_and_bad_files_change_nothing() {
        let rig = rig_with(Vec::new());
        // A technician may not claim; nobody without a token may do anything.
        let (status, _) = rig
            .call("tech", "POST", "/v1/claims", &manifest(&[("m-1", 1)]))
            .await;
        assert_eq!(status, 403);
        let (status, _) = rig
            .call("nobody", "POST", "/v1/claims", &manifest(&[("m-1", 1)]))
            .await;
        assert_eq!(status, 401);

        let (status, body) = rig
            .call(
                "op",
                "POST",
                "/v1/claims",
                &manifest(&[("m-1", 1), ("m-2", 2), ("m-3", 3)]),
            )
            .await;
        assert_eq!((status, &body["claimed"]), (200, &serde_json::json!(3)));
        assert_eq!(rig.seen(), ["devices 3"]);
        assert_eq!(rig.metrics.devices_claimed.get(), 3);

        // One bad row among good ones: 422 naming it, nothing claimed.
        let mut bad = manifest(&[("m-4", 4), ("m-5", 5)]);
        bad.extend_from_slice(b"m-6,nothex,EM\n");
        let (status, body) = rig.call("op", "POST", "/v1/claims", &bad).await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["bad_rows"], 1);
        assert_eq!(body["errors"][0]["row"], 4);
        assert_eq!(body["errors"][0]["serial"], "m-6");
        let (_, list) = rig.call("op", "GET", "/v1/devices", b"").await;
        assert_eq!(list["total"], 3);
        assert!(rig.seen().is_empty(), "the engine hears of nothing");

        // A plan by the technician: row 3 names a device of nobody, row 4 an unknown profile.
        let plan =
            b"serial,account,profile\nm-1,apt 1,default\nm-9,apt 9,default\nm-2,apt 2,gold\n";
        let (status, body) = rig.call("tech", "POST", "/v1/plans", plan).await;
        assert_eq!(status, 422);
        let rows: Vec<_> = body["errors"]
            .as_array()
            .expect("errors")
            .iter()
            .map(|e| e["row"].as_u64().unwrap_or(0))
            .collect();
        assert_eq!(rows, [3, 4]);
        let (_, shown) = rig.call("op", "GET", "/v1/devices/m-1", b"").await;
        assert_eq!(shown["state"], "claimed");
        // Another owner's operator cannot activate ours either.
        let (status, body) = rig
            .call(
                "acme-op",
                "POST",
                "/v1/plans",
                b"serial,account,profile\nm-1,a,default\n",
            )
            .await;
        assert_eq!(status, 422);
        assert!(body["errors"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("another owner")));

        let plan = b"serial,account,profile\nm-1,apt 1,default\nm-2,apt 2,default\n";
        let (status, body) = rig.call("tech", "POST", "/v1/plans", plan).await;
        assert_eq!((status, &body["activated"]), (200, &serde_json::json!(2)));
        assert_eq!(rig.seen(), ["devices 2"]);
        assert_eq!(rig.metrics.devices_activated.get(), 2);
        let (_, shown) = rig.call("tech", "GET", "/v1/devices/m-1", b"").await;
        assert_eq!(
            (
                &shown["state"],
                &shown["account"],
                &shown["profile_version"]
            ),
            (
                &serde_json::json!("activated"),
                &serde_json::json!("apt 1"),
                &serde_json::json!(1)
            )
        );
        // The other owner sees none of it.
        let (_, theirs) = rig.call("acme-op", "GET", "/v1/devices", b"").await;
        assert_eq!(theirs["total"], 0);
        let (status, _) = rig.call("acme-op", "GET", "/v1/devices/m-1", b"").await;
        assert_eq!(status, 404);
        let (status, _) = rig
            .call("acme-op", "POST", "/v1/devices/m-1/suspend", b"")
            .await;
        assert_eq!(status, 404);

        let actions = rig.audit_actions().await;
        for want in [
            ("op", "claim", "ok"),
            ("op", "claim_manifest", "ok"),
            ("tech", "claim", "forbidden"),
            ("anonymous", "claim", "unauthorized"),
            ("op", "claim", "bad_request"),
            ("tech", "activate", "bad_request"),
            ("acme-op", "activate", "bad_request"),
            ("tech", "activate", "ok"),
            ("tech", "activate_plan", "ok"),
            ("acme-op", "show_device", "not_found"),
        ] {
            let want = (want.0.to_owned(), want.1.to_owned(), want.2.to_owned());
            assert!(actions.contains(&want), "{want:?} not in {actions:?}");
        }
    }

    #[tokio::test]
    async fn profiles_rotation_and_transfer() {
        let rig = rig_with(Vec::new());
        let (status, body) = rig.call("op", "GET", "/v1/profiles", b"").await;
        assert_eq!(
            (status, &body["profiles"][0]["name"]),
            (200, &serde_json::json!("default"))
        );
        let settings = br#"{"report_interval_secs":300,"report_bytes":16,"threshold":2}"#;
        let (status, _) = rig.call("tech", "PUT", "/v1/profiles/heat", settings).await;
        assert_eq!(status, 403);
        let (status, body) = rig.call("op", "PUT", "/v1/profiles/heat", settings).await;
        assert_eq!(
            (status, &body["profile"]["version"]),
            (200, &serde_json::json!(1))
        );
        let (_, body) = rig.call("op", "PUT", "/v1/profiles/heat", settings).await;
        assert_eq!(body["changed"], false);
        let (status, _) = rig
            .call(
                "op",
                "PUT",
                "/v1/profiles/heat",
                br#"{"report_interval_secs":0,"report_bytes":16,"threshold":2}"#,
            )
            .await;
        assert_eq!(status, 400);
        let (status, _) = rig
            .call("op", "PUT", "/v1/profiles/heat", br#"{"interval":5}"#)
            .await;
        assert_eq!(status, 400);
        assert_eq!(rig.seen(), ["profile heat 1"]);

        // A gateway policy: stored, shown, handed to the engine; the version stays.
        let policy = br#"{"report_interval_secs":300,"report_bytes":16,"threshold":2,
            "gateways":["gateway-1"],"allow_direct":false}"#;
        let (status, body) = rig.call("op", "PUT", "/v1/profiles/heat", policy).await;
        assert_eq!(status, 200);
        assert_eq!(
            (
                &body["changed"],
                &body["profile"]["version"],
                &body["profile"]["gateways"],
                &body["profile"]["allow_direct"]
            ),
            (
                &serde_json::json!(true),
                &serde_json::json!(1),
                &serde_json::json!(["gateway-1"]),
                &serde_json::json!(false)
            )
        );
        assert_eq!(rig.seen(), ["profile heat 1"]);
        let (_, body) = rig.call("op", "GET", "/v1/profiles", b"").await;
        assert_eq!(
            body["profiles"][1]["gateways"],
            serde_json::json!(["gateway-1"])
        );
        let (status, _) = rig
            .call(
                "op",
                "PUT",
                "/v1/profiles/heat",
                br#"{"report_interval_secs":300,"report_bytes":16,"threshold":2,"gateways":["a b"]}"#,
            )
            .await;
        assert_eq!(status, 400, "not a gateway name");
        let (status, _) = rig
            .call(
                "op",
                "PUT",
                "/v1/profiles/heat",
                br#"{"report_interval_secs":300,"report_bytes":16,"threshold":2,"allow_direct":"no"}"#,
            )
            .await;
        assert_eq!(status, 400);
        // Back to the default policy (fields left out).
        let (_, body) = rig.call("op", "PUT", "/v1/profiles/heat", settings).await;
        assert_eq!(
            (&body["changed"], &body["profile"]["allow_direct"]),
            (&serde_json::json!(true), &serde_json::json!(true))
        );
        assert_eq!(body["profile"]["quota"], serde_json::Value::Null);
        rig.seen();

        // A quota: stored, shown, handed to the engine; the version stays.
        let quota = br#"{"report_interval_secs":300,"report_bytes":16,"threshold":2,
            "quota":{"frames":10,"bytes":2000,"interval_secs":60}}"#;
        let (status, body) = rig.call("op", "PUT", "/v1/profiles/heat", quota).await;
        assert_eq!(status, 200);
        assert_eq!(
            (
                &body["changed"],
                &body["profile"]["version"],
                &body["profile"]["quota"]
            ),
            (
                &serde_json::json!(true),
                &serde_json::json!(1),
                &serde_json::json!({"frames":10,"bytes":2000,"interval_secs":60})
            )
        );
        assert_eq!(rig.seen(), ["profile heat 1"]);
        for bad in [
            &br#"{"report_interval_secs":300,"report_bytes":16,"threshold":2,"quota":{"frames":10}}"#[..],
            br#"{"report_interval_secs":300,"report_bytes":16,"threshold":2,
                "quota":{"frames":10,"bytes":0,"interval_secs":0}}"#,
            br#"{"report_interval_secs":300,"report_bytes":16,"threshold":2,
                "quota":{"frames":10,"bytes":0,"interval_secs":70000}}"#,
        ] {
            let (status, _) = rig.call("op", "PUT", "/v1/profiles/heat", bad).await;
            assert_eq!(status, 400, "{}", String::from_utf8_lossy(bad));
        }
        let (_, body) = rig.call("op", "PUT", "/v1/profiles/heat", settings).await;
        assert_eq!(
            (&body["changed"], &body["profile"]["quota"]),
            (&serde_json::json!(true), &serde_json::Value::Null)
        );
        rig.seen();

        rig.call("op", "POST", "/v1/claims", &manifest(&[("m-1", 1)]))
            .await;
        rig.call(
            "op",
            "POST",
            "/v1/plans",
            b"serial,account,profile\nm-1,a,heat\n",
        )
        .await;
        let (status, _) = rig.call("op", "POST", "/v1/devices/m-1/rotate", b"").await;
        assert_eq!(status, 409, "no subscription yet");
        let sub = {
            let store = rig.api.store.lock().expect("store");
            store
                .provision("m-1", &PublicKey([11; 32]))
                .expect("provision")
                .id
        };
        rig.seen();
        let (status, body) = rig.call("op", "POST", "/v1/devices/m-1/rotate", b"").await;
        assert_eq!(
            (status, &body["subscription"]),
            (200, &serde_json::json!(sub.0))
        );
        assert_eq!(rig.seen(), [format!("rotate {}", sub.0)]);
        let (_, shown) = rig.call("op", "GET", "/v1/devices/m-1", b"").await;
        assert_eq!(
            (
                &shown["state"],
                &shown["rotate_requested"],
                &shown["live_sessions"]
            ),
            (
                &serde_json::json!("provisioned"),
                &serde_json::json!(true),
                &serde_json::json!(0)
            )
        );

        // Transfer: offered by the owner, accepted by the receiver; the old subscription is
        // revoked at once.
        let (status, _) = rig
            .call(
                "acme-op",
                "POST",
                "/v1/devices/m-1/transfer",
                br#"{"to":"acme"}"#,
            )
            .await;
        assert_eq!(status, 404, "not acme's to give");
        let (status, _) = rig
            .call("op", "POST", "/v1/devices/m-1/accept-transfer", b"")
            .await;
        assert_eq!(status, 409, "nothing offered to the operator");
        let (status, _) = rig
            .call(
                "op",
                "POST",
                "/v1/devices/m-1/transfer",
                br#"{"to":"acme","x":1}"#,
            )
            .await;
        assert_eq!(status, 400);
        let (status, _) = rig
            .call(
                "op",
                "POST",
                "/v1/devices/m-1/transfer",
                br#"{"to":"acme"}"#,
            )
            .await;
        assert_eq!(status, 200);
        let (status, shown) = rig.call("acme-op", "GET", "/v1/devices/m-1", b"").await;
        assert_eq!(
            (status, &shown["transfer_to"]),
            (200, &serde_json::json!("acme"))
        );
        let (status, body) = rig
            .call(
                "acme-op",
                "POST",
                "/v1/devices/m-1/accept-transfer",
                br#"{"account":"unit 7"}"#,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["revoked_subscription"], sub.0);
        // The engine learns the new owner before the revocation, so the old key's refusal
        // already says "re-provision".
        assert_eq!(
            rig.seen(),
            ["devices 1".to_owned(), format!("status {} revoked", sub.0)]
        );
        let (_, shown) = rig.call("acme-op", "GET", "/v1/devices/m-1", b"").await;
        assert_eq!(
            (&shown["owner"], &shown["state"], &shown["status"]),
            (
                &serde_json::json!("acme"),
                &serde_json::json!("activated"),
                &serde_json::Value::Null
            )
        );
        let (status, _) = rig.call("op", "POST", "/v1/devices/m-1/rotate", b"").await;
        assert_eq!(status, 404);
        let (_, readings) = rig
            .call("acme-op", "GET", "/v1/devices/m-1/readings?limit=5", b"")
            .await;
        assert_eq!(readings["readings"].as_array().map(Vec::len), Some(0));
        let actions = rig.audit_actions().await;
        assert!(actions.contains(&("op".into(), "transfer".into(), "ok".into())));
        assert!(actions.contains(&("acme-op".into(), "accept_transfer".into(), "ok".into())));
        assert!(actions.contains(&("op".into(), "rotate".into(), "ok".into())));
    }

    #[tokio::test]
    async fn a_release_signed_here_is_claimed_by_a_core_that_trusts_it() {
        let old = rig_with(Vec::new());
        let new = rig_with(vec![TrustedReleaser {
            name: "old-operator".into(),
            public_key: old.signer.public_key(),
        }]);
        old.call("op", "POST", "/v1/claims", &manifest(&[("m-1", 1)]))
            .await;
        old.seen();
        let release = |key: &str| {
            serde_json::json!({ "core_public_key": key, "endpoint": "core-2.example:4433" })
                .to_string()
        };
        let theirs = hex::encode([0xc0; 32]);
        for (body, status) in [
            (release("abcd"), 400),
            (r#"{"core_public_key":"00"}"#.to_owned(), 400),
            (
                serde_json::json!({ "core_public_key": theirs, "endpoint": "nope" }).to_string(),
                400,
            ),
        ] {
            let (s, _) = old
                .call("op", "POST", "/v1/devices/m-1/release", body.as_bytes())
                .await;
            assert_eq!(s, status, "{body}");
        }
        let (status, _) = old
            .call(
                "acme-op",
                "POST",
                "/v1/devices/m-1/release",
                release(&theirs).as_bytes(),
            )
            .await;
        assert_eq!(status, 404);
        let (status, doc) = old
            .call(
                "op",
                "POST",
                "/v1/devices/m-1/release",
                release(&theirs).as_bytes(),
            )
            .await;
        assert_eq!(status, 200, "{doc}");
        assert_eq!(doc["serial"], "m-1");
        assert_eq!(
            doc["issuer_public_key"],
            hex::encode(old.signer.public_key())
        );
        assert_eq!(old.seen(), ["devices 1"], "no subscription to revoke yet");
        let (status, _) = old
            .call(
                "op",
                "POST",
                "/v1/devices/m-1/release",
                release(&theirs).as_bytes(),
            )
            .await;
        assert_eq!(status, 409);
        let (_, shown) = old.call("op", "GET", "/v1/devices/m-1", b"").await;
        assert_eq!(
            (&shown["state"], &shown["released_to"]),
            (
                &serde_json::json!("released"),
                &serde_json::json!("core-2.example:4433")
            )
        );

        let doc_bytes = doc.to_string().into_bytes();
        // The old core does not trust itself; a forged document fails on the new one.
        let (status, _) = old
            .call("op", "POST", "/v1/claims/release", &doc_bytes)
            .await;
        assert_eq!(status, 422);
        let mut forged = doc.clone();
        forged["endpoint"] = "evil:1".into();
        let (status, body) = new
            .call(
                "op",
                "POST",
                "/v1/claims/release",
                forged.to_string().as_bytes(),
            )
            .await;
        assert_eq!(status, 422, "{body}");
        let (status, _) = new.call("op", "POST", "/v1/claims/release", b"{}").await;
        assert_eq!(status, 400);
        let (status, body) = new
            .call("acme-op", "POST", "/v1/claims/release", &doc_bytes)
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            (&body["owner"], &body["released_by"]),
            (
                &serde_json::json!("acme"),
                &serde_json::json!("old-operator")
            )
        );
        assert_eq!(new.seen(), ["devices 1"]);
        let (status, _) = new
            .call("op", "POST", "/v1/claims/release", &doc_bytes)
            .await;
        assert_eq!(status, 409, "claimed once");
        let (_, shown) = new.call("acme-op", "GET", "/v1/devices/m-1", b"").await;
        assert_eq!(shown["state"], "claimed");
        let actions = new.audit_actions().await;
        assert!(actions.contains(&("acme-op".into(), "claim_release".into(), "ok".into())));
        assert!(actions.contains(&("op".into(), "claim_release".into(), "bad_request".into())));
    }
}
