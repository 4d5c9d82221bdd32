-- 0007: interaction events of schema version 2 (chat API parity).
--
-- interactions.endpoint   'chat' or 'completions' (legacy text completions, whose raw
--                         prompt is `prompt` and whose `messages` are empty). Training
--                         reads chat interactions only: a raw prompt is not in the chat
--                         template the policy is trained with.
-- interaction_choices.tool_calls
--                         the function calls an answer made ([{id, name, arguments}]);
--                         NULL for plain text answers and for version-1 events. Training
--                         skips answers that called tools (docs/training.md).

ALTER TABLE interactions ADD COLUMN endpoint text NOT NULL DEFAULT 'chat'
    CHECK (endpoint IN ('chat', 'completions'));
ALTER TABLE interactions ADD COLUMN prompt text;
ALTER TABLE interaction_choices ADD COLUMN tool_calls jsonb;
-- interactions.tool_turns true when the conversation sent holds tool turns (a tool
--                         result, or an assistant turn that called tools); training
--                         skips those conversations too.
ALTER TABLE interactions ADD COLUMN tool_turns boolean NOT NULL DEFAULT false;
