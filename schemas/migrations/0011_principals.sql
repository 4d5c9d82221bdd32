-- 0011: principals (serving/api_keys.py; docs/feedback.md, "Who may rate").
--
-- Every interaction, rating and preference records the API key's name it came through
-- (its principal): which product asked, which one rated. Rows written before keys existed
-- (and under ALIGNLOOP_INSECURE_NO_AUTH, `anonymous`) say so. The index lets the canary and
-- the training data cap one principal's weight without scanning the table.

ALTER TABLE interactions ADD COLUMN principal text;
ALTER TABLE feedback_events ADD COLUMN principal text;
ALTER TABLE preferences ADD COLUMN principal text;

CREATE INDEX feedback_events_principal ON feedback_events (principal, occurred_at);
