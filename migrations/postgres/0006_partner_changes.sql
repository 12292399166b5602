-- Every change to partners, by handset or by hand, is announced on the
-- `handset_partners` channel when its transaction commits, so replicas
-- empty their in-memory partner cache at once (see handset-core's
-- partner_cache). The payload is empty: a listener forgets every partner.
CREATE FUNCTION handset_partners_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('handset_partners', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER partners_changed
AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON partners
FOR EACH STATEMENT EXECUTE FUNCTION handset_partners_changed();
