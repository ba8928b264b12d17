//! The credential lifecycle of a meter with a secure element: the device rule (which key each
//! handshake uses), provisioning with the factory identity, credential updates, refusals, release
//! to another operator, and the crash points kill tests stop the device at. See the
//! [parent module's docs](super#the-device-rule).
//!
//! ```text
//!            ┌──────────── Rotate notice ───────────┐
//!            │ generate Next                        ▼
//!  Idle ─────┤                           Announce{next} ── Subscription + NextKey ──┐
//!   ▲        │ refused needs_factory /              │                     KeyAccepted│
//!   │        │ no subscription key / Release        ▼                               ▼
//!   │        └─ erase + generate Next ─▶ Provision{next} ── Factory + NextKey ─▶ UseNext
//!   │                                                                               │
//!   └───────────────────── commit(Next, Subscription) ◀── established with Next ────┘
//! ```

use super::*;

/// What a device remembers across restarts besides its keys (which its secure element keeps):
/// handed to [`Meter::with_element`] at start, read back with [`Meter::memory`] whenever
/// [`MeterEvent::StateChanged`] says it changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceMemory {
    /// The configuration in force (reported to the core in every handshake).
    pub config: Option<DeviceConfig>,
    /// The release the device followed, if any: its core key and endpoint replace the ones the
    /// device was manufactured with.
    pub release: Option<Release>,
}

/// A point between two steps of a key switch where a kill test may stop the device (environment
/// variable `RELAY_CRASH_AT` in the simulator).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CrashPoint {
    /// A `Rotate` notice arrived; `Next` is not generated yet.
    RotateNotice,
    /// `Next` is generated (sealed in the element); the core has not heard of it.
    NextGenerated,
    /// The core answered `KeyAccepted`; no handshake with `Next` yet.
    KeyAccepted,
    /// A handshake with `Next` succeeded; `Next` is not committed yet.
    NextEstablished,
}

impl CrashPoint {
    /// Every crash point, in the order a switch passes them.
    pub const ALL: [Self; 4] = [
        Self::RotateNotice,
        Self::NextGenerated,
        Self::KeyAccepted,
        Self::NextEstablished,
    ];

    /// The point's name as `RELAY_CRASH_AT` spells it.
    pub fn label(self) -> &'static str {
        match self {
            Self::RotateNotice => "device:rotate_notice",
            Self::NextGenerated => "device:next_generated",
            Self::KeyAccepted => "device:key_accepted",
            Self::NextEstablished => "device:next_established",
        }
    }

    /// The point named `label`, if any.
    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.label() == label)
    }
}

impl fmt::Display for CrashPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Called at every [`CrashPoint`] the meter passes. Returning `true` stops the meter there for
/// good (a test's crash); the simulator's hook aborts the process instead.
pub struct CrashHook(Box<dyn FnMut(CrashPoint) -> bool + Send>);

impl CrashHook {
    /// A hook from a closure.
    pub fn new(hook: impl FnMut(CrashPoint) -> bool + Send + 'static) -> Self {
        Self(Box::new(hook))
    }
}

impl fmt::Debug for CrashHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CrashHook")
    }
}

/// Refusals counted by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefusalCounts([u64; RefusalReason::ALL.len()]);

impl RefusalCounts {
    /// Counts one refusal.
    pub fn add(&mut self, reason: RefusalReason) {
        self.0[Self::index(reason)] += 1;
    }

    /// Refusals for `reason`.
    pub fn get(&self, reason: RefusalReason) -> u64 {
        self.0[Self::index(reason)]
    }

    /// Every refusal.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Adds another set of counts.
    pub fn merge(&mut self, other: &Self) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    /// The reasons counted at least once, with their counts.
    pub fn iter(&self) -> impl Iterator<Item = (RefusalReason, u64)> + '_ {
        RefusalReason::ALL
            .into_iter()
            .map(|r| (r, self.get(r)))
            .filter(|(_, n)| *n > 0)
    }

    fn index(reason: RefusalReason) -> usize {
        RefusalReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0)
    }
}

/// A map from the reason's label to its count; reasons never seen are left out.
impl serde::Serialize for RefusalCounts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter().map(|(r, n)| (r.label(), n)))
    }
}

/// What one handshake does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// With `Next`: established means the core bound it; commit.
    Next,
    /// With the subscription key, proposing `announce` while a credential update is announced.
    Subscription { announce: Option<PublicKey> },
    /// With the factory identity, proposing `next` (provisioning).
    Factory { next: PublicKey },
}

impl Step {
    pub(super) fn slot(self) -> KeySlot {
        match self {
            Self::Next => KeySlot::Next,
            Self::Subscription { .. } => KeySlot::Subscription,
            Self::Factory { .. } => KeySlot::Factory,
        }
    }

    /// The key the handshake proposes (`NextKey`).
    pub(super) fn proposed(self) -> Option<PublicKey> {
        match self {
            Self::Next => None,
            Self::Subscription { announce } => announce,
            Self::Factory { next } => Some(next),
        }
    }
}

/// A key switch in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Switch {
    /// None.
    Idle,
    /// A credential update: `next` is generated, to be announced with the subscription key.
    Announce { next: PublicKey },
    /// Provisioning: `next` is generated, to be proposed with the factory key.
    Provision { next: PublicKey },
    /// The core accepted `Next`: handshake with it, then commit.
    UseNext { provisioning: bool },
}

/// The lifecycle half of a [`Meter`].
pub(super) struct Lifecycle {
    pub(super) element: Arc<dyn SecureElement>,
    pub(super) release: Option<Release>,
    switch: Switch,
    /// The device rule reached step 3 (re-provision with the factory identity).
    factory_needed: bool,
    /// Handshakes with `Next` unanswered in a row, this contact.
    next_unanswered: u32,
}

impl fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lifecycle")
            .field("slots", &self.element.slots())
            .field("switch", &self.switch)
            .field("factory_needed", &self.factory_needed)
            .field("release", &self.release)
            .finish_non_exhaustive()
    }
}

impl Lifecycle {
    pub(super) fn new(element: Arc<dyn SecureElement>, release: Option<Release>) -> Self {
        Self {
            element,
            release,
            switch: Switch::Idle,
            factory_needed: false,
            next_unanswered: 0,
        }
    }

    /// No key switch in progress.
    pub(super) fn is_settled(&self) -> bool {
        self.switch == Switch::Idle && !self.factory_needed
    }

    /// A handshake of `step` got no answer before its retry.
    pub(super) fn unanswered(&mut self, step: Step) {
        if step == Step::Next {
            self.next_unanswered += 1;
        }
    }

    /// A new contact (rekey, silence): the device rule starts from the top.
    pub(super) fn new_contact(&mut self) {
        self.next_unanswered = 0;
    }

    fn has(&self, slot: KeySlot) -> bool {
        self.element.public(slot).is_ok()
    }

    fn holds_next(&self, key: PublicKey) -> bool {
        self.element.public(KeySlot::Next).ok() == Some(key)
    }
}

impl Meter {
    /// Calls the crash hook at `point`; `true` if the meter is now stopped.
    fn crash(&mut self, point: CrashPoint) -> bool {
        if let Some(hook) = self.crash_hook.as_mut() {
            if (hook.0)(point) {
                tracing::debug!(serial = %self.serial, %point, "stopped at a crash point");
                self.crashed = true;
            }
        }
        self.crashed
    }

    /// The device rule: which key the next handshake uses. `None` when no handshake can start
    /// now (a crash point stopped the meter, the element failed, or there is no identity to fall
    /// back to); the retry timer is set either way.
    pub(super) fn choose_step(&mut self, now: Instant) -> Option<Step> {
        let attempts = self.config.next_key_attempts;
        let l = self.lifecycle.as_mut()?;
        if l.factory_needed {
            return self.begin_factory(now);
        }
        let next_ok = l.has(KeySlot::Next) && l.next_unanswered < attempts;
        match l.switch {
            Switch::Provision { next } if l.holds_next(next) => {
                return Some(Step::Factory { next });
            }
            Switch::Provision { .. } => return self.begin_factory(now),
            Switch::Announce { next } if l.holds_next(next) && l.has(KeySlot::Subscription) => {
                return Some(Step::Subscription {
                    announce: Some(next),
                });
            }
            Switch::UseNext { .. } if next_ok => return Some(Step::Next),
            Switch::Announce { .. } | Switch::UseNext { .. } => {
                if !l.has(KeySlot::Next) || matches!(l.switch, Switch::Announce { .. }) {
                    l.switch = Switch::Idle;
                }
            }
            Switch::Idle => {}
        }
        if next_ok {
            Some(Step::Next)
        } else if l.has(KeySlot::Subscription) {
            Some(Step::Subscription { announce: None })
        } else {
            self.begin_factory(now)
        }
    }

    /// Step 3 of the device rule: a fresh `Next` for provisioning with the factory identity.
    fn begin_factory(&mut self, now: Instant) -> Option<Step> {
        let serial = self.serial.clone();
        let l = self.lifecycle.as_mut()?;
        l.factory_needed = false;
        if !l.has(KeySlot::Factory) {
            // A device without a factory identity (a clone of another's subscription key) cannot
            // re-provision: it tries its subscription key again after a while.
            tracing::warn!(%serial, "no factory identity to re-provision with");
            l.switch = Switch::Idle;
            self.back_off(now);
            return None;
        }
        let generated = l
            .element
            .erase(KeySlot::Next)
            .and_then(|()| l.element.generate(KeySlot::Next));
        let next = match generated {
            Ok(next) => next,
            Err(e) => {
                tracing::warn!(%serial, error = %e, "cannot generate a key in the element");
                l.factory_needed = true;
                return None;
            }
        };
        l.switch = Switch::Provision { next };
        if self.crash(CrashPoint::NextGenerated) {
            return None;
        }
        Some(Step::Factory { next })
    }

    /// The core's answer to a handshake of `step`.
    pub(super) fn lifecycle_response(
        &mut self,
        step: Step,
        response: &ResponsePayload,
        now: Instant,
    ) {
        match response.refused {
            None => self.lifecycle_established(step, response, now),
            Some(reason) => self.lifecycle_refused(step, reason, response, now),
        }
    }

    fn lifecycle_established(&mut self, step: Step, response: &ResponsePayload, now: Instant) {
        let serial = self.serial.clone();
        let Some(l) = self.lifecycle.as_mut() else {
            return;
        };
        match step {
            Step::Factory { next } => {
                // The core keeps no session for the factory key, and the device sends nothing on
                // it: the next handshake, with `Next`, is the first that carries readings.
                self.usable = false;
                if response.key_accepted != Some(next) {
                    tracing::warn!(%serial, "factory handshake answered without accepting the key");
                    self.back_off(now);
                    return;
                }
                l.switch = Switch::UseNext { provisioning: true };
                l.next_unanswered = 0;
                self.events
                    .push_back(MeterEvent::KeyAccepted { provisioning: true });
                if let Some(config) = response.notices.config {
                    // Applied before the crash point: it came in this very answer.
                    self.apply_config(config);
                }
                if self.crash(CrashPoint::KeyAccepted) {
                    return;
                }
                self.want_handshake = true;
            }
            Step::Next => {
                l.next_unanswered = 0;
                let provisioning = match l.switch {
                    Switch::UseNext { provisioning } => provisioning,
                    // A restart in the middle of a switch: provisioning if there was no key yet.
                    _ => !l.has(KeySlot::Subscription),
                };
                if self.crash(CrashPoint::NextEstablished) {
                    return;
                }
                let Some(l) = self.lifecycle.as_mut() else {
                    return;
                };
                match l.element.commit(KeySlot::Next, KeySlot::Subscription) {
                    Ok(()) => {
                        l.switch = Switch::Idle;
                        if provisioning {
                            self.stats.provisionings += 1;
                        } else {
                            self.stats.key_updates += 1;
                        }
                        self.events
                            .push_back(MeterEvent::KeyCommitted { provisioning });
                    }
                    // The core holds the new key and the session works; `Next` is still there,
                    // so the next contact handshakes with it and commits again.
                    Err(e) => tracing::warn!(%serial, error = %e, "cannot commit the new key"),
                }
                self.on_usable(response.rekey_after_secs, now);
            }
            Step::Subscription { announce } => {
                let accepted = announce.is_some() && response.key_accepted == announce;
                if accepted {
                    l.switch = Switch::UseNext {
                        provisioning: false,
                    };
                    l.next_unanswered = 0;
                }
                self.on_usable(response.rekey_after_secs, now);
                if accepted {
                    self.events.push_back(MeterEvent::KeyAccepted {
                        provisioning: false,
                    });
                    if self.crash(CrashPoint::KeyAccepted) {
                        return;
                    }
                    self.want_handshake = true;
                }
            }
        }
    }

    fn lifecycle_refused(
        &mut self,
        step: Step,
        reason: RefusalReason,
        response: &ResponsePayload,
        now: Instant,
    ) {
        let serial = self.serial.clone();
        tracing::debug!(%serial, slot = %step.slot(), reason = reason.label(), "handshake refused");
        // A refused `Next` says nothing about the subscription session in use, unless the
        // refusal is about the whole device.
        let key_only = step == Step::Next
            && matches!(
                reason,
                RefusalReason::UnknownKey | RefusalReason::Superseded
            );
        if !key_only {
            self.usable = false;
        }
        if reason == RefusalReason::Released && response.notices.release.is_some() {
            // Followed by the caller, `on_release`.
            return;
        }
        let Some(l) = self.lifecycle.as_mut() else {
            return;
        };
        match step {
            Step::Next if reason.needs_factory() => {
                // The core does not know the key (a switch it never heard of, or lost): destroy
                // it and go on with the rule at once.
                l.next_unanswered = 0;
                if let Err(e) = l.element.erase(KeySlot::Next) {
                    tracing::warn!(%serial, error = %e, "cannot erase the refused key");
                }
                if matches!(l.switch, Switch::UseNext { .. }) {
                    l.switch = Switch::Idle;
                }
                self.want_handshake = true;
            }
            Step::Subscription { .. } if reason.needs_factory() => {
                l.factory_needed = true;
                l.switch = Switch::Idle;
                self.want_handshake = true;
            }
            // Suspended, revoked, unclaimed, not activated, not permitted on this path (and
            // anything refused with the factory key): no fallback, try again later.
            _ => self.back_off(now),
        }
    }

    pub(super) fn apply_config(&mut self, config: DeviceConfig) {
        if self.device_config != Some(config) {
            self.device_config = Some(config);
            self.stats.config_updates += 1;
            self.events.push_back(MeterEvent::ConfigApplied(config));
            self.events.push_back(MeterEvent::StateChanged);
        }
    }

    /// A credential update notice: generate `Next` and announce it with the subscription key.
    pub(super) fn on_rotate(&mut self, _now: Instant) {
        let serial = self.serial.clone();
        let Some(l) = self.lifecycle.as_ref() else {
            tracing::debug!(%serial, "a pre-provisioned meter cannot rotate its key");
            return;
        };
        if !l.is_settled() || !l.has(KeySlot::Subscription) {
            // A switch is under way already; it ends with a new key too.
            return;
        }
        self.stats.rotations += 1;
        if self.crash(CrashPoint::RotateNotice) {
            return;
        }
        let Some(l) = self.lifecycle.as_mut() else {
            return;
        };
        let generated = l
            .element
            .erase(KeySlot::Next)
            .and_then(|()| l.element.generate(KeySlot::Next));
        let next = match generated {
            Ok(next) => next,
            Err(e) => {
                // The core repeats the notice while the update is pending.
                tracing::warn!(%serial, error = %e, "cannot generate a key in the element");
                return;
            }
        };
        l.switch = Switch::Announce { next };
        if self.crash(CrashPoint::NextGenerated) {
            return;
        }
        self.want_handshake = true;
    }

    /// The device now belongs to another operator: switch core key and endpoint, re-provision
    /// there with the factory identity.
    pub(super) fn on_release(&mut self, release: Release, _now: Instant) {
        let serial = self.serial.clone();
        let Some(l) = self.lifecycle.as_mut() else {
            tracing::warn!(%serial, "a pre-provisioned meter cannot follow a release");
            return;
        };
        if !release.is_valid() {
            return;
        }
        l.release = Some(release.clone());
        l.factory_needed = true;
        l.switch = Switch::Idle;
        l.new_contact();
        self.session.set_core(release.core);
        self.usable = false;
        // Readings in flight went to the old core: resend them once the new one answers.
        self.suspect = true;
        self.handshake = None;
        self.rekey_at = None;
        self.silence_from = None;
        self.want_handshake = true;
        self.stats.releases += 1;
        self.events.push_back(MeterEvent::Released {
            endpoint: release.endpoint,
        });
        self.events.push_back(MeterEvent::StateChanged);
    }
}

#[cfg(test)]
mod tests;
