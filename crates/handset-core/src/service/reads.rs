//! Authentication, reads of a partner's own resources, and callback administration.

use super::*;

impl Gateway {
    /// The partner behind a bearer key: unknown (or refused) -> 401 1100,
    /// inactive -> 401 1200.
    /// The partner may come from the cache (`crate::partner_cache`).
    pub async fn authenticate(&self, api_key: &str) -> Result<Partner, GatewayError> {
        let key_hash = api_key_hash(api_key);
        let found = match self.partners.get(&key_hash) {
            Some(partner) => Some(partner),
            None => {
                let ticket = self.partners.before_read();
                let now = self.now();
                let read = self.store.partner_by_key_hash(&key_hash, now).await?;
                if let Some(found) = &read {
                    let expires_in = found.key_expires_at.map(|at| (at - now).to_std().unwrap_or_default());
                    self.partners.put(&key_hash, &found.partner, expires_in, ticket);
                }
                read.map(|found| found.partner)
            }
        };
        let partner = found
            .filter(|partner| Some(partner.id) != self.settings.refused_partner)
            .ok_or_else(|| ApiError::new(ErrorCode::CredentialsUnknown))?;
        if !partner.active {
            return Err(ApiError::new(ErrorCode::AccountInactive).into());
        }
        self.limit(Scope::Partner(partner.id)).await?;
        Ok(partner)
    }

    /// A possession transaction of this partner: 404 4100, 403 3200, 422 3105 otherwise.
    pub async fn possession_transaction(&self, partner: &Partner, id: Uuid) -> Result<Transaction, GatewayError> {
        let tx = self.owned_transaction(partner, id).await?;
        if !tx.product.is_possession() {
            return Err(ApiError::new(ErrorCode::NotPossessionCheck).into());
        }
        Ok(tx)
    }

    /// The possession transaction a confirm acts on: the copy this process
    /// kept when it started the check, if it has one for this partner
    /// (`crate::recent`), else as `possession_transaction` reads it.
    pub async fn transaction_to_confirm(&self, partner: &Partner, id: Uuid) -> Result<ToConfirm, GatewayError> {
        if let Some(tx) = self.recent.take(id)
            && tx.partner_id == partner.id
        {
            return Ok(ToConfirm { tx, as_started: true });
        }
        Ok(ToConfirm { tx: self.possession_transaction(partner, id).await?, as_started: false })
    }

    pub async fn transaction(&self, partner: &Partner, id: Uuid) -> Result<Transaction, GatewayError> {
        self.owned_transaction(partner, id).await
    }

    pub async fn verification(&self, partner: &Partner, id: Uuid) -> Result<VerificationOut, GatewayError> {
        let verification = self.store.verification(id).await?.ok_or_else(not_found)?;
        if verification.partner_id != partner.id {
            return Err(ApiError::new(ErrorCode::VerificationNotOwned).into());
        }
        let transactions = self.store.transactions_of_verification(id).await?;
        Ok(VerificationOut::new(&verification, &transactions))
    }

    /// The callbacks of a transaction with their delivery attempts.
    pub async fn callbacks(&self, partner: &Partner, transaction_id: Uuid) -> Result<Vec<CallbackOut>, GatewayError> {
        let tx = self.owned_transaction(partner, transaction_id).await?;
        let records = self.store.callbacks_of_transaction(tx.id).await?;
        Ok(records.iter().map(CallbackRecord::to_resource).collect())
    }

    /// Queues a new delivery of the transaction's current state (a new `webhook-id`).
    pub async fn retry_callback(&self, partner: &Partner, transaction_id: Uuid) -> Result<CallbackOut, GatewayError> {
        let tx = self.owned_transaction(partner, transaction_id).await?;
        let callback_url = tx.callback_url.clone().ok_or_else(|| {
            ApiError::with_message(ErrorCode::InvalidCallbackUrl, "Transaction has no callback_url to deliver to")
        })?;
        let now = self.now();
        let message = OutboxMessage::of(&tx, callback_url, now);
        let max_pending = self.settings.max_pending_callbacks;
        if !self.store.insert_outbox_capped(&message, max_pending).await? {
            // A slot frees when a pending delivery is delivered or given up;
            // the soonest next attempt is the earliest that can happen.
            let records = self.store.callbacks_of_transaction(tx.id).await?;
            let soonest = records.iter().filter(|r| r.state == CallbackState::Pending).map(|r| r.next_attempt_at).min();
            let wait = soonest.and_then(|at| (at - now).to_std().ok()).unwrap_or(std::time::Duration::from_secs(1));
            let message = format!(
                "This transaction already has {max_pending} callback deliveries pending; \
                 retry once one of them is delivered or given up (see GET .../callbacks)"
            );
            return Err(ApiError::with_message(ErrorCode::AccountRateLimited, message).retry_after(wait).into());
        }
        let record = CallbackRecord {
            next_attempt_at: message.created_at,
            message,
            state: CallbackState::Pending,
            attempts: Vec::new(),
        };
        Ok(record.to_resource())
    }
}

impl Gateway {
    /// The funnel `query` names (`GET /v1/stats` scopes it to the partner).
    pub async fn funnel(&self, query: &crate::funnel::FunnelQuery) -> Result<crate::funnel::FunnelOut, GatewayError> {
        let counts = self.store.funnel(query).await?;
        Ok(crate::funnel::FunnelOut::of(query, counts))
    }
}
