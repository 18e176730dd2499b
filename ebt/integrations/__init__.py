"""Adapters to the tools language models are compared with, each an optional extra:
`ebt.integrations.lm_eval` (lm-evaluation-harness: `pip install -e '.[lm_eval]'`)."""
