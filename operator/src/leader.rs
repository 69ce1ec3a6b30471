//! Leader election: one controller of several replicas reconciles, the others stand by.
//!
//! Two controllers reconciling the same Backup would both commit and fold the same volumes, so
//! `strata-controller` runs its controllers only while it holds a `coordination.k8s.io/v1`
//! Lease in its own namespace. The semantics are client-go's `tools/leaderelection` (its
//! package doc and the Kubernetes docs' "Leases" page, section "Leader election"), with the
//! Lease fields as `LeaseSpec` documents them:
//!
//! - `holderIdentity`: the current leader (the pod name, [`identity`]); empty once released.
//! - `leaseDurationSeconds`: how long candidates wait after the last renewal before taking the
//!   Lease over ([`LeaderElection::lease_duration`], 15 s by default, as client-go's).
//! - `acquireTime` / `renewTime`: when the holder took it and last renewed it.
//! - `leaseTransitions`: how many times it changed hands, incremented on every takeover.
//!
//! A candidate takes the Lease when it does not exist (create), when it has no holder, or when
//! `renewTime + leaseDurationSeconds` has passed (the holder stopped renewing). The leader
//! renews every [`LeaderElection::retry_period`] (2 s). Every write is a replace (`PUT`)
//! carrying the `resourceVersion` that was read, so of two candidates writing at once the API
//! server accepts one and answers the other 409 Conflict: that one has lost the round.
//!
//! A leader that cannot renew for [`LeaderElection::renew_deadline`] (10 s) since its last
//! renewal, or that finds another holder, has lost the Lease ([`LeaderError::Lost`]). The
//! deadline is shorter than the lease duration, so the old leader has stopped before any
//! candidate may take over (assuming the nodes' clocks agree to within the difference, 5 s by
//! default: expiry is judged from the holder's `renewTime`, as the API documents it, where
//! client-go times its own observations of the record).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};

use crate::endpoint::Health;

/// client-go's default `LeaseDuration`.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// client-go's default `RenewDeadline`.
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// client-go's default `RetryPeriod`.
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);
/// The Lease's name by default.
pub const DEFAULT_LEASE_NAME: &str = "strata-controller";

/// Where the Lease is, who this candidate is, and the timing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderElection {
    /// Namespace of the Lease (the controller's own).
    pub namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// This candidate's `holderIdentity`, unique among the replicas.
    pub identity: String,
    /// How long after the last renewal candidates may take the Lease over.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives up leading.
    pub renew_deadline: Duration,
    /// Pause between two attempts to acquire or renew.
    pub retry_period: Duration,
}

impl LeaderElection {
    /// Lease [`DEFAULT_LEASE_NAME`] in `namespace` for `identity`, with client-go's timing.
    pub fn new(namespace: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaderElection {
            namespace: namespace.into(),
            lease_name: DEFAULT_LEASE_NAME.to_owned(),
            identity: identity.into(),
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
        }
    }

    /// The checks client-go's `NewLeaderElector` makes: a lease duration longer than the renew
    /// deadline, which is longer than the retry period, and a non-empty identity.
    pub fn validate(&self) -> Result<(), LeaderError> {
        let refuse = |reason: &str| {
            Err(LeaderError::Settings {
                reason: reason.to_owned(),
            })
        };
        if self.identity.is_empty() {
            return refuse("the identity must not be empty");
        }
        if self.retry_period.is_zero() {
            return refuse("the retry period must be positive");
        }
        if self.lease_duration <= self.renew_deadline {
            return refuse("the lease duration must be longer than the renew deadline");
        }
        if self.renew_deadline <= self.retry_period {
            return refuse("the renew deadline must be longer than the retry period");
        }
        if i32::try_from(self.lease_duration.as_secs()).is_err()
            || self.lease_duration.as_secs() == 0
        {
            return refuse("the lease duration must be a whole number of seconds, at least 1");
        }
        Ok(())
    }
}

/// This candidate's identity: `POD_NAME` (the Deployment sets it from the downward API), else
/// the host name and a random suffix, so two processes on one machine differ.
pub fn identity() -> String {
    if let Some(pod) = std::env::var(crate::events::POD_NAME_ENV)
        .ok()
        .filter(|p| !p.is_empty())
    {
        return pod;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "strata-controller".to_owned());
    let mut suffix = [0u8; 4];
    // Without randomness the process id still tells two processes of one host apart.
    let suffix = match getrandom::fill(&mut suffix) {
        Ok(()) => u32::from_le_bytes(suffix),
        Err(_) => std::process::id(),
    };
    format!("{host}_{suffix:08x}")
}

/// Why a leader stopped leading.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostCause {
    /// Another candidate holds the Lease.
    TakenBy {
        /// Its `holderIdentity`.
        holder: String,
    },
    /// No renewal succeeded within the renew deadline.
    RenewDeadline {
        /// The deadline.
        deadline: Duration,
    },
}

impl std::fmt::Display for LostCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LostCause::TakenBy { holder } => write!(f, "{holder} holds it"),
            LostCause::RenewDeadline { deadline } => {
                write!(f, "no renewal succeeded within {deadline:?}")
            }
        }
    }
}

/// A failure of leader election.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaderError {
    /// A call to the API server failed.
    #[error("{operation} Lease {lease}")]
    Api {
        /// What was being done: `get`, `create`, `replace`.
        operation: &'static str,
        /// `namespace/name` of the Lease.
        lease: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The leader lost the Lease; it must stop reconciling at once.
    #[error("lost the leader Lease {lease}: {cause}")]
    Lost {
        /// `namespace/name` of the Lease.
        lease: String,
        /// Why.
        cause: LostCause,
    },
    /// The settings break client-go's rules ([`LeaderElection::validate`]).
    #[error("leader election settings: {reason}")]
    Settings {
        /// What is wrong.
        reason: String,
    },
}

/// Outcome of one [`Elector::try_acquire_or_renew`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// This candidate holds the Lease (acquired or renewed just now).
    Leading,
    /// Another candidate holds a live Lease.
    HeldBy {
        /// Its `holderIdentity`.
        holder: String,
    },
    /// Another writer changed the Lease between the read and the write (409 Conflict).
    Conflict,
}

/// Where "now" comes from when writing and judging `renewTime`.
#[derive(Clone, Copy, Debug)]
pub enum Clock {
    /// The system's wall clock.
    System,
    /// Tokio's clock, read as wall time from when [`Clock::tokio`] was called: it follows
    /// tokio's paused time in tests.
    Tokio {
        /// Wall time at the anchor.
        wall: Timestamp,
        /// Tokio's instant at the anchor.
        instant: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock following tokio's, anchored now.
    pub fn tokio() -> Self {
        Clock::Tokio {
            wall: Timestamp::now(),
            instant: tokio::time::Instant::now(),
        }
    }

    /// The current time.
    pub fn now(&self) -> Timestamp {
        match self {
            Clock::System => Timestamp::now(),
            Clock::Tokio { wall, instant } => wall
                .checked_add(instant.elapsed())
                .unwrap_or(Timestamp::MAX),
        }
    }
}

/// One candidate for the Lease.
pub struct Elector {
    api: Api<Lease>,
    settings: LeaderElection,
    clock: Clock,
    health: Option<Arc<Health>>,
    /// The Lease as this candidate last wrote it while leading: a renewal replaces it without
    /// reading it first, and a 409 says someone else wrote in between.
    held: Option<Lease>,
}

impl Elector {
    /// A candidate with `settings` (checked by [`LeaderElection::validate`]), on the system
    /// clock.
    pub fn new(client: Client, settings: LeaderElection) -> Result<Self, LeaderError> {
        settings.validate()?;
        Ok(Elector {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            clock: Clock::System,
            health: None,
            held: None,
        })
    }

    /// Judge and write times with `clock`.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Report each round to `health` (liveness, readiness, the leader gauge).
    pub fn with_health(mut self, health: Arc<Health>) -> Self {
        self.health = Some(health);
        self
    }

    /// The settings.
    pub fn settings(&self) -> &LeaderElection {
        &self.settings
    }

    fn lease_path(&self) -> String {
        format!("{}/{}", self.settings.namespace, self.settings.lease_name)
    }

    fn api_error(&self, operation: &'static str) -> impl FnOnce(kube::Error) -> LeaderError {
        let lease = self.lease_path();
        move |source| LeaderError::Api {
            operation,
            lease,
            source,
        }
    }

    fn lease_seconds(&self) -> i32 {
        // validate() checked that it fits.
        i32::try_from(self.settings.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }

    /// One round, client-go's `tryAcquireOrRenew`: renew the Lease if this candidate holds it,
    /// create it if absent, take it over if free or expired; otherwise report its holder.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Attempt, LeaderError> {
        let attempt = self.round().await;
        if let Some(health) = &self.health {
            health.beat(self.settings.lease_duration * 2);
            health.election_round(attempt.as_ref().ok());
        }
        attempt
    }

    async fn round(&mut self) -> Result<Attempt, LeaderError> {
        let now = self.clock.now();
        let current = match self.held.take() {
            Some(held) => Some(held),
            None => self
                .api
                .get_opt(&self.settings.lease_name)
                .await
                .map_err(self.api_error("get"))?,
        };
        let Some(mut lease) = current else {
            return self.create(now).await;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.settings.identity.as_str());
        if !ours {
            if let Some(holder) = holder.filter(|_| !self.expired(spec, now)) {
                return Ok(Attempt::HeldBy { holder });
            }
            spec.holder_identity = Some(self.settings.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(self.lease_seconds());
        // `lease` keeps the resourceVersion it was read with: the replace is conditional on it.
        match self
            .api
            .replace(&self.settings.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                self.held = Some(written);
                Ok(Attempt::Leading)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Conflict),
            Err(err) => Err(self.api_error("replace")(err)),
        }
    }

    /// Whether `spec`'s holder stopped renewing: `renewTime + leaseDurationSeconds` has passed
    /// (the record's duration, as its holder announced it, else ours).
    fn expired(&self, spec: &LeaseSpec, now: Timestamp) -> bool {
        let Some(MicroTime(renewed)) = spec.renew_time else {
            return true;
        };
        let seconds = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(self.settings.lease_duration.as_secs());
        renewed
            .checked_add(Duration::from_secs(seconds))
            .is_ok_and(|end| end <= now)
    }

    async fn create(&mut self, now: Timestamp) -> Result<Attempt, LeaderError> {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.settings.lease_name.clone()),
                namespace: Some(self.settings.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.settings.identity.clone()),
                lease_duration_seconds: Some(self.lease_seconds()),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(written) => {
                self.held = Some(written);
                Ok(Attempt::Leading)
            }
            // Another candidate created it first.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Conflict),
            Err(err) => Err(self.api_error("create")(err)),
        }
    }

    /// Try every retry period until this candidate leads. API errors are logged and retried,
    /// as client-go does; a round that hangs is given up after the renew deadline and tried
    /// again.
    pub async fn acquire(&mut self) {
        loop {
            let round =
                tokio::time::timeout(self.settings.renew_deadline, self.try_acquire_or_renew());
            match round.await {
                Ok(Ok(Attempt::Leading)) => return,
                Ok(Ok(_)) => {}
                Ok(Err(err)) => {
                    eprintln!("leader election: {}", crate::reconcile::error_chain(&err));
                }
                Err(_elapsed) => eprintln!(
                    "leader election: no answer from the API server within {:?}",
                    self.settings.renew_deadline
                ),
            }
            tokio::time::sleep(self.settings.retry_period).await;
        }
    }

    /// Run `work` while renewing the Lease every retry period (the caller holds it: call this
    /// right after [`Elector::acquire`], whose success starts the renew deadline). Returns `work`'s output once it finishes; if the Lease is lost
    /// first, `work` is dropped and [`LeaderError::Lost`] returned.
    pub async fn while_leading<F: Future>(&mut self, work: F) -> Result<F::Output, LeaderError> {
        let lease = self.lease_path();
        let renewals = async {
            let mut last_renewal = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(self.settings.retry_period).await;
                let deadline = last_renewal + self.settings.renew_deadline;
                // A hung call must not carry the leader past its deadline.
                let attempt = tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await;
                match attempt {
                    Ok(Ok(Attempt::Leading)) => last_renewal = tokio::time::Instant::now(),
                    Ok(Ok(Attempt::HeldBy { holder })) => return LostCause::TakenBy { holder },
                    Ok(Ok(Attempt::Conflict)) => {}
                    Ok(Err(err)) => {
                        eprintln!(
                            "renewing the leader Lease: {}",
                            crate::reconcile::error_chain(&err)
                        );
                    }
                    Err(_elapsed) => {}
                }
                if tokio::time::Instant::now() >= deadline {
                    return LostCause::RenewDeadline {
                        deadline: self.settings.renew_deadline,
                    };
                }
            }
        };
        let result = tokio::select! {
            output = work => Ok(output),
            cause = renewals => Err(cause),
        };
        match result {
            Ok(output) => Ok(output),
            Err(cause) => {
                self.held = None;
                if let Some(health) = &self.health {
                    health.set_leading(false);
                }
                Err(LeaderError::Lost { lease, cause })
            }
        }
    }

    /// Give the Lease up (client-go's `ReleaseOnCancel`): clear the holder and set the lease
    /// duration to one second, so a candidate takes it at its next round instead of waiting
    /// for it to expire. Returns whether this candidate held it; a Lease someone else holds is
    /// left alone.
    pub async fn release(&mut self) -> Result<bool, LeaderError> {
        let current = match self.held.take() {
            Some(held) => held,
            None => match self
                .api
                .get_opt(&self.settings.lease_name)
                .await
                .map_err(self.api_error("get"))?
            {
                Some(lease) => lease,
                None => return Ok(false),
            },
        };
        let mut lease = current;
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(false);
        }
        let now = self.clock.now();
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(now));
        spec.acquire_time = Some(MicroTime(now));
        self.api
            .replace(&self.settings.lease_name, &PostParams::default(), &lease)
            .await
            .map_err(self.api_error("replace"))?;
        if let Some(health) = &self.health {
            health.set_leading(false);
        }
        Ok(true)
    }
}
