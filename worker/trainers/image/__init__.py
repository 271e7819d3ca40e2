"""Image LoRA (diffusers + PEFT), one module per part of the recipe:

- `recipe`: `train`, read top to bottom (data → base model → LoRA → work done once → loop →
  export); `parts`: the steps `recipe` and `flux_recipe` share (LoRA config, work done once,
  optimizer, metrics); `objective`: the denoising target, SNR and min-SNR weights;
- `models`: loading a diffusers base and recognising its family (SD 1.x/2.x, SDXL) from its
  config; `tiny` / `tiny_learnable`: tiny offline pipelines and data sets for tests and the demo;
- `data` builds the training set from `sources` (captions, kohya, imagefolder layouts),
  `captions` (trigger word, dropout, tag shuffle), `buckets` (aspect buckets and the batch
  sampler), `pixels` (decoding, resizing, cropping); `latents`: what is encoded once, and the
  latent cache;
- `kohya`: the A1111 / ComfyUI file and its metadata; `samples`: validation grids.
- Flux.1: `flux` (recognition from the transformer config, `load_flux_models`, prompt
  encoders, sigma sampling, the flow-matching loss), `flux_recipe` (`train_flux`, reached from
  `recipe.train`), `flux_names` (kohya names, fused qkv / linear1), `flux_tiny`.

Importing this package imports nothing heavy; the registry imports `recipe` when a job runs.
"""
