"""Dataset readers: each turns a pulled dataset path into training batches.

Image jobs — `build_image_dataset(data_dir, spec) -> ImageTrainSet` (`image_dataset.py`):
layouts in `image_sources.py` (captions, kohya `N_concept`, HF imagefolder), caption options in
`captions.py`, aspect buckets and the one-bucket batch sampler in `buckets.py`, what may be
encoded once and the latent cache in `latent_cache.py`, file decoding in `images.py`.

Text jobs — `build_text_dataset(data_path, spec, tokenizer) -> TextTrainSet` (`text_dataset.py`):
row formats in `text_formats.py` (text, prompt/completion, alpaca, chat), chat templates and
assistant spans in `chat.py`, packing and collation in `packing.py`, the JSONL parser in
`jsonl.py`; `text.py` keeps the plain `{"text"}` reader.

Every data problem is a `UserDataError` naming the file (and the line, for JSONL). Batch order
and every per-sample random choice are pure functions of (seed, step), so resume needs only the
step.
"""
