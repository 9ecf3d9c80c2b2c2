"""2D vision-foundation-model baselines with parameter-efficient finetuning."""
