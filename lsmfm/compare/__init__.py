"""`lsmfm compare`: pretrained vs scratch vs 2D foundation-model baselines on the same volumes (see `run`)."""
