//! Confirming a possession check: the documented precedence, attempts
//! counted by the database, codes checked locally or by the provider.

use super::*;

/// Shape of a one-time code handset accepts before counting an attempt.
pub(super) fn code_is_well_formed(code: &str) -> bool {
    (4..=10).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_digit())
}

/// The transaction a confirm starts from (`Gateway::transaction_to_confirm`).
pub struct ToConfirm {
    pub tx: Transaction,
    /// `tx` is the copy kept when this process started the check, perhaps
    /// out of date (`crate::recent`), not a read.
    pub as_started: bool,
}

impl Gateway {
    /// Checks a code (sms) or refreshes the operator result (network), with
    /// the documented precedence.
    ///
    /// `loaded` is the transaction as `transaction_to_confirm` found it.
    pub async fn confirm_possession(
        &self,
        partner: &Partner,
        loaded: ToConfirm,
        code: Option<&str>,
    ) -> Result<Transaction, GatewayError> {
        let transaction_id = loaded.tx.id;
        self.limit(Scope::Product(partner.id, loaded.tx.product)).await?;
        // A concurrent request can change the transaction between our read and
        // our conditional write; re-reading and deciding again settles it.
        // (Three reads, after the copy kept at the start if there is one.)
        let tries = 3 + usize::from(loaded.as_started);
        let mut fresh = Some(loaded);
        for _ in 0..tries {
            let ToConfirm { mut tx, as_started } = match fresh.take() {
                Some(loaded) => loaded,
                None => {
                    ToConfirm { tx: self.possession_transaction(partner, transaction_id).await?, as_started: false }
                }
            };
            let now = self.now();
            // A copy kept at the start is only good for a write conditioned on
            // what it shows (pending, these attempts used): whatever else it
            // calls for (an expiry, a refusal) is decided on a read.
            let expected = as_started.then_some(tx.attempts_used);
            if as_started
                && !(tx.status == Status::Pending
                    && tx.expires_at.is_some_and(|at| at > now)
                    && tx.attempts_used < tx.max_attempts
                    && code.is_some_and(code_is_well_formed))
            {
                continue;
            }
            match tx.status {
                Status::Succeeded => return Ok(tx),
                Status::Failed => return Err(failure_error(&tx).into()),
                Status::Pending => {}
            }
            if tx.expires_at.is_some_and(|at| at <= now) {
                self.expire(tx).await?;
                return Err(ApiError::new(ErrorCode::CodeExpired).recorded().into());
            }
            if tx.product == Product::PossessionNetwork {
                return self.refresh_network(tx, None).await;
            }
            if tx.attempts_used >= tx.max_attempts {
                return Err(ApiError::new(ErrorCode::RetryLimitExceeded).into());
            }
            let code = code.filter(|c| code_is_well_formed(c)).ok_or_else(|| ApiError::new(ErrorCode::InvalidCode))?;
            if let Some(hash) = &tx.code_hash {
                let matched = constant_time_eq(hash, &self.code_hash(tx.id, code));
                match self.apply_local_code(tx, matched, now, expected).await? {
                    Some(succeeded) => return Ok(succeeded),
                    None => continue,
                }
            }
            let Some(used) = self.store.use_attempt(tx.id, now, expected).await? else {
                continue;
            };
            let (checked, reference) = match self.provider_check(&tx, code).await {
                Ok(checked) => checked,
                Err(error) => return Err(self.unchecked_code(&mut tx, used, error).await),
            };
            tx.provider_ref = reference;
            let mut tx = Transaction { attempts_used: used, ..tx };
            if let Some(renewed) = checked.provider_ref {
                // Written with the final state below, or on its own while the
                // check goes on (only over the reference this check used).
                if checked.answer == CodeCheck::Mismatched && used < tx.max_attempts {
                    self.store.renew_provider_ref(tx.id, tx.provider_ref.as_deref(), &renewed).await?;
                }
                tx.provider_ref = Some(renewed);
            }
            match checked.answer {
                CodeCheck::Matched(result) => {
                    let result = possession_result(&tx, result);
                    if self.finish(&mut tx, Status::Succeeded, result).await? {
                        return Ok(tx);
                    }
                }
                CodeCheck::Mismatched if used < tx.max_attempts => {
                    return Err(ApiError::new(ErrorCode::InvalidCode).recorded().into());
                }
                CodeCheck::Mismatched => {
                    let error = ResultError::new(ErrorCode::RetryLimitExceeded);
                    self.finish(&mut tx, Status::Failed, TransactionResult::failure(error)).await?;
                    return Err(ApiError::new(ErrorCode::RetryLimitExceeded).recorded().into());
                }
                CodeCheck::Failed(error) => {
                    self.finish(&mut tx, Status::Failed, TransactionResult::failure(error)).await?;
                    return Err(failure_error(&tx).recorded().into());
                }
                // `provider_check` settles staleness; reaching here would be a bug.
                CodeCheck::Stale => {
                    return Err(GatewayError::Internal("a stale provider reference was not settled".into()));
                }
            }
        }
        Err(GatewayError::Internal("confirm did not settle after repeated reads".into()))
    }

    /// A code the provider did not decide. Given back when the provider
    /// gave no usable answer or refused to check (`Unavailable`, which
    /// adapters also use for a check that timed out or met a 5xx;
    /// `Misconfigured`; `Rejected`, e.g. its rate limit): the user is not
    /// charged for handset's or the provider's trouble, the answer leaves the
    /// check as it was, and a provider that did count the code still enforces
    /// its own limit. Kept when the provider answered without deciding
    /// (`Failed`: a status or body that is not a verdict); if that was the
    /// last attempt, the check ends as failed with 5001, as the answer says,
    /// instead of staying pending with no attempt left.
    async fn unchecked_code(&self, tx: &mut Transaction, used: i32, error: GatewayError) -> GatewayError {
        let given_back = matches!(
            error,
            GatewayError::Provider(
                ProviderError::Unavailable { .. } | ProviderError::Misconfigured { .. } | ProviderError::Rejected(_)
            )
        );
        if given_back && let Err(store) = self.store.refund_attempt(tx.id).await {
            tracing::error!(transaction_id = %tx.id, error = %store, "could not give back an unused attempt");
        }
        if matches!(error, GatewayError::Provider(ProviderError::Failed { .. })) && used >= tx.max_attempts {
            tx.attempts_used = used;
            let ended =
                ResultError { message: AMBIGUOUS_CHECK.into(), ..ResultError::new(ErrorCode::ProvidersUnavailable) };
            match self.finish(tx, Status::Failed, TransactionResult::failure(ended)).await {
                Ok(true) => {
                    return ApiError::with_message(ErrorCode::ProvidersUnavailable, AMBIGUOUS_CHECK).recorded().into();
                }
                // Another request ended it first: its outcome stands.
                Ok(false) => {}
                Err(store) => {
                    tracing::error!(transaction_id = %tx.id, error = %store, "could not end a check with no attempt left");
                }
            }
        }
        error
    }

    /// Applies a code handset checked itself (`matched` against the stored
    /// hash) in one conditional write: the attempt, and the final state with
    /// its callback when the code decides the check. The succeeded
    /// transaction, or the refusal a wrong code earns (3102, or 3104 for the
    /// last one); `None` when the transaction changed since it was read
    /// (decide again on a fresh read), or used other than `expected`
    /// attempts.
    async fn apply_local_code(
        &self,
        tx: Transaction,
        matched: bool,
        now: DateTime<Utc>,
        expected: Option<i32>,
    ) -> Result<Option<Transaction>, GatewayError> {
        let phone = TransactionResult::Phone { phone: tx.phone.clone().unwrap_or_default() };
        let success = possession_result(&tx, phone);
        let exhausted = TransactionResult::failure(ResultError::new(ErrorCode::RetryLimitExceeded));
        let ended = |status: Status, result: &TransactionResult| Transaction {
            status,
            result: Some(result.clone()),
            updated_at: now,
            attempts_used: tx.attempts_used + 1,
            ..tx.clone()
        };
        // Only the callback this code can lead to is rendered.
        let on_success = if matched { outbox_for(&ended(Status::Succeeded, &success)) } else { None };
        let on_exhausted = if matched { None } else { outbox_for(&ended(Status::Failed, &exhausted)) };
        let attempt = LocalCodeAttempt {
            id: tx.id,
            now,
            matched,
            success: &success,
            exhausted: &exhausted,
            on_success: on_success.as_ref(),
            on_exhausted: on_exhausted.as_ref(),
            expected_attempts: expected,
        };
        let Some((status, used)) = self.store.attempt_local_code(attempt).await? else {
            return Ok(None);
        };
        match status {
            Status::Succeeded => {
                let succeeded = Transaction { attempts_used: used, ..ended(Status::Succeeded, &success) };
                crate::observe::finished(&succeeded);
                Ok(Some(succeeded))
            }
            Status::Failed => {
                crate::observe::finished(&ended(Status::Failed, &exhausted));
                Err(ApiError::new(ErrorCode::RetryLimitExceeded).recorded().into())
            }
            Status::Pending => Err(ApiError::new(ErrorCode::InvalidCode).recorded().into()),
        }
    }

    /// Asks the provider that sent the code to check it. A reference the
    /// provider no longer knows was most likely renewed by a concurrent
    /// confirm whose answer is being written: the stored one is read again
    /// (a few times, briefly) and the code asked again with it. If it never
    /// changes, the code could not be checked: it counts as a wrong one, so
    /// the check is never ended by a race (the attempts limit still ends it).
    ///
    /// Returns the verdict and the reference it was given for.
    async fn provider_check(
        &self,
        tx: &Transaction,
        code: &str,
    ) -> Result<(Renewed<CodeCheck>, Option<String>), GatewayError> {
        const REREADS: u32 = 4;
        let provider = self.provider(tx.provider)?;
        let sms = provider
            .sms()
            .ok_or_else(|| GatewayError::Internal(format!("{} sent a code it cannot check", provider.name())))?;
        let checked =
            crate::observe::provider_call(tx.provider, tx.product, "check_code", sms.check_code(tx, code)).await?;
        if checked.answer != CodeCheck::Stale {
            return Ok((checked, tx.provider_ref.clone()));
        }
        for _ in 0..REREADS {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let stored = self.store.transaction(tx.id).await?.ok_or_else(not_found)?;
            if stored.is_final() {
                break;
            }
            if stored.provider_ref != tx.provider_ref {
                let again =
                    crate::observe::provider_call(tx.provider, tx.product, "check_code", sms.check_code(&stored, code))
                        .await?;
                if again.answer != CodeCheck::Stale {
                    return Ok((again, stored.provider_ref));
                }
                break;
            }
        }
        tracing::warn!(provider = %tx.provider, transaction_id = %tx.id, "the provider no longer knows this check's reference; counted as a wrong code");
        Ok((Renewed::same_ref(CodeCheck::Mismatched), tx.provider_ref.clone()))
    }

    pub(super) async fn refresh_network(
        &self,
        tx: Transaction,
        token: Option<&str>,
    ) -> Result<Transaction, GatewayError> {
        let fetch = self.provider(tx.provider)?.fetch_result(&tx, token);
        let renewed = crate::observe::provider_call(tx.provider, tx.product, "fetch_result", fetch).await?;
        Ok(self.apply_renewed(tx, renewed).await?.ok_or_else(not_found)?)
    }
}

/// Why a check ended when the provider did not answer its last code.
const AMBIGUOUS_CHECK: &str =
    "The provider did not answer the check of the last code; no attempt is left, so the check has ended";

/// The answer to a confirm on a transaction that already failed: 3104 after
/// the attempts ran out, 3103 after its deadline, else 3105.
pub(super) fn failure_error(tx: &Transaction) -> ApiError {
    let code = tx.result.as_ref().and_then(TransactionResult::error_code);
    match code.and_then(ErrorCode::from_code) {
        Some(code @ (ErrorCode::RetryLimitExceeded | ErrorCode::CodeExpired)) => ApiError::new(code),
        _ => ApiError::new(ErrorCode::NotPossessionCheck),
    }
}
