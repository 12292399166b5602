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

    /// The verification a new transaction joins: the requested one (with the
    /// providers' own verification ids its transactions collected), or a new one.
    pub(super) async fn verification_for(
        &self,
        partner: &Partner,
        requested: Option<Uuid>,
    ) -> Result<Joined, ApiError> {
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
                let verification = Verification { id: Uuid::new_v4(), partner_id: partner.id, created_at: self.now() };
                Ok(Joined { id: verification.id, new: Some(verification), provider_verifications: Vec::new() })
            }
        }
    }

    /// The providers to try, in order. A forced provider must be configured
    /// and able to take the number; Veratad-like providers that need a name
    /// are skipped in a chain without one, and refused (3905) when forced or alone.
    pub(super) fn chain(
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

    pub(super) fn draft(
        &self,
        partner: &Partner,
        product: Product,
        verification_id: Uuid,
        phone: &Phone,
    ) -> Transaction {
        let now = self.now();
        Transaction {
            expires_at: product.is_possession().then(|| now + self.settings.code_ttl),
            max_attempts: if product == Product::PossessionSms { self.settings.max_attempts } else { 0 },
            ..Transaction::pending(partner.id, verification_id, product, ProviderName::Sandbox, phone.e164(), now)
        }
    }

    /// Tries each provider in turn; one that is unavailable before anything
    /// reached the user is skipped for the next. Records on `draft` which
    /// provider answered (or was tried last).
    pub(super) async fn first_available(
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
    pub(super) async fn record_start(
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

/// Why a start that may have reached the user was not tried elsewhere.
pub(super) const AMBIGUOUS_SEND: &str =
    "The provider did not confirm the send; the code may have been sent, so no other provider was tried";

pub(super) fn settle(tx: &mut Transaction, status: Status, result: TransactionResult) {
    tx.status = status;
    tx.result = Some(result);
    tx.expires_at = None;
}

pub(super) fn ensure_enabled(partner: &Partner, product: Product) -> Result<(), ApiError> {
    if partner.enabled_for(product) { Ok(()) } else { Err(ApiError::new(ErrorCode::ProductNotEnabled)) }
}

/// The transaction a new one joins, with the providers' verification ids.
pub(super) struct Joined {
    id: Uuid,
    new: Option<Verification>,
    provider_verifications: Vec<(ProviderName, String)>,
}
