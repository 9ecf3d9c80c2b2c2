"""Patch streaming for pretraining: every config of the stream (`config`), where each sample comes from
(`sampling`), the per-patch chunk read (`chunk_reader`), augmentation (`augment`) and the dataset and
loader (`dataset`)."""
