//! Results that arrive after a start (a provider's webhook, a poll, the
//! sandbox operator page, a deadline): each ends a pending transaction once.

use super::*;

impl Gateway {
    /// The sandbox operator page: completes a pending sandbox network check.
    /// Anything else is 404, so the page cannot touch real providers' checks.
    pub async fn complete_sandbox_operator(&self, id: Uuid) -> Result<Transaction, GatewayError> {
        let tx = self.store.transaction(id).await?.ok_or_else(not_found)?;
        if tx.provider != ProviderName::Sandbox || tx.product != Product::PossessionNetwork {
            return Err(not_found().into());
        }
        // Past its deadline, `apply_outcome` expires it instead.
        let proven = Outcome::Succeeded(TransactionResult::Phone { phone: String::new() });
        Ok(self.apply_outcome(tx, proven).await?.ok_or_else(not_found)?)
    }

    /// A result a provider pushed (e.g. ID.me's webhook) for its transaction
    /// `provider_ref`. Final outcomes end a pending transaction (once; repeats
    /// and late arrivals change nothing). `None`: no such transaction.
    pub async fn provider_result(
        &self,
        provider: ProviderName,
        provider_ref: &str,
        outcome: Outcome,
    ) -> Result<Option<Transaction>, GatewayError> {
        let tx = self.store.transaction_by_provider_ref(provider, provider_ref).await?;
        match tx {
            None => Ok(None),
            Some(tx) => self.apply_outcome(tx, outcome).await,
        }
    }

    /// The user came back from `provider`'s operator step of transaction
    /// `id` (with the provider's session `token`, if any): the result is
    /// fetched and applied once; a final transaction is answered as it is.
    /// Anything that is not this provider's network check is 404.
    pub async fn operator_return(
        &self,
        provider: ProviderName,
        id: Uuid,
        token: Option<&str>,
    ) -> Result<Transaction, GatewayError> {
        let tx = self.network_transaction(provider, id).await?;
        if tx.is_final() {
            return Ok(tx);
        }
        // A token another transaction already holds is not this check's.
        let token = match token {
            Some(t) => match self.store.transaction_by_provider_ref(provider, t).await? {
                Some(holder) if holder.id != tx.id => {
                    tracing::warn!(transaction_id = %tx.id, "a return brought another check's session token; ignored");
                    None
                }
                _ => Some(t),
            },
            None => None,
        };
        let kept = tx.provider_ref.is_some();
        let result = self.refresh_network(tx, token).await;
        // DQE could not be asked now: keep the token, so the job runner can ask later.
        if let (Err(GatewayError::Provider(_)), Some(token), false) = (&result, token, kept) {
            self.store.renew_provider_ref(id, None, token).await?;
        }
        result
    }

    /// `provider`'s network check `id`, as stored; anything else is 404.
    pub async fn network_transaction(&self, provider: ProviderName, id: Uuid) -> Result<Transaction, GatewayError> {
        let tx = self.store.transaction(id).await?.ok_or_else(not_found)?;
        if tx.provider != provider || tx.product != Product::PossessionNetwork {
            return Err(not_found().into());
        }
        Ok(tx)
    }

    /// Ends a pending transaction with a provider's final answer (once). An
    /// answer that arrives after the transaction's deadline cannot succeed
    /// it: the transaction ends as expired instead.
    pub(super) async fn apply_outcome(
        &self,
        mut tx: Transaction,
        outcome: Outcome,
    ) -> Result<Option<Transaction>, GatewayError> {
        // Repeats and late arrivals for a final transaction change (and log) nothing.
        if tx.is_final() {
            return Ok(Some(tx));
        }
        let outcome = match checked(&tx, outcome) {
            Outcome::Succeeded(_) if tx.expires_at.is_some_and(|at| at <= self.now()) => {
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
            Ok(self.store.transaction(tx.id).await?)
        }
    }

    /// `apply_outcome` for an answer that may renew the provider's reference:
    /// a final state is written with it, a pending one keeps it on its own.
    pub(super) async fn apply_renewed(
        &self,
        mut tx: Transaction,
        renewed: Renewed<Outcome>,
    ) -> Result<Option<Transaction>, GatewayError> {
        if let Some(reference) = renewed.provider_ref
            && !tx.is_final()
        {
            if renewed.answer == Outcome::Pending {
                self.store.renew_provider_ref(tx.id, tx.provider_ref.as_deref(), &reference).await?;
            }
            tx.provider_ref = Some(reference);
        }
        self.apply_outcome(tx, renewed.answer).await
    }

    /// Ends a pending transaction past its deadline: final 300 with 3103.
    pub(super) async fn expire(&self, tx: Transaction) -> Result<Transaction, GatewayError> {
        let error = deadline_error(&tx);
        Ok(self.apply_outcome(tx, Outcome::Failed(error)).await?.ok_or_else(not_found)?)
    }
}

/// A provider's success that does not carry what the product promises (an
/// identity match without an address) is not passed on as a success: it is
/// a 5000 result, logged loudly for the operator.
pub(super) fn checked(tx: &Transaction, outcome: Outcome) -> Outcome {
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

/// A possession result is always the number handset checked, in E.164,
/// whatever form the provider wrote it in.
pub(super) fn possession_result(tx: &Transaction, result: TransactionResult) -> TransactionResult {
    match result {
        TransactionResult::Phone { .. } => TransactionResult::Phone { phone: tx.phone.clone().unwrap_or_default() },
        other => other,
    }
}

/// Why a pending transaction that reached its deadline failed.
pub(super) fn deadline_error(tx: &Transaction) -> ResultError {
    match tx.product {
        Product::Identity => ResultError {
            message: "No result from the provider before the deadline".into(),
            ..ResultError::new(ErrorCode::ProvidersUnavailable)
        },
        _ => ResultError::new(ErrorCode::CodeExpired),
    }
}
