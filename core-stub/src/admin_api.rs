//! The admin API (`/v1/…` on the admin listener, `docs/admin-api.json`): list and show devices,
//! suspend, resume and revoke them, read the audit log. JSON over HTTP/1.1, bearer tokens per
//! role ([`crate::tokens`]).
//!
//! A status change is made durable first (SQLite, with its audit record in the same
//! transaction), then pushed to the engine on its control channel; the answer goes out only after
//! the engine applied it, so when a client sees `200` the device's sessions are already gone.
//! Every refusal is audited too (actor `anonymous` without a valid token). Successful reads are
//! not: they change nothing.
//!
//! ```text
//!  client ─HTTP─▶ relay-ops admin ─Handler─▶ AdminApi ─spawn_blocking─▶ Store (own connection)
//!                                               └──EngineControl (bounded)──▶ engine ──reply──┘
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use relay_ops::admin::{Handler, HandlerFuture, Request, Response};
use tokio::sync::{mpsc, oneshot};

use crate::engine::EngineControl;
use crate::metrics::Metrics;
use crate::store::{AuditEvent, Store, StoreError, SubscriptionStatus, MAX_PAGE};
use crate::tokens::{Role, TokenSet};

/// Every route the API serves, as `docs/admin-api.json` names them (method, path template).
pub const ROUTES: [(&str, &str); 6] = [
    ("get", "/v1/devices"),
    ("get", "/v1/devices/{serial}"),
    ("post", "/v1/devices/{serial}/suspend"),
    ("post", "/v1/devices/{serial}/resume"),
    ("post", "/v1/devices/{serial}/revoke"),
    ("get", "/v1/audit"),
];

/// The page size when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 100;
/// The longest serial accepted.
pub const MAX_SERIAL: usize = 64;
/// How long a request waits for the engine before answering 503.
const ENGINE_WAIT: Duration = Duration::from_secs(2);
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

/// A parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    List { limit: u32, offset: u64 },
    Show { serial: String },
    Change { serial: String, change: Change },
    Audit { limit: u32 },
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Self::List { .. } => "list_devices",
            Self::Show { .. } => "show_device",
            Self::Change { change, .. } => change.name(),
            Self::Audit { .. } => "read_audit",
        }
    }

    fn target(&self) -> Option<&str> {
        match self {
            Self::Show { serial } | Self::Change { serial, .. } => Some(serial),
            _ => None,
        }
    }

    fn allowed(&self, role: Role) -> bool {
        match self {
            Self::List { .. } | Self::Show { .. } => true,
            Self::Change { .. } | Self::Audit { .. } => role == Role::Operator,
        }
    }
}

/// Why a request is refused: the status, the metric's `result`, the audit's outcome and a message
/// for the client.
#[derive(Debug)]
struct Refusal {
    status: u16,
    result: &'static str,
    message: String,
}

impl Refusal {
    fn new(status: u16, message: impl Into<String>) -> Self {
        let result = match status {
            400 | 405 => "bad_request",
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
        }
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
        ["devices", serial, op] => {
            let change = match *op {
                "suspend" => Change::Suspend,
                "resume" => Change::Resume,
                "revoke" => Change::Revoke,
                _ => return Err(Refusal::new(404, "no such route")),
            };
            want("POST")?;
            parse_query(query, &[])?;
            Action::Change {
                serial: parse_serial(serial)?,
                change,
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
    let ok = !s.is_empty()
        && s.len() <= MAX_SERIAL
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(Refusal::new(
            400,
            format!("a serial is 1 to {MAX_SERIAL} of A-Z a-z 0-9 - _ ."),
        ))
    }
}

/// Who is asking.
#[derive(Clone, Debug)]
struct Caller {
    name: String,
    role: Option<Role>,
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
}

impl std::fmt::Debug for AdminApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminApi")
            .field("tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

impl AdminApi {
    pub fn new(
        tokens: TokenSet,
        store: Store,
        engine: mpsc::Sender<EngineControl>,
        metrics: Metrics,
    ) -> Self {
        Self {
            tokens,
            store: Arc::new(Mutex::new(store)),
            engine,
            changes: tokio::sync::Mutex::new(()),
            metrics,
        }
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
        let outcome = match action_parsed {
            Action::List { limit, offset } => self.list(limit, offset).await,
            Action::Show { serial } => self.show(serial).await,
            Action::Audit { limit } => self.audit(limit).await,
            Action::Change { serial, change } => self.change(&caller, serial, change).await,
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
        let (actor, role) = (caller.name.clone(), caller.role.map(Role::as_str));
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
        error_response(refusal.status, &refusal.message)
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

    async fn ask_engine(
        &self,
        make: impl FnOnce(oneshot::Sender<usize>) -> EngineControl,
    ) -> Option<usize> {
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

    async fn list(&self, limit: u32, offset: u64) -> Result<Vec<u8>, Refusal> {
        let page = self
            .with_store(move |s| s.device_page(limit, offset))
            .await
            .map_err(Failure::refusal)?;
        json(&page)
    }

    async fn show(&self, serial: String) -> Result<Vec<u8>, Refusal> {
        let (id, device, readings) = self
            .with_store(move |s| s.device(&serial))
            .await
            .map_err(Failure::refusal)?;
        let live = self
            .ask_engine(|reply| EngineControl::LiveSessions {
                subscription: id,
                reply,
            })
            .await
            .ok_or_else(|| Refusal::new(503, "engine unavailable"))?;
        json(&serde_json::json!({
            "serial": device.serial,
            "status": device.status.as_str(),
            "created_at_ms": device.created_at_ms,
            "readings": readings,
            "live_sessions": live,
        }))
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
        let actor = caller.name.clone();
        let role = caller.role.map(Role::as_str).unwrap_or("");
        let s = serial.clone();
        let stored = self
            .with_store(move |store| {
                store.change_status(&s, status, Some((&actor, role, change.name())))
            })
            .await
            .map_err(Failure::refusal)?;
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
}

/// What went wrong under a store call.
#[derive(Debug)]
struct Failure {
    status: u16,
    message: String,
}

impl Failure {
    fn internal(what: &str) -> Self {
        Self {
            status: 500,
            message: format!("internal error: {what}"),
        }
    }

    fn store(e: StoreError) -> Self {
        let status = match e {
            StoreError::UnknownSerial(_) => 404,
            StoreError::RevokedForGood(_) => 409,
            _ => 500,
        };
        if status == 500 {
            tracing::error!(error = %e, "admin API store call failed");
        }
        Self {
            status,
            message: e.to_string(),
        }
    }

    fn refusal(self) -> Refusal {
        Refusal::new(self.status, self.message)
    }
}

fn json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Refusal> {
    serde_json::to_vec(value).map_err(|e| Refusal::new(500, e.to_string()))
}

fn error_response(status: u16, message: &str) -> Response {
    let body = serde_json::json!({ "error": message }).to_string();
    Response::json(status, body)
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

    #[test]
    fn routes_parse_and_bad_input_is_refused() {
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
}
