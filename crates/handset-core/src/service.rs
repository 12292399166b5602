//! The gateway service: every decision about partners' requests. Handlers call
//! it with parsed input; it calls providers and the store through their traits.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::birth_date::BirthDate;
use crate::breaker::{BreakerSettings, CircuitBreaker};
use crate::error::{ApiError, ErrorCode};
use crate::model::{
    CallbackOut, CallbackRecord, CallbackState, OutboxMessage, Partner, PersonName, Product, ProviderName, ResultError,
    Status, Transaction, TransactionResult, Verification, VerificationOut,
};
use crate::phone::Phone;
use crate::provider::{CodeCheck, Outcome, Provider, ProviderError, StartRequest, Started};
use crate::rate_limit::{RateLimits, Scope};
use crate::routing::Routing;
use crate::secret::{Secret, api_key_hash, code_hash, constant_time_eq};
use crate::store::{Finalization, Store};

/// Service settings taken from config.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub code_ttl: Duration,
    pub max_attempts: i32,
    /// handset's absolute base URL, for links it hands out.
    pub public_url: String,
    /// A partner that must never authenticate, whatever key it holds (the
    /// development partner in production).
    pub refused_partner: Option<Uuid>,
    /// Keys the hashes of codes handset checks itself (`security.code_pepper`).
    pub code_pepper: Secret,
    /// Callback deliveries a transaction may have pending before a partner's
    /// retry request is refused (429).
    pub max_pending_callbacks: i64,
    /// How long an identity match may wait for an asynchronous result.
    pub identity_ttl: Duration,
    /// Polling a provider for a pending result: first delay, doubled up to the max.
    pub poll_min: std::time::Duration,
    pub poll_max: std::time::Duration,
    pub breaker: BreakerSettings,
    pub rate_limits: RateLimits,
}

/// A possession check to start, already parsed.
#[derive(Clone)]
pub struct StartPossession {
    pub phone: Phone,
    pub channel: Product,
    pub provider: Option<ProviderName>,
    pub verification_id: Option<Uuid>,
    pub callback_url: Option<String>,
    pub redirect_uri: Option<String>,
    pub name: Option<PersonName>,
    pub metadata: Value,
}

crate::debug_only!(StartPossession { phone, channel, provider, verification_id });

/// An identity match to start, already parsed.
#[derive(Clone)]
pub struct StartIdentity {
    pub phone: Phone,
    pub birth_date: BirthDate,
    pub provider: Option<ProviderName>,
    pub verification_id: Option<Uuid>,
    pub callback_url: Option<String>,
    pub metadata: Value,
}

crate::debug_only!(StartIdentity { phone, provider, verification_id });

/// Shape of a one-time code handset accepts before counting an attempt.
fn code_is_well_formed(code: &str) -> bool {
    (4..=10).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_digit())
}

pub struct Gateway {
    store: Arc<dyn Store>,
    providers: HashMap<ProviderName, Arc<dyn Provider>>,
    breakers: HashMap<ProviderName, CircuitBreaker>,
    routing: Routing,
    settings: GatewaySettings,
}

impl Gateway {
    pub fn new(
        store: Arc<dyn Store>,
        providers: Vec<Arc<dyn Provider>>,
        routing: Routing,
        settings: GatewaySettings,
    ) -> Self {
        Gateway {
            store,
            breakers: providers.iter().map(|p| (p.name(), CircuitBreaker::new(settings.breaker))).collect(),
            providers: providers.into_iter().map(|p| (p.name(), p)).collect(),
            routing,
            settings,
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn settings(&self) -> &GatewaySettings {
        &self.settings
    }

    /// The partner behind a bearer key: unknown (or refused) -> 401 1100,
    /// inactive -> 401 1200.
    pub async fn authenticate(&self, api_key: &str) -> Result<Partner, ApiError> {
        let partner = self
            .store
            .partner_by_key_hash(&api_key_hash(api_key))
            .await
            .map_err(internal)?
            .filter(|partner| Some(partner.id) != self.settings.refused_partner)
            .ok_or_else(|| ApiError::new(ErrorCode::CredentialsUnknown))?;
        if !partner.active {
            return Err(ApiError::new(ErrorCode::AccountInactive));
        }
        self.limit(Scope::Partner(partner.id)).await?;
        Ok(partner)
    }

    pub async fn start_possession(&self, partner: &Partner, input: StartPossession) -> Result<Transaction, ApiError> {
        let product = input.channel;
        ensure_enabled(partner, product)?;
        self.limit(Scope::Product(partner.id, product)).await?;
        let joined = self.verification_for(partner, input.verification_id).await?;
        let chain = self.chain(product, &input.phone, input.provider, input.name.is_some())?;
        // Only a send that is about to be attempted counts against the
        // number: requests refused above cost the phone nothing.
        if product == Product::PossessionSms {
            self.limit(Scope::Phone(&input.phone)).await?;
        }
        let mut draft = self.draft(partner, product, joined.id, &input.phone);
        draft.callback_url = input.callback_url;
        draft.redirect_uri = input.redirect_uri;
        draft.name = input.name;
        draft.metadata = input.metadata;
        let started = self.first_available(&chain, &mut draft, &input.phone, None, &joined).await;
        self.record_start(draft, joined.new, started).await
    }

    pub async fn start_identity(&self, partner: &Partner, input: StartIdentity) -> Result<Transaction, ApiError> {
        let product = Product::Identity;
        ensure_enabled(partner, product)?;
        self.limit(Scope::Product(partner.id, product)).await?;
        let joined = self.verification_for(partner, input.verification_id).await?;
        let chain = self.chain(product, &input.phone, input.provider, false)?;
        let mut draft = self.draft(partner, product, joined.id, &input.phone);
        draft.birth_date = Some(input.birth_date.to_string());
        draft.callback_url = input.callback_url;
        draft.metadata = input.metadata;
        let started = self.first_available(&chain, &mut draft, &input.phone, Some(&input.birth_date), &joined).await;
        self.record_start(draft, joined.new, started).await
    }

    /// Checks a code (sms) or refreshes the operator result (network), with
    /// the precedence of DESIGN §9.
    ///
    /// `loaded` is the transaction as `possession_transaction` just read it.
    pub async fn confirm_possession(
        &self,
        partner: &Partner,
        loaded: Transaction,
        code: Option<&str>,
    ) -> Result<Transaction, ApiError> {
        let transaction_id = loaded.id;
        self.limit(Scope::Product(partner.id, loaded.product)).await?;
        let mut fresh = Some(loaded);
        // A concurrent request can change the transaction between our read and
        // our conditional write; re-reading and deciding again settles it.
        for _ in 0..3 {
            let tx = match fresh.take() {
                Some(tx) => tx,
                None => self.possession_transaction(partner, transaction_id).await?,
            };
            let now = Utc::now();
            match tx.status {
                Status::Succeeded => return Ok(tx),
                Status::Failed => return Err(failure_error(&tx)),
                Status::Pending => {}
            }
            if tx.expires_at.is_some_and(|at| at <= now) {
                self.expire(tx).await?;
                return Err(ApiError::new(ErrorCode::CodeExpired).recorded());
            }
            if tx.product == Product::PossessionNetwork {
                return self.refresh_network(tx, None).await;
            }
            if tx.attempts_used >= tx.max_attempts {
                return Err(ApiError::new(ErrorCode::RetryLimitExceeded));
            }
            let code = code.filter(|c| code_is_well_formed(c)).ok_or_else(|| ApiError::new(ErrorCode::InvalidCode))?;
            let Some(used) = self.store.use_attempt(tx.id, now).await.map_err(internal)? else {
                continue;
            };
            let check = match &tx.code_hash {
                Some(hash) => {
                    if constant_time_eq(hash, &self.code_hash(tx.id, code)) {
                        CodeCheck::Matched(TransactionResult::Phone { phone: tx.phone.clone().unwrap_or_default() })
                    } else {
                        CodeCheck::Mismatched
                    }
                }
                None => self.provider(tx.provider)?.check_code(&tx, code).await.map_err(provider_failure)?,
            };
            let mut tx = Transaction { attempts_used: used, ..tx };
            match check {
                CodeCheck::Matched(result) => {
                    let result = possession_result(&tx, result);
                    if self.finish(&mut tx, Status::Succeeded, result).await? {
                        return Ok(tx);
                    }
                }
                CodeCheck::Mismatched if used < tx.max_attempts => {
                    return Err(ApiError::new(ErrorCode::InvalidCode).recorded());
                }
                CodeCheck::Mismatched => {
                    let error = ResultError::new(ErrorCode::RetryLimitExceeded);
                    self.finish(&mut tx, Status::Failed, TransactionResult::failure(error)).await?;
                    return Err(ApiError::new(ErrorCode::RetryLimitExceeded).recorded());
                }
                CodeCheck::Failed(error) => {
                    self.finish(&mut tx, Status::Failed, TransactionResult::failure(error)).await?;
                    return Err(failure_error(&tx).recorded());
                }
            }
        }
        Err(internal("confirm did not settle after 3 reads"))
    }

    fn code_hash(&self, transaction_id: Uuid, code: &str) -> String {
        code_hash(self.settings.code_pepper.expose().as_bytes(), transaction_id, code)
    }

    async fn limit(&self, scope: Scope<'_>) -> Result<(), ApiError> {
        self.settings.rate_limits.hit(self.store.as_ref(), scope, Utc::now()).await
    }

    /// A possession transaction of this partner: 404 4100, 403 3200, 422 3105 otherwise.
    pub async fn possession_transaction(&self, partner: &Partner, id: Uuid) -> Result<Transaction, ApiError> {
        let tx = self.owned_transaction(partner, id).await?;
        if !tx.product.is_possession() {
            return Err(ApiError::new(ErrorCode::NotPossessionCheck));
        }
        Ok(tx)
    }

    pub async fn transaction(&self, partner: &Partner, id: Uuid) -> Result<Transaction, ApiError> {
        self.owned_transaction(partner, id).await
    }

    pub async fn verification(&self, partner: &Partner, id: Uuid) -> Result<VerificationOut, ApiError> {
        let verification = self.store.verification(id).await.map_err(internal)?.ok_or_else(not_found)?;
        if verification.partner_id != partner.id {
            return Err(ApiError::new(ErrorCode::VerificationNotOwned));
        }
        let transactions = self.store.transactions_of_verification(id).await.map_err(internal)?;
        Ok(VerificationOut::new(&verification, &transactions))
    }

    /// The sandbox operator page: completes a pending sandbox network check.
    /// Anything else is 404, so the page cannot touch real providers' checks.
    pub async fn complete_sandbox_operator(&self, id: Uuid) -> Result<Transaction, ApiError> {
        let tx = self.store.transaction(id).await.map_err(internal)?.ok_or_else(not_found)?;
        if tx.provider != ProviderName::Sandbox || tx.product != Product::PossessionNetwork {
            return Err(not_found());
        }
        // Past its deadline, `apply_outcome` expires it instead.
        let proven = Outcome::Succeeded(TransactionResult::Phone { phone: String::new() });
        self.apply_outcome(tx, proven).await?.ok_or_else(not_found)
    }

    /// The callbacks of a transaction with their delivery attempts.
    pub async fn callbacks(&self, partner: &Partner, transaction_id: Uuid) -> Result<Vec<CallbackOut>, ApiError> {
        let tx = self.owned_transaction(partner, transaction_id).await?;
        let records = self.store.callbacks_of_transaction(tx.id).await.map_err(internal)?;
        Ok(records.iter().map(CallbackRecord::to_resource).collect())
    }

    /// Queues a new delivery of the transaction's current state (a new `webhook-id`).
    pub async fn retry_callback(&self, partner: &Partner, transaction_id: Uuid) -> Result<CallbackOut, ApiError> {
        let tx = self.owned_transaction(partner, transaction_id).await?;
        let callback_url = tx.callback_url.clone().ok_or_else(|| {
            ApiError::with_message(ErrorCode::InvalidCallbackUrl, "Transaction has no callback_url to deliver to")
        })?;
        let now = Utc::now();
        let message = OutboxMessage::of(&tx, callback_url, now);
        let max_pending = self.settings.max_pending_callbacks;
        if !self.store.insert_outbox_capped(&message, max_pending).await.map_err(internal)? {
            // A slot frees when a pending delivery is delivered or given up;
            // the soonest next attempt is the earliest that can happen.
            let records = self.store.callbacks_of_transaction(tx.id).await.map_err(internal)?;
            let soonest = records.iter().filter(|r| r.state == CallbackState::Pending).map(|r| r.next_attempt_at).min();
            let wait = soonest.and_then(|at| (at - now).to_std().ok()).unwrap_or(std::time::Duration::from_secs(1));
            let message = format!(
                "This transaction already has {max_pending} callback deliveries pending; \
                 retry once one of them is delivered or given up (see GET .../callbacks)"
            );
            return Err(ApiError::with_message(ErrorCode::AccountRateLimited, message).retry_after(wait));
        }
        let record = CallbackRecord {
            next_attempt_at: message.created_at,
            message,
            state: CallbackState::Pending,
            attempts: Vec::new(),
        };
        Ok(record.to_resource())
    }

    /// Ends up to `limit` pending transactions past their deadline (final 300,
    /// 3103, with their callbacks). Returns how many this call ended.
    pub async fn expire_due(&self, now: DateTime<Utc>, limit: i64) -> Result<usize, ApiError> {
        let due = self.store.expired_pending(now, limit).await.map_err(internal)?;
        let mut expired = 0;
        for mut tx in due {
            let result = TransactionResult::failure(deadline_error(&tx));
            if self.finish(&mut tx, Status::Failed, result).await? {
                expired += 1;
            }
        }
        Ok(expired)
    }

    /// Asks providers for up to `limit` pending results that are due, all at
    /// once, with backoff between polls of one transaction. Returns how many
    /// became final.
    pub async fn poll_due(self: &Arc<Self>, now: DateTime<Utc>, limit: i64) -> Result<usize, ApiError> {
        let lease_until = now + chrono_delay(self.settings.poll_max);
        let due = self.store.claim_due_polls(now, lease_until, limit).await.map_err(internal)?;
        let mut polls = tokio::task::JoinSet::new();
        for tx in due {
            let gateway = self.clone();
            polls.spawn(async move { gateway.poll_one(tx).await });
        }
        let mut settled = 0;
        while let Some(joined) = polls.join_next().await {
            match joined {
                Ok(Ok(true)) => settled += 1,
                Ok(Ok(false)) => {}
                Ok(Err(error)) => tracing::warn!(%error, "recording a polled result failed"),
                Err(error) => tracing::error!(%error, "a provider poll task failed"),
            }
        }
        Ok(settled)
    }

    /// Polls one claimed transaction; true when it became final.
    async fn poll_one(&self, tx: Transaction) -> Result<bool, ApiError> {
        let Some(provider) = self.providers.get(&tx.provider) else { return Ok(false) };
        match provider.fetch_result(&tx, None).await {
            Ok(Outcome::Pending) => {}
            Ok(outcome) => {
                if self.apply_outcome(tx.clone(), outcome).await?.is_some_and(|t| t.is_final()) {
                    return Ok(true);
                }
            }
            Err(error) => {
                tracing::warn!(provider = %tx.provider, transaction_id = %tx.id, %error, "polling a provider failed")
            }
        }
        // The claim counted this poll already: the first wait after it is `poll_min`.
        let delay = backoff(self.settings.poll_min, self.settings.poll_max, tx.poll_attempts - 1);
        self.store.schedule_poll(tx.id, Utc::now() + chrono_delay(delay)).await.map_err(internal)?;
        Ok(false)
    }

    /// A result a provider pushed (e.g. ID.me's webhook) for its transaction
    /// `provider_ref`. Final outcomes end a pending transaction (once; repeats
    /// and late arrivals change nothing). `None`: no such transaction.
    pub async fn provider_result(
        &self,
        provider: ProviderName,
        provider_ref: &str,
        outcome: Outcome,
    ) -> Result<Option<Transaction>, ApiError> {
        let tx = self.store.transaction_by_provider_ref(provider, provider_ref).await.map_err(internal)?;
        match tx {
            None => Ok(None),
            Some(tx) => self.apply_outcome(tx, outcome).await,
        }
    }

    /// Ends a pending transaction with a provider's final answer (once). An
    /// answer that arrives after the transaction's deadline cannot succeed
    /// it: the transaction ends as expired instead.
    async fn apply_outcome(&self, mut tx: Transaction, outcome: Outcome) -> Result<Option<Transaction>, ApiError> {
        // Repeats and late arrivals for a final transaction change (and log) nothing.
        if tx.is_final() {
            return Ok(Some(tx));
        }
        let outcome = match checked(&tx, outcome) {
            Outcome::Succeeded(_) if tx.expires_at.is_some_and(|at| at <= Utc::now()) => {
                tracing::info!(transaction_id = %tx.id, "a success arrived after the deadline; the transaction expires");
                Outcome::Failed(deadline_error(&tx))
            }
            outcome => outcome,
        };
        let (status, result) = match outcome {
            Outcome::Pending => return Ok(Some(tx)),
            Outcome::Succeeded(result) => (Status::Succeeded, possession_result(&tx, result)),
            Outcome::Failed(error) => (Status::Failed, TransactionResult::failure(error)),
        };
        if self.finish(&mut tx, status, result).await? {
            Ok(Some(tx))
        } else {
            self.store.transaction(tx.id).await.map_err(internal)
        }
    }

    async fn refresh_network(&self, tx: Transaction, token: Option<&str>) -> Result<Transaction, ApiError> {
        let outcome = self.provider(tx.provider)?.fetch_result(&tx, token).await.map_err(provider_failure)?;
        self.apply_outcome(tx, outcome).await?.ok_or_else(not_found)
    }

    /// Ends a pending transaction past its deadline: final 300 with 3103.
    async fn expire(&self, tx: Transaction) -> Result<Transaction, ApiError> {
        let error = deadline_error(&tx);
        self.apply_outcome(tx, Outcome::Failed(error)).await?.ok_or_else(not_found)
    }

    /// Moves `tx` to a final state with its callback; false when another
    /// request finalized it first.
    async fn finish(&self, tx: &mut Transaction, status: Status, result: TransactionResult) -> Result<bool, ApiError> {
        tx.status = status;
        tx.result = Some(result);
        tx.updated_at = Utc::now();
        let outbox = outbox_for(tx);
        self.store.finalize(Finalization { transaction: tx, outbox: outbox.as_ref() }).await.map_err(internal)
    }

    async fn owned_transaction(&self, partner: &Partner, id: Uuid) -> Result<Transaction, ApiError> {
        let tx = self.store.transaction(id).await.map_err(internal)?.ok_or_else(not_found)?;
        if tx.partner_id != partner.id {
            return Err(ApiError::new(ErrorCode::TransactionNotOwned));
        }
        Ok(tx)
    }

    /// The verification a new transaction joins: the requested one (with the
    /// providers' own verification ids its transactions collected), or a new one.
    async fn verification_for(&self, partner: &Partner, requested: Option<Uuid>) -> Result<Joined, ApiError> {
        match requested {
            Some(id) => {
                let existing = self.store.verification(id).await.map_err(internal)?.ok_or_else(not_found)?;
                if existing.partner_id != partner.id {
                    return Err(ApiError::new(ErrorCode::VerificationNotOwned));
                }
                let earlier = self.store.transactions_of_verification(id).await.map_err(internal)?;
                let provider_verifications =
                    earlier.into_iter().filter_map(|t| Some((t.provider, t.provider_verification?))).collect();
                Ok(Joined { id, new: None, provider_verifications })
            }
            None => {
                let verification = Verification { id: Uuid::new_v4(), partner_id: partner.id, created_at: Utc::now() };
                Ok(Joined { id: verification.id, new: Some(verification), provider_verifications: Vec::new() })
            }
        }
    }

    fn provider(&self, name: ProviderName) -> Result<&Arc<dyn Provider>, ApiError> {
        self.providers
            .get(&name)
            .ok_or_else(|| internal(format!("provider {name} of a stored transaction is not configured")))
    }

    /// The providers to try, in order. A forced provider must be configured
    /// and able to take the number; Veratad-like providers that need a name
    /// are skipped in a chain without one, and refused (3905) when forced or alone.
    fn chain(
        &self,
        product: Product,
        phone: &Phone,
        forced: Option<ProviderName>,
        has_name: bool,
    ) -> Result<Vec<Arc<dyn Provider>>, ApiError> {
        let names: Vec<ProviderName> = match forced {
            Some(name) => vec![name],
            None => self.routing.chain(product, phone).map(<[_]>::to_vec).unwrap_or_default(),
        };
        let eligible: Vec<Arc<dyn Provider>> = names
            .iter()
            .filter_map(|name| self.providers.get(name))
            .filter(|p| p.accepts(product, phone))
            .cloned()
            .collect();
        if eligible.is_empty() {
            return Err(ApiError::new(ErrorCode::NoProvider));
        }
        if has_name {
            return Ok(eligible);
        }
        let named_ok: Vec<_> = eligible.iter().filter(|p| !p.needs_name(product)).cloned().collect();
        if named_ok.is_empty() {
            return Err(ApiError::new(ErrorCode::InvalidName));
        }
        Ok(named_ok)
    }

    fn draft(&self, partner: &Partner, product: Product, verification_id: Uuid, phone: &Phone) -> Transaction {
        let now = Utc::now();
        Transaction {
            expires_at: product.is_possession().then(|| now + self.settings.code_ttl),
            max_attempts: if product == Product::PossessionSms { self.settings.max_attempts } else { 0 },
            ..Transaction::pending(partner.id, verification_id, product, ProviderName::Sandbox, phone.e164(), now)
        }
    }

    /// Tries each provider in turn; one that is unavailable before anything
    /// reached the user is skipped for the next. Records on `draft` which
    /// provider answered (or was tried last).
    async fn first_available(
        &self,
        chain: &[Arc<dyn Provider>],
        draft: &mut Transaction,
        phone: &Phone,
        birth_date: Option<&BirthDate>,
        joined: &Joined,
    ) -> Result<Started, ProviderError> {
        let mut last = ProviderError::Unavailable("no provider tried".into());
        for provider in chain {
            let name = provider.name();
            draft.provider = name;
            let breaker = &self.breakers[&name];
            if !breaker.allows(Instant::now()) {
                tracing::debug!(provider = %name, "circuit open, skipping the provider");
                last = ProviderError::Unavailable(format!("{name} is paused after repeated failures"));
                continue;
            }
            let provider_verification =
                joined.provider_verifications.iter().rev().find(|(p, _)| *p == name).map(|(_, v)| v.as_str());
            let request = StartRequest {
                transaction_id: draft.id,
                phone,
                name: draft.name.as_ref(),
                birth_date,
                provider_verification,
            };
            let answer = match draft.product {
                Product::PossessionSms => provider.send_code(request).await,
                Product::PossessionNetwork => {
                    // Where the operator sends the user back; it names our transaction.
                    let return_url = format!(
                        "{}/providers/{}/return?transaction_id={}",
                        self.settings.public_url,
                        provider.name(),
                        draft.id
                    );
                    provider.start_network(request, &return_url).await
                }
                Product::Identity => provider.start_identity(request).await,
            };
            match answer {
                Err(ProviderError::Unavailable(why)) => {
                    tracing::warn!(provider = %name, transaction_id = %draft.id, %why, "provider unavailable, trying the next");
                    metrics::counter!("provider_unavailable_total", "provider" => name.as_str()).increment(1);
                    if breaker.record_failure(Instant::now()) {
                        tracing::warn!(provider = %name, "circuit opened: the provider is skipped for a while");
                    }
                    last = ProviderError::Unavailable(why);
                }
                Err(ProviderError::Failed(why)) => {
                    // No answer after sending: not failed over, but it counts toward pausing a hanging provider.
                    if breaker.record_failure(Instant::now()) {
                        tracing::warn!(provider = %name, "circuit opened: the provider is skipped for a while");
                    }
                    return Err(ProviderError::Failed(why));
                }
                answer => {
                    breaker.record_success();
                    return answer;
                }
            }
        }
        Err(last)
    }

    /// Stores the started transaction (with its verification and, if already
    /// final, its callback) or turns the provider's refusal into the answer.
    async fn record_start(
        &self,
        mut tx: Transaction,
        new_verification: Option<Verification>,
        started: Result<Started, ProviderError>,
    ) -> Result<Transaction, ApiError> {
        let refusal = match started {
            Ok(started) => {
                tx.provider_ref = started.provider_ref;
                tx.provider_verification = started.provider_verification;
                tx.redirect_url = started.redirect_url;
                tx.code_hash = started.local_code.map(|code| self.code_hash(tx.id, &code));
                match checked(&tx, started.outcome) {
                    Outcome::Pending => {
                        if tx.product == Product::Identity {
                            tx.expires_at = Some(tx.created_at + self.settings.identity_ttl);
                        }
                        if self.providers.get(&tx.provider).is_some_and(|p| p.polls(tx.product)) {
                            tx.next_poll_at = Some(tx.created_at + chrono_delay(self.settings.poll_min));
                        }
                    }
                    Outcome::Succeeded(result) => settle(&mut tx, Status::Succeeded, result),
                    Outcome::Failed(error) => settle(&mut tx, Status::Failed, TransactionResult::failure(error)),
                }
                None
            }
            Err(ProviderError::Unavailable(_)) => {
                let error = ResultError::new(ErrorCode::ProvidersUnavailable);
                settle(&mut tx, Status::Failed, TransactionResult::failure(error));
                Some(ApiError::new(ErrorCode::ProvidersUnavailable))
            }
            // No answer after the request left: it may have reached the user, so
            // no other provider is tried; the transaction ends here.
            Err(ProviderError::Failed(why)) => {
                tracing::warn!(provider = %tx.provider, transaction_id = %tx.id, %why, "provider call failed after sending");
                let error =
                    ResultError { message: AMBIGUOUS_SEND.into(), ..ResultError::new(ErrorCode::ProvidersUnavailable) };
                settle(&mut tx, Status::Failed, TransactionResult::failure(error));
                // Kept for Idempotency-Key replay: a retry must not send a second code.
                Some(ApiError::with_message(ErrorCode::ProvidersUnavailable, AMBIGUOUS_SEND).recorded())
            }
            Err(other) => return Err(provider_failure(other)),
        };
        let outbox = outbox_for(&tx);
        self.store.insert_transaction(&tx, new_verification.as_ref(), outbox.as_ref()).await.map_err(internal)?;
        match refusal {
            Some(error) => Err(error),
            None => Ok(tx),
        }
    }
}

/// A provider's success that does not carry what the product promises (an
/// identity match without an address) is not passed on as a success: it is
/// a 5000 result, logged loudly for the operator.
fn checked(tx: &Transaction, outcome: Outcome) -> Outcome {
    match outcome {
        Outcome::Succeeded(ref result)
            if tx.product == Product::Identity && !matches!(result, TransactionResult::Address { .. }) =>
        {
            tracing::error!(
                provider = %tx.provider, transaction_id = %tx.id,
                "the provider reported an identity match without an address; recorded as failed (5000)"
            );
            Outcome::Failed(ResultError {
                message: "The provider reported a match without an address".into(),
                ..ResultError::new(ErrorCode::Internal)
            })
        }
        outcome => outcome,
    }
}

/// Why a start that may have reached the user was not tried elsewhere.
const AMBIGUOUS_SEND: &str =
    "The provider did not confirm the send; the code may have been sent, so no other provider was tried";

fn settle(tx: &mut Transaction, status: Status, result: TransactionResult) {
    tx.status = status;
    tx.result = Some(result);
    tx.expires_at = None;
}

/// The callback a final transaction owes its partner, if it has a callback URL.
fn outbox_for(tx: &Transaction) -> Option<OutboxMessage> {
    let callback_url = tx.callback_url.clone()?;
    tx.is_final().then(|| OutboxMessage::of(tx, callback_url, tx.updated_at))
}

fn ensure_enabled(partner: &Partner, product: Product) -> Result<(), ApiError> {
    if partner.enabled_for(product) { Ok(()) } else { Err(ApiError::new(ErrorCode::ProductNotEnabled)) }
}

/// A possession result is always the number handset checked, in E.164,
/// whatever form the provider wrote it in.
fn possession_result(tx: &Transaction, result: TransactionResult) -> TransactionResult {
    match result {
        TransactionResult::Phone { .. } => TransactionResult::Phone { phone: tx.phone.clone().unwrap_or_default() },
        other => other,
    }
}

/// Why a pending transaction that reached its deadline failed.
fn deadline_error(tx: &Transaction) -> ResultError {
    match tx.product {
        Product::Identity => ResultError {
            message: "No result from the provider before the deadline".into(),
            ..ResultError::new(ErrorCode::ProvidersUnavailable)
        },
        _ => ResultError::new(ErrorCode::CodeExpired),
    }
}

/// `min * 2^attempts`, at most `max`.
fn backoff(min: std::time::Duration, max: std::time::Duration, attempts: i32) -> std::time::Duration {
    let factor = 2u32.saturating_pow(attempts.clamp(0, 20) as u32);
    min.saturating_mul(factor).min(max)
}

fn chrono_delay(delay: std::time::Duration) -> Duration {
    Duration::from_std(delay).unwrap_or(Duration::MAX)
}

/// The transaction a new one joins, with the providers' verification ids.
struct Joined {
    id: Uuid,
    new: Option<Verification>,
    provider_verifications: Vec<(ProviderName, String)>,
}

/// The answer to a confirm on a transaction that already failed: 3104 after
/// the attempts ran out, 3103 after its deadline, else 3105.
fn failure_error(tx: &Transaction) -> ApiError {
    let code = tx.result.as_ref().and_then(TransactionResult::error_code);
    match code.and_then(ErrorCode::from_code) {
        Some(code @ (ErrorCode::RetryLimitExceeded | ErrorCode::CodeExpired)) => ApiError::new(code),
        _ => ApiError::new(ErrorCode::NotPossessionCheck),
    }
}

fn provider_failure(error: ProviderError) -> ApiError {
    match error {
        ProviderError::Rejected(api_error) => api_error,
        ProviderError::Unavailable(why) => {
            tracing::warn!(%why, "provider unavailable");
            ApiError::new(ErrorCode::ProvidersUnavailable)
        }
        ProviderError::Misconfigured(why) => {
            tracing::error!(%why, "a provider refused handset's credentials: check the provider configuration");
            ApiError::new(ErrorCode::Internal)
        }
        ProviderError::Failed(why) => internal(why),
    }
}

fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound)
}

/// Logs the cause for operators; the partner sees only 500 5000.
fn internal(cause: impl std::fmt::Display) -> ApiError {
    tracing::error!(%cause, "internal error");
    ApiError::new(ErrorCode::Internal)
}
