"""Where users already work: an OpenAI-compatible HTTP server over the fused generation loop
(continuous batching) and the lm-evaluation-harness model. Nothing here fuses on its own: it
calls generation, scoring and tasks."""
