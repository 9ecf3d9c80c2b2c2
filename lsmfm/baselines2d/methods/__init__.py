"""One module per PEFT method; each defines `apply(model, cfg)` (see lsmfm.baselines2d.registry)."""
