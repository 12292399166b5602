//! Background steps the job runner calls: expiring pending checks past their
//! deadline and polling providers for pending results.

use super::*;

impl Gateway {
    /// Ends up to `limit` pending transactions past their deadline (final 300
    /// with 3103, or 5001 for an identity match, with their callbacks). Returns how many this call ended.
    pub async fn expire_due(&self, now: DateTime<Utc>, limit: i64) -> Result<usize, GatewayError> {
        let due = self.store.expired_pending(now, limit).await?;
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
    pub async fn poll_due(self: &Arc<Self>, now: DateTime<Utc>, limit: i64) -> Result<usize, GatewayError> {
        let lease_until = now + chrono_delay(self.settings.poll_max);
        let due = self.store.claim_due_polls(now, lease_until, limit).await?;
        let mut polls = tokio::task::JoinSet::new();
        for tx in due {
            let gateway = self.clone();
            let span = tracing::info_span!("poll_result", transaction_id = %tx.id, provider = tx.provider.as_str());
            polls.spawn(tracing::Instrument::instrument(async move { gateway.poll_one(tx).await }, span));
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
    pub(super) async fn poll_one(&self, tx: Transaction) -> Result<bool, GatewayError> {
        let Some(provider) = self.providers.get(&tx.provider) else { return Ok(false) };
        match crate::observe::provider_call(tx.provider, tx.product, "fetch_result", provider.fetch_result(&tx, None))
            .await
        {
            Ok(renewed) => {
                if self.apply_renewed(tx.clone(), renewed).await?.is_some_and(|t| t.is_final()) {
                    return Ok(true);
                }
            }
            Err(error) => {
                tracing::warn!(provider = %tx.provider, transaction_id = %tx.id, %error, "polling a provider failed")
            }
        }
        // The claim counted this poll already: the first wait after it is `poll_min`.
        let delay = backoff(self.settings.poll_min, self.settings.poll_max, tx.poll_attempts - 1);
        self.store.schedule_poll(tx.id, self.now() + chrono_delay(delay)).await?;
        Ok(false)
    }
}

impl Gateway {
    /// Forgets in-memory rate windows that ended before `before` (partners
    /// gone quiet), keeping memory bounded by the active ones.
    pub fn forget_rate_windows(&self, before: DateTime<Utc>) {
        self.limiter.forget_before(before);
    }
}

/// `min * 2^attempts`, at most `max`.
pub(super) fn backoff(min: std::time::Duration, max: std::time::Duration, attempts: i32) -> std::time::Duration {
    let factor = 2u32.saturating_pow(attempts.clamp(0, 20) as u32);
    min.saturating_mul(factor).min(max)
}
