-- The order a start tried its providers in, and why (`routing` on the
-- transaction: strategy, order, reason, scores), as JSON text. NULL on
-- transactions from before.
ALTER TABLE transactions ADD COLUMN routing TEXT;
