"""Text LoRA (transformers + PEFT) for causal LMs:

- `recipe`: `train`, read top to bottom (tokenizer and data → base model → LoRA → loop →
  export);
- `data` builds the training set: `formats` (text, prompt/completion, alpaca, chat rows and
  their loss masks), `plain` (the plain `{"text"}` reader), `chat` (chat templates, assistant
  spans), `packing` (packing and collation); `tiny`: a tiny offline causal LM for tests and the
  demo.

Importing this package imports nothing heavy; the registry imports `recipe` when a job runs.
"""
