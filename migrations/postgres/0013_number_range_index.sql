-- no-transaction
-- A range's recent SMS sends (the pumping guard reads them at every SMS start).
CREATE INDEX CONCURRENTLY IF NOT EXISTS transactions_number_range ON transactions (number_range, created_at)
    WHERE number_range IS NOT NULL;
