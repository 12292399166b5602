//! Starting a check: the verification it joins, the provider chain (routing,
//! eligibility, names), failover across it, and recording what the provider said.

use super::*;

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

impl Gateway {
    pub async fn start_possession(
        &self,
        partner: &Partner,
        input: StartPossession,
    ) -> Result<Transaction, GatewayError> {
        let product = input.channel;
        ensure_enabled(partner, product)?;
        self.limit(Scope::Product(partner.id, product)).await?;
        let joined = self.verification_for(partner, input.verification_id).await?;
        let chain = self.chain(product, &input.phone, input.provider, input.name.is_some())?;
        // Only a send that is about to be attempted counts against the
        // number: requests refused above, or that no provider can take, cost
        // the phone nothing.
        if product == Product::PossessionSms && !chain.providers.is_empty() {
            self.guard_number_range(&input.phone).await?;
            self.limit(Scope::Phone(&input.phone)).await?;
        }
        let mut draft = self.draft(partner, product, joined.id, &input.phone, chain.first);
        draft.routing = Some(chain.routing);
        draft.callback_url = input.callback_url;
        draft.redirect_uri = input.redirect_uri;
        draft.name = input.name;
        draft.metadata = input.metadata;
        let started = self.first_available(&chain.providers, &mut draft, &input.phone, None, &joined).await;
        self.record_start(draft, joined.new, started).await
    }

    pub async fn start_identity(&self, partner: &Partner, input: StartIdentity) -> Result<Transaction, GatewayError> {
        let product = Product::Identity;
        ensure_enabled(partner, product)?;
        self.limit(Scope::Product(partner.id, product)).await?;
        let joined = self.verification_for(partner, input.verification_id).await?;
        let chain = self.chain(product, &input.phone, input.provider, false)?;
        let mut draft = self.draft(partner, product, joined.id, &input.phone, chain.first);
        draft.routing = Some(chain.routing);
        draft.birth_date = Some(input.birth_date.to_string());
        draft.callback_url = input.callback_url;
        draft.metadata = input.metadata;
        let started =
            self.first_available(&chain.providers, &mut draft, &input.phone, Some(&input.birth_date), &joined).await;
        self.record_start(draft, joined.new, started).await
    }

    /// The pumping guard (`crate::pumping`): 429 5301 while the number's
    /// range is paused; otherwise the send is counted, and the one that
    /// tips a range over pauses it.
    async fn guard_number_range(&self, phone: &Phone) -> Result<(), GatewayError> {
        if !self.settings.pumping_guard_enabled {
            return Ok(());
        }
        let guard = &self.settings.pumping_guard;
        let range = PumpingGuard::range_of(phone, guard.prefix_digits);
        let now = self.now();
        let window_start = guard.window_start(now);
        let traffic = self.store.range_traffic(&range, window_start, now).await?;
        let paused_until = match traffic.paused_until.filter(|until| *until > now) {
            Some(until) => until,
            None => {
                let since = RangeTraffic::counting_since(traffic.paused_until, traffic.released_at, now);
                let scope = PumpingGuard::counter_scope(&range, since);
                let sends = self.store.add_rate_hits(&scope, window_start, 1).await?;
                if !guard.pauses(sends, traffic.succeeded) {
                    return Ok(());
                }
                let until = now.checked_add_signed(guard.cooldown).unwrap_or(DateTime::<Utc>::MAX_UTC);
                let pause = NewPause {
                    range: &range,
                    paused_at: now,
                    paused_until: until,
                    sends,
                    succeeded: traffic.succeeded,
                    released_at_seen: traffic.released_at,
                };
                if !self.store.pause_range(&pause).await? {
                    // An operator released the range meanwhile: let this one through.
                    return Ok(());
                }
                tracing::warn!(
                    range = %range, sends, succeeded = traffic.succeeded,
                    "pausing SMS sends to a number range: many sends, few confirmed (SMS pumping?)"
                );
                metrics::counter!("handset_number_range_pauses_total").increment(1);
                until
            }
        };
        metrics::counter!("handset_number_range_refusals_total").increment(1);
        let wait = (paused_until - now).to_std().unwrap_or_default();
        Err(ApiError::new(ErrorCode::NumberRangePaused).retry_after(wait).into())
    }

    /// The verification a new transaction joins: the requested one (with the
    /// providers' own verification ids its transactions collected), or a new one.
    pub(super) async fn verification_for(
        &self,
        partner: &Partner,
        requested: Option<Uuid>,
    ) -> Result<Joined, GatewayError> {
        match requested {
            Some(id) => {
                let existing = self.store.verification(id).await?.ok_or_else(not_found)?;
                if existing.partner_id != partner.id {
                    return Err(ApiError::new(ErrorCode::VerificationNotOwned).into());
                }
                let earlier = self.store.transactions_of_verification(id).await?;
                let provider_verifications =
                    earlier.into_iter().filter_map(|t| Some((t.provider, t.provider_verification?))).collect();
                Ok(Joined { id, new: None, provider_verifications })
            }
            None => {
                let verification =
                    Verification { id: crate::model::new_record_id(), partner_id: partner.id, created_at: self.now() };
                Ok(Joined { id: verification.id, new: Some(verification), provider_verifications: Vec::new() })
            }
        }
    }

    /// The providers to try, in order, and why in that order. None
    /// configured for the product (or the forced one unknown): 422 3908.
    /// Configured but none can take this number (ID.me and a non-NANP
    /// number, Veratad's country lists): an empty chain, which the start
    /// records as a final 300 with 3908. Providers that need a name are
    /// skipped in a chain without one, and refused (3905) when forced or alone.
    pub(super) fn chain(
        &self,
        product: Product,
        phone: &Phone,
        forced: Option<ProviderName>,
        has_name: bool,
    ) -> Result<Chain, GatewayError> {
        let rule = self.routing.rule(product, phone);
        let names: Vec<ProviderName> = match forced {
            Some(name) => vec![name],
            None => rule.map(|r| r.providers.clone()).unwrap_or_default(),
        };
        let candidates: Vec<Arc<dyn Provider>> =
            names.iter().filter_map(|name| self.providers.get(name)).filter(|p| p.offers(product)).cloned().collect();
        if candidates.is_empty() {
            return Err(ApiError::new(ErrorCode::NoProvider).into());
        }
        let listed: Vec<ProviderName> = candidates.iter().map(|p| p.name()).collect();
        let strategy = rule.map(|r| r.strategy).unwrap_or_default();
        let routing = match (&self.scoreboard, forced, strategy) {
            (_, Some(_), _) => {
                RoutingDecision { strategy, order: listed, reason: RoutingReason::Requested, scores: vec![] }
            }
            (Some(scoreboard), None, Strategy::Adaptive) => {
                scoreboard.refresh_soon(&self.store, self.now());
                scoreboard.order(&listed, phone.region(), product)
            }
            _ => RoutingDecision { strategy, order: listed, reason: RoutingReason::Configured, scores: vec![] },
        };
        metrics::counter!(
            "handset_routing_decisions_total",
            "product" => product.as_str(),
            "strategy" => routing.strategy.as_str(),
            "reason" => routing.reason.as_str(),
            "first" => routing.order[0].as_str(),
        )
        .increment(1);
        let candidates: Vec<Arc<dyn Provider>> =
            routing.order.iter().filter_map(|name| candidates.iter().find(|p| p.name() == *name).cloned()).collect();
        let first = candidates[0].name();
        let eligible: Vec<Arc<dyn Provider>> = candidates.into_iter().filter(|p| p.serves(product, phone)).collect();
        if has_name || eligible.is_empty() {
            return Ok(Chain { providers: eligible, first, routing });
        }
        let needs_name =
            |p: &Arc<dyn Provider>| product == Product::PossessionSms && p.sms().is_some_and(|c| c.needs_name());
        let named_ok: Vec<_> = eligible.iter().filter(|p| !needs_name(p)).cloned().collect();
        if named_ok.is_empty() {
            return Err(ApiError::new(ErrorCode::InvalidName).into());
        }
        Ok(Chain { providers: named_ok, first, routing })
    }

    pub(super) fn draft(
        &self,
        partner: &Partner,
        product: Product,
        verification_id: Uuid,
        phone: &Phone,
        provider: ProviderName,
    ) -> Transaction {
        let now = self.now();
        Transaction {
            expires_at: product.is_possession().then(|| now + self.settings.code_ttl),
            max_attempts: if product == Product::PossessionSms { self.settings.max_attempts } else { 0 },
            country: phone.region().map(str::to_owned),
            number_range: (product == Product::PossessionSms)
                .then(|| PumpingGuard::range_of(phone, self.settings.pumping_guard.prefix_digits)),
            ..Transaction::pending(partner.id, verification_id, product, provider, phone.e164(), now)
        }
    }

    /// Tries each provider in turn (the "four kinds" of answer in the README): one that cannot
    /// serve the number, or is unavailable before anything reached the user,
    /// is skipped for the next (only unavailability counts for its breaker);
    /// a decision or an ambiguous send ends the chain. Records on `draft`
    /// which provider answered (or was tried last). When the chain runs out:
    /// unavailable if any provider was, else ineligible.
    pub(super) async fn first_available(
        &self,
        chain: &[Arc<dyn Provider>],
        draft: &mut Transaction,
        phone: &Phone,
        birth_date: Option<&BirthDate>,
        joined: &Joined,
    ) -> Result<Started, ProviderError> {
        let mut last = None;
        let mut any_unavailable = false;
        for (index, provider) in chain.iter().enumerate() {
            let name = provider.name();
            // An unavailable answer that passes the start on is a sample
            // against the provider; the last one is, as the transaction's end.
            let passed_on = || {
                if index + 1 < chain.len()
                    && let Some(scoreboard) = &self.scoreboard
                {
                    scoreboard.record_unavailable(name, draft.country.as_deref(), draft.product);
                }
            };
            draft.provider = name;
            let breaker = &self.breakers[&name];
            if !breaker.allows(Instant::now()) {
                tracing::debug!(provider = %name, "circuit open, skipping the provider");
                any_unavailable = true;
                last = Some(ProviderError::unavailable(format!("{name} is paused after repeated failures")));
                continue;
            }
            let provider_verification =
                joined.provider_verifications.iter().rev().find(|(p, _)| *p == name).map(|(_, v)| v.as_str());
            let request =
                StartRequest { transaction_id: draft.id, phone, name: draft.name.as_ref(), provider_verification };
            let lacks = || ProviderError::ineligible(format!("{name} does not offer {}", draft.product));
            let call = async {
                match draft.product {
                    Product::PossessionSms => match provider.sms() {
                        Some(sms) => sms.send_code(request).await,
                        None => Err(lacks()),
                    },
                    Product::PossessionNetwork => match provider.operator() {
                        Some(operator) => {
                            // Where the operator sends the user back; it names our transaction.
                            let return_url = format!(
                                "{}/providers/{name}/return?transaction_id={}",
                                self.settings.public_url, draft.id
                            );
                            operator.start(request, &return_url).await
                        }
                        None => Err(lacks()),
                    },
                    Product::Identity => match (provider.identity(), birth_date) {
                        (Some(identity), Some(birth_date)) => identity.start_identity(request, birth_date).await,
                        _ => Err(lacks()),
                    },
                }
            };
            let answer = crate::observe::provider_call(name, draft.product, "start", call).await;
            match answer {
                Err(error @ ProviderError::Ineligible { temporary, .. }) => {
                    any_unavailable |= temporary;
                    if temporary {
                        passed_on();
                    }
                    tracing::info!(provider = %name, transaction_id = %draft.id, %error, "provider cannot serve the number, trying the next");
                    last = Some(error);
                }
                Err(error @ (ProviderError::Unavailable { .. } | ProviderError::Misconfigured { .. })) => {
                    if matches!(error, ProviderError::Misconfigured { .. }) {
                        tracing::error!(provider = %name, error = %error.with_causes(), "a provider refused handset's credentials or configuration: check its settings");
                    } else {
                        tracing::warn!(provider = %name, transaction_id = %draft.id, error = %error.with_causes(), "provider unavailable, trying the next");
                    }
                    if breaker.record_failure(Instant::now()) {
                        tracing::warn!(provider = %name, "circuit opened: the provider is skipped for a while");
                    }
                    passed_on();
                    any_unavailable = true;
                    last = Some(error);
                }
                Err(error @ ProviderError::Failed { .. }) => {
                    // No answer after sending: not failed over, but it counts toward pausing a hanging provider.
                    if breaker.record_failure(Instant::now()) {
                        tracing::warn!(provider = %name, "circuit opened: the provider is skipped for a while");
                    }
                    return Err(error);
                }
                answer => {
                    breaker.record_success();
                    return answer;
                }
            }
        }
        Err(match last {
            Some(error @ ProviderError::Ineligible { .. }) if !any_unavailable => error,
            // A temporary refusal last: 503, with its code kept (record_start).
            Some(error @ ProviderError::Ineligible { temporary: true, .. }) => error,
            Some(error @ (ProviderError::Unavailable { .. } | ProviderError::Misconfigured { .. })) => error,
            None => ProviderError::ineligible("no provider in the chain can serve this number"),
            _ => ProviderError::unavailable("no provider in the chain could take the request"),
        })
    }

    /// Stores the started transaction (with its verification and, if already
    /// final, its callback) or turns the provider's refusal into the answer.
    pub(super) async fn record_start(
        &self,
        mut tx: Transaction,
        new_verification: Option<Verification>,
        started: Result<Started, ProviderError>,
    ) -> Result<Transaction, GatewayError> {
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
            Err(ProviderError::Unavailable { .. } | ProviderError::Misconfigured { .. }) => {
                let error = ResultError::new(ErrorCode::ProvidersUnavailable);
                settle(&mut tx, Status::Failed, TransactionResult::failure(error));
                Some(ApiError::new(ErrorCode::ProvidersUnavailable))
            }
            // The last provider refused for now (DQE 16): 503 5001, with its code.
            Err(ProviderError::Ineligible { provider_code, temporary: true, .. }) => {
                let error = ResultError { provider_code, ..ResultError::new(ErrorCode::ProvidersUnavailable) };
                settle(&mut tx, Status::Failed, TransactionResult::failure(error));
                Some(ApiError::new(ErrorCode::ProvidersUnavailable))
            }
            // Every provider said it cannot serve this number: 422 3908,
            // recorded with the last one's own code.
            Err(ProviderError::Ineligible { provider_code, .. }) => {
                let error = ResultError { provider_code, ..ResultError::new(ErrorCode::NoProvider) };
                settle(&mut tx, Status::Failed, TransactionResult::failure(error));
                Some(ApiError::new(ErrorCode::NoProvider))
            }
            // No answer after the request left: it may have reached the user, so
            // no other provider is tried; the transaction ends here.
            Err(error @ ProviderError::Failed { .. }) => {
                tracing::warn!(provider = %tx.provider, transaction_id = %tx.id, error = %error.with_causes(), "provider call failed after sending");
                let error =
                    ResultError { message: AMBIGUOUS_SEND.into(), ..ResultError::new(ErrorCode::ProvidersUnavailable) };
                settle(&mut tx, Status::Failed, TransactionResult::failure(error));
                // Kept for Idempotency-Key replay: a retry must not send a second code.
                Some(ApiError::with_message(ErrorCode::ProvidersUnavailable, AMBIGUOUS_SEND).recorded())
            }
            Err(ProviderError::Rejected(refusal)) => return Err(refusal.into()),
        };
        let outbox = outbox_for(&tx);
        self.store.insert_transaction(&tx, new_verification.as_ref(), outbox.as_ref()).await?;
        self.recent.remember(&tx);
        crate::observe::started(&tx);
        match refusal {
            Some(error) => Err(error.into()),
            None => Ok(tx),
        }
    }
}

/// The providers a start tries, in order, and the one its record names when
/// none of them can take the number.
pub(super) struct Chain {
    pub(super) providers: Vec<Arc<dyn Provider>>,
    pub(super) first: ProviderName,
    pub(super) routing: RoutingDecision,
}

/// Why a start that may have reached the user was not tried elsewhere.
pub(super) const AMBIGUOUS_SEND: &str =
    "The provider did not confirm the send; the code may have been sent, so no other provider was tried";

pub(super) fn settle(tx: &mut Transaction, status: Status, result: TransactionResult) {
    tx.status = status;
    tx.result = Some(result);
    tx.expires_at = None;
}

pub(super) fn ensure_enabled(partner: &Partner, product: Product) -> Result<(), GatewayError> {
    if partner.enabled_for(product) { Ok(()) } else { Err(ErrorCode::ProductNotEnabled.into()) }
}

/// The transaction a new one joins, with the providers' verification ids.
pub(super) struct Joined {
    id: Uuid,
    new: Option<Verification>,
    provider_verifications: Vec<(ProviderName, String)>,
}
