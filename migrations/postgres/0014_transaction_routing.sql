-- The order a start tried its providers in, and why (`routing` on the
-- transaction: strategy, order, reason, scores). NULL on transactions from
-- before; adding a nullable column rewrites nothing.
ALTER TABLE transactions ADD COLUMN routing JSONB;
