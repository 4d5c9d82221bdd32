-- 0011: principals (serving/api_keys.py; docs/feedback.md, "Who may rate").
--
-- Every interaction, rating and preference records the API key's name it came through
-- (its principal): which product asked, which one rated. Rows written before keys existed
-- are NULL; under ALIGNLOOP_INSECURE_NO_AUTH the principal is `anonymous`. The index lets
-- the canary and the training data cap one principal's weight without scanning the table.
-- Server faults record the principal too (the 5xx guardrail needs several principals'
-- failures), with the model asked for and the routing arm.

ALTER TABLE interactions ADD COLUMN principal text;
ALTER TABLE feedback_events ADD COLUMN principal text;
ALTER TABLE preferences ADD COLUMN principal text;

CREATE INDEX feedback_events_principal ON feedback_events (principal, occurred_at);

ALTER TABLE request_failures ADD COLUMN model text;
ALTER TABLE request_failures ADD COLUMN arm text;
ALTER TABLE request_failures ADD COLUMN principal text;
